//! moka in front of the store: "no cutoff" is cached too (the common case), concurrent
//! misses for one key share one store read, and store events invalidate at once.
//!
//! The hit path ([`RevocationCache::cached_cutoff`]) is synchronous: one `ArcSwap`
//! load, one moka `sync` lookup for the user and one hash lookup in the small app
//! table. No I/O, no lock, no `.await`. Misses go through [`Inflight`], which makes
//! concurrent misses for one key share a single store read.

use super::{RevocationEvent, RevocationStore, StoreError, UserCutoffChange};
use crate::config::RevocationSettings;
use crate::reload::ConfigHandle;
use crate::time::{Cutoff, now_unix};
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::OnceCell;

/// foldhash instead of SipHash: keys are user ids from validly signed tokens, so
/// hash flooding needs the app's secret, and the lookup is on every request.
type FastHash = foldhash::quality::RandomState;

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
    // Bumped by every invalidation: a store read that started before one must not put
    // its (possibly older) answer in the cache.
    generation: AtomicU64,
    users_inflight: Inflight<UserKey>,
    apps_inflight: Inflight<Arc<str>>,
    stats: CacheStats,
}

/// App-wide cutoffs: a handful of entries read on every request and written once per
/// TTL, so a copy-on-write map behind `ArcSwap` beats a concurrent cache.
/// Entries carry the unix second they stop being trusted, compared with the `now` the
/// gate already read for the token's `exp`: no clock read on the hot path.
type AppTable = HashMap<Arc<str>, (Option<Cutoff>, i64), FastHash>;

/// The caches and the settings they were built with.
struct Tuned {
    users: moka::sync::Cache<UserKey, Option<Cutoff>, FastHash>,
    apps: ArcSwap<AppTable>,
    capacity: u64,
    ttl: Duration,
    store_timeout: Duration,
}

impl Tuned {
    fn new(settings: &RevocationSettings) -> Self {
        Tuned {
            users: moka::sync::Cache::builder()
                .max_capacity(settings.cache_capacity)
                .time_to_live(settings.cache_ttl)
                .build_with_hasher(FastHash::default()),
            apps: ArcSwap::from_pointee(AppTable::default()),
            capacity: settings.cache_capacity,
            ttl: settings.cache_ttl,
            store_timeout: settings.store_timeout,
        }
    }

    fn app(&self, app: &str, now: i64) -> Option<Option<Cutoff>> {
        let apps = self.apps.load();
        let (cutoff, trusted_until) = apps.get(app)?;
        (now < *trusted_until).then_some(*cutoff)
    }

    fn set_app(&self, app: &Arc<str>, cutoff: Option<Option<Cutoff>>) {
        self.apps.rcu(|apps| {
            let mut apps = AppTable::clone(apps);
            match cutoff {
                Some(cutoff) => {
                    let ttl = self.ttl.as_secs().max(1) as i64;
                    apps.insert(app.clone(), (cutoff, now_unix() + ttl))
                }
                None => apps.remove(app),
            };
            apps
        });
    }
}

/// Misses in flight, one shared cell per key. The mutex only guards the map while a
/// cell is looked up or removed, never across the store read.
struct Inflight<K> {
    cells: Mutex<HashMap<K, Arc<ReadCell>, FastHash>>,
}

/// One store read's outcome, shared by every request that missed on the same key.
type ReadCell = OnceCell<Result<Option<Cutoff>, StoreError>>;

impl<K: Hash + Eq + Clone> Inflight<K> {
    fn new() -> Self {
        Inflight {
            cells: Mutex::new(HashMap::default()),
        }
    }

    async fn read(
        &self,
        key: &K,
        read: impl Future<Output = Result<Option<Cutoff>, StoreError>>,
    ) -> Result<Option<Cutoff>, StoreError> {
        let cell = {
            let mut cells = self.cells.lock().expect("no panics while locked");
            cells.entry(key.clone()).or_default().clone()
        };
        let result = cell.get_or_init(|| read).await.clone();
        let mut cells = self.cells.lock().expect("no panics while locked");
        if cells.get(key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            cells.remove(key);
        }
        result
    }
}

impl RevocationCache {
    /// A cache over `store`, sized and timed by `[revocation]`. Call
    /// [`RevocationCache::spawn_invalidation`] to follow the store's events.
    pub fn new(store: Arc<dyn RevocationStore>, settings: &RevocationSettings) -> Arc<Self> {
        Arc::new(RevocationCache {
            store,
            tuned: ArcSwap::from_pointee(Tuned::new(settings)),
            generation: AtomicU64::new(0),
            users_inflight: Inflight::new(),
            apps_inflight: Inflight::new(),
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
                    apps: ArcSwap::new(current.apps.load_full()),
                    capacity: current.capacity,
                    ttl: current.ttl,
                    store_timeout: settings.store_timeout,
                }));
            }
            return false;
        }
        self.tuned.store(Arc::new(Tuned::new(settings)));
        self.generation.fetch_add(1, Ordering::SeqCst);
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
        tuned.users.entry_count() + tuned.apps.load().len() as u64
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
        self.generation.fetch_add(1, Ordering::SeqCst);
        let tuned = self.tuned.load();
        match event {
            RevocationEvent::User { app, user, .. } => tuned.users.invalidate(&UserKey {
                app: app.clone(),
                user: user.clone(),
            }),
            RevocationEvent::App { app, .. } => tuned.set_app(app, None),
            RevocationEvent::Resync => {
                tuned.users.invalidate_all();
                tuned.apps.store(Arc::default());
            }
        }
    }

    /// The cutoff that applies to a user's tokens (the later of the user's and the
    /// app's stored cutoffs) when both are cached: no I/O, no `.await`.
    /// `now` is the current unix second (the gate has it already).
    pub fn cached_cutoff(
        &self,
        app: &Arc<str>,
        user: &Arc<str>,
        now: i64,
    ) -> Option<Option<Cutoff>> {
        let tuned = self.tuned.load();
        let app_cutoff = tuned.app(app, now)?;
        let user_cutoff = tuned.users.get(&UserKey {
            app: app.clone(),
            user: user.clone(),
        })?;
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        Some(app_cutoff.max(user_cutoff))
    }

    /// The cutoff that applies to a user's tokens: from the cache, or from the store
    /// (one shared read per key however many requests miss at once).
    pub async fn cutoff(
        &self,
        app: &Arc<str>,
        user: &Arc<str>,
    ) -> Result<Option<Cutoff>, StoreError> {
        if let Some(hit) = self.cached_cutoff(app, user, now_unix()) {
            return Ok(hit);
        }
        let app_cutoff = self.app_cutoff(app).await?;
        let user_cutoff = self.user_cutoff(app, user).await?;
        Ok(app_cutoff.max(user_cutoff))
    }

    /// A user's own cutoff: from the cache, or one shared store read per key.
    pub async fn user_cutoff(
        &self,
        app: &Arc<str>,
        user: &Arc<str>,
    ) -> Result<Option<Cutoff>, StoreError> {
        let key = UserKey {
            app: app.clone(),
            user: user.clone(),
        };
        let (timeout, cached) = {
            let tuned = self.tuned.load();
            (tuned.store_timeout, tuned.users.get(&key))
        };
        if let Some(hit) = cached {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(hit);
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let generation = self.generation.load(Ordering::Acquire);
        let read = bounded(timeout, self.store.user_cutoff(app, user));
        let cutoff = self
            .users_inflight
            .read(&key, read)
            .await
            .map_err(|e| self.count_error(&e))?;
        if self.generation.load(Ordering::Acquire) == generation {
            let tuned = self.tuned.load();
            tuned.users.insert(key.clone(), cutoff);
            // An invalidation may have landed between the check and the insert; its
            // own removal then ran before our insert, so take the answer out again.
            // SeqCst here and on the bump: store-buffering between the two sides must
            // not let each miss the other.
            if self.generation.load(Ordering::SeqCst) != generation {
                tuned.users.invalidate(&key);
            }
        }
        Ok(cutoff)
    }

    /// The app-wide cutoff set through the API.
    pub async fn app_cutoff(&self, app: &Arc<str>) -> Result<Option<Cutoff>, StoreError> {
        let (timeout, cached) = {
            let tuned = self.tuned.load();
            (tuned.store_timeout, tuned.app(app, now_unix()))
        };
        if let Some(hit) = cached {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(hit);
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let generation = self.generation.load(Ordering::Acquire);
        let read = bounded(timeout, self.store.app_cutoff(app));
        let cutoff = self
            .apps_inflight
            .read(app, read)
            .await
            .map_err(|e| self.count_error(&e))?;
        if self.generation.load(Ordering::Acquire) == generation {
            let tuned = self.tuned.load();
            tuned.set_app(app, Some(cutoff));
            // As for users: an invalidation between the check and the insert.
            if self.generation.load(Ordering::SeqCst) != generation {
                tuned.set_app(app, None);
            }
        }
        Ok(cutoff)
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
        self.generation.fetch_add(1, Ordering::SeqCst);
        // Loaded after the write: caches swapped in meanwhile must drop the old value too.
        // The store's own event does this as well; doing it here means the writer sees
        // its write even before the event arrives.
        let tuned = self.tuned.load();
        for change in changes {
            tuned.users.invalidate(&UserKey {
                app: app.clone(),
                user: Arc::from(change.user_id.as_str()),
            });
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
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.tuned.load().set_app(app, None);
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
        cache.tuned.load().users.run_pending_tasks();
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
    /// A store whose reads wait for the test to let them finish.
    struct Gated {
        reads: AtomicUsize,
        release: tokio::sync::Semaphore,
        events: broadcast::Sender<RevocationEvent>,
    }

    #[async_trait::async_trait]
    impl RevocationStore for Gated {
        async fn user_cutoff(&self, _: &str, _: &str) -> Result<Option<Cutoff>, StoreError> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            self.release.acquire().await.unwrap().forget();
            Ok(None)
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

    #[tokio::test]
    async fn a_read_overtaken_by_an_invalidation_is_answered_but_not_cached() {
        let store = Arc::new(Gated {
            reads: AtomicUsize::new(0),
            release: tokio::sync::Semaphore::new(0),
            events: broadcast::channel(16).0,
        });
        let mut settings = settings();
        settings.store_timeout = Duration::from_secs(30);
        let cache = RevocationCache::new(store.clone(), &settings);
        let (app, user): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("u"));
        let read = tokio::spawn({
            let (cache, app, user) = (cache.clone(), app.clone(), user.clone());
            async move { cache.user_cutoff(&app, &user).await }
        });
        // The read is in the store; now the user is revoked elsewhere.
        for _ in 0..1000 {
            if store.reads.load(Ordering::SeqCst) == 1 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(store.reads.load(Ordering::SeqCst), 1);
        cache
            .apply_event(&RevocationEvent::User {
                app: app.clone(),
                user: user.clone(),
                cutoff: Some(Cutoff::from_unix_seconds(5)),
            })
            .await;
        store.release.add_permits(2);
        assert_eq!(read.await.unwrap(), Ok(None));
        // Its answer predates the event: the next lookup must read the store again.
        assert_eq!(cache.user_cutoff(&app, &user).await, Ok(None));
        assert_eq!(store.reads.load(Ordering::SeqCst), 2);
        // That one was not overtaken, so it is cached.
        assert_eq!(cache.cutoff(&app, &user).await, Ok(None));
        assert_eq!(store.reads.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_small_cache_still_answers_every_user_with_their_own_cutoff() {
        let store = Arc::new(MemoryStore::new());
        let mut settings = settings();
        settings.cache_capacity = 64;
        let cache = RevocationCache::new(store.clone(), &settings);
        let changes: Vec<UserCutoffChange> = (0..300)
            .map(|i| UserCutoffChange {
                user_id: format!("u{i}"),
                cutoff: (i % 3 != 0).then(|| Cutoff::from_unix_seconds(i)),
            })
            .collect();
        store.set_user_cutoffs("a", &changes).await.unwrap();
        let app: Arc<str> = Arc::from("a");
        for _ in 0..2 {
            for change in &changes {
                let user: Arc<str> = Arc::from(change.user_id.as_str());
                assert_eq!(cache.cutoff(&app, &user).await, Ok(change.cutoff));
                // the same user name in another app has nothing
                assert_eq!(cache.cutoff(&Arc::from("b"), &user).await, Ok(None));
            }
        }
    }

    #[tokio::test]
    async fn user_entries_expire_with_the_ttl() {
        let store = probe(0, false);
        let mut settings = settings();
        settings.cache_ttl = Duration::from_millis(1);
        let cache = RevocationCache::new(store.clone(), &settings);
        let (app, user): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("u"));
        cache.cutoff(&app, &user).await.unwrap();
        assert_eq!(store.reads.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        cache.cutoff(&app, &user).await.unwrap();
        assert_eq!(store.reads.load(Ordering::SeqCst), 2);
    }
}
