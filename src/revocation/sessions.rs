//! The live sessions a revocation can reach (contract §4), indexed by app and user.
//!
//! Why a registry: with tens of thousands of idle sockets, a revocation must not wake
//! them all. Each [`crate::gate::Gate`] owns one [`SessionRegistry`], and one task per
//! registry follows the store's change events (local writes and, with the Redis store,
//! other instances' writes arriving over pub/sub). A user's cutoff wakes only that
//! user's sessions, an app-wide cutoff only that app's; only a `Resync` (events may
//! have been missed) wakes every session to re-read its cutoffs. It lives with the
//! revocation store because that is all it knows: the events and the cutoffs; the
//! sessions register by (app, user, `iat`) and wait on their [`Registration`]
//! (`crate::session::LiveSession` for the tower layer, the edge proxy's relay).
//!
//! The same task follows the config's versions when the registry is given the live
//! config ([`SessionRegistry::with_config`]): a reload that sets or moves an app's
//! `revoke_tokens_issued_before` reaches that app's sessions exactly as an app-wide
//! revocation through the API does.

use super::{RevocationCache, RevocationEvent};
use crate::reload::ConfigHandle;
use crate::time::Cutoff;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use tokio::sync::Notify;
use tokio::sync::broadcast::error::RecvError;

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

/// The live sessions of one [`Gate`](crate::gate::Gate), indexed by app and user (see the module docs).
pub struct SessionRegistry {
    cache: Arc<RevocationCache>,
    /// The live config, whose app-wide cutoffs are followed too.
    config: Option<crate::reload::WeakConfigHandle>,
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
            config: None,
            index: Mutex::default(),
            follower: Mutex::default(),
            woken: AtomicU64::new(0),
        }
    }

    /// An empty registry following `cache`'s store and `config`'s app-wide cutoffs
    /// (`[[apps]] revoke_tokens_issued_before`, applied by a reload).
    pub fn with_config(cache: Arc<RevocationCache>, config: &ConfigHandle) -> Self {
        let mut registry = SessionRegistry::new(cache);
        registry.config = Some(config.downgrade());
        registry
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Users>> {
        // A panic while holding the lock leaves the index consistent (no step spans
        // two states), so a poisoned lock is still usable.
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a session of `app`'s `user` whose token has `issued_at`; `None` when
    /// no cutoff can reach it (no user: server and anonymous identities). Must run
    /// inside a tokio runtime, which the first registration uses to follow the store's
    /// events.
    pub fn register(
        self: &Arc<Self>,
        app: &Arc<str>,
        user: Option<&Arc<str>>,
        issued_at: Option<i64>,
    ) -> Option<Registration> {
        let user: Arc<str> = user?.clone();
        self.follow();
        let watch = Arc::new(Watch {
            issued_at,
            state: AtomicU8::new(LIVE),
            notify: Notify::new(),
        });
        self.lock()
            .entry(app.clone())
            .or_default()
            .entry(user.clone())
            .or_default()
            .push(watch.clone());
        Some(Registration {
            registry: self.clone(),
            app: app.clone(),
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
        let config = self.config.clone();
        // Subscribed now, like the events: a reload after a registration is not missed.
        let mut versions = config.as_ref().and_then(|c| c.upgrade()).map(|c| {
            let versions = c.subscribe();
            (versions, config_cutoffs(&c))
        });
        let registry: Weak<SessionRegistry> = Arc::downgrade(self);
        *follower = Some(tokio::spawn(async move {
            loop {
                let changed = async {
                    match versions.as_mut() {
                        Some((versions, _)) => versions.changed().await.is_ok(),
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    event = events.recv() => {
                        let Some(registry) = registry.upgrade() else {
                            return;
                        };
                        match event {
                            Ok(event) => registry.apply(&event),
                            Err(RecvError::Lagged(_)) => registry.apply(&RevocationEvent::Resync),
                            Err(RecvError::Closed) => return,
                        }
                    }
                    alive = changed => {
                        let (Some(registry), Some(handle)) = (
                            registry.upgrade(),
                            config.as_ref().and_then(|c| c.upgrade()),
                        ) else {
                            return;
                        };
                        if !alive {
                            versions = None;
                            continue;
                        }
                        let now = config_cutoffs(&handle);
                        if let Some((_, before)) = versions.as_mut() {
                            for (app, cutoff) in &now {
                                if cutoff.is_some() && before.get(app) != Some(cutoff) {
                                    registry.apply(&RevocationEvent::App {
                                        app: app.clone(),
                                        cutoff: *cutoff,
                                    });
                                }
                            }
                            *before = now;
                        }
                    }
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

/// Each app's cutoff in the live config.
fn config_cutoffs(config: &ConfigHandle) -> HashMap<Arc<str>, Option<Cutoff>> {
    config
        .load()
        .apps()
        .map(|app| (app.api_key.clone(), app.revoke_tokens_issued_before))
        .collect()
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
    use crate::revocation::MemoryStore;
    use crate::time::now_unix;
    use std::time::Duration;

    fn snapshot(b_cutoff: Option<i64>) -> ConfigSnapshot {
        let mut b = App::new("b", vec!["s".into()]);
        b.revoke_tokens_issued_before = b_cutoff.map(Cutoff::from_unix_seconds);
        ConfigSnapshot::with_apps(vec![App::new("a", vec!["s".into()]), b])
    }

    #[tokio::test]
    async fn a_reload_that_sets_an_apps_cutoff_wakes_that_apps_sessions_only() {
        let config = ConfigHandle::new(snapshot(None));
        let cache = RevocationCache::new(Arc::new(MemoryStore::new()), &config.load().revocation);
        let registry = Arc::new(SessionRegistry::with_config(cache, &config));
        let issued = Some(now_unix() - 10);
        let user: Arc<str> = "u".into();
        let in_a = registry.register(&"a".into(), Some(&user), issued).unwrap();
        let in_b = registry.register(&"b".into(), Some(&user), issued).unwrap();
        let later = registry
            .register(&"b".into(), Some(&user), Some(now_unix() + 60))
            .unwrap();

        config.store(snapshot(Some(now_unix())));
        let woken = tokio::time::timeout(Duration::from_secs(5), in_b.woken()).await;
        assert_eq!(woken.expect("app b's session was woken"), Wake::Revoked);
        // Neither the other app's session nor a token issued after the cutoff.
        for untouched in [&in_a, &later] {
            let quiet = tokio::time::timeout(Duration::from_millis(200), untouched.woken()).await;
            assert!(quiet.is_err(), "woken: {:?}", quiet);
        }
        assert_eq!(registry.wakeups(), 1);

        // A reload that leaves the cutoff where it is wakes nobody.
        let same = config.load().app("b").unwrap().revoke_tokens_issued_before;
        config.store(snapshot(same.map(|c| c.unix_seconds())));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(registry.wakeups(), 1);
    }
}
