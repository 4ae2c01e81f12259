//! The forward engine's WebSocket upgrades (contract §4 live sessions, §5 refusals, §6
//! request normalisation): the head the forward loop parsed is decided once by the
//! [`Gate`](crate::gate::Gate), the upstream head is serialised once from the client's
//! own header, and on the upstream's `101` the connection goes to [`super::super::relay`],
//! exactly as the filter engine's `EdgeProxy::relay_upgrade` leaves it.
//!
//! Why not hand the connection to the filter engine (as before issue 13's CPU goal):
//! that parsed the head a second time into a new Pingora session, ran the gate a
//! second time, cloned the request header for the upstream and made the handshake
//! through Pingora's per-request proxy state (its `Session`, `CTX`, modules and
//! keep-alive hand-back), about a fifth of a handshake's CPU with nothing to show for
//! it. The filter engine's path stays for embedders (and for upgrades to other
//! protocols, which the forward engine still hands over).
//!
//! What the upstream receives is what the filter engine sends: identity headers
//! stripped, the target in normal form (§6 rules 2, 3), hop-by-hop headers and those
//! the client names in `Connection` removed as Pingora does
//! ([`strip_hop_by_hop`](super::super::relay::strip_hop_by_hop)), `Connection: Upgrade`
//! and `Upgrade: websocket` set again, then the identity headers. A refusal by the gate
//! is the contract's upgrade refusal (101, an error frame, close 1000); a refusal by
//! the upstream (any answer but `101`) is copied to the client as an HTTP response and
//! the connection closes; an upstream that cannot be reached or does not answer within
//! `[upstream] read_timeout_ms` gets the 502/504 of the contract. Frames the client
//! sent behind its head are relayed after the `101` (the [`HeadGuard`] kept them).
//!
//! [`HeadGuard`]: super::super::head::HeadGuard

use super::super::access_log::AccessRecord;
use super::super::relay::{self, UpgradeReply, Upgraded, connect_upstream, strip_hop_by_hop};
use super::{ClientSession, ForwardApp, bad_request, write_rejection};
use crate::error::{AuthError, Rejection};
use crate::gate::{Decision, Identity, RequestParts};
use pingora::protocols::http::v1::client::{
    HttpSession as UpstreamSession, http_req_header_to_wire,
};
use pingora::time::fast_timeout::fast_timeout;

impl ForwardApp {
    /// Serves a WebSocket upgrade request whose head `session` has read; the client
    /// connection is then relayed (in a task of its own) or closed. Gives `session`
    /// back, untouched, when it is not one this engine makes: an upgrade to another
    /// protocol, or one with a method other than `GET` (the filter engine decides those
    /// as before).
    pub(super) async fn upgrade(&self, mut session: ClientSession) -> Result<(), ClientSession> {
        if session.req_header().method != http::Method::GET
            || !RequestParts::from(&**session.req_header()).is_websocket_upgrade()
        {
            return Err(session);
        }
        // A drain waits for it, then for the relayed session.
        let _in_progress = self.hub.request();
        let mut access = AccessRecord::default();
        let Some((_, decision)) = self.decide(&mut session).await else {
            session.shutdown().await;
            return Ok(());
        };
        let metrics = self.auth.metrics();
        let identity = match decision {
            Ok(Decision::Public) => None,
            Ok(Decision::Allow(identity)) => Some(identity),
            // Revocations are `PATCH` requests: a `GET` is never one. Were it, the filter
            // engine reads its body as it does for any request.
            Ok(Decision::Revocation(..)) => return Err(session),
            Err(error) => {
                let app = self.auth.record_refusal(session.req_header(), &error);
                access.code = Some(error.code());
                access.refused_app = Some(app);
                let rejection =
                    Rejection::new(&error, &RequestParts::from(&**session.req_header()));
                // The socket is now a WebSocket (the contract's refusal of an upgrade is
                // a completed one): it does not serve another HTTP request.
                session.set_server_keepalive(None);
                let written = write_rejection(&mut session, rejection).await;
                self.log_upgrade(&session, &access, None, None);
                if written.is_ok() {
                    session.shutdown().await;
                }
                return Ok(());
            }
        };
        if let Some(identity) = &identity {
            metrics.allowed(&identity.app);
        }
        self.make_upgrade(session, identity, access).await;
        Ok(())
    }

    /// Makes an admitted upgrade with the upstream and relays the session, or answers
    /// what the upstream said (or its failure) and closes.
    async fn make_upgrade(
        &self,
        mut session: ClientSession,
        identity: Option<Identity>,
        mut access: AccessRecord,
    ) {
        let config = self.auth.gate().config().load();
        // The set the peer is picked from below: its TLS Host and its peers agree even
        // when a reload of `[upstream]` rebuilds the set meanwhile.
        let peers = self.upstreams.current_for(&config);
        let header = session.req_header_mut();
        if let Err(error) = strip_hop_by_hop(header) {
            // What Pingora (and so the filter engine) answers to a request it cannot
            // forward.
            tracing::debug!(target: "chatgate::proxy", %error, "upgrade request refused");
            bad_request(&mut session).await;
            self.log_upgrade(&session, &access, identity.as_ref(), None);
            return;
        }
        let wire = self
            .auth
            .upstream_request_filter(header, identity.as_ref())
            .and_then(|()| match &peers.tls_host {
                // A TLS upstream (e.g. Stream) routes on Host: the name it is known by.
                Some(host) => header.insert_header(http::header::HOST, host.as_str()),
                None => Ok(()),
            })
            .ok()
            .and_then(|()| http_req_header_to_wire(header));
        let reply = match wire {
            Some(wire) => {
                access.upstream_picked();
                self.reach_upstream(&peers, &wire, config.upstream.read_timeout)
                    .await
            }
            None => Err(AuthError::UpstreamUnavailable),
        };
        let (upstream, head_and_early) = match reply {
            Ok(UpgradeReply::Switched {
                upstream,
                head_and_early,
            }) => (upstream, head_and_early),
            Ok(UpgradeReply::Other { response, reply }) => {
                access.upstream_answered();
                return self
                    .copy_refusal(
                        session,
                        response,
                        *reply,
                        access,
                        identity,
                        config.upstream.read_timeout,
                    )
                    .await;
            }
            Err(error) => return self.upgrade_failed(session, access, identity, error).await,
        };
        access.upstream_answered();
        self.log_upgrade(&session, &access, identity.as_ref(), Some(101));
        let upgraded = Upgraded::after_switch(
            upstream,
            head_and_early,
            identity,
            self.auth.gate(),
            &self.hub,
            config.upstream.websocket_idle_timeout,
            super::super::head::bytes_after_head(session.stream()),
        );
        // The session's own task: this connection task ends now (see `relay::relay`).
        tokio::spawn(relay::relay(session.into_inner(), upgraded));
    }

    /// Connects to a WebSocket peer of `peers` (a failed connect tries each peer once,
    /// as the filter engine's do) and makes the upgrade handshake on it.
    async fn reach_upstream(
        &self,
        peers: &super::super::edge::PeerSet,
        wire: &[u8],
        read_timeout: std::time::Duration,
    ) -> Result<UpgradeReply, AuthError> {
        let mut previous = None;
        for _ in 0..peers.websocket.len().max(1) {
            let index = self.upstreams.index(peers.websocket.len(), previous);
            previous = Some(index);
            let peer = &peers.websocket[index];
            match connect_upstream(&self.connector, peer, wire).await {
                Ok(connection) => {
                    return relay::upgrade_handshake(connection, peer, wire, read_timeout).await;
                }
                Err(error) => {
                    tracing::debug!(target: "chatgate::proxy", %error, "no upstream for a WebSocket");
                }
            }
        }
        Err(AuthError::UpstreamUnavailable)
    }

    /// Copies the upstream's refusal of an upgrade (any answer but 101) to the client,
    /// then closes, as the filter engine does.
    async fn copy_refusal(
        &self,
        mut session: ClientSession,
        response: Box<pingora::http::ResponseHeader>,
        mut reply: UpstreamSession,
        access: AccessRecord,
        identity: Option<Identity>,
        read_timeout: std::time::Duration,
    ) {
        session.set_server_keepalive(None);
        let copied = async {
            session.write_response_header(response).await.ok()?;
            // Bounded: each read within the read timeout, ended by the body's framing.
            loop {
                match fast_timeout(read_timeout, reply.read_body_bytes()).await {
                    Ok(Ok(Some(chunk))) => {
                        session.write_body(&chunk).await.ok()?;
                    }
                    Ok(Ok(None)) => break,
                    // A body cut short: the client sees the connection close.
                    _ => {
                        self.auth
                            .metrics()
                            .upstream_failure(&AuthError::UpstreamUnavailable);
                        return None;
                    }
                }
            }
            session.finish_body().await.ok()
        }
        .await;
        self.log_upgrade(&session, &access, identity.as_ref(), None);
        if copied.is_some() {
            session.shutdown().await;
        }
    }

    /// Answers an upgrade whose upstream failed (502 or 504 in the contract's shape)
    /// and closes.
    async fn upgrade_failed(
        &self,
        mut session: ClientSession,
        mut access: AccessRecord,
        identity: Option<Identity>,
        error: AuthError,
    ) {
        self.auth.metrics().upstream_failure(&error);
        access.code = Some(error.code());
        session.set_server_keepalive(None);
        let written = write_rejection(&mut session, Rejection::http(&error).closing()).await;
        self.log_upgrade(&session, &access, identity.as_ref(), None);
        if written.is_ok() {
            session.shutdown().await;
        }
    }

    /// The metrics and the access log line of an upgrade request: the status written
    /// to the client, or `relayed` (the 101 the relay writes).
    fn log_upgrade(
        &self,
        session: &ClientSession,
        access: &AccessRecord,
        identity: Option<&Identity>,
        relayed: Option<u16>,
    ) {
        let status = session
            .response_written()
            .map(|response| response.status.as_u16())
            .or(relayed);
        self.auth.metrics().response(status, access.upstream_time);
        let config = self.auth.gate().config().load();
        access.emit_parts(
            session.req_header(),
            status,
            session.client_addr(),
            identity,
            &config,
        );
    }
}
