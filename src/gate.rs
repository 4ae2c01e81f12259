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
//!
//! By concern: `credentials` reads what the request presents (query, headers, connect
//! payload), `policy` is the embedder's rules combined with the config's keys, and this
//! file holds the decision itself.

mod credentials;
mod policy;

pub use policy::Policy;

pub use crate::request::RequestParts;

use credentials::Credentials;

use crate::config::{App, ConfigSnapshot, StoreErrorPolicy};
use crate::error::{AuthError, Malformed};
use crate::limits::{self, FailedAuthLimiter};
use crate::normalize;
use crate::reload::ConfigHandle;
use crate::revocation::sessions::SessionRegistry;
use crate::revocation::{RevocationCache, parse_app_update, parse_users_update};
use crate::time::{Cutoff, StampedCutoff, now_unix};
use crate::token::{self, Cached, Keyring, TokenKind};
use http::Method;
use std::net::IpAddr;
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

/// What the synchronous step found; the revocation step needs no config guard.
struct Verified {
    identity: Identity,
    config_cutoff: Option<Cutoff>,
    policy: StoreErrorPolicy,
    endpoint: Option<RevocationEndpoint>,
    /// The client failures are counted against, when the limiter is on.
    client: Option<IpAddr>,
}

/// The stored cutoff when known without I/O (`Some(None)`: none, or no user to
/// revoke); `None` when the store must be asked.
type CachedCutoff = Option<Option<Cutoff>>;

/// Where a verified token's cache entry is, for the revocation step of the same
/// request: the answer stamped on it last time, and where to stamp a new one.
struct TokenEntry<'a> {
    keyring: &'a Keyring,
    token: &'a str,
    stamp: TokenStamp,
}

/// The revocation answer a verified token brings to its request.
enum TokenStamp {
    /// The token is in the keyring's cache, with the answer last stamped on it, if any.
    Kept(Option<StampedCutoff>),
    /// The token was verified by this request, and its user's cutoffs looked up in the
    /// revocation cache once for both the request and the token's cache entry: `None`
    /// when they are not both cached.
    Verified(Option<StampedCutoff>),
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
    limiter: Arc<FailedAuthLimiter>,
    sessions: Arc<SessionRegistry>,
}

impl Gate {
    /// A gate over a live config and a revocation cache, with the default [`Policy`]
    /// (the config alone decides).
    pub fn new(config: ConfigHandle, revocations: Arc<RevocationCache>) -> Self {
        let sessions = Arc::new(SessionRegistry::with_config(revocations.clone(), &config));
        Gate {
            config,
            sessions,
            revocations,
            policy: Arc::default(),
            limiter: Arc::default(),
        }
    }

    /// The failed-authentication limiter (contract §6 rule 7), shared by clones.
    pub fn limiter(&self) -> &FailedAuthLimiter {
        &self.limiter
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

    /// The live WebSocket sessions admitted through this gate (and its clones).
    pub fn sessions(&self) -> &Arc<SessionRegistry> {
        &self.sessions
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
        let config = self.config.load();
        // Contract §6 rule 7: an address over the limit is answered before anything is
        // checked. Off (no lookup at all) unless `[limits] failed_auth_per_minute` is set.
        let client = match (config.limits.failed_auth_per_minute, request.peer) {
            (Some(limit), Some(peer)) => {
                let client =
                    limits::client_address(peer, request.headers, &config.limits.trusted_proxies);
                if self.limiter.is_over(client, limit) {
                    return Ok(Err(AuthError::RateLimited));
                }
                Some(client)
            }
            _ => None,
        };
        let (verified, cached) = match authenticate(
            &config,
            &self.policy,
            &self.revocations,
            request,
            now_unix(),
        ) {
            Ok(Some(verified)) => verified,
            Ok(None) => return Ok(Ok(Decision::Public)),
            Err(error) => return Ok(Err(self.counted(client, error))),
        };
        drop(config);
        let verified = Verified { client, ..verified };
        let stored = match cached {
            Some(hit) => Ok(hit),
            None => return Err(PendingCheck(verified)),
        };
        Ok(self.decide(verified, stored))
    }

    /// Completes a [`Gate::check_cached`] that needed the revocation store: the same
    /// last step, with the cutoff read from the store.
    pub async fn finish(&self, pending: PendingCheck) -> Result<Decision, AuthError> {
        let verified = pending.0;
        let stored = match &verified.identity.user_id {
            None => Ok(None),
            Some(user) => self.revocations.cutoff(&verified.identity.app, user).await,
        };
        self.decide(verified, stored)
    }

    /// [`decide`], counting a refusal against the client.
    fn decide(
        &self,
        verified: Verified,
        stored: Result<Option<Cutoff>, crate::revocation::StoreError>,
    ) -> Result<Decision, AuthError> {
        let client = verified.client;
        decide(verified, stored).map_err(|error| self.counted(client, error))
    }

    /// Counts `error` against `client` when the limiter is on and the code counts.
    fn counted(&self, client: Option<IpAddr>, error: AuthError) -> AuthError {
        if let Some(client) = client
            && limits::counts(error.code())
        {
            self.limiter.record_failure(client);
        }
        error
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

/// Everything but the store: public paths, app, auth type, token, WS user match, with
/// the policy applied where each rule is decided, then the cached revocation answer
/// for an admitted user: the stored cutoff when known without I/O (`Some(None)`: none,
/// or no user to revoke), `None` for [`Gate::finish`] to read. `Ok(None)` is a public
/// path.
fn authenticate(
    config: &ConfigSnapshot,
    policy: &Policy,
    revocations: &RevocationCache,
    request: RequestParts<'_>,
    now: i64,
) -> Result<Option<(Verified, CachedCutoff)>, AuthError> {
    // Contract §6: everything below matches the normal form, which the adapters forward.
    let path = normalize::request(request.method, request.uri, request.headers)?;
    let path = &*path;
    if policy.is_public(&config.auth, path) {
        return Ok(None);
    }
    let presented = Credentials::read(request);
    let api_key = presented.api_key().ok_or(AuthError::MissingApiKey)?;
    // An app the policy does not serve is as unknown as one the config lacks.
    let app = config
        .app(api_key)
        .filter(|app| policy.serves(app))
        .ok_or(AuthError::UnknownApiKey)?;
    let token = presented.token()?;
    let anonymous = presented.is_anonymous()?;

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
        let verified = Verified {
            identity: Identity::anonymous(app.api_key.clone()),
            config_cutoff: None,
            policy: config.revocation.on_store_error,
            endpoint: None,
            client: None,
        };
        return Ok(Some((verified, Some(None))));
    }

    let token = token.ok_or(AuthError::Malformed(Malformed::Missing))?;
    let keyring = app.keyring();
    let (verified, cached) =
        token::verify_stamped(token, keyring, &app.token_rules(&config.auth), now)?;
    if verified
        .claims
        .user_id
        .as_deref()
        .is_some_and(|id| !normalize::user_id_is_text(id))
    {
        return Err(AuthError::Malformed(Malformed::UserIdNotText));
    }
    let stamp = match cached {
        Cached::Yes(stamp) => TokenStamp::Kept(stamp),
        Cached::No => {
            let stamp = verified
                .claims
                .user_id
                .as_deref()
                .and_then(|user| revocations.cached_stamped(&app.api_key, user, now));
            keyring.remember(token, &verified, stamp);
            TokenStamp::Verified(stamp)
        }
    };
    let claims = verified.claims;
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

    if let Some(user) = identity.user_id() {
        presented.check_connect_user(user)?;
    }
    if endpoint.is_some() && !identity.is_server() {
        return Err(AuthError::NotAllowed(
            "only server-side auth can revoke tokens: use a server token",
        ));
    }
    let cached = match identity.user_id() {
        None => Some(None),
        Some(user) => {
            let entry = TokenEntry {
                keyring,
                token,
                stamp,
            };
            cached_cutoff(revocations, &identity.app, user, now, entry)
        }
    };
    let verified = Verified {
        identity,
        config_cutoff: app_config_cutoff(app),
        policy: config.revocation.on_store_error,
        endpoint,
        client: None,
    };
    Ok(Some((verified, cached)))
}

/// A user's stored cutoff without I/O: the answer stamped on the token's cache entry
/// while the revocation cache says it holds (one moka lookup per request, the
/// token's), else both cached cutoffs, then stamped on the entry for the next requests.
/// A token verified by this request brings the cutoffs looked up for it.
fn cached_cutoff(
    revocations: &RevocationCache,
    app: &str,
    user: &str,
    now: i64,
    entry: TokenEntry<'_>,
) -> Option<Option<Cutoff>> {
    let kept = match entry.stamp {
        TokenStamp::Verified(looked_up) => return looked_up.map(|stamp| stamp.cutoff),
        TokenStamp::Kept(kept) => kept,
    };
    if let Some(hit) = kept
        .as_ref()
        .and_then(|stamp| revocations.stamped(stamp, now))
    {
        return Some(hit);
    }
    let stamp = revocations.cached_stamped(app, user, now)?;
    entry.keyring.restamp(entry.token, stamp);
    Some(stamp.cutoff)
}

fn app_config_cutoff(app: &App) -> Option<Cutoff> {
    app.revoke_tokens_issued_before
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{App, StoreErrorPolicy, StoreKind};
    use crate::revocation::{MemoryStore, RevocationEvent, RevocationStore, UserCutoffChange};
    use crate::token::TokenBuilder;
    use http::{HeaderMap, Uri, header};
    use std::sync::atomic::Ordering;
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
        check_from(gate, method, None, uri, headers).await
    }

    /// One request as a client at `peer` sends it; repeated header names stay repeated.
    async fn check_from(
        gate: &Gate,
        method: Method,
        peer: Option<&str>,
        uri: &str,
        headers: &[(&str, &str)],
    ) -> Result<Decision, AuthError> {
        let uri: Uri = uri.parse().unwrap();
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        gate.check(RequestParts {
            method: &method,
            uri: &uri,
            headers: &map,
            peer: peer.map(|p| p.parse().unwrap()),
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
                    peer: None,
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
    async fn a_credential_header_that_is_not_text_is_refused_never_read_as_absent() {
        let gate = gate();
        let token = TokenBuilder::user("a").sign(SECRET);
        let with_query = format!("/connect?api_key=key&authorization={token}");
        let bearer_latin1 = [b"Bearer ".as_slice(), token.as_bytes(), b"\xe9"].concat();
        let not_utf8: [&[u8]; 4] = [b"\xff", b"\xc3\x28", b"\x80abc", &bearer_latin1];
        for value in not_utf8 {
            for (name, uri, websocket) in [
                // the gate would judge the query token while the upstream reads the header
                ("authorization", with_query.as_str(), true),
                ("authorization", "/channels?api_key=key", false),
                ("stream-auth-type", with_query.as_str(), true),
            ] {
                let uri: Uri = uri.parse().unwrap();
                let mut headers = HeaderMap::new();
                if websocket {
                    headers.insert(header::UPGRADE, "websocket".parse().unwrap());
                    headers.insert(header::CONNECTION, "Upgrade".parse().unwrap());
                }
                headers.insert(
                    http::HeaderName::from_static(name),
                    http::HeaderValue::from_bytes(value).unwrap(),
                );
                let checked = gate
                    .check(RequestParts {
                        method: &Method::GET,
                        uri: &uri,
                        headers: &headers,
                        peer: None,
                    })
                    .await;
                let expected = if name == "authorization" {
                    Malformed::Base64
                } else {
                    Malformed::AuthType
                };
                assert_eq!(
                    checked,
                    Err(AuthError::Malformed(expected)),
                    "{name}: {value:?}"
                );
            }
        }
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
        for (uri, endpoint) in [
            ("/users?api_key=key", RevocationEndpoint::Users),
            ("/app?api_key=key", RevocationEndpoint::App),
        ] {
            let decision = run(&gate, Method::PATCH, uri, &[("authorization", &server)]).await;
            assert!(
                matches!(&decision, Ok(Decision::Revocation(_, e)) if *e == endpoint),
                "{uri}: {decision:?}"
            );
        }
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

    /// Revokes user `u`'s tokens issued before `cutoff` (RFC 3339), as the SDKs send it.
    async fn revoke_u_before(gate: &Gate, cutoff: &str) {
        let body = format!(
            r#"{{"users":[{{"id":"u","set":{{"revoke_tokens_issued_before":"{cutoff}"}}}}]}}"#
        );
        revoke_user(gate, &body).await.unwrap();
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
        revoke_u_before(&gate, &cutoff).await;
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

    /// The target and headers of a `GET /x?api_key=key` that presents `token`.
    fn authorized(token: &str) -> (Uri, HeaderMap) {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, token.parse().unwrap());
        ("/x?api_key=key".parse().unwrap(), headers)
    }

    fn get_parts<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> RequestParts<'a> {
        RequestParts {
            method: &Method::GET,
            uri,
            headers,
            peer: None,
        }
    }

    #[tokio::test]
    async fn check_cached_decides_without_the_store_only_once_cutoffs_are_cached() {
        let gate = gate();
        let (uri, headers) = authorized(&TokenBuilder::user("u").sign(SECRET));
        let parts = get_parts(&uri, &headers);
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

    #[tokio::test]
    async fn a_token_is_kept_from_its_second_request_with_its_users_cutoffs() {
        let gate = gate();
        let config = gate.config().load();
        let keyring = || config.app("key").unwrap().keyring();
        let now = now_unix();
        let token = TokenBuilder::user("u").issued_at(now - 100).sign(SECRET);
        let (uri, headers) = authorized(&token);
        let parts = get_parts(&uri, &headers);
        // First request: verified, the user's cutoffs read from the store; not kept.
        let first = gate.finish(gate.check_cached(parts).unwrap_err()).await;
        assert_eq!(user(first.clone()).user_id(), Some("u"));
        assert_eq!(keyring().cached_tokens(), 0);
        // Second: verified again and decided from the cached cutoffs, then kept with them.
        assert_eq!(gate.check_cached(parts).unwrap(), first);
        assert_eq!(keyring().cached_tokens(), 1);
        let kept = keyring().cached_stamped(&token).unwrap();
        assert_eq!(kept.stamp.map(|stamp| stamp.cutoff), Some(None));
        // Third: from the keyring's cache, and still revocable.
        assert_eq!(gate.check_cached(parts).unwrap(), first);
        let cutoff = chrono::DateTime::from_timestamp(now, 0)
            .unwrap()
            .to_rfc3339();
        revoke_u_before(&gate, &cutoff).await;
        let refused = match gate.check_cached(parts) {
            Ok(decided) => decided,
            Err(pending) => gate.finish(pending).await,
        };
        assert_eq!(refused, Err(AuthError::Revoked));
    }

    fn limited_gate(limit: u32, store: Arc<MemoryStore>) -> Gate {
        let mut config = ConfigSnapshot::with_apps(vec![App::new("key", vec![SECRET.into()])]);
        config.limits.failed_auth_per_minute = Some(limit);
        let cache = RevocationCache::new(store, &config.revocation);
        Gate::new(ConfigHandle::new(config), cache)
    }

    async fn from_peer(
        gate: &Gate,
        peer: Option<&str>,
        uri: &str,
        headers: &[(&str, &str)],
    ) -> Result<Decision, AuthError> {
        check_from(gate, Method::GET, peer, uri, headers).await
    }

    #[tokio::test]
    async fn counted_refusals_limit_an_address_and_the_429s_and_bad_input_do_not_count() {
        let store = Arc::new(MemoryStore::new());
        let gate = limited_gate(3, store.clone());
        let good = TokenBuilder::user("alice").sign(SECRET);
        let auth = [("authorization", good.as_str())];
        let peer = Some("192.0.2.1");
        // Code 4 (bad input) does not count, however often.
        for _ in 0..5 {
            let refused = from_peer(&gate, peer, "/x?api_key=key&api_key=key", &auth).await;
            assert_eq!(refused.unwrap_err().code(), 4);
        }
        assert_eq!(
            from_peer(&gate, peer, "/x?api_key=nope", &auth).await,
            Err(AuthError::UnknownApiKey)
        );
        assert_eq!(
            from_peer(&gate, peer, "/x?api_key=key", &[("authorization", "x")])
                .await
                .unwrap_err()
                .code(),
            5
        );
        // A user whose cutoff is not cached goes through the store: counted there too.
        let revoked = TokenBuilder::user("bob")
            .issued_at(now_unix() - 60)
            .sign(SECRET);
        store
            .set_user_cutoffs(
                "key",
                &[UserCutoffChange {
                    user_id: "bob".into(),
                    cutoff: Some(Cutoff::from_unix_seconds(now_unix())),
                }],
            )
            .await
            .unwrap();
        assert_eq!(
            from_peer(
                &gate,
                peer,
                "/x?api_key=key",
                &[("authorization", &revoked)]
            )
            .await,
            Err(AuthError::Revoked)
        );
        // Over the limit: even a good token is answered 429, and that does not count.
        for _ in 0..3 {
            assert_eq!(
                from_peer(&gate, peer, "/x?api_key=key", &auth).await,
                Err(AuthError::RateLimited)
            );
        }
        // Other addresses, and requests whose peer is unknown, are not limited.
        user(from_peer(&gate, Some("192.0.2.2"), "/x?api_key=key", &auth).await);
        user(from_peer(&gate, None, "/x?api_key=key", &auth).await);
        // A reload that turns the limit off lets the address through at once.
        let mut off = ConfigSnapshot::with_apps(vec![App::new("key", vec![SECRET.into()])]);
        off.limits.failed_auth_per_minute = None;
        gate.config().store(off);
        user(from_peer(&gate, peer, "/x?api_key=key", &auth).await);
    }

    #[tokio::test]
    async fn forwarded_for_names_the_client_only_behind_a_trusted_proxy() {
        let mut config = ConfigSnapshot::with_apps(vec![App::new("key", vec![SECRET.into()])]);
        config.limits.failed_auth_per_minute = Some(1);
        config.limits.trusted_proxies = crate::config::TrustedProxies::new(vec![
            crate::config::TrustedProxies::parse_entry("127.0.0.1").unwrap(),
        ]);
        let cache = RevocationCache::new(Arc::new(MemoryStore::new()), &config.revocation);
        let gate = Gate::new(ConfigHandle::new(config), cache);
        let good = TokenBuilder::user("alice").sign(SECRET);
        let proxy = Some("127.0.0.1");
        let bad = [("authorization", "x"), ("x-forwarded-for", "203.0.113.5")];
        assert_eq!(
            from_peer(&gate, proxy, "/x?api_key=key", &bad)
                .await
                .unwrap_err()
                .code(),
            5
        );
        let as_client = |xff: &'static str| {
            [
                ("authorization", good.clone()),
                ("x-forwarded-for", xff.to_owned()),
            ]
        };
        let limited = as_client("198.51.100.1, 203.0.113.5");
        let limited: Vec<(&str, &str)> = limited.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(
            from_peer(&gate, proxy, "/x?api_key=key", &limited).await,
            Err(AuthError::RateLimited)
        );
        let other = as_client("203.0.113.6");
        let other: Vec<(&str, &str)> = other.iter().map(|(k, v)| (*k, v.as_str())).collect();
        user(from_peer(&gate, proxy, "/x?api_key=key", &other).await);
        // The same header from a peer that is not trusted is ignored.
        let spoofed = as_client("203.0.113.5");
        let spoofed: Vec<(&str, &str)> = spoofed.iter().map(|(k, v)| (*k, v.as_str())).collect();
        user(from_peer(&gate, Some("192.0.2.9"), "/x?api_key=key", &spoofed).await);
    }

    /// A user's cutoff written behind this instance's back, as another instance (or
    /// the Redis store's listener) would, and the event it sends.
    async fn revoke_elsewhere(gate: &Gate, event: RevocationEvent) {
        let store = gate.revocations().store();
        match &event {
            RevocationEvent::User { app, user, cutoff } => {
                let change = UserCutoffChange {
                    user_id: user.to_string(),
                    cutoff: *cutoff,
                };
                store.set_user_cutoffs(app, &[change]).await.unwrap();
            }
            RevocationEvent::App { app, cutoff } => {
                store.set_app_cutoff(app, *cutoff).await.unwrap();
            }
            RevocationEvent::Resync => {}
        }
        gate.revocations().apply_event(&event).await;
    }

    #[tokio::test]
    async fn a_repeated_tokens_stamped_answer_gives_way_to_the_next_cutoff() {
        let gate = gate();
        let now = now_unix();
        let token = TokenBuilder::user("u").issued_at(now - 100).sign(SECRET);
        let headers = [("authorization", token.as_str())];
        let check = || get(&gate, "/x?api_key=key", &headers);
        let stamp = || {
            let config = gate.config().load();
            let entry = config.app("key").unwrap().keyring().cached_stamped(&token);
            entry.and_then(|entry| entry.stamp)
        };
        let (app, u): (Arc<str>, Arc<str>) = (Arc::from("key"), Arc::from("u"));
        let cutoff = Some(Cutoff::from_unix_seconds(now));
        let user_event = |cutoff| RevocationEvent::User {
            app: app.clone(),
            user: u.clone(),
            cutoff,
        };
        let app_event = |cutoff| RevocationEvent::App {
            app: app.clone(),
            cutoff,
        };
        // The first request reads the store; the second finds both cutoffs cached and
        // stamps the answer on the token's entry; the third takes the stamp alone.
        for _ in 0..3 {
            user(check().await);
        }
        let hits = gate.revocations().stats().hits.load(Ordering::Relaxed);
        assert!(stamp().is_some(), "a repeated token carries its answer");
        user(check().await);
        assert_eq!(
            gate.revocations().stats().hits.load(Ordering::Relaxed),
            hits + 1,
            "a stamped answer counts as a cache hit"
        );

        // Each way a cutoff arrives applies to the very next request, and to the
        // ones after it (a store read, a new stamp, the stamp).
        let revoked = || async {
            for _ in 0..3 {
                assert_eq!(check().await, Err(AuthError::Revoked));
            }
        };
        let admitted = || async {
            for _ in 0..3 {
                user(check().await);
            }
        };
        revoke_elsewhere(&gate, user_event(cutoff)).await;
        revoked().await;
        revoke_elsewhere(&gate, user_event(None)).await;
        admitted().await;
        revoke_elsewhere(&gate, app_event(cutoff)).await;
        revoked().await;
        revoke_elsewhere(&gate, app_event(None)).await;
        admitted().await;
        // Missed events: the resync voids the stamp, so the store is read again.
        let store = gate.revocations().store().clone();
        let change = UserCutoffChange {
            user_id: "u".into(),
            cutoff,
        };
        store.set_user_cutoffs("key", &[change]).await.unwrap();
        user(check().await); // no event yet: the cache (and its stamp) still answers
        revoke_elsewhere(&gate, RevocationEvent::Resync).await;
        revoked().await;
        // This instance's own write.
        revoke_user(
            &gate,
            r#"{"users":[{"id":"u","set":{"revoke_tokens_issued_before":null}}]}"#,
        )
        .await
        .unwrap();
        admitted().await;
        revoke_user(
            &gate,
            &format!(r#"{{"users":[{{"id":"u","set":{{"revoke_tokens_issued_before":{now}}}}}]}}"#),
        )
        .await
        .unwrap();
        revoked().await;
    }

    #[tokio::test]
    async fn a_stamp_from_one_revocation_cache_is_not_taken_by_another() {
        // Two gates over one config (so one keyring, one verified-token cache) and
        // each its own store and cache, both at their first epoch.
        let config = ConfigHandle::new(ConfigSnapshot::with_apps(vec![App::new(
            "key",
            vec![SECRET.into()],
        )]));
        let settings = config.load().revocation.clone();
        let open = RevocationCache::new(Arc::new(MemoryStore::new()), &settings);
        let revoked_store = Arc::new(MemoryStore::new());
        let now = now_unix();
        let change = UserCutoffChange {
            user_id: "u".into(),
            cutoff: Some(Cutoff::from_unix_seconds(now)),
        };
        revoked_store
            .set_user_cutoffs("key", &[change])
            .await
            .unwrap();
        let revoked = RevocationCache::new(revoked_store, &settings);
        let (open, revoked) = (Gate::new(config.clone(), open), Gate::new(config, revoked));
        let token = TokenBuilder::user("u").issued_at(now - 100).sign(SECRET);
        let headers = [("authorization", token.as_str())];
        for _ in 0..3 {
            user(get(&open, "/x?api_key=key", &headers).await);
        }
        for _ in 0..3 {
            assert_eq!(
                get(&revoked, "/x?api_key=key", &headers).await,
                Err(AuthError::Revoked)
            );
        }
        user(get(&open, "/x?api_key=key", &headers).await);
    }
}
