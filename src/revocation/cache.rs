//! moka in front of the store: "no cutoff" is cached too (the common case), concurrent
//! misses for one key share one store read, and store events invalidate at once.
//!
//! Two levels. moka is the cache proper: bounded by `cache_capacity` with its TinyLFU
//! policy, entries expiring after `cache_ttl`, misses coalesced. A moka hit costs a few
//! hundred nanoseconds (it records every read for its policy and takes the time), which
//! would be most of a request's auth budget, so hits are served from a small sharded map
//! in front of it ([`Hot`]): one hash over the borrowed `(app, user)` strings, a read
//! lock on one of 64 shards, no allocation, no `.await`, one clock read per request.
//! Entries keep the expiry of the store read that produced them, so the front never
//! stretches the TTL; a full shard is simply emptied (its users are still in moka).
//!
//! Invalidation races: a store read that started before a write can finish after the
//! write's event. A global generation counter, bumped around every invalidation, lets
//! such a read be detected and left uncached (see [`RevocationCache::apply_event`]).

use super::{RevocationEvent, RevocationStore, StoreError, UserCutoffChange};
use crate::config::RevocationSettings;
use crate::time::Cutoff;
use moka::future::Cache;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

/// Key of a user's cutoff in moka: both parts are `Arc`s already held by the request's
/// identity, so building a key allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct UserKey {
    app: Arc<str>,
    user: Arc<str>,
}

/// A cutoff as read from the store, with when that read stops being trusted and the
/// generation it started in.
#[derive(Debug, Clone, Copy)]
struct Loaded {
    cutoff: Option<Cutoff>,
    expires: Instant,
    generation: u64,
}

/// Why a coalesced load produced nothing to cache.
#[derive(Debug)]
enum LoadError {
    Store(StoreError),
    /// An invalidation ran while the store was read: the answer is good for the
    /// requests that waited for it, but must not be cached.
    Raced(Option<Cutoff>),
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

/// Number of front shards (a power of two: a hash picks one with a mask).
const SHARDS: usize = 64;

/// The hash is the front's key; it is already well mixed, so the map does not hash it again.
#[derive(Default, Clone, Copy)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed; fold anything else in rather than panic.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[derive(Default, Clone, Copy)]
struct BuildPassThrough;

impl BuildHasher for BuildPassThrough {
    type Hasher = PassThrough;
    fn build_hasher(&self) -> PassThrough {
        PassThrough::default()
    }
}

/// One front entry: the strings it is for (two keys may share a hash) and the answer.
struct HotEntry {
    app: Arc<str>,
    user: Option<Arc<str>>,
    loaded: Loaded,
}

/// The front level: sharded `RwLock<HashMap>`s keyed by a hash of `(app, user)`.
/// Readers take one shard's read lock for a lookup and never hold it across `.await`.
struct Hot {
    shards: Box<[RwLock<HashMap<u64, HotEntry, BuildPassThrough>>]>,
    hasher: foldhash::fast::FixedState,
    shard_capacity: usize,
}

impl Hot {
    fn new(capacity: u64) -> Self {
        Hot {
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            hasher: foldhash::fast::FixedState::with_seed(0x6368_6174_6761_7465),
            shard_capacity: usize::try_from(capacity / SHARDS as u64)
                .unwrap_or(usize::MAX)
                .max(1),
        }
    }

    fn hash(&self, app: &str, user: Option<&str>) -> u64 {
        let mut hasher = self.hasher.build_hasher();
        hasher.write(app.as_bytes());
        hasher.write_u8(0xff);
        if let Some(user) = user {
            hasher.write(user.as_bytes());
        }
        hasher.finish()
    }

    fn shard(&self, hash: u64) -> &RwLock<HashMap<u64, HotEntry, BuildPassThrough>> {
        &self.shards[(hash as usize) & (SHARDS - 1)]
    }

    fn get(&self, app: &str, user: Option<&str>, now: Instant) -> Option<Option<Cutoff>> {
        let hash = self.hash(app, user);
        let shard = self
            .shard(hash)
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let entry = shard.get(&hash)?;
        (entry.loaded.expires > now && &*entry.app == app && entry.user.as_deref() == user)
            .then_some(entry.loaded.cutoff)
    }

    fn insert(&self, app: &Arc<str>, user: Option<&Arc<str>>, loaded: Loaded) {
        let hash = self.hash(app, user.map(|u| &**u));
        let mut shard = self
            .shard(hash)
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if shard.len() >= self.shard_capacity && !shard.contains_key(&hash) {
            // Bounded without an eviction policy of its own: these users are still in moka.
            shard.clear();
        }
        shard.insert(
            hash,
            HotEntry {
                app: app.clone(),
                user: user.cloned(),
                loaded,
            },
        );
    }

    fn remove(&self, app: &str, user: Option<&str>) {
        let hash = self.hash(app, user);
        self.shard(hash)
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&hash);
    }

    fn clear(&self) {
        for shard in self.shards.iter() {
            shard
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
        }
    }
}

/// The cached view of a [`RevocationStore`].
pub struct RevocationCache {
    store: Arc<dyn RevocationStore>,
    users: Cache<UserKey, Loaded>,
    apps: Cache<Arc<str>, Loaded>,
    hot_users: Hot,
    hot_apps: Hot,
    /// Bumped before and after every invalidation.
    generation: AtomicU64,
    ttl: Duration,
    store_timeout: Duration,
    stats: CacheStats,
}

/// The front holds the hottest users only; beyond this many, the rest are served from
/// moka (still no I/O), which keeps the front's memory small next to moka's.
const FRONT_CAPACITY_MAX: u64 = 262_144;

/// Most apps whose cutoffs are cached.
const APP_CAPACITY: u64 = 10_000;

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
                .max_capacity(APP_CAPACITY)
                .time_to_live(settings.cache_ttl)
                .build(),
            hot_users: Hot::new(settings.cache_capacity.min(FRONT_CAPACITY_MAX)),
            hot_apps: Hot::new(APP_CAPACITY),
            generation: AtomicU64::new(0),
            ttl: settings.cache_ttl,
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
    ///
    /// Order matters: bump, drop from moka, bump, drop from the front. A reader that
    /// put a stale answer in the front checks the generation afterwards and takes it
    /// out again, or else its insert happened before the final removal here.
    pub async fn apply_event(&self, event: &RevocationEvent) {
        self.generation.fetch_add(1, Ordering::SeqCst);
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
        self.generation.fetch_add(1, Ordering::SeqCst);
        match event {
            RevocationEvent::User { app, user, .. } => self.hot_users.remove(app, Some(user)),
            RevocationEvent::App { app, .. } => self.hot_apps.remove(app, None),
            RevocationEvent::Resync => {
                self.hot_users.clear();
                self.hot_apps.clear();
            }
        }
    }

    /// The cutoff that applies to a user's tokens: the later of the app's and the
    /// user's. The request path's one call: a front hit for both takes one clock read.
    pub async fn cutoff(
        &self,
        app: &Arc<str>,
        user: &Arc<str>,
    ) -> Result<Option<Cutoff>, StoreError> {
        let now = Instant::now();
        if let (Some(app_cutoff), Some(user_cutoff)) = (
            self.hot_apps.get(app, None, now),
            self.hot_users.get(app, Some(user), now),
        ) {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(app_cutoff.max(user_cutoff));
        }
        let app_cutoff = self.app_cutoff(app).await?;
        let user_cutoff = self.user_cutoff(app, user).await?;
        Ok(app_cutoff.max(user_cutoff))
    }

    /// A user's cutoff: from the cache, or one shared store read per key.
    pub async fn user_cutoff(
        &self,
        app: &Arc<str>,
        user: &Arc<str>,
    ) -> Result<Option<Cutoff>, StoreError> {
        if let Some(hit) = self.hot_users.get(app, Some(user), Instant::now()) {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(hit);
        }
        let key = UserKey {
            app: app.clone(),
            user: user.clone(),
        };
        let before = self.generation.load(Ordering::SeqCst);
        if let Some(loaded) = self.users.get(&key).await {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            self.promote(&self.hot_users, app, Some(user), loaded, before);
            return Ok(loaded.cutoff);
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let load = self.load(self.store.user_cutoff(app, user));
        match self.users.try_get_with(key.clone(), load).await {
            Ok(loaded) => {
                if !self.promote(&self.hot_users, app, Some(user), loaded, loaded.generation) {
                    self.users.invalidate(&key).await;
                }
                Ok(loaded.cutoff)
            }
            Err(error) => self.load_failed(&error),
        }
    }

    /// The app-wide cutoff set through the API.
    pub async fn app_cutoff(&self, app: &Arc<str>) -> Result<Option<Cutoff>, StoreError> {
        if let Some(hit) = self.hot_apps.get(app, None, Instant::now()) {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(hit);
        }
        let before = self.generation.load(Ordering::SeqCst);
        if let Some(loaded) = self.apps.get(app).await {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            self.promote(&self.hot_apps, app, None, loaded, before);
            return Ok(loaded.cutoff);
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let load = self.load(self.store.app_cutoff(app));
        match self.apps.try_get_with(app.clone(), load).await {
            Ok(loaded) => {
                if !self.promote(&self.hot_apps, app, None, loaded, loaded.generation) {
                    self.apps.invalidate(app).await;
                }
                Ok(loaded.cutoff)
            }
            Err(error) => self.load_failed(&error),
        }
    }

    /// One bounded store read, stamped with the generation it started in; `Raced` when
    /// an invalidation ran meanwhile.
    async fn load(
        &self,
        read: impl Future<Output = Result<Option<Cutoff>, StoreError>>,
    ) -> Result<Loaded, LoadError> {
        let generation = self.generation.load(Ordering::SeqCst);
        let cutoff = self.bounded(read).await.map_err(LoadError::Store)?;
        if self.generation.load(Ordering::SeqCst) != generation {
            return Err(LoadError::Raced(cutoff));
        }
        Ok(Loaded {
            cutoff,
            expires: Instant::now() + self.ttl,
            generation,
        })
    }

    fn load_failed(&self, error: &LoadError) -> Result<Option<Cutoff>, StoreError> {
        match error {
            LoadError::Store(error) => Err(self.count_error(error)),
            LoadError::Raced(cutoff) => Ok(*cutoff),
        }
    }

    /// Puts an answer in the front unless an invalidation ran since `since`; says
    /// whether it stayed.
    fn promote(
        &self,
        hot: &Hot,
        app: &Arc<str>,
        user: Option<&Arc<str>>,
        loaded: Loaded,
        since: u64,
    ) -> bool {
        hot.insert(app, user, loaded);
        if self.generation.load(Ordering::SeqCst) != since {
            hot.remove(app, user.map(|u| &**u));
            return false;
        }
        true
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
            self.apply_event(&RevocationEvent::User {
                app: app.clone(),
                user: Arc::from(change.user_id.as_str()),
                cutoff: change.cutoff,
            })
            .await;
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
        self.apply_event(&RevocationEvent::App {
            app: app.clone(),
            cutoff,
        })
        .await;
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
    async fn a_tiny_front_still_answers_every_user_with_their_own_cutoff() {
        let store = Arc::new(MemoryStore::new());
        let mut settings = settings();
        // 64 shards of one entry: constant clearing and hash sharing.
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
    async fn front_entries_expire_with_the_ttl_of_their_store_read() {
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
