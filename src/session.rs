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
//! A revocation wakes only the sessions it reaches: each [`Gate`] owns a
//! [`SessionRegistry`] indexed by (app, user) (see `revocation::sessions`). Expiry is
//! a timer per session (`sleep_until` the gate's own refusal instant, `exp +
//! leeway`), never a poll.

use crate::gate::{Gate, Identity};
pub use crate::revocation::sessions::{Registration, SessionRegistry, Wake, wait};
use crate::time::Cutoff;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
        let registration = self.gate.sessions().register(
            &self.identity.app,
            self.identity.user_id.as_ref(),
            self.identity.issued_at,
        );
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{App, ConfigSnapshot};
    use crate::gate::{IdentityKind, RevocationEndpoint};
    use crate::reload::ConfigHandle;
    use crate::revocation::{MemoryStore, RevocationCache, RevocationEvent};
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
        let sessions: Vec<LiveSession> = (0..10_000)
            .map(|i| {
                LiveSession::new(
                    gate.clone(),
                    identity(
                        IdentityKind::User,
                        Some(&format!("u{}", i % 5_000)),
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
        assert_eq!(gate.sessions().len(), 10_000);
        let before = gate.sessions().wakeups();
        let body = format!(
            r#"{{"users":[{{"id":"u7","set":{{"revoke_tokens_issued_before":{}}}}}]}}"#,
            now_unix()
        );
        gate.apply_revocation(&server(), RevocationEndpoint::Users, body.as_bytes())
            .await
            .unwrap();
        // The two sessions of u7 (sessions 7 and 5007) end; no other one was woken.
        for index in [7, 5_007] {
            assert_eq!(
                tokio::time::timeout(Duration::from_secs(10), watching[index].as_mut())
                    .await
                    .unwrap(),
                SessionEnd::Revoked
            );
        }
        assert_eq!(gate.sessions().wakeups() - before, 2);
        for (index, watch) in watching.iter_mut().enumerate() {
            if index % 5_000 != 7 {
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
