//! moka in front of the store: "no cutoff" is cached too (the common case), concurrent
//! misses for one key share one store read, and store events invalidate at once.

use super::{RevocationEvent, RevocationStore, StoreError, UserCutoffChange};
use crate::config::RevocationSettings;
use crate::reload::ConfigHandle;
use crate::time::Cutoff;
use arc_swap::ArcSwap;
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
    // moka cannot resize or retime a live cache, so a config reload that changes
    // `cache_capacity` / `cache_ttl_seconds` swaps in new (empty) caches: the store stays
    // the truth, the cost is a round of misses.
    tuned: ArcSwap<Tuned>,
    stats: CacheStats,
}

/// The caches and the settings they were built with.
struct Tuned {
    users: Cache<UserKey, Option<Cutoff>>,
    apps: Cache<Arc<str>, Option<Cutoff>>,
    capacity: u64,
    ttl: Duration,
    store_timeout: Duration,
}

impl Tuned {
    fn new(settings: &RevocationSettings) -> Self {
        Tuned {
            users: Cache::builder()
                .max_capacity(settings.cache_capacity)
                .time_to_live(settings.cache_ttl)
                .build(),
            apps: Cache::builder()
                .max_capacity(10_000)
                .time_to_live(settings.cache_ttl)
                .build(),
            capacity: settings.cache_capacity,
            ttl: settings.cache_ttl,
            store_timeout: settings.store_timeout,
        }
    }
}

impl RevocationCache {
    /// A cache over `store`, sized and timed by `[revocation]`. Call
    /// [`RevocationCache::spawn_invalidation`] to follow the store's events.
    pub fn new(store: Arc<dyn RevocationStore>, settings: &RevocationSettings) -> Arc<Self> {
        Arc::new(RevocationCache {
            store,
            tuned: ArcSwap::from_pointee(Tuned::new(settings)),
            stats: CacheStats::default(),
        })
    }

    /// Follows `[revocation]` cache settings (`cache_capacity`, `cache_ttl_seconds`,
    /// `store_timeout_ms`) through config reloads. True when the caches were rebuilt
    /// (capacity or TTL changed), which empties them.
    pub fn apply_settings(&self, settings: &RevocationSettings) -> bool {
        let current = self.tuned.load();
        if current.capacity == settings.cache_capacity && current.ttl == settings.cache_ttl {
            if current.store_timeout != settings.store_timeout {
                self.tuned.store(Arc::new(Tuned {
                    users: current.users.clone(),
                    apps: current.apps.clone(),
                    capacity: current.capacity,
                    ttl: current.ttl,
                    store_timeout: settings.store_timeout,
                }));
            }
            return false;
        }
        self.tuned.store(Arc::new(Tuned::new(settings)));
        true
    }

    /// Applies the cache settings of every config version `config` swaps in, until
    /// the cache or every handle of the config is dropped.
    pub fn follow_config(self: &Arc<Self>, config: &ConfigHandle) -> tokio::task::JoinHandle<()> {
        let mut versions = config.subscribe();
        // Holding a handle would keep the version sender, and so this task, alive forever.
        let config = config.downgrade();
        let cache = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let (Some(cache), Some(config)) = (cache.upgrade(), config.upgrade()) else {
                    return;
                };
                versions.borrow_and_update();
                if cache.apply_settings(&config.load().revocation) {
                    tracing::info!(target: "chatgate::revocation", "revocation cache rebuilt for new settings");
                }
                drop((cache, config));
                if versions.changed().await.is_err() {
                    return;
                }
            }
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
        let tuned = self.tuned.load();
        tuned.users.entry_count() + tuned.apps.entry_count()
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
        let tuned = self.tuned.load_full();
        match event {
            RevocationEvent::User { app, user, .. } => {
                tuned
                    .users
                    .invalidate(&UserKey {
                        app: app.clone(),
                        user: user.clone(),
                    })
                    .await
            }
            RevocationEvent::App { app, .. } => tuned.apps.invalidate(app).await,
            RevocationEvent::Resync => {
                tuned.users.invalidate_all();
                tuned.apps.invalidate_all();
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
        let tuned = self.tuned.load_full();
        if let Some(hit) = tuned.users.get(&key).await {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(hit);
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let store = &self.store;
        let read = bounded(tuned.store_timeout, store.user_cutoff(app, user));
        tuned
            .users
            .try_get_with(key, read)
            .await
            .map_err(|e| self.count_error(&e))
    }

    /// The app-wide cutoff set through the API.
    pub async fn app_cutoff(&self, app: &Arc<str>) -> Result<Option<Cutoff>, StoreError> {
        let tuned = self.tuned.load_full();
        if let Some(hit) = tuned.apps.get(app).await {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(hit);
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let read = bounded(tuned.store_timeout, self.store.app_cutoff(app));
        tuned
            .apps
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
        let timeout = self.tuned.load().store_timeout;
        bounded(timeout, self.store.set_user_cutoffs(app, changes))
            .await
            .map_err(|e| self.count_error(&e))?;
        // Loaded after the write: caches swapped in meanwhile must drop the old value too.
        let tuned = self.tuned.load_full();
        // The store's own event does this too; doing it here as well means the writer
        // sees its write even before the event arrives.
        for change in changes {
            let key = UserKey {
                app: app.clone(),
                user: Arc::from(change.user_id.as_str()),
            };
            tuned.users.invalidate(&key).await;
        }
        Ok(())
    }

    /// Writes the app-wide cutoff to the store, then drops it from the cache.
    pub async fn set_app_cutoff(
        &self,
        app: &Arc<str>,
        cutoff: Option<Cutoff>,
    ) -> Result<(), StoreError> {
        let timeout = self.tuned.load().store_timeout;
        bounded(timeout, self.store.set_app_cutoff(app, cutoff))
            .await
            .map_err(|e| self.count_error(&e))?;
        self.tuned.load_full().apps.invalidate(app).await;
        Ok(())
    }

    fn count_error(&self, error: &StoreError) -> StoreError {
        self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
        error.clone()
    }
}

async fn bounded<T>(
    timeout: Duration,
    operation: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(timeout, operation).await {
        Ok(result) => result,
        Err(_) => Err(StoreError::Timeout),
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
    #[tokio::test]
    async fn new_cache_settings_rebuild_the_caches_and_the_store_still_answers() {
        let store = Arc::new(MemoryStore::new());
        let cache = RevocationCache::new(store.clone(), &settings());
        let (app, user): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("u"));
        assert_eq!(cache.user_cutoff(&app, &user).await, Ok(None));
        cache.tuned.load().users.run_pending_tasks().await;
        assert_eq!(cache.entry_count(), 1);

        let mut same = settings();
        same.store_timeout = Duration::from_millis(300);
        assert!(
            !cache.apply_settings(&same),
            "a timeout alone keeps the entries"
        );
        assert_eq!(cache.tuned.load().store_timeout, Duration::from_millis(300));
        assert_eq!(cache.entry_count(), 1);

        let mut smaller = same.clone();
        smaller.cache_capacity = 10;
        smaller.cache_ttl = Duration::from_secs(5);
        assert!(cache.apply_settings(&smaller));
        assert_eq!(cache.entry_count(), 0);
        let tuned = cache.tuned.load();
        assert_eq!(tuned.users.policy().max_capacity(), Some(10));
        assert_eq!(
            tuned.users.policy().time_to_live(),
            Some(Duration::from_secs(5))
        );
        drop(tuned);
        assert_eq!(cache.user_cutoff(&app, &user).await, Ok(None));
    }

    #[tokio::test]
    async fn following_a_config_applies_each_swapped_in_version() {
        let config = ConfigHandle::new(
            crate::config::ConfigSnapshot::with_apps(vec![]).with_revocation(settings()),
        );
        let cache = RevocationCache::new(Arc::new(MemoryStore::new()), &settings());
        let follower = cache.follow_config(&config);
        let mut changed = settings();
        changed.cache_capacity = 42;
        config.store(crate::config::ConfigSnapshot::with_apps(vec![]).with_revocation(changed));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while cache.tuned.load().capacity != 42 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "new capacity not applied within 1s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // the follower ends with the config
        drop(config);
        tokio::time::timeout(Duration::from_secs(1), follower)
            .await
            .expect("follower still running 1s after the config was dropped")
            .unwrap();
    }
}
