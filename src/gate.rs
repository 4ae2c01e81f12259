//! The transport-neutral decision: "who is this, or why not" for one request
//! (contract §1-§5). Both adapters call [`Gate::check`] with the request's method,
//! URI and headers; neither knows how the answer is made. The embedder's own rules
//! (apps served, anonymous override, extra public paths) are a [`Policy`] the gate
//! applies inside the same decision, so no adapter decides anything after it.
//!
//! One decision has two halves: everything but revocation is decided synchronously on
//! the current config snapshot ([`Gate::check_cached`]); only a user whose revocation
//! cutoffs are not cached yet waits for the store ([`Gate::finish`]). Both halves end in
//! the same step, which applies the cutoff and names the outcome.

mod policy;

pub use policy::Policy;

use crate::config::{App, ConfigSnapshot, StoreErrorPolicy};
use crate::error::{AuthError, Malformed};
use crate::normalize;
use crate::reload::ConfigHandle;
use crate::revocation::{RevocationCache, parse_app_update, parse_users_update};
use crate::time::{Cutoff, now_unix};
use crate::token::{self, TokenKind};
use http::{HeaderMap, Method, Uri, header};
use std::borrow::Cow;
use std::sync::Arc;

/// Header naming the auth type (`jwt` or `anonymous`).
pub const AUTH_TYPE_HEADER: &str = "stream-auth-type";

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The app's api_key.
    pub app: Arc<str>,
    /// User, server, developer or anonymous.
    pub kind: IdentityKind,
    /// The token's `user_id` (users and developers only).
    pub user_id: Option<Arc<str>>,
    /// The token's `iat`.
    pub issued_at: Option<i64>,
    /// The token's `exp`.
    pub expires_at: Option<i64>,
}

/// What kind of caller an [`Identity`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum IdentityKind {
    /// A signed user token.
    User,
    /// A signed token without `user_id`: full access.
    Server,
    /// A developer token (`devtoken`), on an app with `disable_auth_checks`.
    Developer,
    /// `stream-auth-type: anonymous`, on an app with `allow_anonymous`.
    Anonymous,
}

impl IdentityKind {
    /// `user`, `server`, `developer` or `anonymous` (the `x-chatgate-auth` header value).
    pub fn as_str(self) -> &'static str {
        match self {
            IdentityKind::User => "user",
            IdentityKind::Server => "server",
            IdentityKind::Developer => "developer",
            IdentityKind::Anonymous => "anonymous",
        }
    }
}

impl Identity {
    /// The user id, for user and developer tokens.
    pub fn user_id(&self) -> Option<&str> {
        self.user_id.as_deref()
    }

    /// Whether this is a server token.
    pub fn is_server(&self) -> bool {
        self.kind == IdentityKind::Server
    }

    /// A user token's identity.
    pub fn user(app: impl Into<Arc<str>>, user_id: impl Into<Arc<str>>) -> Self {
        Self::with_kind(app, IdentityKind::User, Some(user_id.into()))
    }

    /// A developer token's identity (an app with `disable_auth_checks`).
    pub fn developer(app: impl Into<Arc<str>>, user_id: impl Into<Arc<str>>) -> Self {
        Self::with_kind(app, IdentityKind::Developer, Some(user_id.into()))
    }

    /// A server token's identity; also what code that authenticated its caller itself
    /// passes to [`Gate::apply_revocation`].
    pub fn server(app: impl Into<Arc<str>>) -> Self {
        Self::with_kind(app, IdentityKind::Server, None)
    }

    /// An anonymous caller's identity (`stream-auth-type: anonymous`).
    pub fn anonymous(app: impl Into<Arc<str>>) -> Self {
        Self::with_kind(app, IdentityKind::Anonymous, None)
    }

    /// The same identity with the token's `iat` and `exp`, which revocation and live
    /// sessions read.
    pub fn with_token_times(mut self, issued_at: Option<i64>, expires_at: Option<i64>) -> Self {
        self.issued_at = issued_at;
        self.expires_at = expires_at;
        self
    }

    fn with_kind(app: impl Into<Arc<str>>, kind: IdentityKind, user_id: Option<Arc<str>>) -> Self {
        Identity {
            app: app.into(),
            kind,
            user_id,
            issued_at: None,
            expires_at: None,
        }
    }
}

/// The Stream endpoints whose revocation fields chatgate applies itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RevocationEndpoint {
    /// `PATCH /users`: per-user cutoffs.
    Users,
    /// `PATCH /app`: the app-wide cutoff.
    App,
}

/// The outcome of [`Gate::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Decision {
    /// A public path: forward without an identity.
    Public,
    /// Authenticated: forward with this identity.
    Allow(Identity),
    /// A server token calling a revocation endpoint: the adapter buffers the body,
    /// calls [`Gate::apply_revocation`], and forwards the request if that succeeds.
    Revocation(Identity, RevocationEndpoint),
}

/// The parts of a request the gate reads. `http::request::Parts` (tower) and Pingora's
/// `RequestHeader` both provide them.
#[derive(Debug, Clone, Copy)]
pub struct RequestParts<'a> {
    /// Method.
    pub method: &'a Method,
    /// Path and query.
    pub uri: &'a Uri,
    /// Headers.
    pub headers: &'a HeaderMap,
}

impl<'a> From<&'a http::request::Parts> for RequestParts<'a> {
    fn from(parts: &'a http::request::Parts) -> Self {
        RequestParts {
            method: &parts.method,
            uri: &parts.uri,
            headers: &parts.headers,
        }
    }
}

impl<'a> RequestParts<'a> {
    /// Whether this is a WebSocket upgrade request.
    pub fn is_websocket_upgrade(&self) -> bool {
        self.headers
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
    }
}

/// What the synchronous step found; the revocation step needs no config guard.
struct Verified {
    identity: Identity,
    now: i64,
    config_cutoff: Option<Cutoff>,
    policy: StoreErrorPolicy,
    endpoint: Option<RevocationEndpoint>,
}

/// A request whose token passed every check but revocation, and whose cutoffs are not
/// cached: [`Gate::finish`] reads them from the store.
pub struct PendingCheck(Verified);

impl std::fmt::Debug for PendingCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("PendingCheck")
            .field(&self.0.identity)
            .finish()
    }
}

/// The gate: config snapshot, revocation cache and policy. Cheap to clone.
#[derive(Clone)]
pub struct Gate {
    config: ConfigHandle,
    revocations: Arc<RevocationCache>,
    policy: Arc<Policy>,
}

impl Gate {
    /// A gate over a live config and a revocation cache, with the default [`Policy`]
    /// (the config alone decides).
    pub fn new(config: ConfigHandle, revocations: Arc<RevocationCache>) -> Self {
        Gate {
            config,
            revocations,
            policy: Arc::default(),
        }
    }

    /// The same gate applying `policy` on top of the config.
    pub fn with_policy(mut self, policy: Policy) -> Self {
        self.policy = Arc::new(policy);
        self
    }

    /// The policy this gate applies on top of the config.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The live config.
    pub fn config(&self) -> &ConfigHandle {
        &self.config
    }

    /// The revocation cache.
    pub fn revocations(&self) -> &Arc<RevocationCache> {
        &self.revocations
    }

    /// Decides one request.
    pub async fn check(&self, request: RequestParts<'_>) -> Result<Decision, AuthError> {
        match self.check_cached(request) {
            Ok(decision) => decision,
            Err(pending) => self.finish(pending).await,
        }
    }

    /// [`Gate::check`] without waiting, for the common case: `Ok` when the decision
    /// needs no store read (refusals, public paths, server and anonymous identities,
    /// and users whose cutoffs are cached); otherwise the verified request, for
    /// [`Gate::finish`] to complete without checking the token again. Lets an adapter
    /// skip allocating a future on cache hits.
    pub fn check_cached(
        &self,
        request: RequestParts<'_>,
    ) -> Result<Result<Decision, AuthError>, PendingCheck> {
        let verified = match self.verify(request) {
            Ok(Some(verified)) => verified,
            Ok(None) => return Ok(Ok(Decision::Public)),
            Err(error) => return Ok(Err(error)),
        };
        let stored = match &verified.identity.user_id {
            None => Ok(None),
            Some(user) => {
                let app = &verified.identity.app;
                match self.revocations.cached_cutoff(app, user, verified.now) {
                    Some(hit) => Ok(hit),
                    None => return Err(PendingCheck(verified)),
                }
            }
        };
        Ok(decide(verified, stored))
    }

    /// Completes a [`Gate::check_cached`] that needed the revocation store: the same
    /// last step, with the cutoff read from the store.
    pub async fn finish(&self, pending: PendingCheck) -> Result<Decision, AuthError> {
        let verified = pending.0;
        let stored = match &verified.identity.user_id {
            None => Ok(None),
            Some(user) => self.revocations.cutoff(&verified.identity.app, user).await,
        };
        decide(verified, stored)
    }

    /// Everything but revocation, on the snapshot current now; `Ok(None)` is a public path.
    fn verify(&self, request: RequestParts<'_>) -> Result<Option<Verified>, AuthError> {
        authenticate(&self.config.load(), &self.policy, request, now_unix())
    }

    /// Applies the revocation fields of a `PATCH /users` or `PATCH /app` body for the
    /// identity's app. Other fields are left for the upstream. Returns once the store
    /// has the change durably.
    pub async fn apply_revocation(
        &self,
        identity: &Identity,
        endpoint: RevocationEndpoint,
        body: &[u8],
    ) -> Result<(), AuthError> {
        let now = now_unix();
        let store_error = |error: crate::revocation::StoreError| {
            tracing::warn!(target: "chatgate::revocation", %error, "revocation write failed");
            AuthError::StoreUnavailable
        };
        match endpoint {
            RevocationEndpoint::Users => {
                let changes = parse_users_update(body, now)?;
                if !changes.is_empty() {
                    self.revocations
                        .set_user_cutoffs(&identity.app, &changes)
                        .await
                        .map_err(store_error)?;
                }
            }
            RevocationEndpoint::App => {
                if let Some(cutoff) = parse_app_update(body, now)? {
                    self.revocations
                        .set_app_cutoff(&identity.app, cutoff)
                        .await
                        .map_err(store_error)?;
                }
            }
        }
        Ok(())
    }
}

/// The last step of both paths: the decision once the stored cutoff (or the store's
/// failure) is known.
fn decide(
    verified: Verified,
    stored: Result<Option<Cutoff>, crate::revocation::StoreError>,
) -> Result<Decision, AuthError> {
    let cutoff = match stored {
        Ok(stored) => stored.max(verified.config_cutoff),
        Err(error) => match verified.policy {
            StoreErrorPolicy::Deny => {
                tracing::warn!(target: "chatgate::revocation", %error, "store error on a cache miss, denying");
                return Err(AuthError::StoreUnavailable);
            }
            StoreErrorPolicy::Allow => verified.config_cutoff,
        },
    };
    let identity = verified.identity;
    if identity.user_id.is_some() && cutoff.is_some_and(|c| c.revokes(identity.issued_at)) {
        return Err(AuthError::Revoked);
    }
    Ok(match verified.endpoint {
        Some(endpoint) => Decision::Revocation(identity, endpoint),
        None => Decision::Allow(identity),
    })
}

/// The query parameters the gate reads, borrowed unless percent-encoded.
#[derive(Default)]
struct Query<'a> {
    api_key: Option<Cow<'a, str>>,
    authorization: Option<Cow<'a, str>>,
    auth_type: Option<Cow<'a, str>>,
    json: Option<Cow<'a, str>>,
}

/// Reads the four parameters the gate needs, as `application/x-www-form-urlencoded`
/// does (`form_urlencoded::parse` is the reference in the tests), but decodes only the
/// components it keeps, and only those with something to decode: the common query
/// costs no allocation and no UTF-8 repair pass.
fn parse_query(query: &str) -> Query<'_> {
    let mut found = Query::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match &*decode_component(name) {
            "api_key" => &mut found.api_key,
            "authorization" => &mut found.authorization,
            "stream-auth-type" => &mut found.auth_type,
            "json" => &mut found.json,
            _ => continue,
        };
        *slot = Some(decode_component(value));
    }
    found
}

/// One query component: `+` is a space, `%XX` a byte, invalid UTF-8 replaced.
fn decode_component(raw: &str) -> Cow<'_, str> {
    if !raw.bytes().any(|b| b == b'%' || b == b'+') {
        return Cow::Borrowed(raw);
    }
    let spaced = raw.replace('+', " ");
    Cow::Owned(
        percent_encoding::percent_decode_str(&spaced)
            .decode_utf8_lossy()
            .into_owned(),
    )
}

/// A header as text. `from_utf8` rather than `HeaderValue::to_str`, whose byte-by-byte
/// check of a 200-byte token showed in the profile; a non-ASCII value still fails later,
/// as malformed, because no token or keyword contains one.
fn header_str(headers: &HeaderMap, name: impl header::AsHeaderName) -> Option<&str> {
    headers
        .get(name)
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
}

fn strip_bearer(token: &str) -> &str {
    let token = token.trim();
    match token.get(..6) {
        Some(scheme)
            if scheme.eq_ignore_ascii_case("bearer")
                && token[6..].starts_with(|c: char| c.is_ascii_whitespace()) =>
        {
            token[6..].trim_start()
        }
        Some(scheme) if scheme.eq_ignore_ascii_case("bearer") && token.len() == 6 => "",
        _ => token,
    }
}

fn revocation_endpoint(method: &Method, path: &str) -> Option<RevocationEndpoint> {
    if method != Method::PATCH {
        return None;
    }
    match path.strip_suffix('/').unwrap_or(path) {
        "/users" => Some(RevocationEndpoint::Users),
        "/app" => Some(RevocationEndpoint::App),
        _ => None,
    }
}

/// Everything but revocation: public paths, app, auth type, token, WS user match, with
/// the policy applied where each rule is decided. `Ok(None)` is a public path.
fn authenticate(
    config: &ConfigSnapshot,
    policy: &Policy,
    request: RequestParts<'_>,
    now: i64,
) -> Result<Option<Verified>, AuthError> {
    // Contract §6: everything below matches the normal form, which the adapters forward.
    let path = normalize::request(request.method, request.uri, request.headers)?;
    let path = &*path;
    if config.auth.public_paths.contains(path) || policy.is_public(path) {
        return Ok(None);
    }
    let query = parse_query(request.uri.query().unwrap_or(""));
    let api_key = query.api_key.as_deref().ok_or(AuthError::MissingApiKey)?;
    // An app the policy does not serve is as unknown as one the config lacks.
    let app = config
        .app(api_key)
        .filter(|app| policy.serves(app))
        .ok_or(AuthError::UnknownApiKey)?;
    let websocket = request.is_websocket_upgrade();

    // Swift sends headers on the upgrade too, so headers win when both are present.
    let header_token = header_str(request.headers, header::AUTHORIZATION);
    let query_token = query
        .authorization
        .as_deref()
        .map(strip_bearer)
        .filter(|t| !t.is_empty());
    let token = match header_token {
        Some(t) => Some(strip_bearer(t)),
        None if websocket => query_token,
        None => None,
    }
    .filter(|t| !t.is_empty());
    if let (true, Some(header), Some(query)) = (websocket, token, query_token)
        && header != query
    {
        // One credential (contract §6 rule 1): the upstream may read either.
        return Err(normalize::Unsafe::TokensDiffer.into());
    }

    let auth_type = header_str(request.headers, AUTH_TYPE_HEADER).or(if websocket {
        query.auth_type.as_deref()
    } else {
        None
    });
    let anonymous = match auth_type.map(str::trim) {
        None => false,
        Some(t) if t.eq_ignore_ascii_case("jwt") => false,
        Some(t) if t.eq_ignore_ascii_case("anonymous") => true,
        Some(_) => return Err(AuthError::Malformed(Malformed::AuthType)),
    };

    let endpoint = revocation_endpoint(request.method, path);
    if anonymous {
        if !policy.admits_anonymous(app) {
            return Err(AuthError::AnonymousNotAllowed);
        }
        if endpoint.is_some() {
            return Err(AuthError::NotAllowed(
                "only server-side auth can revoke tokens: use a server token",
            ));
        }
        return Ok(Some(Verified {
            now,
            identity: Identity::anonymous(app.api_key.clone()),
            config_cutoff: None,
            policy: config.revocation.on_store_error,
            endpoint: None,
        }));
    }

    let token = token.ok_or(AuthError::Malformed(Malformed::Missing))?;
    let verified = token::verify(token, app.keyring(), &app.token_rules(&config.auth), now)?;
    let claims = verified.claims;
    if claims
        .user_id
        .as_deref()
        .is_some_and(|id| !normalize::user_id_is_text(id))
    {
        return Err(AuthError::Malformed(Malformed::UserIdNotText));
    }
    let app_key = app.api_key.clone();
    let identity = match (verified.kind, claims.user_id) {
        (TokenKind::Server, _) => Identity::server(app_key),
        (TokenKind::User, Some(user)) => Identity::user(app_key, user),
        (TokenKind::Developer, Some(user)) => Identity::developer(app_key, user),
        // token::verify names a token without user_id a server token; never widen a
        // user or developer token into one.
        (TokenKind::User | TokenKind::Developer, None) => {
            return Err(AuthError::Malformed(Malformed::EmptyUserId));
        }
    }
    .with_token_times(claims.issued_at, claims.expires_at);

    if let (true, Some(json), Some(user)) = (websocket, query.json.as_deref(), identity.user_id()) {
        check_connect_user(json, user)?;
    }
    if endpoint.is_some() && !identity.is_server() {
        return Err(AuthError::NotAllowed(
            "only server-side auth can revoke tokens: use a server token",
        ));
    }
    Ok(Some(Verified {
        now,
        identity,
        config_cutoff: app_config_cutoff(app),
        policy: config.revocation.on_store_error,
        endpoint,
    }))
}

fn app_config_cutoff(app: &App) -> Option<Cutoff> {
    app.revoke_tokens_issued_before
}

/// `/connect?json={"user_id":..,"user_details":{"id":..}}` must name the token's user.
fn check_connect_user(json: &str, token_user: &str) -> Result<(), AuthError> {
    #[derive(serde::Deserialize)]
    struct Connect<'a> {
        #[serde(borrow, default)]
        user_id: Option<Cow<'a, str>>,
        #[serde(borrow, default)]
        user_details: Option<Details<'a>>,
    }
    #[derive(serde::Deserialize)]
    struct Details<'a> {
        #[serde(borrow, default)]
        id: Option<Cow<'a, str>>,
    }
    let connect: Connect<'_> = serde_json::from_str(json).map_err(|_| {
        AuthError::BadInput("the json query parameter is not a valid connect payload".into())
    })?;
    let claimed = [connect.user_id, connect.user_details.and_then(|d| d.id)];
    if claimed
        .iter()
        .flatten()
        .any(|claimed| claimed.as_ref() != token_user)
    {
        return Err(AuthError::NotAllowed(
            "the user_id in the connect payload does not match the token's user_id",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{App, StoreErrorPolicy, StoreKind};
    use crate::revocation::{MemoryStore, RevocationStore, UserCutoffChange};
    use crate::token::TokenBuilder;
    use std::time::Duration;

    const SECRET: &str = "secret";

    fn gate_with(configure: impl FnOnce(&mut App)) -> Gate {
        let mut app = App::new("key", vec![SECRET.into()]);
        configure(&mut app);
        let config = ConfigSnapshot::with_apps(vec![app]);
        let cache = RevocationCache::new(Arc::new(MemoryStore::new()), &config.revocation);
        Gate::new(ConfigHandle::new(config), cache)
    }

    fn gate() -> Gate {
        gate_with(|_| {})
    }

    async fn run(
        gate: &Gate,
        method: Method,
        uri: &str,
        headers: &[(&str, &str)],
    ) -> Result<Decision, AuthError> {
        let uri: Uri = uri.parse().unwrap();
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        gate.check(RequestParts {
            method: &method,
            uri: &uri,
            headers: &map,
        })
        .await
    }

    async fn get(gate: &Gate, uri: &str, headers: &[(&str, &str)]) -> Result<Decision, AuthError> {
        run(gate, Method::GET, uri, headers).await
    }

    fn user(decision: Result<Decision, AuthError>) -> Identity {
        match decision {
            Ok(Decision::Allow(identity)) => identity,
            other => panic!("expected Allow, got {other:?}"),
        }
    }

    proptest::proptest! {
        #[test]
        fn the_query_reads_as_form_urlencoded_does(
            query in proptest::string::string_regex(
                "((api_key|authorization|stream-auth-type|json|api%5Fkey|x|)(=[a-zA-Z0-9%+=._\\-]{0,12})?&?){0,6}"
            ).unwrap(),
        ) {
            let ours = parse_query(&query);
            let mut reference: [Option<String>; 4] = Default::default();
            for (name, value) in form_urlencoded::parse(query.as_bytes()) {
                let at = match &*name {
                    "api_key" => 0,
                    "authorization" => 1,
                    "stream-auth-type" => 2,
                    "json" => 3,
                    _ => continue,
                };
                reference[at] = Some(value.into_owned());
            }
            let ours = [ours.api_key, ours.authorization, ours.auth_type, ours.json]
                .map(|v| v.map(Cow::into_owned));
            proptest::prop_assert_eq!(ours, reference);
        }
    }

    #[tokio::test]
    async fn non_ascii_header_values_are_malformed_not_missing_or_a_panic() {
        let gate = gate();
        let uri = "/channels?api_key=key";
        let method = Method::GET;
        let parsed: Uri = uri.parse().unwrap();
        for (name, value) in [
            (
                "authorization",
                "Bearer t\u{f6}ken.p\u{e4}yload.sig".as_bytes(),
            ),
            ("authorization", b"Bearer \xff\xfe.a.b".as_slice()),
            ("stream-auth-type", "j\u{fc}t".as_bytes()),
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(
                http::header::AUTHORIZATION,
                TokenBuilder::user("alice").sign(SECRET).parse().unwrap(),
            );
            headers.insert(
                http::HeaderName::from_static(name),
                http::HeaderValue::from_bytes(value).unwrap(),
            );
            let decision = gate
                .check(RequestParts {
                    method: &method,
                    uri: &parsed,
                    headers: &headers,
                })
                .await;
            assert!(
                matches!(decision, Err(AuthError::Malformed(_))),
                "{name}: {value:?} gave {decision:?}"
            );
        }
    }

    #[tokio::test]
    async fn raw_and_bearer_headers_both_authenticate() {
        let gate = gate();
        let token = TokenBuilder::user("alice").sign(SECRET);
        for value in [
            token.clone(),
            format!("Bearer {token}"),
            format!("bearer {token}"),
        ] {
            let identity = user(
                get(
                    &gate,
                    "/channels?api_key=key",
                    &[("authorization", &value), ("stream-auth-type", "jwt")],
                )
                .await,
            );
            assert_eq!(identity.user_id(), Some("alice"));
            assert_eq!(identity.kind, IdentityKind::User);
        }
        // missing stream-auth-type means jwt when a token is present
        user(get(&gate, "/channels?api_key=key", &[("authorization", &token)]).await);
    }

    #[tokio::test]
    async fn api_key_missing_or_unknown_is_code_2() {
        let gate = gate();
        let token = TokenBuilder::user("a").sign(SECRET);
        let auth = [("authorization", token.as_str())];
        assert_eq!(
            get(&gate, "/channels", &auth).await,
            Err(AuthError::MissingApiKey)
        );
        assert_eq!(
            get(&gate, "/channels?api_key=nope", &auth).await,
            Err(AuthError::UnknownApiKey)
        );
    }

    #[tokio::test]
    async fn missing_token_and_bad_auth_type_are_code_5() {
        let gate = gate();
        assert_eq!(
            get(&gate, "/x?api_key=key", &[]).await,
            Err(AuthError::Malformed(Malformed::Missing))
        );
        assert_eq!(
            get(&gate, "/x?api_key=key", &[("authorization", "Bearer ")]).await,
            Err(AuthError::Malformed(Malformed::Missing))
        );
        let token = TokenBuilder::user("a").sign(SECRET);
        assert_eq!(
            get(
                &gate,
                "/x?api_key=key",
                &[("authorization", &token), ("stream-auth-type", "oauth")]
            )
            .await,
            Err(AuthError::Malformed(Malformed::AuthType))
        );
    }

    #[tokio::test]
    async fn query_tokens_count_only_on_websocket_upgrades() {
        let gate = gate();
        let token = TokenBuilder::user("a").sign(SECRET);
        let uri = format!("/connect?api_key=key&authorization={token}&stream-auth-type=jwt");
        assert_eq!(
            get(&gate, &uri, &[]).await,
            Err(AuthError::Malformed(Malformed::Missing))
        );
        let identity = user(
            get(
                &gate,
                &uri,
                &[("upgrade", "websocket"), ("connection", "Upgrade")],
            )
            .await,
        );
        assert_eq!(identity.user_id(), Some("a"));
    }

    #[tokio::test]
    async fn connect_payload_must_name_the_token_user() {
        let gate = gate();
        let token = TokenBuilder::user("alice").sign(SECRET);
        let ws = [("upgrade", "websocket")];
        let with_json = |json: &str| {
            let encoded: String = form_urlencoded::byte_serialize(json.as_bytes()).collect();
            format!("/connect?api_key=key&authorization={token}&json={encoded}")
        };
        user(
            get(
                &gate,
                &with_json(r#"{"user_id":"alice","user_details":{"id":"alice"}}"#),
                &ws,
            )
            .await,
        );
        for json in [
            r#"{"user_id":"mallory"}"#,
            r#"{"user_id":"alice","user_details":{"id":"mallory"}}"#,
        ] {
            let error = get(&gate, &with_json(json), &ws).await.unwrap_err();
            assert_eq!(error.code(), 17, "{json}");
        }
        assert_eq!(
            get(&gate, &with_json("{not json"), &ws)
                .await
                .unwrap_err()
                .code(),
            4
        );
    }

    #[tokio::test]
    async fn anonymous_only_where_allowed() {
        let denied = gate();
        let anon = [("stream-auth-type", "anonymous")];
        assert_eq!(
            get(&denied, "/x?api_key=key", &anon).await,
            Err(AuthError::AnonymousNotAllowed)
        );
        let allowed = gate_with(|a| a.allow_anonymous = true);
        let identity = user(get(&allowed, "/x?api_key=key", &anon).await);
        assert_eq!(identity.kind, IdentityKind::Anonymous);
        // JS sends authorization= (empty) with anonymous on /connect
        let ws = user(
            get(
                &allowed,
                "/connect?api_key=key&authorization=&stream-auth-type=anonymous",
                &[("upgrade", "websocket")],
            )
            .await,
        );
        assert_eq!(ws.kind, IdentityKind::Anonymous);
    }

    #[tokio::test]
    async fn the_policy_is_part_of_the_decision() {
        let token = TokenBuilder::user("a").sign(SECRET);
        let auth = [("authorization", token.as_str())];
        let anon = [("stream-auth-type", "anonymous")];
        // An app outside only_apps is unknown whatever its token, before it is read.
        let elsewhere = gate().with_policy(Policy::new().only_apps(["other"]));
        for headers in [&auth[..], &[("authorization", "garbage")][..], &anon[..]] {
            assert_eq!(
                get(&elsewhere, "/x?api_key=key", headers).await,
                Err(AuthError::UnknownApiKey),
                "{headers:?}"
            );
        }
        let served = gate().with_policy(Policy::new().only_apps(["key"]));
        user(get(&served, "/x?api_key=key", &auth).await);
        // The anonymous override widens and narrows the app's own setting.
        let widened = gate().with_policy(Policy::new().allow_anonymous(true));
        let identity = user(get(&widened, "/x?api_key=key", &anon).await);
        assert_eq!(identity, Identity::anonymous("key"));
        let error = run(&widened, Method::PATCH, "/app?api_key=key", &anon)
            .await
            .unwrap_err();
        assert_eq!(error.code(), 17);
        let narrowed = gate_with(|a| a.allow_anonymous = true)
            .with_policy(Policy::new().allow_anonymous(false));
        assert_eq!(
            get(&narrowed, "/x?api_key=key", &anon).await,
            Err(AuthError::AnonymousNotAllowed)
        );
        // Extra public paths join the config's.
        let public = gate().with_policy(Policy::new().public_path("/static/*"));
        assert_eq!(
            get(&public, "/static/a.js", &[]).await,
            Ok(Decision::Public)
        );
        assert_eq!(get(&public, "/healthz", &[]).await, Ok(Decision::Public));
        assert!(get(&public, "/other", &[]).await.is_err());
    }

    #[tokio::test]
    async fn public_paths_need_nothing() {
        assert_eq!(get(&gate(), "/healthz", &[]).await, Ok(Decision::Public));
    }

    #[tokio::test]
    async fn revocation_endpoints_need_a_server_token() {
        let gate = gate();
        let server = TokenBuilder::server().sign(SECRET);
        let user_token = TokenBuilder::user("a").sign(SECRET);
        let decision = run(
            &gate,
            Method::PATCH,
            "/users?api_key=key",
            &[("authorization", &server)],
        )
        .await
        .unwrap();
        assert!(matches!(
            decision,
            Decision::Revocation(_, RevocationEndpoint::Users)
        ));
        let decision = run(
            &gate,
            Method::PATCH,
            "/app?api_key=key",
            &[("authorization", &server)],
        )
        .await
        .unwrap();
        assert!(matches!(
            decision,
            Decision::Revocation(_, RevocationEndpoint::App)
        ));
        let error = run(
            &gate,
            Method::PATCH,
            "/users?api_key=key",
            &[("authorization", &user_token)],
        )
        .await
        .unwrap_err();
        assert_eq!(error.code(), 17);
        // other methods on the same paths are ordinary requests
        user(
            run(
                &gate,
                Method::POST,
                "/users?api_key=key",
                &[("authorization", &user_token)],
            )
            .await,
        );
    }

    async fn revoke_user(gate: &Gate, body: &str) -> Result<(), AuthError> {
        gate.apply_revocation(
            &Identity::server("key"),
            RevocationEndpoint::Users,
            body.as_bytes(),
        )
        .await
    }

    #[tokio::test]
    async fn a_user_cutoff_revokes_older_tokens_and_tokens_without_iat_as_code_40() {
        let gate = gate();
        let now = now_unix();
        let old = TokenBuilder::user("u").issued_at(now - 100).sign(SECRET);
        let fresh = TokenBuilder::user("u").issued_at(now + 2).sign(SECRET);
        let no_iat = TokenBuilder::user("u").without_iat().sign(SECRET);
        let other_user = TokenBuilder::user("v").issued_at(now - 100).sign(SECRET);
        let cutoff = chrono::DateTime::from_timestamp(now, 0)
            .unwrap()
            .to_rfc3339();
        revoke_user(&gate, &format!(r#"{{"users":[{{"id":"u","set":{{"revoke_tokens_issued_before":"{cutoff}","name":"x"}}}}]}}"#)).await.unwrap();
        let check = |t: String| {
            let gate = gate.clone();
            async move { get(&gate, "/x?api_key=key", &[("authorization", &t)]).await }
        };
        assert_eq!(check(old.clone()).await, Err(AuthError::Revoked));
        assert_eq!(check(no_iat.clone()).await.unwrap_err().code(), 40);
        user(check(fresh).await);
        user(check(other_user).await);
        // undo with null, as every SDK does
        revoke_user(
            &gate,
            r#"{"users":[{"id":"u","set":{"revoke_tokens_issued_before":null}}]}"#,
        )
        .await
        .unwrap();
        user(check(old.clone()).await);
        // and with unset
        revoke_user(
            &gate,
            &format!(
                r#"{{"users":[{{"id":"u","set":{{"revoke_tokens_issued_before":"{cutoff}"}}}}]}}"#
            ),
        )
        .await
        .unwrap();
        assert_eq!(check(old.clone()).await, Err(AuthError::Revoked));
        revoke_user(
            &gate,
            r#"{"users":[{"id":"u","unset":["revoke_tokens_issued_before"]}]}"#,
        )
        .await
        .unwrap();
        user(check(old).await);
    }

    #[tokio::test]
    async fn app_cutoffs_from_config_and_api_revoke_users_but_not_servers() {
        let now = now_unix();
        let gate = gate_with(|a| {
            a.revoke_tokens_issued_before = Some(Cutoff::from_unix_seconds(now - 50))
        });
        let before = TokenBuilder::user("u").issued_at(now - 100).sign(SECRET);
        let after = TokenBuilder::user("u").issued_at(now - 10).sign(SECRET);
        let server = TokenBuilder::server().sign(SECRET);
        let check = |t: &str| {
            let gate = gate.clone();
            let t = t.to_owned();
            async move { get(&gate, "/x?api_key=key", &[("authorization", &t)]).await }
        };
        assert_eq!(check(&before).await, Err(AuthError::Revoked));
        user(check(&after).await);
        let identity = Identity::server("key");
        gate.apply_revocation(
            &identity,
            RevocationEndpoint::App,
            format!(r#"{{"revoke_tokens_issued_before":{now}}}"#).as_bytes(),
        )
        .await
        .unwrap();
        assert_eq!(check(&after).await, Err(AuthError::Revoked));
        assert!(matches!(check(&server).await, Ok(Decision::Allow(_))));
        gate.apply_revocation(
            &identity,
            RevocationEndpoint::App,
            br#"{"revoke_tokens_issued_before":null}"#,
        )
        .await
        .unwrap();
        user(check(&after).await);
    }

    /// A store that never answers: misses must follow the policy quickly.
    struct Hung;

    #[async_trait::async_trait]
    impl RevocationStore for Hung {
        async fn user_cutoff(
            &self,
            _: &str,
            _: &str,
        ) -> Result<Option<Cutoff>, crate::revocation::StoreError> {
            std::future::pending().await
        }
        async fn set_user_cutoffs(
            &self,
            _: &str,
            _: &[UserCutoffChange],
        ) -> Result<(), crate::revocation::StoreError> {
            std::future::pending().await
        }
        async fn app_cutoff(
            &self,
            _: &str,
        ) -> Result<Option<Cutoff>, crate::revocation::StoreError> {
            std::future::pending().await
        }
        async fn set_app_cutoff(
            &self,
            _: &str,
            _: Option<Cutoff>,
        ) -> Result<(), crate::revocation::StoreError> {
            std::future::pending().await
        }
        fn subscribe(
            &self,
        ) -> tokio::sync::broadcast::Receiver<crate::revocation::RevocationEvent> {
            tokio::sync::broadcast::channel(1).1
        }
        async fn ping(&self) -> Result<(), crate::revocation::StoreError> {
            std::future::pending().await
        }
    }

    #[tokio::test]
    async fn a_hung_store_answers_503_or_allows_per_policy_within_the_timeout() {
        for (policy, expect_allowed) in [
            (StoreErrorPolicy::Deny, false),
            (StoreErrorPolicy::Allow, true),
        ] {
            let mut config = ConfigSnapshot::with_apps(vec![App::new("key", vec![SECRET.into()])]);
            config.revocation.on_store_error = policy;
            config.revocation.store = StoreKind::Memory;
            config.revocation.store_timeout = Duration::from_millis(50);
            let cache = RevocationCache::new(Arc::new(Hung), &config.revocation);
            let gate = Gate::new(ConfigHandle::new(config), cache);
            let token = TokenBuilder::user("u").sign(SECRET);
            let started = std::time::Instant::now();
            let result = get(&gate, "/x?api_key=key", &[("authorization", &token)]).await;
            assert!(started.elapsed() < Duration::from_secs(1));
            if expect_allowed {
                user(result);
            } else {
                let error = result.unwrap_err();
                assert_eq!((error.code(), error.status().as_u16()), (-1, 503));
            }
        }
    }

    #[tokio::test]
    async fn check_cached_decides_without_the_store_only_once_cutoffs_are_cached() {
        let gate = gate();
        let token = TokenBuilder::user("u").sign(SECRET);
        let uri: Uri = "/x?api_key=key".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, token.parse().unwrap());
        let parts = RequestParts {
            method: &Method::GET,
            uri: &uri,
            headers: &headers,
        };
        let pending = gate.check_cached(parts).unwrap_err();
        let checked = gate.finish(pending).await;
        assert!(matches!(checked, Ok(Decision::Allow(_))));
        assert_eq!(gate.check_cached(parts).unwrap(), checked);
        // refusals and public paths never need the store
        let bad: Uri = "/x?api_key=nope".parse().unwrap();
        assert_eq!(
            gate.check_cached(RequestParts { uri: &bad, ..parts })
                .unwrap(),
            Err(AuthError::UnknownApiKey)
        );
    }
}
