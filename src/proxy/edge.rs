//! [`EdgeProxy`]: the `ProxyHttp` that `chatgate serve` runs. WebSocket upgrades it
//! admits are made with the upstream here and relayed by [`super::relay`] (contract §4:
//! live sessions end when their token does), when the connection runs under
//! [`super::head::HeadLimitedApp`] as in [`super::run`]; otherwise (an embedder's own
//! service) Pingora tunnels them and [`LiveWatch`] ends them with the next bytes.

use super::access_log::AccessRecord;
use super::filter::{ChatAuthFilter, Verdict, write_rejection};
use super::live::LiveWatch;
use super::metrics::ProxyMetrics;
use super::relay::{RelayHub, RequestGuard, UpgradeReply, Upgraded};
use crate::config::{ConfigSnapshot, UpstreamSettings};
use crate::error::{AuthError, Rejection};
use crate::gate::{Identity, RequestParts};
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::connectors::TransportConnector;
use pingora::modules::http::HttpModules;
use pingora::prelude::*;
use pingora::protocols::http::v1::client::{
    HttpSession as UpstreamSession, http_req_header_to_wire,
};
use pingora::proxy::FailToProxy;
use pingora::time::fast_timeout::fast_timeout;
use pingora::{ErrorSource, ErrorType};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Why `[upstream]` gives no peers to proxy to.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// `addresses = []`.
    #[error("[upstream] addresses is empty")]
    NoAddresses,
    /// An address that does not resolve.
    #[error("upstream {address}: {source}")]
    Resolve {
        /// The address as configured.
        address: String,
        /// The resolver's error.
        source: std::io::Error,
    },
    /// An address that resolves to nothing.
    #[error("upstream {0}: no address")]
    NoAddress(String),
}

/// The edge proxy: [`ChatAuthFilter`] in front of `[upstream] addresses`.
pub struct EdgeProxy {
    auth: ChatAuthFilter,
    upstreams: Upstreams,
    /// Opens the upstream side of relayed WebSockets (never pooled).
    connector: TransportConnector,
    hub: Arc<RelayHub>,
}

/// Per-request state of [`EdgeProxy`].
#[derive(Debug, Default)]
pub struct EdgeCtx {
    /// The verified caller (`None` on public paths and before the gate ran).
    pub identity: Option<Identity>,
    /// The request is a WebSocket upgrade.
    pub websocket: bool,
    /// The upstream accepted the upgrade: counted in `chatgate_websockets_open`.
    pub websocket_open: bool,
    /// Upstream peers tried so far.
    pub attempts: usize,
    /// Index of the peer last tried, so a retry goes to the next one.
    pub peer: Option<usize>,
    /// An open WebSocket's token watch: ends the connection when the token does.
    pub live: Option<LiveWatch>,
    /// What the access log line of this request says.
    pub access: AccessRecord,
    /// The upgrade was made here and the session handed to the relay.
    pub relayed: bool,
    /// Counts the request as in progress for a drain.
    _in_progress: Option<RequestGuard>,
}

impl EdgeProxy {
    /// A proxy over `auth`, with peers built from the current `[upstream]`.
    pub fn new(auth: ChatAuthFilter) -> Result<Self, UpstreamError> {
        let upstreams = Upstreams::new(&auth.gate().config().load().upstream)?;
        let hub = Arc::new(RelayHub::new(auth.metrics().clone()));
        Ok(EdgeProxy {
            auth,
            upstreams,
            connector: TransportConnector::new(None),
            hub,
        })
    }

    /// The relayed WebSocket sessions and requests in progress (for a drain).
    pub fn hub(&self) -> &Arc<RelayHub> {
        &self.hub
    }

    /// The filter (and through it the gate and metrics).
    pub fn auth(&self) -> &ChatAuthFilter {
        &self.auth
    }

    fn metrics(&self) -> &ProxyMetrics {
        self.auth.metrics()
    }
}

#[async_trait]
impl ProxyHttp for EdgeProxy {
    type CTX = EdgeCtx;

    fn new_ctx(&self) -> Self::CTX {
        EdgeCtx {
            _in_progress: Some(self.hub.request()),
            ..EdgeCtx::default()
        }
    }

    // No response compression module: chatgate never compresses, and installing the
    // disabled default still costs time on every request (perf-notes).
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    async fn early_request_filter(
        &self,
        session: &mut Session,
        _ctx: &mut Self::CTX,
    ) -> Result<()> {
        // The head is read: the rest of the request is no longer bounded as a head.
        super::head::head_read(session);
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        // Contract §6 rule 9. Without this, Pingora 0.9.1 treats bytes that arrive while
        // a request is being proxied as an error ("Sent data after end of body") and
        // answers the request, which the upstream already has, with a bare 400. With it,
        // those bytes are kept as the next request and answered in order; the setting
        // carries over to the connection's later requests.
        session.as_downstream_mut().set_pipelining_enabled(true);
        // Pingora's own default is 60 s; the setting makes it the operator's (and a
        // test's) and keeps both engines alike. Per request: a reload applies to the next.
        let body_timeout = self.auth.gate().config().load().server.client_body_timeout;
        session.set_read_timeout(Some(body_timeout));
        ctx.websocket = RequestParts::from(&**session.req_header()).is_websocket_upgrade();
        let (verdict, refused) = self.auth.decide(session).await?;
        if let Some(refused) = refused {
            ctx.access.code = Some(refused.code);
            ctx.access.refused_app = Some(refused.app);
        }
        match verdict {
            Verdict::Responded => Ok(true),
            Verdict::Forward(identity) => {
                ctx.identity = identity;
                if ctx.websocket {
                    // Pingora reads a client body (and so an upgraded stream) with a 60 s
                    // timeout by default: an idle chat socket would be cut after a minute.
                    let idle = self
                        .auth
                        .gate()
                        .config()
                        .load()
                        .upstream
                        .websocket_idle_timeout;
                    session.set_read_timeout(Some(idle));
                    session.set_write_timeout(Some(idle));
                    if super::head::can_hand_off(session) {
                        self.relay_upgrade(session, ctx).await?;
                        return Ok(true);
                    }
                }
                Ok(false)
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        ctx.attempts += 1;
        ctx.access.upstream_picked();
        let config = self.auth.gate().config().load();
        let (index, peer) = self.upstreams.pick(&config, ctx.websocket, ctx.peer);
        ctx.peer = Some(index);
        Ok(peer)
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        self.upstream_request(upstream_request, ctx.identity.as_ref())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        ctx.access.upstream_answered();
        if ctx.websocket
            && !ctx.websocket_open
            && upstream_response.status == http::StatusCode::SWITCHING_PROTOCOLS
        {
            ctx.websocket_open = true;
            self.metrics().websocket_opened();
            if let Some(identity) = &ctx.identity {
                ctx.live = LiveWatch::start(self.auth.gate(), identity);
            }
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<bytes::Bytes>,
        _end_of_stream: bool,
        ctx: &mut Self::CTX,
    ) -> Result<Option<std::time::Duration>> {
        if let Some(live) = &mut ctx.live {
            live.filter_downstream(body);
        }
        Ok(None)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        _body: &mut Option<bytes::Bytes>,
        _end_of_stream: bool,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        // A client of an ended session sends nothing more upstream: ending the
        // connection makes its SDK reconnect, and the reconnect gets the code-40 frame.
        match ctx.live.as_ref().and_then(LiveWatch::ended) {
            Some(end) => Error::e_explain(ErrorType::Custom("live session ended"), end.reason()),
            None => Ok(()),
        }
    }

    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Self::CTX,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // Nothing reached the failed peer; idempotent requests try the next one, each
        // peer at most once.
        let peers = self.upstreams.current.load().http.len();
        if session.req_header().method.is_idempotent() && ctx.attempts < peers {
            e.set_retry(true);
        }
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut Self::CTX,
    ) -> FailToProxy {
        if ctx.live.as_ref().and_then(LiveWatch::ended).is_some() {
            // Our own end of a live session: not an upstream failure, nothing to answer.
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        }
        let error = match (e.esource(), e.etype()) {
            (ErrorSource::Upstream, kind) => upstream_error(kind),
            // The client went away (nobody to answer), or its body stalled or was
            // malformed: the contract's input error where Pingora would answer a bare
            // 400, as the forward engine does (`super::unreadable_request`).
            (ErrorSource::Downstream, _) => {
                let Some(error) = super::unreadable_request(e) else {
                    return FailToProxy {
                        error_code: 0,
                        can_reuse_downstream: false,
                    };
                };
                ctx.access.code = Some(error.code());
                if session.response_written().is_none() {
                    session.set_keepalive(None);
                    let rejection = Rejection::http(&error).closing();
                    if let Err(write_error) = write_rejection(session, rejection).await {
                        tracing::debug!(target: "chatgate::proxy", %write_error, "could not answer an unreadable request");
                    }
                }
                return FailToProxy {
                    error_code: error.status().as_u16(),
                    can_reuse_downstream: false,
                };
            }
            // Internal errors come from our own filters; the upstream was never reached
            // or did not answer, which is what a client can act on.
            _ => AuthError::UpstreamUnavailable,
        };
        self.metrics().upstream_failure(&error);
        ctx.access.code = Some(error.code());
        let status = error.status().as_u16();
        // Only a response not yet started can still be answered; otherwise the client
        // sees the connection close mid-body, which is all HTTP allows.
        if session.response_written().is_none() {
            session.set_keepalive(None);
            let rejection = Rejection::http(&error).closing();
            if let Err(write_error) = write_rejection(session, rejection).await {
                tracing::debug!(target: "chatgate::proxy", %write_error, "could not answer an upstream failure");
            }
        }
        FailToProxy {
            error_code: status,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Self::CTX) {
        if ctx.websocket_open {
            ctx.websocket_open = false;
            self.metrics().websocket_closed();
        }
        // A relayed upgrade's 101 goes to the client from the relay, after this.
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .or(ctx.access.relayed_status);
        self.metrics().response(status, ctx.access.upstream_time);
        let config = self.auth.gate().config().load();
        ctx.access.emit(session, ctx.identity.as_ref(), &config);
    }

    // Pingora's default summary includes the query string, where WebSocket clients send
    // their token (contract §1: query tokens never reach the logs).
    fn request_summary(&self, session: &Session, _ctx: &Self::CTX) -> String {
        let request = session.req_header();
        format!("{} {}", request.method, request.uri.path())
    }
}

impl EdgeProxy {
    /// The request head the upstream receives: the identity headers (contract §6 rule
    /// 2, after hop-by-hop removal) and, for a TLS upstream, its Host.
    fn upstream_request(
        &self,
        upstream_request: &mut RequestHeader,
        identity: Option<&Identity>,
    ) -> Result<()> {
        self.auth
            .upstream_request_filter(upstream_request, identity)?;
        let peers = self.upstreams.current.load();
        if let Some(host) = &peers.tls_host {
            // A TLS upstream (e.g. Stream) routes on Host: send the name it is known by.
            upstream_request.insert_header(http::header::HOST, host.as_str())?;
        }
        Ok(())
    }

    /// Makes an admitted WebSocket upgrade with the upstream and, on its 101, leaves
    /// the session for the relay (see [`super::relay`]); any other answer is copied to
    /// the client. Connect failures try each peer once, as `fail_to_connect` does.
    async fn relay_upgrade(&self, session: &mut Session, ctx: &mut EdgeCtx) -> Result<()> {
        let config = self.auth.gate().config().load();
        let mut request = session.req_header().clone();
        if let Err(error) = super::relay::strip_hop_by_hop(&mut request) {
            // What Pingora answers to a request it cannot forward.
            tracing::debug!(target: "chatgate::proxy", %error, "upgrade request refused");
            session.set_keepalive(None);
            session.respond_error(400).await?;
            return Ok(());
        }
        self.upstream_request(&mut request, ctx.identity.as_ref())?;
        ctx.access.upstream_picked();
        let reply = match http_req_header_to_wire(&request) {
            Some(wire) => self.reach_upstream(ctx, &config, &wire).await,
            None => Err(AuthError::UpstreamUnavailable),
        };
        let (upstream, head_and_early) = match reply {
            Ok(UpgradeReply::Switched {
                upstream,
                head_and_early,
            }) => (upstream, head_and_early),
            Ok(UpgradeReply::Other { response, reply }) => {
                ctx.access.upstream_answered();
                return self
                    .copy_refusal(session, *reply, response, config.upstream.read_timeout)
                    .await;
            }
            Err(error) => return self.upstream_failed(session, ctx, error).await,
        };
        ctx.access.upstream_answered();
        let upgraded = Upgraded::after_switch(
            upstream,
            head_and_early,
            ctx.identity.clone(),
            self.auth.gate(),
            &self.hub,
            config.upstream.websocket_idle_timeout,
            bytes::Bytes::new(),
        );
        if super::head::hand_off(session, upgraded).is_err() {
            // can_hand_off said yes on this very session: cannot happen.
            return Error::e_explain(ErrorType::InternalError, "no relay for the WebSocket");
        }
        // Pingora hands a kept-alive connection back to the loop that relays it (with
        // pipelining on, set above, bytes the client sent before the 101 do not stop
        // that; the hand-off forwards them).
        let downstream = session.as_downstream_mut();
        downstream.set_keepalive(Some(60));
        downstream.set_keepalive_reuses_remaining(None);
        ctx.relayed = true;
        ctx.access.relayed_status = Some(101);
        Ok(())
    }

    /// Connects to a WebSocket peer (a failed connect tries each peer once, as
    /// `fail_to_connect` does) and makes the upgrade handshake on it.
    async fn reach_upstream(
        &self,
        ctx: &mut EdgeCtx,
        config: &ConfigSnapshot,
        wire: &[u8],
    ) -> std::result::Result<UpgradeReply, AuthError> {
        let peers = self.upstreams.current.load().websocket.len();
        let mut failure = None;
        for _ in 0..peers.max(1) {
            ctx.attempts += 1;
            let (index, peer) = self.upstreams.pick(config, true, ctx.peer);
            ctx.peer = Some(index);
            match super::relay::connect_upstream(&self.connector, &peer, wire).await {
                Ok(connection) => {
                    return super::relay::upgrade_handshake(
                        connection,
                        &peer,
                        wire,
                        config.upstream.read_timeout,
                    )
                    .await;
                }
                Err(error) => failure = Some(error),
            }
        }
        tracing::debug!(target: "chatgate::proxy", error = ?failure, "no upstream for a WebSocket");
        Err(AuthError::UpstreamUnavailable)
    }

    /// Copies an upstream's refusal of an upgrade to the client, then closes.
    async fn copy_refusal(
        &self,
        session: &mut Session,
        mut upstream: UpstreamSession,
        response: Box<ResponseHeader>,
        read_timeout: std::time::Duration,
    ) -> Result<()> {
        session.set_keepalive(None);
        session.write_response_header(response, false).await?;
        // Bounded: each read within the read timeout, ended by the body's framing.
        loop {
            match fast_timeout(read_timeout, upstream.read_body_bytes()).await {
                Ok(Ok(Some(chunk))) => session.write_response_body(Some(chunk), false).await?,
                Ok(Ok(None)) => break,
                _ => {
                    // A body cut short: the client sees the connection close.
                    return Error::e_explain(ErrorType::ReadError, "upstream refusal body");
                }
            }
        }
        session.write_response_body(None, true).await
    }

    /// Answers an upgrade whose upstream failed as `fail_to_proxy` would.
    async fn upstream_failed(
        &self,
        session: &mut Session,
        ctx: &mut EdgeCtx,
        error: AuthError,
    ) -> Result<()> {
        self.metrics().upstream_failure(&error);
        ctx.access.code = Some(error.code());
        session.set_keepalive(None);
        write_rejection(session, Rejection::http(&error).closing()).await
    }
}

/// The contract's answer to a failed exchange with the upstream (both engines): past
/// a connect, read or write timeout the upstream timed out (504), else it is
/// unavailable (502).
pub(super) fn upstream_error(kind: &ErrorType) -> AuthError {
    match kind {
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
            AuthError::UpstreamTimeout
        }
        _ => AuthError::UpstreamUnavailable,
    }
}

// === impl Upstreams ===

/// Peers built once per `[upstream]` version, picked round robin. Building an
/// `HttpPeer` resolves its address; doing that per request would cost measurable time.
pub(super) struct Upstreams {
    pub(super) current: ArcSwap<PeerSet>,
    next: AtomicUsize,
}

pub(super) struct PeerSet {
    settings: UpstreamSettings,
    pub(super) http: Vec<HttpPeer>,
    pub(super) websocket: Vec<HttpPeer>,
    /// Host header for a TLS upstream.
    pub(super) tls_host: Option<String>,
}

impl Upstreams {
    pub(super) fn new(settings: &UpstreamSettings) -> Result<Self, UpstreamError> {
        Ok(Upstreams {
            current: ArcSwap::from_pointee(PeerSet::build(settings)?),
            next: AtomicUsize::new(0),
        })
    }

    /// The next peer round robin, or after `previous` when retrying (so a retry never
    /// lands on the peer that just failed while others exist).
    pub(super) fn pick(
        &self,
        config: &ConfigSnapshot,
        websocket: bool,
        previous: Option<usize>,
    ) -> (usize, Box<HttpPeer>) {
        let peers = self.refreshed(config);
        let list = if websocket {
            &peers.websocket
        } else {
            &peers.http
        };
        let index = self.index(list.len(), previous);
        (index, Box::new(list[index].clone()))
    }

    /// The peer set for `config`, rebuilt once when a reload changed `[upstream]`. A
    /// caller that picks from it with [`Upstreams::index`] cannot get an index of
    /// another set when a concurrent request rebuilds it meanwhile.
    pub(super) fn current_for(&self, config: &ConfigSnapshot) -> Arc<PeerSet> {
        arc_swap::Guard::into_inner(self.refreshed(config))
    }

    /// Index of the next of `len` peers round robin, or of the one after `previous`.
    pub(super) fn index(&self, len: usize, previous: Option<usize>) -> usize {
        match previous {
            Some(previous) => (previous + 1) % len,
            None => self.next.fetch_add(1, Ordering::Relaxed) % len,
        }
    }

    fn refreshed(&self, config: &ConfigSnapshot) -> arc_swap::Guard<Arc<PeerSet>> {
        let peers = self.current.load();
        if peers.settings == config.upstream {
            return peers;
        }
        // A reload changed [upstream]: rebuild once; concurrent rebuilds are equal.
        match PeerSet::build(&config.upstream) {
            Ok(set) => {
                self.current.store(Arc::new(set));
                self.current.load()
            }
            Err(message) => {
                tracing::error!(target: "chatgate::proxy", %message, "keeping the previous upstreams");
                peers
            }
        }
    }
}

impl PeerSet {
    fn build(settings: &UpstreamSettings) -> Result<Self, UpstreamError> {
        if settings.addresses.is_empty() {
            return Err(UpstreamError::NoAddresses);
        }
        let mut http = Vec::with_capacity(settings.addresses.len());
        let mut websocket = Vec::with_capacity(settings.addresses.len());
        let mut tls_host = None;
        for address in &settings.addresses {
            let resolved: SocketAddr = address
                .to_socket_addrs()
                .map_err(|source| UpstreamError::Resolve {
                    address: address.clone(),
                    source,
                })?
                .next()
                .ok_or_else(|| UpstreamError::NoAddress(address.clone()))?;
            let host = address
                .rsplit_once(':')
                .map_or(address.as_str(), |(host, _)| host)
                .trim_start_matches('[')
                .trim_end_matches(']');
            let sni = settings.sni.clone().unwrap_or_else(|| host.to_owned());
            if settings.tls {
                tls_host.get_or_insert_with(|| sni.clone());
            }
            let mut peer = HttpPeer::new(resolved, settings.tls, sni);
            peer.options.connection_timeout = Some(settings.connect_timeout);
            peer.options.read_timeout = Some(settings.read_timeout);
            peer.options.write_timeout = Some(settings.read_timeout);
            peer.options.verify_cert = settings.verify_cert;
            peer.options.verify_hostname = settings.verify_cert;
            let mut ws = peer.clone();
            // A chat socket may be quiet for long: its reads and writes wait up to the
            // WebSocket idle timeout instead of the HTTP read timeout.
            ws.options.read_timeout = Some(settings.websocket_idle_timeout);
            ws.options.write_timeout = Some(settings.websocket_idle_timeout);
            ws.options.idle_timeout = Some(settings.websocket_idle_timeout);
            http.push(peer);
            websocket.push(ws);
        }
        Ok(PeerSet {
            settings: settings.clone(),
            http,
            websocket,
            tls_host,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::upstreams::peer::Peer;
    use std::time::Duration;

    #[test]
    fn upstream_timeouts_are_504s_and_other_failures_502s() {
        for kind in [
            ErrorType::ConnectTimedout,
            ErrorType::ReadTimedout,
            ErrorType::WriteTimedout,
        ] {
            assert_eq!(
                upstream_error(&kind),
                AuthError::UpstreamTimeout,
                "{kind:?}"
            );
        }
        for kind in [
            ErrorType::ConnectRefused,
            ErrorType::ConnectError,
            ErrorType::ReadError,
            ErrorType::ConnectionClosed,
            ErrorType::InvalidHTTPHeader,
        ] {
            assert_eq!(
                upstream_error(&kind),
                AuthError::UpstreamUnavailable,
                "{kind:?}"
            );
        }
    }

    fn settings(addresses: &[&str]) -> UpstreamSettings {
        let mut config = ConfigSnapshot::with_apps(vec![]);
        config.upstream.addresses = addresses.iter().map(|a| a.to_string()).collect();
        config.upstream
    }

    #[test]
    fn peers_are_used_round_robin() {
        let mut config = ConfigSnapshot::with_apps(vec![]);
        config.upstream = settings(&["127.0.0.1:1001", "127.0.0.1:1002"]);
        let upstreams = Upstreams::new(&config.upstream).unwrap();
        let ports: Vec<u16> = (0..4)
            .map(|_| {
                upstreams
                    .pick(&config, false, None)
                    .1
                    .address()
                    .as_inet()
                    .unwrap()
                    .port()
            })
            .collect();
        assert_eq!(ports, [1001, 1002, 1001, 1002]);
    }

    #[test]
    fn a_retry_goes_to_the_peer_after_the_one_that_failed() {
        let mut config = ConfigSnapshot::with_apps(vec![]);
        config.upstream = settings(&["127.0.0.1:1001", "127.0.0.1:1002", "127.0.0.1:1003"]);
        let upstreams = Upstreams::new(&config.upstream).unwrap();
        for failed in 0..3 {
            let (index, peer) = upstreams.pick(&config, false, Some(failed));
            assert_eq!(index, (failed + 1) % 3);
            assert_eq!(
                peer.address().as_inet().unwrap().port(),
                1001 + index as u16
            );
        }
    }

    #[test]
    fn websocket_peers_wait_for_the_idle_timeout() {
        let mut config = ConfigSnapshot::with_apps(vec![]);
        config.upstream = settings(&["127.0.0.1:1001"]);
        config.upstream.websocket_idle_timeout = Duration::from_secs(3600);
        config.upstream.read_timeout = Duration::from_secs(5);
        let upstreams = Upstreams::new(&config.upstream).unwrap();
        let ws = upstreams.pick(&config, true, None).1;
        assert_eq!(ws.options.read_timeout, Some(Duration::from_secs(3600)));
        let http = upstreams.pick(&config, false, None).1;
        assert_eq!(http.options.read_timeout, Some(Duration::from_secs(5)));
    }

    #[test]
    fn a_changed_upstream_section_rebuilds_the_peers() {
        let mut config = ConfigSnapshot::with_apps(vec![]);
        config.upstream = settings(&["127.0.0.1:1001"]);
        let upstreams = Upstreams::new(&config.upstream).unwrap();
        config.upstream = settings(&["127.0.0.1:2002"]);
        let peer = upstreams.pick(&config, false, None).1;
        assert_eq!(peer.address().as_inet().unwrap().port(), 2002);
    }

    #[test]
    fn tls_peers_use_the_configured_sni() {
        let mut upstream = settings(&["127.0.0.1:443"]);
        upstream.tls = true;
        upstream.sni = Some("chat.stream-io-api.com".into());
        let set = PeerSet::build(&upstream).unwrap();
        assert_eq!(set.http[0].sni, "chat.stream-io-api.com");
        assert_eq!(set.tls_host.as_deref(), Some("chat.stream-io-api.com"));
        assert!(PeerSet::build(&settings(&[])).is_err());
    }
}
