//! The tower adapter: [`ChatAuthLayer`] runs [`Gate::check`] in front of any
//! `Service<http::Request<B>>`, puts the verified [`Identity`] into the request
//! extensions and calls the inner service. A refusal is `Ok(response)` carrying the
//! contract's JSON error; the inner service's error type is never changed.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! // Store, cache, reload and invalidation, in one call (see `from_config_file`):
//! let layer = chatgate::ChatAuthLayer::from_config_file("config.toml")
//!     .await?
//!     .public_path("/metrics");
//! // router.layer(layer), or tower::ServiceBuilder::new().layer(layer).service(svc)
//! # let _ = layer;
//! # Ok(()) }
//! ```
//!
//! Wired by hand, the same layer without a file watcher:
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use chatgate::{ChatAuthLayer, ConfigHandle, Gate, revocation};
//!
//! let config = ConfigHandle::from_file("config.toml")?;
//! let store = revocation::open_store(&config.load().revocation).await?;
//! let cache = revocation::RevocationCache::new(store, &config.load().revocation);
//! cache.spawn_invalidation();
//! let layer = ChatAuthLayer::new(Gate::new(config, cache)).public_path("/metrics");
//! // router.layer(layer), or tower::ServiceBuilder::new().layer(layer).service(svc)
//! # let _ = layer;
//! # Ok(()) }
//! ```
//!
//! # Request bodies
//!
//! `PATCH /users` and `PATCH /app` with a server token are applied by the gate, then
//! forwarded: the layer buffers that body (at most [`MAX_REVOCATION_BODY_BYTES`], more
//! is code 4) and rebuilds the request with the same bytes. It therefore needs
//! `B: http_body::Body + From<Bytes>`: `axum::body::Body` (what an axum `Router`'s
//! layers see) and `http_body_util::Full<Bytes>` qualify. A bare hyper service receives
//! `Request<hyper::body::Incoming>`, which cannot be rebuilt from bytes: wrap it in
//! [`ReplayBody`] first, `ServiceBuilder::new().map_request(|r: Request<Incoming>|
//! r.map(ReplayBody::new)).layer(layer).service(svc)` (the inner service then takes
//! `Request<ReplayBody<Incoming>>`).
//! Only those two requests are buffered; every other body streams through untouched.
//!
//! # WebSocket upgrades
//!
//! A refused upgrade is answered the Stream way (contract §4): `101 Switching
//! Protocols`, then one text frame `{"error":{..}}` and a close 1000, so SDKs refresh
//! their token instead of retrying forever. This needs hyper's `OnUpgrade` in the
//! request extensions (axum::serve and hyper's HTTP/1 server with upgrades put it
//! there); without it, or without `Sec-WebSocket-Key`, the refusal is the HTTP error.
//!
//! An admitted upgrade also gets a [`LiveSession`] in its extensions: the handler awaits
//! [`LiveSession::ended`] and closes with 4000 when the token expires or is revoked.
//!
//! # Ordering with other layers
//!
//! Browsers send CORS preflights (`OPTIONS`) without credentials: put tower-http's
//! `CorsLayer` outside (after, in `Router::layer` order) this layer so preflights are
//! answered before the gate sees them.
//!
//! # Hot reload
//!
//! The layer holds a [`Gate`], which holds the [`crate::ConfigHandle`]: a
//! `store()` on that handle (by the file watcher or by hand) is seen by the next request.
//! [`ChatAuthLayer::from_config_file`] starts that watcher itself.
//!
//! # Design
//!
//! The layer only asks (as tower-http's middlewares do): its builder methods configure
//! the gate's [`Policy`], and the gate's [`Decision`] is final. One function turns a
//! decision into what happens next, for the synchronous and the awaited path alike;
//! refusals are the [`Rejection`] the error module builds, copied into a response
//! (and, for a WebSocket, onto the upgraded connection by `upgrade`).

mod replay;
mod setup;
mod upgrade;

pub use replay::ReplayBody;
pub use setup::SetupError;

use crate::error::{AuthError, Rejection};
use crate::gate::{
    Decision, Gate, Identity, PendingCheck, Policy, RequestParts, RevocationEndpoint,
};
use crate::normalize;
use crate::session::LiveSession;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Limited};
use pin_project_lite::pin_project;
use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use tower::{Layer, Service};

/// Largest `PATCH /users` / `PATCH /app` body the layer buffers (1 MiB); larger is code 4.
pub const MAX_REVOCATION_BODY_BYTES: usize = 1 << 20;

/// Renders an HTTP refusal. The body is converted into the service's response body
/// with `From<Bytes>`.
pub type RejectionRenderer = Arc<dyn Fn(&AuthError) -> Response<Bytes> + Send + Sync>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The future that authorizes one request the slow way (a revocation cutoff not cached
/// yet, or a revocation body to buffer): yields the request to forward or the refusal
/// to send. Boxed because `Gate::check` is an `async fn`, whose future has no name on
/// stable Rust; the common case is decided in `call` by [`Gate::check_cached`] and
/// allocates no future.
type Authorizing<B> = Pin<Box<dyn Future<Output = Result<Request<B>, Response<Bytes>>> + Send>>;

/// A [`tower::Layer`] that authenticates Stream-style requests with a [`Gate`].
#[derive(Clone)]
pub struct ChatAuthLayer {
    shared: Arc<Shared>,
}

/// The middleware [`ChatAuthLayer`] builds around a service.
#[derive(Clone)]
pub struct ChatAuth<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// The gate (with its policy) and the renderer in one allocation: a request clones one
/// `Arc`, not several (refcounts shared by every core are contended cache lines).
#[derive(Clone)]
struct Shared {
    gate: Gate,
    renderer: Option<RejectionRenderer>,
    /// The tasks [`ChatAuthLayer::from_config_file`] started: they end when the last
    /// layer or service holding this state is dropped.
    background: Option<Arc<setup::Background>>,
}

pin_project! {
    /// The response future of [`ChatAuth`]: authorizing, then the inner service's future.
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S, B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B>
    where
        S: Service<Request<B>>,
    {
        Authorizing {
            check: Authorizing<B>,
            inner: Option<S>,
        },
        Calling {
            #[pin]
            future: S::Future,
        },
        Refused {
            response: Option<Response<Bytes>>,
        },
        Done,
    }
}

// === impl ChatAuthLayer ===

impl ChatAuthLayer {
    /// A layer that checks every request with `gate`, as its config says.
    pub fn new(gate: Gate) -> Self {
        ChatAuthLayer {
            shared: Arc::new(Shared {
                gate,
                renderer: None,
                background: None,
            }),
        }
    }

    /// The same layer, owning the tasks that keep its config and cache current.
    fn owning(mut self, background: setup::Background) -> Self {
        Arc::make_mut(&mut self.shared).background = Some(Arc::new(background));
        self
    }

    #[cfg(test)]
    fn background(&self) -> Option<&setup::Background> {
        self.shared.background.as_deref()
    }

    /// Serves `path` without auth, in addition to the config's `[auth] public_paths`.
    /// A trailing `*` makes it a prefix (`/static/*`). See [`Policy::public_path`].
    pub fn public_path(self, path: impl Into<String>) -> Self {
        self.with_policy(|policy| policy.public_path(path))
    }

    /// Accepts only tokens of these apps (api_keys); the config's other apps are
    /// answered as unknown (code 2). Useful when one config serves several services.
    /// See [`Policy::only_apps`].
    pub fn only_apps<I, K>(self, api_keys: I) -> Self
    where
        I: IntoIterator<Item = K>,
        K: AsRef<str>,
    {
        self.with_policy(|policy| policy.only_apps(api_keys))
    }

    /// Overrides the apps' `allow_anonymous` for this layer: `false` refuses anonymous
    /// users (code 5) even where the config allows them, `true` admits them for every
    /// app. See [`Policy::allow_anonymous`].
    pub fn allow_anonymous(self, allow: bool) -> Self {
        self.with_policy(|policy| policy.allow_anonymous(allow))
    }

    /// Renders HTTP refusals with `render` instead of [`render_error`]. WebSocket
    /// refusals keep the Stream frames, which the SDKs parse.
    pub fn rejection_renderer<F>(mut self, render: F) -> Self
    where
        F: Fn(&AuthError) -> Response<Bytes> + Send + Sync + 'static,
    {
        Arc::make_mut(&mut self.shared).renderer = Some(Arc::new(render));
        self
    }

    /// Changes the gate's policy: the builder methods are policy, decided by the gate.
    fn with_policy(mut self, change: impl FnOnce(Policy) -> Policy) -> Self {
        let shared = Arc::make_mut(&mut self.shared);
        let policy = change(shared.gate.policy().clone());
        shared.gate = shared.gate.clone().with_policy(policy);
        self
    }

    /// The gate this layer checks with.
    pub fn gate(&self) -> &Gate {
        &self.shared.gate
    }
}

impl<S> Layer<S> for ChatAuthLayer {
    type Service = ChatAuth<S>;

    fn layer(&self, inner: S) -> ChatAuth<S> {
        ChatAuth {
            inner,
            shared: self.shared.clone(),
        }
    }
}

impl std::fmt::Debug for ChatAuthLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatAuthLayer")
            .field("config", self.shared.gate.config())
            .field("policy", self.shared.gate.policy())
            .field("custom_renderer", &self.shared.renderer.is_some())
            .finish()
    }
}

// === impl ChatAuth ===

impl<S> ChatAuth<S> {
    /// Wraps `inner` with default options (see [`ChatAuthLayer`] for the others).
    pub fn new(inner: S, gate: Gate) -> Self {
        ChatAuthLayer::new(gate).layer(inner)
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: std::fmt::Debug> std::fmt::Debug for ChatAuth<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatAuth")
            .field("inner", &self.inner)
            .field("policy", self.shared.gate.policy())
            .finish()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for ChatAuth<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    ReqBody: http_body::Body + From<Bytes> + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<BoxError>,
    ResBody: From<Bytes>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let (mut parts, body) = request.into_parts();
        // Contract §6: the inner service gets the request the gate judges, and never a
        // client's own identity headers.
        if let Err(error) = normalize_request(&mut parts) {
            return ResponseFuture {
                state: State::Refused {
                    response: Some(self.shared.refuse(&mut parts, &error)),
                },
            };
        }
        // The common case (cached cutoffs, refusals) is decided here, with no future to
        // allocate, and calls the instance poll_ready readied.
        match self.shared.gate.check_cached(RequestParts::from(&parts)) {
            Ok(decision) => match settle(&self.shared, parts, body, decision) {
                Next::Forward(request) => ResponseFuture::calling(self.inner.call(request)),
                Next::Revoke(revoke) => self.later(revoke),
                Next::Refuse(response) => ResponseFuture {
                    state: State::Refused {
                        response: Some(response),
                    },
                },
            },
            Err(pending) => {
                let check = authorize(self.shared.clone(), parts, body, pending);
                self.later(Box::pin(check))
            }
        }
    }
}

impl<S> ChatAuth<S> {
    /// A future that calls the inner service once `check` let the request through.
    fn later<B>(&mut self, check: Authorizing<B>) -> ResponseFuture<S, B>
    where
        S: Service<Request<B>> + Clone,
    {
        // The instance poll_ready readied is the one that must be called, later,
        // from the future: keep a fresh clone here instead.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture {
            state: State::Authorizing {
                check,
                inner: Some(inner),
            },
        }
    }
}

// === impl ResponseFuture ===

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn calling(future: S::Future) -> Self {
        ResponseFuture {
            state: State::Calling { future },
        }
    }
}

impl<S, B, ResBody> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    ResBody: From<Bytes>,
{
    type Output = Result<Response<ResBody>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Authorizing { check, inner } => {
                    let outcome = ready!(check.as_mut().poll(cx));
                    match outcome {
                        Ok(request) => {
                            let mut inner = inner.take().expect("the inner service is present");
                            let future = inner.call(request);
                            this.state.set(State::Calling { future });
                        }
                        Err(refusal) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Ok(refusal.map(ResBody::from)));
                        }
                    }
                }
                StateProj::Calling { future } => return future.poll(cx),
                StateProj::Refused { response } => {
                    let response = response.take().expect("polled after completion");
                    this.state.set(State::Done);
                    return Poll::Ready(Ok(response.map(ResBody::from)));
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}

impl<S, B> std::fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Authorizing { .. } => "authorizing",
            State::Calling { .. } => "calling",
            State::Refused { .. } => "refused",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

// === authorization ===

/// The contract's HTTP refusal ([`Rejection::http`] as a response): status,
/// `Content-Type: application/json`, Stream's error object. The default renderer, and a
/// fallback for custom ones.
pub fn render_error(error: &AuthError) -> Response<Bytes> {
    Rejection::http(error).into()
}

/// What the layer does with the gate's decision.
enum Next<B> {
    /// Call the inner service with this request.
    Forward(Request<B>),
    /// Apply a revocation body first: yields the request to forward or the refusal.
    Revoke(Authorizing<B>),
    /// Answer with this refusal.
    Refuse(Response<Bytes>),
}

/// The one dispatch on a [`Decision`], shared by the synchronous path (`call`) and the
/// awaited one (`authorize`).
fn settle<B>(
    shared: &Arc<Shared>,
    mut parts: http::request::Parts,
    body: B,
    decision: Result<Decision, AuthError>,
) -> Next<B>
where
    B: http_body::Body + From<Bytes> + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    match decision {
        Ok(Decision::Public) => Next::Forward(Request::from_parts(parts, body)),
        Ok(Decision::Allow(identity)) => {
            admit(&shared.gate, &mut parts, identity);
            Next::Forward(Request::from_parts(parts, body))
        }
        Ok(Decision::Revocation(identity, endpoint)) => Next::Revoke(Box::pin(revoke(
            shared.clone(),
            parts,
            body,
            identity,
            endpoint,
        ))),
        Err(error) => Next::Refuse(shared.refuse(&mut parts, &error)),
    }
}

/// The slow path: the revocation store must be asked for a request whose token
/// `check_cached` already verified.
async fn authorize<B>(
    shared: Arc<Shared>,
    parts: http::request::Parts,
    body: B,
    pending: PendingCheck,
) -> Result<Request<B>, Response<Bytes>>
where
    B: http_body::Body + From<Bytes> + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let decision = shared.gate.finish(pending).await;
    match settle(&shared, parts, body, decision) {
        Next::Forward(request) => Ok(request),
        Next::Revoke(revoke) => revoke.await,
        Next::Refuse(response) => Err(response),
    }
}

/// Buffers a revocation body, applies it, and rebuilds the request with the same bytes.
async fn revoke<B>(
    shared: Arc<Shared>,
    mut parts: http::request::Parts,
    body: B,
    identity: Identity,
    endpoint: RevocationEndpoint,
) -> Result<Request<B>, Response<Bytes>>
where
    B: http_body::Body + From<Bytes> + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let bytes = match Limited::new(body, MAX_REVOCATION_BODY_BYTES)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            let error = AuthError::BadInput(format!(
                "request body unreadable or larger than {MAX_REVOCATION_BODY_BYTES} bytes"
            ));
            return Err(shared.refuse(&mut parts, &error));
        }
    };
    if let Err(error) = shared
        .gate
        .apply_revocation(&identity, endpoint, &bytes)
        .await
    {
        return Err(shared.refuse(&mut parts, &error));
    }
    parts.extensions.insert(identity);
    Ok(Request::from_parts(parts, B::from(bytes)))
}

/// Hands the identity to the inner service; an upgrade also gets its [`LiveSession`].
/// Rewrites the URI to its normal form and removes headers an inner service could read
/// as chatgate's identity headers (contract §6 rules 2 and 3); a path that has no normal
/// form is refused with code 4. The gate checks the rest (and the path again, which is
/// then one scan of a normal path).
fn normalize_request(parts: &mut http::request::Parts) -> Result<(), AuthError> {
    for name in normalize::forged_identity_headers(&parts.headers) {
        parts.headers.remove(name);
    }
    if let Cow::Owned(path) = normalize::path(parts.uri.path())? {
        parts.uri = normalize::with_path(&parts.uri, &path);
    }
    Ok(())
}

fn admit(gate: &Gate, parts: &mut http::request::Parts, identity: Identity) {
    if RequestParts::from(&*parts).is_websocket_upgrade() {
        parts
            .extensions
            .insert(LiveSession::new(gate.clone(), identity.clone()));
    }
    parts.extensions.insert(identity);
}

impl Shared {
    /// Logs the refusal and copies its [`Rejection`] into a response: the Stream
    /// WebSocket one for upgrades hyper can hand over, the HTTP one otherwise.
    fn refuse(&self, parts: &mut http::request::Parts, error: &AuthError) -> Response<Bytes> {
        // The path only: query strings may carry tokens.
        tracing::debug!(
            target: "chatgate::layer",
            code = error.code(),
            reason = error.reason(),
            path = parts.uri.path(),
            "request refused"
        );
        let mut rejection = Rejection::new(error, &RequestParts::from(&*parts));
        if rejection.is_upgrade() {
            match parts.extensions.remove::<hyper::upgrade::OnUpgrade>() {
                Some(on_upgrade) => return upgrade::refuse(on_upgrade, rejection),
                // Not served by hyper with upgrades: the HTTP refusal is all there is.
                None => rejection = Rejection::http(error),
            }
        }
        match &self.renderer {
            Some(render) => render(error),
            None => rejection.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{App, ConfigSnapshot};
    use crate::error::ErrorResponse;
    use crate::reload::ConfigHandle;
    use crate::revocation::{MemoryStore, RevocationCache};
    use crate::token::TokenBuilder;
    use http::{Method, StatusCode, header};
    use std::convert::Infallible;

    const SECRET: &str = "secret";

    fn gate_with(apps: Vec<App>) -> Gate {
        let config = ConfigSnapshot::with_apps(apps);
        let cache = RevocationCache::new(Arc::new(MemoryStore::new()), &config.revocation);
        Gate::new(ConfigHandle::new(config), cache)
    }

    fn gate() -> Gate {
        gate_with(vec![App::new("key", vec![SECRET.into()])])
    }

    /// Answers 200 with the identity it saw (or "none"). A clone starts unready, so
    /// calling a clone instead of the readied instance panics.
    #[derive(Default)]
    struct Echo {
        ready: bool,
        calls: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Clone for Echo {
        fn clone(&self) -> Self {
            Echo {
                ready: false,
                calls: self.calls.clone(),
            }
        }
    }

    impl Service<Request<http_body_util::Full<Bytes>>> for Echo {
        type Response = Response<http_body_util::Full<Bytes>>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            self.ready = true;
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: Request<http_body_util::Full<Bytes>>) -> Self::Future {
            assert!(self.ready, "called without poll_ready");
            self.ready = false;
            self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let who = request
                .extensions()
                .get::<Identity>()
                .map(|i| format!("{}:{}", i.kind.as_str(), i.user_id().unwrap_or("-")))
                .unwrap_or_else(|| "none".into());
            std::future::ready(Ok(Response::new(who.into())))
        }
    }

    async fn send(
        layer: &ChatAuthLayer,
        method: Method,
        uri: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (StatusCode, String) {
        use tower::ServiceExt;
        let mut request = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(http_body_util::Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        let response = layer.layer(Echo::default()).oneshot(request).await.unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    fn code(body: &str) -> i64 {
        serde_json::from_str::<serde_json::Value>(body).unwrap()["code"]
            .as_i64()
            .unwrap()
    }

    /// Sends through the layer to a service that answers with the URI and the header
    /// names it received; `None` when the layer refused (with the code).
    async fn seen_by_inner(
        layer: &ChatAuthLayer,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
    ) -> Result<String, i64> {
        use tower::ServiceExt;
        let inner = tower::service_fn(|request: Request<http_body_util::Full<Bytes>>| async move {
            let names: Vec<&str> = request.headers().keys().map(|n| n.as_str()).collect();
            let seen = format!("{} {}", request.uri(), names.join(","));
            Ok::<_, Infallible>(Response::new(http_body_util::Full::new(Bytes::from(seen))))
        });
        let mut request = Request::builder()
            .method(Method::from_bytes(method.as_bytes()).unwrap())
            .uri(uri);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap();
        let response = layer.layer(inner).oneshot(request).await.unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let body = String::from_utf8(body.to_vec()).unwrap();
        if status == StatusCode::OK {
            Ok(body)
        } else {
            Err(code(&body))
        }
    }

    #[tokio::test]
    async fn the_inner_service_gets_the_normal_path_and_none_of_the_clients_identity_headers() {
        let layer = ChatAuthLayer::new(gate()).public_path("/static/*");
        let token = TokenBuilder::user("alice").sign(SECRET);
        for (uri, seen) in [
            (
                "/static/%2e%2e/channels?api_key=key",
                "/channels?api_key=key",
            ),
            (
                "//static/./../channels?api_key=key",
                "/channels?api_key=key",
            ),
            (
                "/%63hannels?api_key=key&v=%2e",
                "/channels?api_key=key&v=%2e",
            ),
        ] {
            let headers = [
                ("authorization", token.as_str()),
                ("x-chatgate-user-id", "mallory"),
                ("x_chatgate_auth", "server"),
                ("X_ChatGate_User_Id", "mallory"),
            ];
            assert_eq!(
                seen_by_inner(&layer, "GET", uri, &headers).await,
                Ok(format!("{seen} authorization")),
                "{uri}"
            );
            // Judged as /channels: no token, no entry.
            assert_eq!(
                seen_by_inner(&layer, "GET", uri, &[]).await,
                Err(5),
                "{uri}"
            );
        }
        // A public path of the layer's own, in another spelling, is public too.
        assert_eq!(
            seen_by_inner(&layer, "GET", "/%73tatic//x", &[]).await,
            Ok("/static/x ".into())
        );
    }

    #[tokio::test]
    async fn the_layer_refuses_what_cannot_be_normalised_with_code_4_even_on_public_paths() {
        let layer = ChatAuthLayer::new(gate()).public_path("/static/*");
        let token = TokenBuilder::user("alice").sign(SECRET);
        for (method, uri) in [
            ("GET", "/static/..%2Fchannels?api_key=key"),
            ("GET", "/static/a%5Cb"),
            ("GET", "/static/a%00"),
            ("GET", "/channels?api_key=key&api_key=other"),
            ("GET", "/channels?api_key=key&%61pi_key=key"),
            ("patch", "/users?api_key=key"),
        ] {
            assert_eq!(
                seen_by_inner(&layer, method, uri, &[("authorization", &token)]).await,
                Err(4),
                "{method} {uri}"
            );
        }
        let twice = [
            ("authorization", token.as_str()),
            ("Authorization", token.as_str()),
        ];
        assert_eq!(
            seen_by_inner(&layer, "GET", "/channels?api_key=key", &twice).await,
            Err(4)
        );
    }

    #[tokio::test]
    async fn an_allowed_request_reaches_the_inner_service_with_its_identity() {
        let token = TokenBuilder::user("alice").sign(SECRET);
        let (status, body) = send(
            &ChatAuthLayer::new(gate()),
            Method::GET,
            "/channels?api_key=key",
            &[("authorization", &token)],
            "",
        )
        .await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "user:alice"));
    }

    #[tokio::test]
    async fn a_refusal_is_an_ok_response_with_the_json_error() {
        let layer = ChatAuthLayer::new(gate());
        let response = {
            use tower::ServiceExt;
            let request = Request::get("/channels?api_key=key")
                .body(http_body_util::Full::new(Bytes::new()))
                .unwrap();
            layer.layer(Echo::default()).oneshot(request).await.unwrap()
        };
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            ErrorResponse::CONTENT_TYPE
        );
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(code(std::str::from_utf8(&body).unwrap()), 5);
    }

    #[tokio::test]
    async fn extra_public_paths_skip_the_gate() {
        let layer = ChatAuthLayer::new(gate()).public_path("/static/*");
        let (status, body) = send(&layer, Method::GET, "/static/app.js", &[], "").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "none"));
        let (status, _) = send(&layer, Method::GET, "/other", &[], "").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn apps_outside_the_allowed_list_are_unknown() {
        let gate = gate_with(vec![
            App::new("key", vec![SECRET.into()]),
            App::new("other", vec!["other-secret".into()]),
        ]);
        let layer = ChatAuthLayer::new(gate).only_apps(["key"]);
        let other = TokenBuilder::user("a").sign("other-secret");
        let (status, body) = send(
            &layer,
            Method::GET,
            "/x?api_key=other",
            &[("authorization", &other)],
            "",
        )
        .await;
        assert_eq!((status, code(&body)), (StatusCode::UNAUTHORIZED, 2));
        let mine = TokenBuilder::user("a").sign(SECRET);
        let (status, _) = send(
            &layer,
            Method::GET,
            "/x?api_key=key",
            &[("authorization", &mine)],
            "",
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }

    #[tokio::test]
    async fn the_anonymous_override_widens_and_narrows_the_config() {
        let anon = [("stream-auth-type", "anonymous")];
        let allowing = ChatAuthLayer::new(gate()).allow_anonymous(true);
        let (status, body) = send(&allowing, Method::GET, "/x?api_key=key", &anon, "").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "anonymous:-"));
        let (status, body) =
            send(&allowing, Method::PATCH, "/users?api_key=key", &anon, "{}").await;
        assert_eq!((status, code(&body)), (StatusCode::FORBIDDEN, 17));

        let mut open = App::new("key", vec![SECRET.into()]);
        open.allow_anonymous = true;
        let denying = ChatAuthLayer::new(gate_with(vec![open])).allow_anonymous(false);
        let (status, body) = send(&denying, Method::GET, "/x?api_key=key", &anon, "").await;
        assert_eq!((status, code(&body)), (StatusCode::UNAUTHORIZED, 5));
    }

    #[tokio::test]
    async fn a_custom_renderer_shapes_http_refusals() {
        let layer = ChatAuthLayer::new(gate()).rejection_renderer(|error| {
            let mut response = Response::new(Bytes::from(format!("nope {}", error.code())));
            *response.status_mut() = StatusCode::IM_A_TEAPOT;
            response
        });
        let (status, body) = send(&layer, Method::GET, "/x", &[], "").await;
        assert_eq!((status, body.as_str()), (StatusCode::IM_A_TEAPOT, "nope 2"));
    }

    #[tokio::test]
    async fn a_revocation_body_is_applied_then_forwarded() {
        let gate = gate();
        let layer = ChatAuthLayer::new(gate.clone());
        let server = TokenBuilder::server().sign(SECRET);
        let old = TokenBuilder::user("u")
            .issued_at(crate::time::now_unix() - 100)
            .sign(SECRET);
        let cutoff = chrono::Utc::now().to_rfc3339();
        let body = format!(
            r#"{{"users":[{{"id":"u","set":{{"revoke_tokens_issued_before":"{cutoff}"}}}}]}}"#
        );
        let (status, seen) = send(
            &layer,
            Method::PATCH,
            "/users?api_key=key",
            &[("authorization", &server)],
            &body,
        )
        .await;
        assert_eq!((status, seen.as_str()), (StatusCode::OK, "server:-"));
        let (status, body) = send(
            &layer,
            Method::GET,
            "/x?api_key=key",
            &[("authorization", &old)],
            "",
        )
        .await;
        assert_eq!((status, code(&body)), (StatusCode::UNAUTHORIZED, 40));
    }

    #[tokio::test]
    async fn an_oversized_revocation_body_is_code_4() {
        let server = TokenBuilder::server().sign(SECRET);
        let body = " ".repeat(MAX_REVOCATION_BODY_BYTES + 1);
        let (status, body) = send(
            &ChatAuthLayer::new(gate()),
            Method::PATCH,
            "/app?api_key=key",
            &[("authorization", &server)],
            &body,
        )
        .await;
        assert_eq!((status, code(&body)), (StatusCode::BAD_REQUEST, 4));
    }

    #[tokio::test]
    async fn the_service_made_ready_is_the_one_called() {
        use tower::ServiceExt;
        let echo = Echo::default();
        let calls = echo.calls.clone();
        let mut service = ChatAuthLayer::new(gate()).layer(echo);
        let token = TokenBuilder::user("a").sign(SECRET);
        for _ in 0..3 {
            let request = Request::get("/x?api_key=key")
                .header("authorization", &token)
                .body(http_body_util::Full::new(Bytes::new()))
                .unwrap();
            // Echo asserts it was readied before each call.
            let response = service.ready().await.unwrap().call(request).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
        }
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn an_upgrade_without_hyper_falls_back_to_the_http_error() {
        let (status, body) = send(
            &ChatAuthLayer::new(gate()),
            Method::GET,
            "/connect?api_key=key",
            &[
                ("upgrade", "websocket"),
                ("connection", "Upgrade"),
                ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ],
            "",
        )
        .await;
        assert_eq!((status, code(&body)), (StatusCode::UNAUTHORIZED, 5));
    }
}
