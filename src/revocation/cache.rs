//! A bounded in-memory cache in front of the store: "no cutoff" is cached too (the
//! common case), concurrent misses for one key share one store read, and store events
//! invalidate at once.
//!
//! The hit path ([`RevocationCache::cached_cutoff`]) is synchronous: one lookup in the
//! user table (a shard read lock held for the lookup only) and one in the small app
//! table behind `ArcSwap`. No I/O, no `.await`, no clock read: entries carry the unix
//! second they were cached, compared with the `now` the gate already read for the
//! token's `exp`. Misses go through [`Inflight`], which makes concurrent misses for one
//! key share a single store read.
//!
//! The user table is `quick_cache` rather than moka: moka keeps ~300 bytes of
//! bookkeeping per entry (its entry, expiry and policy nodes, each allocated apart),
//! and a million cached users must fit in 200 bytes each; quick_cache keeps an entry in
//! one slab slot (~130 bytes with the user id), is resized live, and finds `(app, user)`
//! from borrowed strings, so a lookup clones no `Arc`.

use super::{RevocationEvent, RevocationStore, StoreError, UserCutoffChange};
use crate::config::RevocationSettings;
use crate::reload::ConfigHandle;
use crate::time::{Cutoff, now_unix};
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
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

/// A [`UserKey`] made of borrowed strings, for lookups. Its derived `Hash` hashes the
/// same two `str`s in the same order as `UserKey`'s, as `Equivalent` requires.
#[derive(Hash)]
struct UserRef<'a> {
    app: &'a str,
    user: &'a str,
}

impl quick_cache::Equivalent<UserKey> for UserRef<'_> {
    fn equivalent(&self, key: &UserKey) -> bool {
        *key.app == *self.app && *key.user == *self.user
    }
}

impl<'a> From<&'a UserKey> for UserRef<'a> {
    fn from(key: &'a UserKey) -> Self {
        UserRef {
            app: &key.app,
            user: &key.user,
        }
    }
}

/// A cached answer and the unix second it was read from the store.
#[derive(Debug, Clone, Copy)]
struct Cached {
    cutoff: Option<Cutoff>,
    read_at: i64,
}

impl Cached {
    fn now(cutoff: Option<Cutoff>) -> Self {
        Cached {
            cutoff,
            read_at: now_unix(),
        }
    }

    /// The answer while it is younger than the TTL. The TTL is read at lookup, so a
    /// reload that shortens it applies to entries already cached.
    fn fresh(self, now: i64, ttl_seconds: i64) -> Option<Option<Cutoff>> {
        (now < self.read_at.saturating_add(ttl_seconds)).then_some(self.cutoff)
    }
}

type UserTable = quick_cache::sync::Cache<UserKey, Cached, quick_cache::UnitWeighter, FastHash>;

/// App-wide cutoffs: a handful of entries read on every request and written once per
/// TTL, so a copy-on-write map behind `ArcSwap` beats a concurrent cache.
type AppTable = HashMap<Arc<str>, Cached, FastHash>;

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
    users: UserTable,
    apps: ArcSwap<AppTable>,
    // The `[revocation]` settings a reload may change, read without a guard.
    capacity: AtomicU64,
    ttl_seconds: AtomicI64,
    store_timeout_ms: AtomicU64,
    // Bumped by every invalidation: a store read that started before one must not put
    // its (possibly older) answer in the cache.
    generation: AtomicU64,
    users_inflight: Inflight<UserKey>,
    apps_inflight: Inflight<Arc<str>>,
    stats: CacheStats,
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

/// The TTL in whole seconds, at least one.
fn ttl_seconds(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX).max(1)
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl RevocationCache {
    /// A cache over `store`, sized and timed by `[revocation]`. Call
    /// [`RevocationCache::spawn_invalidation`] to follow the store's events.
    pub fn new(store: Arc<dyn RevocationStore>, settings: &RevocationSettings) -> Arc<Self> {
        let options = quick_cache::OptionsBuilder::new()
            .weight_capacity(settings.cache_capacity)
            // Grow with use: a configured million must not be allocated up front.
            .estimated_items_capacity(settings.cache_capacity.min(4096) as usize)
            .build()
            .expect("a positive capacity (config validation) is valid");
        Arc::new(RevocationCache {
            store,
            users: UserTable::with_options(
                options,
                quick_cache::UnitWeighter,
                FastHash::default(),
                Default::default(),
            ),
            apps: ArcSwap::default(),
            capacity: AtomicU64::new(settings.cache_capacity),
            ttl_seconds: AtomicI64::new(ttl_seconds(settings.cache_ttl)),
            store_timeout_ms: AtomicU64::new(millis(settings.store_timeout)),
            generation: AtomicU64::new(0),
            users_inflight: Inflight::new(),
            apps_inflight: Inflight::new(),
            stats: CacheStats::default(),
        })
    }

    /// Follows `[revocation]` cache settings (`cache_capacity`, `cache_ttl_seconds`,
    /// `store_timeout_ms`) through config reloads, in place: a smaller capacity evicts
    /// down to it, a shorter TTL applies to entries already cached, and nothing else is
    /// dropped. True when a setting changed.
    pub fn apply_settings(&self, settings: &RevocationSettings) -> bool {
        let mut changed = false;
        if self
            .capacity
            .swap(settings.cache_capacity, Ordering::Relaxed)
            != settings.cache_capacity
        {
            self.users.set_capacity(settings.cache_capacity);
            changed = true;
        }
        let ttl = ttl_seconds(settings.cache_ttl);
        changed |= self.ttl_seconds.swap(ttl, Ordering::Relaxed) != ttl;
        let timeout = millis(settings.store_timeout);
        changed |= self.store_timeout_ms.swap(timeout, Ordering::Relaxed) != timeout;
        changed
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
                    tracing::info!(target: "chatgate::revocation", "revocation cache settings applied");
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
        (self.users.len() + self.apps.load().len()) as u64
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
        match event {
            RevocationEvent::User { app, user, .. } => {
                self.users.remove(&UserRef { app, user });
            }
            RevocationEvent::App { app, .. } => self.set_app(app, None),
            RevocationEvent::Resync => {
                self.users.clear();
                self.apps.store(Arc::default());
            }
        }
    }

    fn ttl(&self) -> i64 {
        self.ttl_seconds.load(Ordering::Relaxed)
    }

    fn store_timeout(&self) -> Duration {
        Duration::from_millis(self.store_timeout_ms.load(Ordering::Relaxed))
    }

    fn cached_app(&self, app: &str, now: i64) -> Option<Option<Cutoff>> {
        self.apps.load().get(app)?.fresh(now, self.ttl())
    }

    fn cached_user(&self, app: &str, user: &str, now: i64) -> Option<Option<Cutoff>> {
        self.users
            .get(&UserRef { app, user })?
            .fresh(now, self.ttl())
    }

    fn set_app(&self, app: &Arc<str>, cutoff: Option<Option<Cutoff>>) {
        self.apps.rcu(|apps| {
            let mut apps = AppTable::clone(apps);
            match cutoff {
                Some(cutoff) => apps.insert(app.clone(), Cached::now(cutoff)),
                None => apps.remove(app),
            };
            apps
        });
    }

    /// The cutoff that applies to a user's tokens (the later of the user's and the
    /// app's stored cutoffs) when both are cached: no I/O, no `.await`.
    /// `now` is the current unix second (the gate has it already).
    pub fn cached_cutoff(&self, app: &str, user: &str, now: i64) -> Option<Option<Cutoff>> {
        let app_cutoff = self.cached_app(app, now)?;
        let user_cutoff = self.cached_user(app, user, now)?;
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
        if let Some(hit) = self.cached_user(app, user, now_unix()) {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(hit);
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let key = UserKey {
            app: app.clone(),
            user: user.clone(),
        };
        let generation = self.generation.load(Ordering::Acquire);
        let read = bounded(self.store_timeout(), self.store.user_cutoff(app, user));
        let cutoff = self
            .users_inflight
            .read(&key, read)
            .await
            .map_err(|e| self.count_error(&e))?;
        if self.generation.load(Ordering::Acquire) == generation {
            self.users.insert(key.clone(), Cached::now(cutoff));
            // An invalidation may have landed between the check and the insert; its
            // own removal then ran before our insert, so take the answer out again.
            // SeqCst here and on the bump: store-buffering between the two sides must
            // not let each miss the other.
            if self.generation.load(Ordering::SeqCst) != generation {
                self.users.remove(&UserRef::from(&key));
            }
        }
        Ok(cutoff)
    }

    /// The app-wide cutoff set through the API.
    pub async fn app_cutoff(&self, app: &Arc<str>) -> Result<Option<Cutoff>, StoreError> {
        if let Some(hit) = self.cached_app(app, now_unix()) {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(hit);
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let generation = self.generation.load(Ordering::Acquire);
        let read = bounded(self.store_timeout(), self.store.app_cutoff(app));
        let cutoff = self
            .apps_inflight
            .read(app, read)
            .await
            .map_err(|e| self.count_error(&e))?;
        if self.generation.load(Ordering::Acquire) == generation {
            self.set_app(app, Some(cutoff));
            // As for users: an invalidation between the check and the insert.
            if self.generation.load(Ordering::SeqCst) != generation {
                self.set_app(app, None);
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
        bounded(
            self.store_timeout(),
            self.store.set_user_cutoffs(app, changes),
        )
        .await
        .map_err(|e| self.count_error(&e))?;
        self.generation.fetch_add(1, Ordering::SeqCst);
        // The store's own event does this as well; doing it here means the writer sees
        // its write even before the event arrives.
        for change in changes {
            self.users.remove(&UserRef {
                app,
                user: &change.user_id,
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
        bounded(self.store_timeout(), self.store.set_app_cutoff(app, cutoff))
            .await
            .map_err(|e| self.count_error(&e))?;
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.set_app(app, None);
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
            redis: Default::default(),
        }
    }

    /// A store that counts reads and can be made slow, broken, or held until the test
    /// releases each read.
    struct Probe {
        reads: AtomicUsize,
        delay: Duration,
        broken: bool,
        release: Option<tokio::sync::Semaphore>,
        answer: Option<Cutoff>,
        events: broadcast::Sender<RevocationEvent>,
    }

    #[async_trait::async_trait]
    impl RevocationStore for Probe {
        async fn user_cutoff(&self, _: &str, _: &str) -> Result<Option<Cutoff>, StoreError> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            if let Some(release) = &self.release {
                release.acquire().await.unwrap().forget();
            }
            tokio::time::sleep(self.delay).await;
            if self.broken {
                Err(StoreError::Unavailable("down".into()))
            } else {
                Ok(self.answer)
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
            release: None,
            answer: Some(Cutoff::from_unix_seconds(7)),
            events: broadcast::channel(16).0,
        })
    }

    #[test]
    fn a_borrowed_key_hashes_and_compares_as_the_owned_one() {
        use std::hash::BuildHasher;
        let hasher = FastHash::default();
        let owned = UserKey {
            app: Arc::from("app"),
            user: Arc::from("user"),
        };
        let borrowed = UserRef::from(&owned);
        assert_eq!(hasher.hash_one(&owned), hasher.hash_one(&borrowed));
        assert!(quick_cache::Equivalent::equivalent(&borrowed, &owned));
        // the split between app and user is part of the key
        let shifted = UserRef {
            app: "ap",
            user: "puser",
        };
        assert!(!quick_cache::Equivalent::equivalent(&shifted, &owned));
        assert_ne!(hasher.hash_one(&owned), hasher.hash_one(&shifted));
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
    async fn new_cache_settings_apply_in_place_and_keep_what_still_fits() {
        let store = Arc::new(MemoryStore::new());
        let cache = RevocationCache::new(store.clone(), &settings());
        let app: Arc<str> = Arc::from("a");
        let users: Vec<Arc<str>> = (0..100).map(|i| Arc::from(format!("u{i}"))).collect();
        for user in &users {
            assert_eq!(cache.user_cutoff(&app, user).await, Ok(None));
        }
        assert_eq!(cache.entry_count(), 100);

        let mut same = settings();
        same.store_timeout = Duration::from_millis(300);
        assert!(cache.apply_settings(&same));
        assert!(!cache.apply_settings(&same), "nothing new the second time");
        assert_eq!(cache.store_timeout(), Duration::from_millis(300));
        assert_eq!(
            cache.entry_count(),
            100,
            "a timeout alone keeps the entries"
        );

        let mut smaller = same.clone();
        smaller.cache_capacity = 10;
        assert!(cache.apply_settings(&smaller));
        let kept = cache.entry_count();
        // approximately: each shard rounds its share of the capacity up
        assert!(
            (1..=10 + cache.users.num_shards() as u64).contains(&kept),
            "evicted down to the new capacity, kept {kept}"
        );

        let now = now_unix();
        let cached = users
            .iter()
            .find(|u| cache.cached_user(&app, u, now).is_some())
            .expect("an entry survived the resize")
            .clone();
        let mut shorter = smaller.clone();
        shorter.cache_ttl = Duration::from_secs(5);
        assert!(cache.apply_settings(&shorter));
        // the shorter TTL applies to the entries already cached
        assert!(cache.cached_user(&app, &cached, now + 4).is_some());
        assert!(cache.cached_user(&app, &cached, now + 6).is_none());
        assert_eq!(cache.user_cutoff(&app, &cached).await, Ok(None));
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
        while cache.capacity.load(Ordering::Relaxed) != 42 {
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
    #[tokio::test]
    async fn a_read_overtaken_by_an_invalidation_is_answered_but_not_cached() {
        let store = Arc::new(Probe {
            reads: AtomicUsize::new(0),
            delay: Duration::ZERO,
            broken: false,
            release: Some(tokio::sync::Semaphore::new(0)),
            answer: None,
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
        store.release.as_ref().unwrap().add_permits(2);
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
    async fn entries_expire_with_the_ttl() {
        let store = probe(0, false);
        let mut settings = settings();
        settings.cache_ttl = Duration::from_secs(2);
        let cache = RevocationCache::new(store.clone(), &settings);
        let (app, user): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("u"));
        cache.cutoff(&app, &user).await.unwrap();
        assert_eq!(store.reads.load(Ordering::SeqCst), 1);
        let now = now_unix();
        assert!(cache.cached_cutoff(&app, &user, now + 1).is_some());
        // two seconds after the read (at most three after `now`), both entries are stale
        assert!(cache.cached_cutoff(&app, &user, now + 3).is_none());
        assert!(cache.cached_user(&app, &user, now + 3).is_none());
        assert!(cache.cached_app(&app, now + 3).is_none());
        // and a lookup that finds a stale entry reads the store again
        cache.users.insert(
            UserKey {
                app: app.clone(),
                user: user.clone(),
            },
            Cached {
                cutoff: None,
                read_at: now - 10,
            },
        );
        cache.cutoff(&app, &user).await.unwrap();
        assert_eq!(store.reads.load(Ordering::SeqCst), 2);
    }
}
