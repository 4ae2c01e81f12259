//! Live sessions (contract §4): an accepted WebSocket must not outlive its token.
//! [`LiveSession::ended`] resolves when the token's `exp` passes or when a revocation
//! cutoff covering the token is stored; the handler then closes the socket with
//! [`crate::ws::CLOSE_TOKEN_INVALIDATED`] (4000). Any code but 1000 makes the SDKs
//! reconnect; the reconnect gets the code-40 frame and they refresh their token.
//!
//! [`crate::ChatAuthLayer`] puts a `LiveSession` into the extensions of every WebSocket
//! upgrade it admits (axum: take `Option<LiveSession>` in the handler); the edge proxy
//! watches the sessions it relays the same way.
//!
//! Why a [`SessionRegistry`]: with tens of thousands of idle sockets, a revocation
//! must not wake them all. Each [`Gate`] owns one registry, indexed by (app, user), and
//! one task per registry follows the store's change events (local writes and, with
//! the Redis store, other instances' writes arriving over pub/sub). A user's cutoff
//! wakes only that user's sessions, an app-wide cutoff only that app's; only a
//! `Resync` (events may have been missed) wakes every session to re-read its cutoffs.
//! Expiry is a timer per session (`sleep_until` the gate's own refusal instant,
//! `exp + leeway`), never a poll.

use crate::gate::{Gate, Identity};
use crate::revocation::{RevocationCache, RevocationEvent};
use crate::time::Cutoff;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;
use tokio::sync::broadcast::error::RecvError;

/// Watches one admitted WebSocket's token. Cheap to clone.
#[derive(Clone)]
pub struct LiveSession {
    gate: Gate,
    identity: Identity,
}

/// Why a live session must end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionEnd {
    /// The token's `exp` (plus the leeway) has passed.
    Expired,
    /// A revocation cutoff now covers the token.
    Revoked,
}

impl SessionEnd {
    /// The close code to send: 4000, so that SDKs reconnect and refresh.
    pub fn close_code(self) -> u16 {
        crate::ws::CLOSE_TOKEN_INVALIDATED
    }

    /// The close reason to send.
    pub fn reason(self) -> &'static str {
        match self {
            SessionEnd::Expired => "token expired",
            SessionEnd::Revoked => "token revoked",
        }
    }
}

impl LiveSession {
    /// Watches `identity`'s token with `gate`'s config and revocation store.
    pub fn new(gate: Gate, identity: Identity) -> Self {
        LiveSession { gate, identity }
    }

    /// Whose session this is.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The gate watching it.
    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// Resolves when the session must end; never, for a token without `exp` that no
    /// cutoff can reach (server and anonymous identities). Store errors never end a
    /// session: the next connect is checked anyway. The session is registered from
    /// the first poll until the future is dropped.
    pub async fn ended(&self) -> SessionEnd {
        let registration = self.gate.sessions().register(&self.identity);
        // A cutoff stored between the admission and the registration would be missed.
        if registration.is_some() && self.revoked_now().await {
            return SessionEnd::Revoked;
        }
        let expiry = tokio::time::sleep_until(self.expiry_deadline());
        tokio::pin!(expiry);
        let has_expiry = self.identity.expires_at.is_some();
        loop {
            tokio::select! {
                () = &mut expiry, if has_expiry => return SessionEnd::Expired,
                wake = wait(registration.as_ref()) => match wake {
                    Wake::Revoked => return SessionEnd::Revoked,
                    Wake::Recheck => {
                        if self.revoked_now().await {
                            return SessionEnd::Revoked;
                        }
                    }
                },
            }
        }
    }

    /// The instant the gate starts refusing the token as expired (`now >= exp +
    /// leeway`); far in the future without `exp`.
    pub fn expiry_deadline(&self) -> tokio::time::Instant {
        let Some(exp) = self.identity.expires_at else {
            return far_future();
        };
        let leeway = self.gate.config().load().auth.leeway_seconds;
        let deadline_ms = exp.saturating_add(leeway).saturating_mul(1000);
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let wait = u64::try_from(deadline_ms.saturating_sub(now_ms)).unwrap_or(0);
        tokio::time::Instant::now() + Duration::from_millis(wait)
    }

    fn revokes(&self, cutoff: Option<Cutoff>) -> bool {
        cutoff.is_some_and(|cutoff| cutoff.revokes(self.identity.issued_at))
    }

    pub(crate) async fn revoked_now(&self) -> bool {
        let Some(user) = &self.identity.user_id else {
            return false;
        };
        let app = &self.identity.app;
        let configured = self
            .gate
            .config()
            .load()
            .app(app)
            .and_then(|a| a.revoke_tokens_issued_before);
        let cache = self.gate.revocations();
        let stored_app = cache.app_cutoff(app).await.ok().flatten();
        let stored_user = cache.user_cutoff(app, user).await.ok().flatten();
        self.revokes(configured.max(stored_app).max(stored_user))
    }
}

/// About a year: a deadline that never comes for a session without one (tokio's
/// timer wheel takes any instant; this keeps the arithmetic away from overflow).
fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600)
}

impl std::fmt::Debug for LiveSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveSession")
            .field("identity", &self.identity)
            .finish()
    }
}

/// What woke a registered session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// A cutoff covering the session's token was announced.
    Revoked,
    /// Events may have been missed: read the cutoffs again.
    Recheck,
}

/// Waits for the registration's next wake; forever without one.
pub async fn wait(registration: Option<&Registration>) -> Wake {
    match registration {
        Some(registration) => registration.woken().await,
        None => std::future::pending().await,
    }
}

const LIVE: u8 = 0;
const REVOKED: u8 = 1;
const RECHECK: u8 = 2;

/// One registered session: its `iat` (what a cutoff is compared with) and its wake-up.
#[derive(Debug)]
struct Watch {
    issued_at: Option<i64>,
    state: AtomicU8,
    notify: Notify,
}

impl Watch {
    fn wake(&self, state: u8) {
        // A revocation is final; a recheck never overwrites it.
        if state == REVOKED {
            self.state.store(REVOKED, Ordering::Release);
        } else {
            let _ = self
                .state
                .compare_exchange(LIVE, state, Ordering::AcqRel, Ordering::Acquire);
        }
        self.notify.notify_one();
    }
}

type Users = HashMap<Arc<str>, Vec<Arc<Watch>>>;

/// The live sessions of one [`Gate`], indexed by app and user (see the module docs).
pub struct SessionRegistry {
    cache: Arc<RevocationCache>,
    index: Mutex<HashMap<Arc<str>, Users>>,
    /// The task following the store's events, started by the first registration.
    follower: Mutex<Option<tokio::task::JoinHandle<()>>>,
    woken: AtomicU64,
}

/// A session's place in the [`SessionRegistry`]; leaves it on drop.
#[derive(Debug)]
pub struct Registration {
    registry: Arc<SessionRegistry>,
    app: Arc<str>,
    user: Arc<str>,
    watch: Arc<Watch>,
}

impl Registration {
    /// Resolves at the next wake (at once if one came since the last).
    pub async fn woken(&self) -> Wake {
        loop {
            let notified = self.watch.notify.notified();
            match self.watch.state.load(Ordering::Acquire) {
                REVOKED => return Wake::Revoked,
                RECHECK => {
                    let _ = self.watch.state.compare_exchange(
                        RECHECK,
                        LIVE,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                    return Wake::Recheck;
                }
                _ => notified.await,
            }
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut index = self.registry.lock();
        if let Some(users) = index.get_mut(&self.app) {
            if let Some(watches) = users.get_mut(&self.user) {
                watches.retain(|w| !Arc::ptr_eq(w, &self.watch));
                if watches.is_empty() {
                    users.remove(&self.user);
                }
            }
            if users.is_empty() {
                index.remove(&self.app);
            }
        }
    }
}

impl std::fmt::Debug for SessionRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionRegistry")
            .field("sessions", &self.len())
            .finish_non_exhaustive()
    }
}

impl SessionRegistry {
    /// An empty registry following `cache`'s store.
    pub fn new(cache: Arc<RevocationCache>) -> Self {
        SessionRegistry {
            cache,
            index: Mutex::default(),
            follower: Mutex::default(),
            woken: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Users>> {
        // A panic while holding the lock leaves the index consistent (no step spans
        // two states), so a poisoned lock is still usable.
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a session of `identity`; `None` when no cutoff can reach it (no user:
    /// server and anonymous identities). Must run inside a tokio runtime, which the
    /// first registration uses to follow the store's events.
    pub fn register(self: &Arc<Self>, identity: &Identity) -> Option<Registration> {
        let user: Arc<str> = identity.user_id.clone()?;
        self.follow();
        let watch = Arc::new(Watch {
            issued_at: identity.issued_at,
            state: AtomicU8::new(LIVE),
            notify: Notify::new(),
        });
        self.lock()
            .entry(identity.app.clone())
            .or_default()
            .entry(user.clone())
            .or_default()
            .push(watch.clone());
        Some(Registration {
            registry: self.clone(),
            app: identity.app.clone(),
            user,
            watch,
        })
    }

    /// Registered sessions.
    pub fn len(&self) -> usize {
        self.lock()
            .values()
            .flat_map(|users| users.values())
            .map(Vec::len)
            .sum()
    }

    /// Whether no session is registered.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Sessions woken so far (revocations and rechecks), for tests and benchmarks.
    pub fn wakeups(&self) -> u64 {
        self.woken.load(Ordering::Relaxed)
    }

    /// Starts (or restarts, if its runtime went away) the task that follows the
    /// store's events. Subscribes before returning, so no event after a registration
    /// is missed.
    fn follow(self: &Arc<Self>) {
        let mut follower = self.follower.lock().unwrap_or_else(|p| p.into_inner());
        if follower.as_ref().is_some_and(|task| !task.is_finished()) {
            return;
        }
        let mut events = self.cache.store().subscribe();
        let registry: Weak<SessionRegistry> = Arc::downgrade(self);
        *follower = Some(tokio::spawn(async move {
            loop {
                let event = events.recv().await;
                let Some(registry) = registry.upgrade() else {
                    return;
                };
                match event {
                    Ok(event) => registry.apply(&event),
                    Err(RecvError::Lagged(_)) => registry.apply(&RevocationEvent::Resync),
                    Err(RecvError::Closed) => return,
                }
            }
        }));
    }

    /// Wakes the sessions `event` reaches.
    pub fn apply(&self, event: &RevocationEvent) {
        let index = self.lock();
        let mut woken = 0;
        let mut revoke = |watches: &[Arc<Watch>], cutoff: Cutoff| {
            for watch in watches {
                if cutoff.revokes(watch.issued_at) {
                    watch.wake(REVOKED);
                    woken += 1;
                }
            }
        };
        match event {
            RevocationEvent::User {
                app,
                user,
                cutoff: Some(cutoff),
            } => {
                if let Some(watches) = index.get(app).and_then(|users| users.get(user)) {
                    revoke(watches, *cutoff);
                }
            }
            RevocationEvent::App {
                app,
                cutoff: Some(cutoff),
            } => {
                for watches in index.get(app).into_iter().flat_map(|users| users.values()) {
                    revoke(watches, *cutoff);
                }
            }
            // A cleared cutoff ends nothing.
            RevocationEvent::User { cutoff: None, .. }
            | RevocationEvent::App { cutoff: None, .. } => {}
            RevocationEvent::Resync => {
                for watch in index.values().flat_map(|users| users.values()).flatten() {
                    watch.wake(RECHECK);
                    woken += 1;
                }
            }
        }
        self.woken.fetch_add(woken, Ordering::Relaxed);
    }
}

impl Drop for SessionRegistry {
    fn drop(&mut self) {
        if let Some(task) = self.follower.get_mut().ok().and_then(Option::take) {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{App, ConfigSnapshot};
    use crate::gate::{IdentityKind, RevocationEndpoint};
    use crate::reload::ConfigHandle;
    use crate::revocation::{MemoryStore, RevocationCache};
    use crate::time::now_unix;
    use std::sync::Arc;

    fn gate(leeway: i64) -> Gate {
        let mut config = ConfigSnapshot::with_apps(vec![App::new("key", vec!["s".into()])]);
        config.auth.leeway_seconds = leeway;
        let cache = RevocationCache::new(Arc::new(MemoryStore::new()), &config.revocation);
        Gate::new(ConfigHandle::new(config), cache)
    }

    fn identity(kind: IdentityKind, user: Option<&str>, iat: i64, exp: Option<i64>) -> Identity {
        match (kind, user) {
            (IdentityKind::User, Some(user)) => Identity::user("key", user),
            (IdentityKind::Server, None) => Identity::server("key"),
            other => panic!("not used here: {other:?}"),
        }
        .with_token_times(Some(iat), exp)
    }

    fn server() -> Identity {
        identity(IdentityKind::Server, None, now_unix(), None)
    }

    async fn wait(session: &LiveSession) -> SessionEnd {
        tokio::time::timeout(Duration::from_secs(10), session.ended())
            .await
            .expect("the session should have ended")
    }

    #[tokio::test]
    async fn a_session_ends_when_its_user_is_revoked() {
        let gate = gate(5);
        let session = LiveSession::new(
            gate.clone(),
            identity(IdentityKind::User, Some("u"), now_unix() - 100, None),
        );
        let ended = tokio::spawn({
            let session = session.clone();
            async move { wait(&session).await }
        });
        // Let the watcher subscribe, then revoke (either order must end it).
        tokio::task::yield_now().await;
        let body = format!(
            r#"{{"users":[{{"id":"u","set":{{"revoke_tokens_issued_before":{}}}}}]}}"#,
            now_unix()
        );
        gate.apply_revocation(&server(), RevocationEndpoint::Users, body.as_bytes())
            .await
            .unwrap();
        assert_eq!(ended.await.unwrap(), SessionEnd::Revoked);
    }

    #[tokio::test]
    async fn a_session_ends_at_once_if_already_revoked() {
        let gate = gate(5);
        let body = format!(r#"{{"revoke_tokens_issued_before":{}}}"#, now_unix());
        gate.apply_revocation(&server(), RevocationEndpoint::App, body.as_bytes())
            .await
            .unwrap();
        let session = LiveSession::new(
            gate,
            identity(IdentityKind::User, Some("u"), now_unix() - 100, None),
        );
        assert_eq!(wait(&session).await, SessionEnd::Revoked);
    }

    #[tokio::test]
    async fn a_session_ends_when_its_token_expires() {
        let session = LiveSession::new(
            gate(0),
            identity(
                IdentityKind::User,
                Some("u"),
                now_unix(),
                Some(now_unix() + 1),
            ),
        );
        assert_eq!(wait(&session).await, SessionEnd::Expired);
    }

    #[tokio::test]
    async fn other_users_revocations_and_server_sessions_are_left_alone() {
        let gate = gate(5);
        let mine = LiveSession::new(
            gate.clone(),
            identity(IdentityKind::User, Some("u"), now_unix() - 100, None),
        );
        let server_session = LiveSession::new(gate.clone(), server());
        let body = format!(
            r#"{{"users":[{{"id":"other","set":{{"revoke_tokens_issued_before":{}}}}}]}}"#,
            now_unix()
        );
        let watch_mine = mine.ended();
        let watch_server = server_session.ended();
        tokio::pin!(watch_mine, watch_server);
        // Poll both once so that they subscribe before the revocation.
        assert!(futures_util::poll!(&mut watch_mine).is_pending());
        assert!(futures_util::poll!(&mut watch_server).is_pending());
        gate.apply_revocation(&server(), RevocationEndpoint::Users, body.as_bytes())
            .await
            .unwrap();
        assert!(futures_util::poll!(&mut watch_mine).is_pending());
        let app_body = format!(r#"{{"revoke_tokens_issued_before":{}}}"#, now_unix());
        gate.apply_revocation(&server(), RevocationEndpoint::App, app_body.as_bytes())
            .await
            .unwrap();
        // The app-wide cutoff ends the user's session, never the server's.
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(10), &mut watch_mine)
                .await
                .unwrap(),
            SessionEnd::Revoked
        );
        assert!(futures_util::poll!(&mut watch_server).is_pending());
    }

    #[tokio::test]
    async fn revoking_one_user_among_many_wakes_only_their_sessions() {
        let gate = gate(5);
        let iat = now_unix() - 100;
        let sessions: Vec<LiveSession> = (0..500)
            .map(|i| {
                LiveSession::new(
                    gate.clone(),
                    identity(
                        IdentityKind::User,
                        Some(&format!("u{}", i % 250)),
                        iat,
                        None,
                    ),
                )
            })
            .collect();
        let mut watching: Vec<_> = sessions.iter().map(|s| Box::pin(s.ended())).collect();
        for watch in &mut watching {
            assert!(futures_util::poll!(watch.as_mut()).is_pending());
        }
        assert_eq!(gate.sessions().len(), 500);
        let before = gate.sessions().wakeups();
        let body = format!(
            r#"{{"users":[{{"id":"u7","set":{{"revoke_tokens_issued_before":{}}}}}]}}"#,
            now_unix()
        );
        gate.apply_revocation(&server(), RevocationEndpoint::Users, body.as_bytes())
            .await
            .unwrap();
        // The two sessions of u7 (sessions 7 and 257) end; no other one was woken.
        for index in [7, 257] {
            assert_eq!(
                tokio::time::timeout(Duration::from_secs(10), watching[index].as_mut())
                    .await
                    .unwrap(),
                SessionEnd::Revoked
            );
        }
        assert_eq!(gate.sessions().wakeups() - before, 2);
        for (index, watch) in watching.iter_mut().enumerate() {
            if index % 250 != 7 {
                assert!(futures_util::poll!(watch.as_mut()).is_pending(), "{index}");
            }
        }
        // An app-wide cutoff for another app wakes nobody here.
        gate.sessions().apply(&RevocationEvent::App {
            app: "other".into(),
            cutoff: Some(Cutoff::from_unix_seconds(now_unix())),
        });
        assert_eq!(gate.sessions().wakeups() - before, 2);
        drop(watching);
        assert!(gate.sessions().is_empty());
    }
}
