//! [`ChatAuthFilter`]: the gate as a piece of any Pingora `ProxyHttp::request_filter`.
//! The decision (including the embedder's [`crate::gate::Policy`]) is the gate's and the
//! refusal is the error module's [`Rejection`]; this adapter reads revocation bodies,
//! sets the identity headers and copies rejections onto the session.

use super::metrics::{ProxyMetrics, UNKNOWN_APP};
use crate::error::{AuthError, Rejection};
use crate::gate::{Decision, Gate, Identity, RequestParts, RevocationEndpoint};
use crate::normalize;
use bytes::BytesMut;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::Session;
use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

/// Verified user id sent upstream when `[upstream] forward_identity = true`.
pub const USER_ID_HEADER: &str = "x-chatgate-user-id";
/// Verified auth kind (`user`, `server`, `developer`, `anonymous`) sent upstream when
/// `[upstream] forward_identity = true`.
pub const AUTH_HEADER: &str = "x-chatgate-auth";

/// Largest revocation body (`PATCH /users`, `PATCH /app`) chatgate reads before
/// forwarding. It equals Pingora's request retry buffer (64 KiB), which is what replays
/// the already-read body to the upstream; 100 users' cutoffs take about 10 KiB.
pub const MAX_REVOCATION_BODY: usize = 64 * 1024;

/// What [`ChatAuthFilter::request_filter`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Proxy the request. The identity is `None` on public paths.
    Forward(Option<Identity>),
    /// The rejection was written to the client: return `Ok(true)` from `request_filter`.
    Responded,
}

impl Verdict {
    /// Whether a response was written (the value `request_filter` must return).
    pub fn responded(&self) -> bool {
        matches!(self, Verdict::Responded)
    }
}

/// Runs the [`Gate`] inside a Pingora `request_filter`: strips client-sent identity
/// headers, rewrites the target to the normal form the gate judges (contract §6),
/// decides, applies revocation bodies, and answers refusals in the contract's shape
/// (JSON over HTTP; 101 + error frame + close 1000 on a WebSocket upgrade). The client
/// connection stays open after an HTTP refusal. Its
/// [`upstream_request_filter`](ChatAuthFilter::upstream_request_filter) writes the
/// identity headers.
///
/// ```no_run
/// use async_trait::async_trait;
/// use chatgate::proxy::{ChatAuthFilter, Verdict};
/// use chatgate::Identity;
/// use pingora::prelude::*;
///
/// struct MyProxy {
///     auth: ChatAuthFilter,
/// }
///
/// #[async_trait]
/// impl ProxyHttp for MyProxy {
///     type CTX = Option<Identity>;
///     fn new_ctx(&self) -> Self::CTX {
///         None
///     }
///     async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
///         match self.auth.request_filter(session).await? {
///             Verdict::Forward(identity) => {
///                 *ctx = identity;
///                 Ok(false)
///             }
///             Verdict::Responded => Ok(true),
///         }
///     }
///     async fn upstream_peer(&self, _: &mut Session, _: &mut Self::CTX) -> Result<Box<HttpPeer>> {
///         Ok(Box::new(HttpPeer::new("127.0.0.1:3030", false, String::new())))
///     }
///     async fn upstream_request_filter(
///         &self,
///         _: &mut Session,
///         upstream_request: &mut RequestHeader,
///         ctx: &mut Self::CTX,
///     ) -> Result<()> {
///         self.auth.upstream_request_filter(upstream_request, ctx.as_ref())
///     }
/// }
/// ```
#[derive(Clone)]
pub struct ChatAuthFilter {
    gate: Gate,
    metrics: Arc<ProxyMetrics>,
}

impl ChatAuthFilter {
    /// A filter over `gate`, with its own metrics.
    pub fn new(gate: Gate) -> Self {
        Self::with_metrics(gate, Arc::new(ProxyMetrics::new()))
    }

    /// A filter that records into shared metrics.
    pub fn with_metrics(gate: Gate, metrics: Arc<ProxyMetrics>) -> Self {
        ChatAuthFilter { gate, metrics }
    }

    /// The gate.
    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// The metrics this filter records into.
    pub fn metrics(&self) -> &Arc<ProxyMetrics> {
        &self.metrics
    }

    /// Decides the request in `session`. On [`Verdict::Responded`] the refusal has been
    /// written; on [`Verdict::Forward`] the request header carries the normal target and
    /// none of the client's identity headers; pass the identity on to
    /// [`ChatAuthFilter::upstream_request_filter`]. `Err` is an I/O error on the client
    /// connection.
    pub async fn request_filter(&self, session: &mut Session) -> pingora::Result<Verdict> {
        Ok(self.decide(session).await?.0)
    }

    /// [`ChatAuthFilter::request_filter`], also saying what was refused (for the
    /// access log).
    pub(crate) async fn decide(
        &self,
        session: &mut Session,
    ) -> pingora::Result<(Verdict, Option<Refused>)> {
        strip_identity_headers(session.req_header_mut());
        // Before the target rewrite, which leaves an HTTP/2 request without its authority.
        super::tls::settle_h2_authority(session.req_header_mut())?;
        forward_normal_target(session)?;
        let started = Instant::now();
        let peer = session
            .client_addr()
            .and_then(|address| address.as_inet())
            .map(|address| address.ip());
        let decision = self
            .gate
            .check(RequestParts::from(&**session.req_header()).with_peer(peer))
            .await;
        self.metrics.observe_check(started.elapsed());
        let identity = match decision {
            Ok(Decision::Public) => return Ok((Verdict::Forward(None), None)),
            Ok(Decision::Allow(identity)) => Ok(identity),
            Ok(Decision::Revocation(identity, endpoint)) => {
                self.revocation(session, identity, endpoint).await?
            }
            Err(error) => Err(error),
        };
        match identity {
            Ok(identity) => {
                self.metrics.allowed(&identity.app);
                Ok((Verdict::Forward(Some(identity)), None))
            }
            Err(error) => {
                let app = self.record_refusal(session.req_header(), &error);
                respond(session, &error).await?;
                let refused = Refused {
                    code: error.code(),
                    app,
                };
                Ok((Verdict::Responded, Some(refused)))
            }
        }
    }

    /// Reads the body, applies its revocation fields durably, and leaves the body in
    /// Pingora's retry buffer so the same bytes are forwarded.
    async fn revocation(
        &self,
        session: &mut Session,
        identity: Identity,
        endpoint: RevocationEndpoint,
    ) -> pingora::Result<Result<Identity, AuthError>> {
        // Enabled before the first read so the proxy phase replays what is read here:
        // once the body has been consumed, Pingora forwards only its retry buffer.
        session.as_downstream_mut().enable_retry_buffering();
        let mut body = BytesMut::new();
        // Bounded by the size check: every iteration adds at least one byte or ends.
        // A body that stalls or breaks is the client's fault (`into_down`): the filter's
        // `fail_to_proxy` answers it as Pingora answers a streamed body's (400, or
        // nothing to a client that went away), not as an unavailable upstream.
        while let Some(chunk) = session
            .read_request_body()
            .await
            .map_err(|error| error.into_down())?
        {
            if body.len() + chunk.len() > MAX_REVOCATION_BODY {
                return Ok(Err(AuthError::BadInput(format!(
                    "request body larger than {MAX_REVOCATION_BODY} bytes"
                ))));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(self
            .gate
            .apply_revocation(&identity, endpoint, &body)
            .await
            .map(|()| identity))
    }

    /// Call from `ProxyHttp::upstream_request_filter` with the identity
    /// [`ChatAuthFilter::request_filter`] returned: writes the verified identity headers
    /// (when `[upstream] forward_identity` is on) into the request about to go upstream,
    /// after removing any header an upstream could read as one of them.
    ///
    /// Why here and not in `request_filter` (contract §6 rule 2): pingora-proxy 0.9.1
    /// builds the upstream request from a clone of the client's request header and runs
    /// `sanitize_h1_upstream_request` on it (`proxy_h1.rs`, `proxy_1to1`), which removes
    /// the standard hop-by-hop headers and every header the client named in
    /// `Connection`, *after* `request_filter` and *before* `upstream_request_filter`. A
    /// header set in `request_filter` is therefore removed by `Connection:
    /// x-chatgate-user-id`; one set here is not.
    pub fn upstream_request_filter(
        &self,
        upstream_request: &mut RequestHeader,
        identity: Option<&Identity>,
    ) -> pingora::Result<()> {
        strip_identity_headers(upstream_request);
        if let Some(identity) = identity
            && self.gate.config().load().upstream.forward_identity
        {
            upstream_request.insert_header(AUTH_HEADER, identity.kind.as_str())?;
            if let Some(user) = identity.user_id() {
                upstream_request.insert_header(USER_ID_HEADER, user)?;
            }
        }
        Ok(())
    }

    /// Counts and logs (at debug) a request the gate refused with `error`; returns the
    /// app label it was counted under, for the access log.
    pub(super) fn record_refusal(&self, header: &RequestHeader, error: &AuthError) -> String {
        let app = self.app_label_of(header);
        self.metrics.denied(&app, error);
        tracing::debug!(
            target: "chatgate::proxy",
            code = error.code(),
            reason = error.reason(),
            path = header.uri.path(),
            "request refused"
        );
        app
    }

    /// The `app` label of a refusal: the api_key if it names a configured app.
    fn app_label_of(&self, header: &RequestHeader) -> String {
        let query = header.uri.query().unwrap_or("");
        let config = self.gate.config().load();
        form_urlencoded::parse(query.as_bytes())
            .find(|(name, _)| name == "api_key")
            .and_then(|(_, key)| config.app(&key).map(|app| app.api_key.to_string()))
            .unwrap_or_else(|| UNKNOWN_APP.to_owned())
    }
}

/// A refusal, as the access log reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refused {
    /// The Stream error code.
    pub(crate) code: i32,
    /// The metrics' app label: a configured api_key or `unknown`.
    pub(crate) app: String,
}

impl std::fmt::Debug for ChatAuthFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatAuthFilter").finish_non_exhaustive()
    }
}

/// Removes every header an upstream could read as one of the gate's identity headers
/// (case folded, `_` for `-`: contract §6 rule 2).
pub(super) fn strip_identity_headers(header: &mut RequestHeader) {
    // Pingora's own removal: it keeps the header case map in step.
    for name in normalize::forged_identity_headers(&header.headers) {
        header.remove_header(&name);
    }
}

/// Makes the request header carry the target the gate judges (contract §6 rule 3): the
/// normal path and the query as sent, in origin-form. Pingora forwards
/// `RequestHeader::raw_path()`, which for an absolute-form or non-UTF-8 target is not
/// the `uri` the gate reads, so it is rewritten whenever the two differ. A path that
/// cannot be normalised is left for the gate to refuse.
fn forward_normal_target(session: &mut Session) -> pingora::Result<()> {
    normal_target(session.req_header_mut())
}

/// [`forward_normal_target`] on a request header.
pub(super) fn normal_target(header: &mut RequestHeader) -> pingora::Result<()> {
    let Ok(path) = normalize::path(header.uri.path()) else {
        return Ok(());
    };
    let parsed = header
        .uri
        .path_and_query()
        .map_or("", |target| target.as_str());
    // The common request: a normal path, sent in origin-form as UTF-8. No allocation.
    if matches!(path, Cow::Borrowed(_)) && header.raw_path() == parsed.as_bytes() {
        return Ok(());
    }
    let target = normalize::target(&path, header.uri.query());
    header.set_raw_path(target.as_bytes())
}

/// Writes `error` in the contract's shape by copying out its [`Rejection`]: JSON over
/// HTTP (connection kept alive), or a completed upgrade with one error frame and a
/// normal close for a WebSocket handshake.
pub async fn respond(session: &mut Session, error: &AuthError) -> pingora::Result<()> {
    let rejection = Rejection::new(error, &RequestParts::from(&**session.req_header()));
    if rejection.is_upgrade() {
        // The socket is now a WebSocket: it must not go back to the HTTP keep-alive pool.
        session.set_keepalive(None);
    } else {
        keep_alive_after_refusal(session);
    }
    write_rejection(session, rejection).await
}

/// Copies a rejection onto the session: its head, then the bytes that follow it.
pub(crate) async fn write_rejection(
    session: &mut Session,
    rejection: Rejection,
) -> pingora::Result<()> {
    let (head, body) = rejection.into_head();
    let mut header = ResponseHeader::build(head.status(), Some(head.headers().len()))?;
    for (name, value) in head.headers() {
        header.insert_header(name.clone(), value)?;
    }
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session.write_response_body(Some(body), true).await
}

/// Refused bodies up to this size are read and discarded after the answer so the
/// connection can serve the next request; larger or unsized ones close it instead of
/// letting an unauthenticated client make the proxy read an upload.
pub(super) const MAX_DRAINED_BODY: u64 = 64 * 1024;
/// Longest a refused request's body may take to arrive before the connection closes.
pub(super) const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Pingora closes a connection answered before its request body was read; a small body
/// is drained instead (within the drain timeout) to keep the connection alive.
fn keep_alive_after_refusal(session: &mut Session) {
    let small_body = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .is_some_and(|length| length <= MAX_DRAINED_BODY);
    if small_body {
        let downstream = session.as_downstream_mut();
        downstream.set_close_on_response_before_downstream_finish(false);
        downstream.set_total_drain_timeout(Some(DRAIN_TIMEOUT));
    }
}
