//! `[server] engine = "forward"` (the binary's default since issue 16's measurement): a
//! forward loop of chatgate's own on pingora-core's public API, next to the `ProxyHttp`
//! filter engine (`edge`), which embedders of chatgate in their own Pingora proxy use.
//!
//! Contract §6 holds as in the filter engine, by the same functions: the client's
//! identity headers are stripped and the target rewritten to its normal form before the
//! [`Gate`](crate::gate::Gate) decides (rules 2, 3), revocation bodies are read and
//! recorded before they are forwarded (rule 4), the head limits are the same
//! [`HeadGuard`](super::head::HeadGuard) (rule 6), pipelined requests are answered in
//! order (rule 9: pipelining is enabled on every session and the bytes read ahead are
//! handed to the next one). Hop-by-hop headers and every header the client names in
//! `Connection` are removed before the identity headers are written (rule 2), as
//! Pingora's `sanitize_h1_upstream_request` does for the filter engine.
//!
//! Why the design is so (the hypothesis): the filter engine's upstream hop
//! clones the request header and goes through Pingora's shared connection pool per
//! request (a lock, a oneshot, a `Notify`, a spawned idle watcher, a `getpeername`).
//! Here the client connection's task owns one upstream connection and reuses it for the
//! connection's requests (client affinity, as HAProxy does by default), takes it from
//! the shared idle pool ([`super::upstream_pool`]) when it has none, and gives it back
//! there when the client connection ends (HAProxy's `http-reuse always`); the upstream
//! request head is serialised from the client's own header, edited in place (no clone),
//! and the serialised bytes are what a retry resends.
//!
//! Failures: connect errors of idempotent requests move to the next peer (each peer at
//! most once); an idempotent request without a body that finds its reused upstream
//! connection (its own or a pooled one) closed before any response byte is resent once
//! on a fresh connection. A pooled connection is checked for being closed before it is
//! used; the client's own is checked only by requests that cannot be resent.
//! Upstream failures are answered 502/504 in the contract's shape and close the client
//! connection, as in the filter engine.
//!
//! WebSocket upgrades are decided and made by [`upgrade`] (one parse, one decision),
//! then relayed by [`super::relay`]. Not handled here: other upgrades go to the filter
//! engine with the connection (the head is handed over as a pipelined prefix, see
//! `hand_over`), and so do HTTP/2 connections (`[server.tls]` with ALPN `h2`). TLS to clients and to the upstream is
//! Pingora's in both engines (the listener; `TransportConnector`).

use super::access_log::AccessRecord;
use super::edge::{EdgeProxy, Upstreams, upstream_error};
use super::filter::{
    ChatAuthFilter, DRAIN_TIMEOUT, MAX_DRAINED_BODY, MAX_REVOCATION_BODY, normal_target,
    strip_identity_headers,
};
use super::head::{self, Connection, HeadLimitedApp};
use super::relay::RelayHub;
use super::upstream_pool::{IDLE_PER_PEER, IDLE_TIMEOUT, IdlePool, SWEEP_EVERY};
use crate::config::ConfigSnapshot;
use crate::error::{AuthError, Rejection};
use crate::gate::{Decision, Identity, RequestParts};
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::header;
use pingora::apps::ServerApp;
use pingora::connectors::TransportConnector;
use pingora::http::ResponseHeader;
use pingora::protocols::Stream;
use pingora::protocols::http::ServerSession;
use pingora::protocols::http::v1::client::{
    HttpSession as UpstreamSession, http_req_header_to_wire,
};
use pingora::protocols::http::v1::server::HttpSession as ClientSession;
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use pingora::{ErrorType, RetryType};
use std::sync::Arc;
use std::time::Instant;
use tokio::io::AsyncWriteExt;

mod upgrade;

/// Most informational (1xx) responses skipped before the final one.
const MAX_INFORMATIONAL: usize = 16;

/// The forward engine: the listening service's `ServerApp`.
pub struct ForwardApp {
    auth: ChatAuthFilter,
    upstreams: Upstreams,
    connector: TransportConnector,
    /// Counts the requests in progress for a drain, with the filter engine's.
    hub: Arc<RelayHub>,
    /// The filter engine, for upgrades to other protocols and HTTP/2.
    filter: Arc<HeadLimitedApp<HttpProxy<EdgeProxy>>>,
    /// Idle upstream connections between client connections.
    pool: Arc<IdlePool<super::edge::PeerSet, Stream>>,
}

/// Closes the forward engine's expired idle upstream connections every
/// [`SWEEP_EVERY`] (a Pingora background service).
pub(crate) struct IdleSweep {
    pool: Arc<IdlePool<super::edge::PeerSet, Stream>>,
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for IdleSweep {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                () = tokio::time::sleep(SWEEP_EVERY) => self.pool.sweep(),
            }
        }
    }
}

impl ForwardApp {
    /// The forward engine over `auth`; upgrades go to `filter`, whose requests and
    /// relayed sessions `hub` counts.
    pub(crate) fn new(
        auth: ChatAuthFilter,
        hub: Arc<RelayHub>,
        filter: Arc<HeadLimitedApp<HttpProxy<EdgeProxy>>>,
    ) -> Result<Self, super::UpstreamError> {
        let upstreams = Upstreams::new(&auth.gate().config().load().upstream)?;
        Ok(ForwardApp {
            auth,
            upstreams,
            connector: TransportConnector::new(None),
            hub,
            filter,
            pool: Arc::new(IdlePool::new(*IDLE_PER_PEER, IDLE_TIMEOUT)),
        })
    }

    /// The background service that closes idle upstream connections past their
    /// timeout when no request comes to do it.
    pub(crate) fn idle_sweep(&self) -> IdleSweep {
        IdleSweep {
            pool: self.pool.clone(),
        }
    }

    /// Gives a client connection's idle upstream connection to the pool.
    fn release(&self, owned: Owned) {
        self.pool.put(
            &self.upstreams.current.load(),
            &owned.set,
            owned.peer,
            owned.stream,
            owned.idle_since,
        );
    }
}

/// The upstream connection a client connection owns.
struct Owned {
    stream: Stream,
    /// Index of its peer in `set`.
    peer: usize,
    /// The peer set it was opened from: a reload of `[upstream]` retires it.
    set: Arc<super::edge::PeerSet>,
    /// When its last response ended (when it was opened, until then).
    idle_since: Instant,
}

/// A client connection's upstream connection between its requests, given to the pool
/// when the client connection ends, however it ends (only an idle, reusable connection
/// is ever held here: a request takes it out and puts it back after a whole response).
struct Held<'a> {
    app: &'a ForwardApp,
    owned: Option<Owned>,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Some(owned) = self.owned.take() {
            self.app.release(owned);
        }
    }
}

/// How one request ended, for the connection loop.
enum Served {
    /// Answered: the client connection may serve the next request.
    Next,
    /// The client connection ends.
    Close,
}

#[async_trait]
impl ServerApp for ForwardApp {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // HTTP/2 (TLS with ALPN `h2`) is the filter engine's.
        if stream.selected_alpn_proto() == Some(pingora::protocols::ALPN::H2) {
            return self.filter.process_new(stream, shutdown).await;
        }
        let (mut stream, conn) = head::guard(stream, self.auth.gate().config());
        let mut prefix: Option<BytesMut> = None;
        let mut upstream = Held {
            app: self,
            owned: None,
        };
        // Bounded by the client: each round serves one request or ends the connection.
        loop {
            let mut session = ClientSession::new(stream);
            if let Some(prefix) = prefix.take() {
                session.set_pipelined_prefix(prefix);
            }
            session.set_server_keepalive(if *shutdown.borrow() {
                None
            } else {
                Some(head::KEEPALIVE)
            });
            match session.read_request().await {
                Ok(Some(_)) => {}
                Ok(None) => return None,
                Err(error) => {
                    if error.etype() != &ErrorType::ConnectionClosed {
                        bad_request(&mut session).await;
                    }
                    return None;
                }
            }
            head::end_head(&conn);
            session.set_pipelining_enabled(true);
            if session.is_upgrade_req() {
                // WebSocket upgrades are made here (`upgrade`); any other goes to the
                // filter engine.
                if let Err(session) = self.upgrade(session).await {
                    self.hand_over(session, &conn, shutdown).await;
                }
                return None;
            }
            if *shutdown.borrow() {
                session.set_server_keepalive(None);
            }
            match self.serve(&mut session, &mut upstream.owned).await {
                Served::Next => {}
                Served::Close => {
                    session.shutdown().await;
                    return None;
                }
            }
            match session.reuse().await {
                Ok(Some(reusable)) => (stream, prefix) = reusable.into_parts(),
                _ => return None,
            }
            head::next_request(&conn);
        }
    }

    async fn cleanup(&self) {
        ServerApp::cleanup(&*self.filter).await;
    }
}

impl ForwardApp {
    /// Gives the connection, with the upgrade request's head as a pipelined prefix, to
    /// the filter engine, which decides it again and relays the WebSocket. What the
    /// client sent behind the head (frames before the 101) is not lost with this
    /// session's buffer: the [`HeadGuard`](super::head::HeadGuard) kept it for the
    /// relay, tagged with this request, which the filter engine's first request is.
    async fn hand_over(&self, session: ClientSession, conn: &Connection, shutdown: &ShutdownWatch) {
        let head_bytes = session.get_headers_raw_bytes();
        let stream = session.into_inner();
        let mut next = ClientSession::new(stream);
        next.set_pipelined_prefix(BytesMut::from(&head_bytes[..]));
        next.set_server_keepalive(Some(head::KEEPALIVE));
        self.filter
            .serve(ServerSession::H1(next), conn, shutdown)
            .await;
    }

    /// The gate's decision on the request `session` has read (contract §6: the client's
    /// identity headers stripped and the target put in its normal form first, so what
    /// is judged is what is forwarded), with the instant its check started, which also
    /// starts the access log's latency (the head has just been read; the two edits take
    /// well under a µs). `None` when the target has no normal form: the connection ends.
    async fn decide(
        &self,
        session: &mut ClientSession,
    ) -> Option<(Instant, Result<Decision, AuthError>)> {
        let header = session.req_header_mut();
        strip_identity_headers(header);
        normal_target(header).ok()?;
        let started = Instant::now();
        let peer = session
            .client_addr()
            .and_then(|address| address.as_inet())
            .map(|address| address.ip());
        let decision = self
            .auth
            .gate()
            .check(RequestParts::from(&**session.req_header()).with_peer(peer))
            .await;
        self.auth.metrics().observe_check(started.elapsed());
        Some((started, decision))
    }

    /// One request: the gate's decision, then the refusal or the upstream's answer.
    async fn serve(&self, session: &mut ClientSession, upstream: &mut Option<Owned>) -> Served {
        // A drain waits for it, as for the filter engine's requests.
        let _in_progress = self.hub.request();
        let gate = self.auth.gate();
        // One snapshot for the whole request (a reload applies from the next one): a
        // full `Arc`, as it is held across the request's waits, where arc-swap's guards
        // are not meant to stay.
        let config = gate.config().load_full();
        // The pause allowed between two reads of the client's body, as the filter engine
        // sets it: the revocation body, the streamed body and the drain of a refused one.
        session.set_read_timeout(Some(config.server.client_body_timeout));
        let Some((started, decision)) = self.decide(session).await else {
            return Served::Close;
        };
        let mut access = AccessRecord::started_at(started);
        let metrics = self.auth.metrics();
        let mut body: Option<Bytes> = None;
        let identity = match decision {
            Ok(Decision::Public) => Ok(None),
            Ok(Decision::Allow(identity)) => Ok(Some(identity)),
            Ok(Decision::Revocation(identity, endpoint)) => match read_small_body(session).await {
                Ok(Ok(bytes)) => {
                    let applied = gate.apply_revocation(&identity, endpoint, &bytes).await;
                    body = Some(bytes);
                    applied.map(|()| Some(identity))
                }
                Ok(Err(error)) => Err(error),
                Err(error) => return client_failed(session, &error).await,
            },
            Err(error) => Err(error),
        };
        let identity = match identity {
            Ok(identity) => {
                if let Some(identity) = &identity {
                    metrics.allowed(&identity.app);
                }
                identity
            }
            Err(error) => {
                let app = self.auth.record_refusal(session.req_header(), &error);
                access.code = Some(error.code());
                access.refused_app = Some(app);
                let served = refuse(session, &error).await;
                self.log(session, &access, None, &config);
                return served;
            }
        };
        let served = self
            .forward(
                session,
                upstream,
                identity.as_ref(),
                body,
                &mut access,
                &config,
            )
            .await;
        self.log(session, &access, identity.as_ref(), &config);
        served
    }

    fn log(
        &self,
        session: &ClientSession,
        access: &AccessRecord,
        identity: Option<&Identity>,
        config: &ConfigSnapshot,
    ) {
        let status = session.response_written().map(|r| r.status.as_u16());
        self.auth.metrics().response(status, access.upstream_time);
        access.emit_parts(
            session.req_header(),
            status,
            session.client_addr(),
            identity,
            config,
        );
    }

    /// Sends the allowed request upstream and its answer to the client.
    async fn forward(
        &self,
        session: &mut ClientSession,
        upstream: &mut Option<Owned>,
        identity: Option<&Identity>,
        read_body: Option<Bytes>,
        access: &mut AccessRecord,
        config: &ConfigSnapshot,
    ) -> Served {
        let peers = self.upstreams.current_for(config);
        // Read before the hop-by-hop headers (`Expect` among them) are removed: the
        // client hears 100 Continue from the proxy, the upstream gets the body at once.
        let expects_continue = session
            .req_header()
            .headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        let chunked = match prepare_upstream_header(
            session,
            identity.filter(|_| config.upstream.forward_identity),
            peers.tls_host.as_deref(),
            read_body.as_ref().map(Bytes::len),
        ) {
            Ok(chunked) => chunked,
            Err(()) => {
                return self
                    .upstream_failed(session, AuthError::UpstreamUnavailable)
                    .await;
            }
        };
        let Some(wire) = http_req_header_to_wire(session.req_header()) else {
            return Served::Close;
        };
        let head_method = session.req_header().method == http::Method::HEAD;
        let idempotent = session.req_header().method.is_idempotent();
        let has_body = read_body.is_some() || !session.is_body_empty();
        if expects_continue && session.write_continue_response().await.is_err() {
            return Served::Close;
        }
        access.upstream_picked();
        // A retired peer set (reloaded `[upstream]`), a connection idle for longer than
        // the pool keeps one, or a closed connection is not reused.
        if upstream.as_ref().is_some_and(|owned| {
            !Arc::ptr_eq(&owned.set, &peers) || owned.idle_since.elapsed() >= IDLE_TIMEOUT
        }) {
            *upstream = None;
        }
        // A request that cannot be resent checks its reused connection first (one
        // non-blocking read, as Pingora's pool does for every reuse); the common GET
        // skips it and is resent on a fresh connection instead if the upstream had
        // closed it.
        if (has_body || !idempotent)
            && upstream
                .as_mut()
                .is_some_and(|owned| !still_open(&mut owned.stream))
        {
            *upstream = None;
        }
        let mut attempts = 0;
        let mut previous: Option<usize> = None;
        let mut fresh_retry_used = false;
        // Bounded: each round either answers, or uses one of the peers or the single
        // fresh-connection retry.
        loop {
            attempts += 1;
            let mut reused = upstream.is_some();
            let mut owned = match upstream.take() {
                Some(owned) => owned,
                None => {
                    let index = self.upstreams.index(peers.http.len(), previous);
                    previous = Some(index);
                    // An idle connection first (checked before it is used: a request
                    // cannot tell a stale pooled connection from a fresh one otherwise),
                    // except for the resend, which goes on a fresh connection.
                    let pooled = if fresh_retry_used {
                        None
                    } else {
                        self.pool.take(&peers, index, still_open)
                    };
                    if let Some(stream) = pooled {
                        reused = true;
                        Owned {
                            stream,
                            peer: index,
                            set: peers.clone(),
                            idle_since: Instant::now(),
                        }
                    } else {
                        match self.connector.new_stream(&peers.http[index]).await {
                            Ok(stream) => Owned {
                                stream,
                                peer: index,
                                set: peers.clone(),
                                idle_since: Instant::now(),
                            },
                            Err(error) => {
                                if idempotent && attempts < peers.http.len() {
                                    continue;
                                }
                                return self
                                    .upstream_failed(session, upstream_error(error.etype()))
                                    .await;
                            }
                        }
                    }
                }
            };
            let peer_options = &peers.http[owned.peer].options;
            let timeout = peer_options.write_timeout;
            if head_method {
                // The response reader needs the request to know a HEAD answer has no
                // body; HEAD is rare enough for the one clone this costs.
                let mut reply = UpstreamSession::new(owned.stream);
                reply.read_timeout = peer_options.read_timeout;
                reply.write_timeout = peer_options.write_timeout;
                let sent = reply
                    .write_request_header(Box::new(session.req_header().clone()))
                    .await;
                let answered = match sent {
                    Ok(_) => read_head(&mut reply).await,
                    Err(error) => Err(error),
                };
                match answered {
                    Ok(()) => {
                        return self
                            .relay(session, reply, (owned.peer, owned.set), upstream, access)
                            .await;
                    }
                    Err(error)
                        if reused
                            && !fresh_retry_used
                            && matches!(error.retry, RetryType::ReusedOnly) =>
                    {
                        fresh_retry_used = true;
                        attempts -= 1;
                        continue;
                    }
                    Err(error) => return self.failed_read(session, &error).await,
                }
            }
            let sent = send_request(
                session,
                &mut owned.stream,
                &wire,
                read_body.as_ref(),
                has_body,
                chunked,
                timeout,
            )
            .await;
            if let Err(kind) = sent {
                match kind {
                    SendError::Client(error) => return client_failed(session, &error).await,
                    SendError::Upstream
                        if reused && !has_body && idempotent && !fresh_retry_used =>
                    {
                        fresh_retry_used = true;
                        attempts -= 1;
                        continue;
                    }
                    SendError::Upstream => {
                        return self
                            .upstream_failed(session, AuthError::UpstreamUnavailable)
                            .await;
                    }
                }
            }
            let mut reply = UpstreamSession::new(owned.stream);
            reply.read_timeout = peer_options.read_timeout;
            reply.write_timeout = peer_options.write_timeout;
            match read_head(&mut reply).await {
                Ok(()) => {}
                Err(error) => {
                    if reused
                        && !has_body
                        && idempotent
                        && !fresh_retry_used
                        && matches!(error.retry, RetryType::ReusedOnly)
                    {
                        fresh_retry_used = true;
                        attempts -= 1;
                        continue;
                    }
                    return self.failed_read(session, &error).await;
                }
            }
            return self
                .relay(session, reply, (owned.peer, owned.set), upstream, access)
                .await;
        }
    }

    async fn failed_read(&self, session: &mut ClientSession, error: &pingora::Error) -> Served {
        self.upstream_failed(session, upstream_error(error.etype()))
            .await
    }

    /// Copies the upstream's answer (its head has been read) to the client, and keeps
    /// the upstream connection when it can serve the next request.
    async fn relay(
        &self,
        session: &mut ClientSession,
        mut reply: UpstreamSession,
        (peer, set): (usize, Arc<super::edge::PeerSet>),
        upstream: &mut Option<Owned>,
        access: &mut AccessRecord,
    ) -> Served {
        {
            access.upstream_answered();
            let Some(response) = reply.resp_header() else {
                return Served::Close;
            };
            let response = Box::new(response.clone());
            if session.write_response_header(response).await.is_err() {
                return Served::Close;
            }
            // Bounded by the upstream's body, which its read timeout paces.
            loop {
                match reply.read_body_bytes().await {
                    Ok(Some(chunk)) => {
                        if session.write_body(&chunk).await.is_err() {
                            return Served::Close;
                        }
                    }
                    Ok(None) => break,
                    Err(_) => {
                        // The answer has started: all HTTP allows is to end the connection.
                        self.auth
                            .metrics()
                            .upstream_failure(&AuthError::UpstreamUnavailable);
                        return Served::Close;
                    }
                }
            }
            if session.finish_body().await.is_err() {
                return Served::Close;
            }
            reply.respect_keepalive();
            if let Some(stream) = reply.reuse().await {
                *upstream = Some(Owned {
                    stream,
                    peer,
                    set,
                    idle_since: Instant::now(),
                });
            }
            Served::Next
        }
    }

    /// Answers an upstream failure (502 or 504 in the contract's shape) and closes the
    /// client connection, as the filter engine does.
    async fn upstream_failed(&self, session: &mut ClientSession, error: AuthError) -> Served {
        self.auth.metrics().upstream_failure(&error);
        if session.response_written().is_none() {
            session.set_server_keepalive(None);
            let _ = write_rejection(session, Rejection::http(&error).closing()).await;
        }
        Served::Close
    }
}

/// Why a request could not be sent upstream.
enum SendError {
    /// Reading the client's body failed: the client connection ends.
    Client(Box<pingora::Error>),
    /// Writing to the upstream failed.
    Upstream,
}

/// The hop-by-hop headers [`prepare_upstream_header`] removes: RFC 9110's, `Expect`
/// (the proxy answers it), and those Pingora's `sanitize_h1_upstream_request` removes
/// for the filter engine.
static HOP_BY_HOP: [http::HeaderName; 11] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::EXPECT,
    http::HeaderName::from_static("keep-alive"),
    http::HeaderName::from_static("proxy-connection"),
    http::HeaderName::from_static("http2-settings"),
];

/// Edits the client's request header in place into the upstream request (nothing after
/// this reads the client's hop-by-hop headers: keep-alive was decided when the head was
/// read). Returns whether the body goes upstream chunked.
fn prepare_upstream_header(
    session: &mut ClientSession,
    identity: Option<&Identity>,
    tls_host: Option<&str>,
    read_body: Option<usize>,
) -> Result<bool, ()> {
    let body_empty = session.is_body_empty();
    let header = session.req_header_mut();
    // One pass over the names the request has (a few) finds the hop-by-hop ones, where
    // removing each of the eleven by name would hash it twice (the header map and its
    // case map) whether it is there or not. The common request has none: no allocation.
    let mut doomed: Vec<http::HeaderName> = header
        .headers
        .keys()
        .filter(|name| HOP_BY_HOP.contains(name))
        .cloned()
        .collect();
    if doomed.contains(&header::CONNECTION) {
        // Contract §6 rule 2: the headers the client named in `Connection` go before the
        // identity headers are written.
        let nominated = header
            .headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .filter_map(|name| http::HeaderName::from_bytes(name.trim().as_bytes()).ok());
        doomed.extend(nominated);
    }
    for name in &doomed {
        header.remove_header(name);
    }
    strip_identity_headers(header);
    if let Some(identity) = identity {
        // A static value: no copy of the kind's name per request.
        let kind = http::HeaderValue::from_static(identity.kind.as_str());
        header
            .insert_header(super::AUTH_HEADER, kind)
            .map_err(|_| ())?;
        if let Some(user) = identity.user_id() {
            header
                .insert_header(super::USER_ID_HEADER, user)
                .map_err(|_| ())?;
        }
    }
    if let Some(host) = tls_host {
        header.insert_header(header::HOST, host).map_err(|_| ())?;
    }
    match read_body {
        // A revocation body, read whole: sent with its length.
        Some(length) => {
            header
                .insert_header(header::CONTENT_LENGTH, length)
                .map_err(|_| ())?;
            Ok(false)
        }
        None if !body_empty && !header.headers.contains_key(header::CONTENT_LENGTH) => {
            header
                .insert_header(header::TRANSFER_ENCODING, "chunked")
                .map_err(|_| ())?;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Writes the head and the body upstream: a body already read whole, or the client's
/// body streamed (re-chunked when it came chunked). `timeout` bounds each write to the
/// upstream (as Pingora's write timeout does for the filter engine), not the whole
/// request: a long upload that keeps moving is not cut, and the pauses between the
/// client's body reads are bounded by the session's own read timeout.
async fn send_request(
    session: &mut ClientSession,
    stream: &mut Stream,
    wire: &[u8],
    read_body: Option<&Bytes>,
    has_body: bool,
    chunked: bool,
    timeout: Option<std::time::Duration>,
) -> Result<(), SendError> {
    write_upstream(stream, wire, timeout).await?;
    if let Some(body) = read_body {
        write_upstream(stream, body, timeout).await?;
    } else if has_body {
        // Bounded by the client's body, which the read timeout paces.
        loop {
            match session.read_body_bytes().await {
                Ok(Some(chunk)) if chunked => {
                    let size = format!("{:x}\r\n", chunk.len());
                    write_upstream(stream, size.as_bytes(), timeout).await?;
                    write_upstream(stream, &chunk, timeout).await?;
                    write_upstream(stream, b"\r\n", timeout).await?;
                }
                Ok(Some(chunk)) => write_upstream(stream, &chunk, timeout).await?,
                Ok(None) => break,
                Err(error) => return Err(SendError::Client(error)),
            }
        }
        if chunked {
            write_upstream(stream, b"0\r\n\r\n", timeout).await?;
        }
    }
    within(timeout, stream.flush())
        .await
        .map_or(Err(SendError::Upstream), |r| {
            r.map_err(|_| SendError::Upstream)
        })
}

/// One write to the upstream, within `timeout`.
async fn write_upstream(
    stream: &mut Stream,
    bytes: &[u8],
    timeout: Option<std::time::Duration>,
) -> Result<(), SendError> {
    within(timeout, stream.write_all(bytes))
        .await
        .map_or(Err(SendError::Upstream), |r| {
            r.map_err(|_| SendError::Upstream)
        })
}

/// `future`'s output, or `Err` once it has waited `limit`. The timer (a clock read and
/// a timer entry) is made only if the first poll leaves the future waiting: a write to
/// a socket that takes it at once, every request's case, needs none.
async fn within<F: std::future::Future>(
    limit: Option<std::time::Duration>,
    future: F,
) -> Result<F::Output, ()> {
    let mut future = std::pin::pin!(future);
    if let std::task::Poll::Ready(output) = futures_util::poll!(future.as_mut()) {
        return Ok(output);
    }
    match limit {
        Some(limit) => tokio::time::timeout(limit, future).await.map_err(|_| ()),
        None => Ok(future.await),
    }
}

/// Whether an idle upstream connection is still open with nothing unread on it.
fn still_open(stream: &mut Stream) -> bool {
    use futures_util::FutureExt as _;
    use tokio::io::AsyncReadExt as _;
    let mut byte = [0u8; 1];
    // Pending means open and quiet; `unconstrained` so the runtime's budget cannot
    // make a ready read look pending.
    tokio::task::unconstrained(stream.read(&mut byte))
        .now_or_never()
        .is_none()
}

/// Reads the final response head, skipping informational ones.
async fn read_head(reply: &mut UpstreamSession) -> pingora::Result<()> {
    for _ in 0..MAX_INFORMATIONAL {
        reply.read_response().await?;
        match reply.resp_header().map(|r| r.status) {
            Some(status) if status.is_informational() => continue,
            _ => return Ok(()),
        }
    }
    pingora::Error::e_explain(
        ErrorType::InvalidHTTPHeader,
        "too many informational responses",
    )
}

/// Reads a revocation body whole, up to [`MAX_REVOCATION_BODY`]; `Err` when the
/// client's body could not be read.
async fn read_small_body(
    session: &mut ClientSession,
) -> Result<Result<Bytes, AuthError>, Box<pingora::Error>> {
    let mut body = BytesMut::new();
    // Bounded by the size check: every iteration adds at least one byte or ends.
    loop {
        match session.read_body_bytes().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_REVOCATION_BODY {
                    return Ok(Err(AuthError::BadInput(format!(
                        "request body larger than {MAX_REVOCATION_BODY} bytes"
                    ))));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(Ok(body.freeze())),
            Err(error) => return Err(error),
        }
    }
}

/// Answers a refusal in the contract's shape and keeps the connection when the
/// request's body is small enough to drain (as the filter engine does).
async fn refuse(session: &mut ClientSession, error: &AuthError) -> Served {
    let rejection = Rejection::new(error, &RequestParts::from(&**session.req_header()));
    let small_body = session
        .req_header()
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .is_some_and(|length| length <= MAX_DRAINED_BODY);
    if small_body || session.is_body_empty() {
        session.set_close_on_response_before_downstream_finish(false);
        session.set_total_drain_timeout(Some(DRAIN_TIMEOUT));
    } else {
        session.set_server_keepalive(None);
    }
    match write_rejection(session, rejection).await {
        Ok(()) => Served::Next,
        Err(_) => Served::Close,
    }
}

async fn write_rejection(session: &mut ClientSession, rejection: Rejection) -> pingora::Result<()> {
    let (head, body) = rejection.into_head();
    let mut header = ResponseHeader::build(head.status(), Some(head.headers().len()))?;
    for (name, value) in head.headers() {
        header.insert_header(name.clone(), value)?;
    }
    session.write_response_header(Box::new(header)).await?;
    session.write_body(&body).await?;
    session.finish_body().await?;
    Ok(())
}

/// The client's body could not be read, answered as the filter engine's
/// `fail_to_proxy` answers it (one mapping, `super::unreadable_request`): a client that
/// went away or broke the connection hears nothing; a body that stalled past
/// `[server] client_body_timeout_ms` or was malformed gets the contract's input error
/// (400, code 4, JSON), before any answer started. The connection ends.
async fn client_failed(session: &mut ClientSession, error: &pingora::Error) -> Served {
    if let Some(error) = super::unreadable_request(error)
        && session.response_written().is_none()
    {
        session.set_server_keepalive(None);
        let _ = write_rejection(session, Rejection::http(&error).closing()).await;
    }
    Served::Close
}

/// Pingora's 400 (what its proxy answers, before any hook, to a head it cannot parse),
/// and the connection closes after it.
async fn bad_request(session: &mut ClientSession) {
    session.set_server_keepalive(None);
    let header = pingora::protocols::http::error_resp::gen_error_response(400);
    let _ = session.write_response_header(Box::new(header)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The upstream head as [`prepare_upstream_header`] leaves it, lower-cased.
    async fn upstream_head(request: &[u8], identity: Option<&Identity>) -> String {
        let stream: Stream = Box::new(std::io::Cursor::new(request.to_vec()));
        let mut session = ClientSession::new(stream);
        session.read_request().await.expect("a request head");
        let chunked = prepare_upstream_header(&mut session, identity, None, None);
        assert_eq!(chunked, Ok(false));
        let wire = http_req_header_to_wire(session.req_header()).expect("a valid head");
        String::from_utf8(wire.to_vec())
            .expect("ASCII")
            .to_ascii_lowercase()
    }

    #[tokio::test]
    async fn hop_by_hop_and_nominated_headers_go_and_the_others_stay() {
        let request = b"GET /channels?api_key=k HTTP/1.1\r\nHost: chat\r\n\
            Connection: keep-alive, X-Private\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n\
            Trailer: x-sum\r\nProxy-Connection: keep-alive\r\nProxy-Authorization: Basic eA==\r\n\
            Proxy-Authenticate: Basic\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\
            X-Private: secret\r\nX-Chatgate-Auth: forged\r\nX_Chatgate_User_Id: mallory\r\n\
            Accept: */*\r\nAuthorization: t\r\n\r\n";
        let identity = Identity::anonymous("k");
        let head = upstream_head(request, Some(&identity)).await;
        for gone in [
            "connection:",
            "keep-alive:",
            "te:",
            "trailer:",
            "proxy-connection:",
            "proxy-authorization:",
            "proxy-authenticate:",
            "http2-settings:",
            "x-private:",
            "forged",
            "mallory",
        ] {
            assert!(!head.contains(gone), "{gone} in:\n{head}");
        }
        for kept in [
            "get /channels?api_key=k http/1.1\r\n",
            "host: chat\r\n",
            "accept: */*\r\n",
            "authorization: t\r\n",
            "x-chatgate-auth: anonymous\r\n",
        ] {
            assert!(head.contains(kept), "{kept:?} missing from:\n{head}");
        }
        assert_eq!(head.matches("x-chatgate-auth").count(), 1, "{head}");
    }

    #[tokio::test]
    async fn a_request_without_hop_by_hop_headers_is_forwarded_as_sent() {
        let request = b"GET /channels HTTP/1.1\r\nHost: chat\r\nAuthorization: t\r\n\r\n";
        let head = upstream_head(request, None).await;
        assert_eq!(
            head,
            "get /channels http/1.1\r\nhost: chat\r\nauthorization: t\r\n\r\n"
        );
    }
}
