//! moka in front of the store: "no cutoff" is cached too (the common case), concurrent
//! misses for one key share one store read, and store events invalidate at once.

use super::{RevocationEvent, RevocationStore, StoreError, UserCutoffChange};
use crate::config::RevocationSettings;
use crate::time::Cutoff;
use moka::future::Cache;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Key of a user's cutoff: both parts are `Arc`s already held by the request's
/// identity, so building a key allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct UserKey {
    app: Arc<str>,
    user: Arc<str>,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Lookups answered from the cache.
    pub hits: AtomicU64,
    /// Lookups that went to the store.
    pub misses: AtomicU64,
    /// Store reads or writes that failed or timed out.
    pub store_errors: AtomicU64,
}

/// The cached view of a [`RevocationStore`].
pub struct RevocationCache {
    store: Arc<dyn RevocationStore>,
    users: Cache<UserKey, Option<Cutoff>>,
    apps: Cache<Arc<str>, Option<Cutoff>>,
    store_timeout: Duration,
    stats: CacheStats,
}

impl RevocationCache {
    /// A cache over `store`, sized and timed by `[revocation]`. Call
    /// [`RevocationCache::spawn_invalidation`] to follow the store's events.
    pub fn new(store: Arc<dyn RevocationStore>, settings: &RevocationSettings) -> Arc<Self> {
        Arc::new(RevocationCache {
            store,
            users: Cache::builder()
                .max_capacity(settings.cache_capacity)
                .time_to_live(settings.cache_ttl)
                .build(),
            apps: Cache::builder()
                .max_capacity(10_000)
                .time_to_live(settings.cache_ttl)
                .build(),
            store_timeout: settings.store_timeout,
            stats: CacheStats::default(),
        })
    }

    /// The store behind the cache.
    pub fn store(&self) -> &Arc<dyn RevocationStore> {
        &self.store
    }

    /// Hit / miss / error counters.
    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    /// Number of cached entries (approximate, for metrics).
    pub fn entry_count(&self) -> u64 {
        self.users.entry_count() + self.apps.entry_count()
    }

    /// Follows the store's change events until the store drops its sender. A lagging
    /// receiver may have missed invalidations, so lag clears everything.
    pub fn spawn_invalidation(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let mut events = self.store.subscribe();
        let cache = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let event = events.recv().await;
                let Some(cache) = cache.upgrade() else { return };
                match event {
                    Ok(event) => cache.apply_event(&event).await,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        cache.apply_event(&RevocationEvent::Resync).await
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        })
    }

    /// Applies one change event to the cache.
    pub async fn apply_event(&self, event: &RevocationEvent) {
        match event {
            RevocationEvent::User { app, user, .. } => {
                self.users
                    .invalidate(&UserKey {
                        app: app.clone(),
                        user: user.clone(),
                    })
                    .await
            }
            RevocationEvent::App { app, .. } => self.apps.invalidate(app).await,
            RevocationEvent::Resync => {
                self.users.invalidate_all();
                self.apps.invalidate_all();
            }
        }
    }

    /// A user's cutoff: from the cache, or one shared store read per key.
    pub async fn user_cutoff(
        &self,
        app: &Arc<str>,
        user: &Arc<str>,
    ) -> Result<Option<Cutoff>, StoreError> {
        let key = UserKey {
            app: app.clone(),
            user: user.clone(),
        };
        if let Some(hit) = self.users.get(&key).await {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(hit);
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let store = &self.store;
        let read = self.bounded(store.user_cutoff(app, user));
        self.users
            .try_get_with(key, read)
            .await
            .map_err(|e| self.count_error(&e))
    }

    /// The app-wide cutoff set through the API.
    pub async fn app_cutoff(&self, app: &Arc<str>) -> Result<Option<Cutoff>, StoreError> {
        if let Some(hit) = self.apps.get(app).await {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(hit);
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let read = self.bounded(self.store.app_cutoff(app));
        self.apps
            .try_get_with(app.clone(), read)
            .await
            .map_err(|e| self.count_error(&e))
    }

    /// Writes users' cutoffs to the store (durably), then drops them from the cache.
    pub async fn set_user_cutoffs(
        &self,
        app: &Arc<str>,
        changes: &[UserCutoffChange],
    ) -> Result<(), StoreError> {
        self.bounded(self.store.set_user_cutoffs(app, changes))
            .await
            .map_err(|e| self.count_error(&e))?;
        // The store's own event does this too; doing it here as well means the writer
        // sees its write even before the event arrives.
        for change in changes {
            let key = UserKey {
                app: app.clone(),
                user: Arc::from(change.user_id.as_str()),
            };
            self.users.invalidate(&key).await;
        }
        Ok(())
    }

    /// Writes the app-wide cutoff to the store, then drops it from the cache.
    pub async fn set_app_cutoff(
        &self,
        app: &Arc<str>,
        cutoff: Option<Cutoff>,
    ) -> Result<(), StoreError> {
        self.bounded(self.store.set_app_cutoff(app, cutoff))
            .await
            .map_err(|e| self.count_error(&e))?;
        self.apps.invalidate(app).await;
        Ok(())
    }

    async fn bounded<T>(
        &self,
        operation: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.store_timeout, operation).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Timeout),
        }
    }

    fn count_error(&self, error: &StoreError) -> StoreError {
        self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
        error.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{StoreErrorPolicy, StoreKind};
    use crate::revocation::MemoryStore;
    use std::sync::atomic::AtomicUsize;
    use tokio::sync::broadcast;

    fn settings() -> RevocationSettings {
        RevocationSettings {
            store: StoreKind::Memory,
            path: "unused".into(),
            redis_url: "redis://127.0.0.1:1".into(),
            cache_ttl: Duration::from_secs(60),
            cache_capacity: 1000,
            on_store_error: StoreErrorPolicy::Deny,
            store_timeout: Duration::from_millis(200),
        }
    }

    /// A store that counts reads and can be made slow or broken.
    struct Probe {
        reads: AtomicUsize,
        delay: Duration,
        broken: bool,
        events: broadcast::Sender<RevocationEvent>,
    }

    #[async_trait::async_trait]
    impl RevocationStore for Probe {
        async fn user_cutoff(&self, _: &str, _: &str) -> Result<Option<Cutoff>, StoreError> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            if self.broken {
                Err(StoreError::Unavailable("down".into()))
            } else {
                Ok(Some(Cutoff::from_unix_seconds(7)))
            }
        }
        async fn set_user_cutoffs(
            &self,
            _: &str,
            _: &[UserCutoffChange],
        ) -> Result<(), StoreError> {
            Ok(())
        }
        async fn app_cutoff(&self, _: &str) -> Result<Option<Cutoff>, StoreError> {
            Ok(None)
        }
        async fn set_app_cutoff(&self, _: &str, _: Option<Cutoff>) -> Result<(), StoreError> {
            Ok(())
        }
        fn subscribe(&self) -> broadcast::Receiver<RevocationEvent> {
            self.events.subscribe()
        }
        async fn ping(&self) -> Result<(), StoreError> {
            Ok(())
        }
    }

    fn probe(delay_ms: u64, broken: bool) -> Arc<Probe> {
        Arc::new(Probe {
            reads: AtomicUsize::new(0),
            delay: Duration::from_millis(delay_ms),
            broken,
            events: broadcast::channel(16).0,
        })
    }

    #[tokio::test]
    async fn concurrent_misses_share_one_store_read_and_then_hit() {
        let store = probe(50, false);
        let cache = RevocationCache::new(store.clone(), &settings());
        let (app, user): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("u"));
        let reads = (0..20).map(|_| cache.user_cutoff(&app, &user));
        let results = futures_util::future::join_all(reads).await;
        assert!(
            results
                .iter()
                .all(|r| *r == Ok(Some(Cutoff::from_unix_seconds(7))))
        );
        assert_eq!(store.reads.load(Ordering::SeqCst), 1);
        cache.user_cutoff(&app, &user).await.unwrap();
        assert_eq!(store.reads.load(Ordering::SeqCst), 1);
        assert!(cache.stats().hits.load(Ordering::SeqCst) >= 1);
    }

    #[tokio::test]
    async fn a_slow_store_times_out_and_errors_are_not_cached() {
        let cache = RevocationCache::new(probe(1_000, false), &settings());
        let (app, user): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("u"));
        assert_eq!(
            cache.user_cutoff(&app, &user).await,
            Err(StoreError::Timeout)
        );
        let broken = probe(0, true);
        let cache = RevocationCache::new(broken.clone(), &settings());
        assert!(cache.user_cutoff(&app, &user).await.is_err());
        assert!(cache.user_cutoff(&app, &user).await.is_err());
        assert_eq!(broken.reads.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn store_events_invalidate_at_once() {
        let store = Arc::new(MemoryStore::new());
        let cache = RevocationCache::new(store.clone(), &settings());
        let _listener = cache.spawn_invalidation();
        let (app, user): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("u"));
        assert_eq!(cache.user_cutoff(&app, &user).await, Ok(None));
        // written behind the cache's back, as another instance would
        let cutoff = Cutoff::from_unix_seconds(9);
        store
            .set_user_cutoffs(
                "a",
                &[UserCutoffChange {
                    user_id: "u".into(),
                    cutoff: Some(cutoff),
                }],
            )
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        loop {
            if cache.user_cutoff(&app, &user).await == Ok(Some(cutoff)) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "not invalidated within 1s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
