//! The cache in front of the revocation store (contract §3): "no cutoff" is cached too
//! (the common case), concurrent misses for one key share one store read, and store
//! events invalidate at once.
//!
//! Users' cutoffs live in a `moka::sync::Cache`, the cache the product's design names,
//! in its leanest configuration: no moka time-to-live, no eviction listener, no
//! weigher, so an entry carries only moka's access-order node and its `(app, user)`
//! key (the README has the bytes per cached user, the id included, and the command).
//! App-wide cutoffs are a handful of entries (one per configured app) read on every
//! request, with nothing to evict: they live in a map swapped whole on each change
//! (`AppCutoffs`), so a request pays moka's lookup once, not twice.
//!
//! - **Hits are synchronous** ([`RevocationCache::cached_cutoff`]): one probe of the
//!   app map and one moka `get`, both with borrowed keys (`UserRef` is moka's
//!   `Equivalent` of the owned key, so a lookup builds no key and clones no `Arc`), no
//!   I/O, no `.await`, no allocation (`examples/cache_memory.rs` counts it). moka's own
//!   housekeeping runs on the caller's thread when its read buffer fills,
//!   synchronously and under a `try_lock`.
//! - **TTL is ours, not moka's**: an entry carries the unix second it was read and is
//!   checked against the `now` the gate already has, so a reload that shortens the TTL
//!   applies to entries already cached (moka's time-to-live is fixed at build, and costs
//!   a write-order node per entry). Capacity is also fixed at build in moka, so a new
//!   capacity builds a new table and copies the entries that fit into it.
//! - **Misses are coalesced**: the first miss puts a `Slot::Reading` (a shared store
//!   read, spawned) into the table (for users with moka's `or_insert_with_if`, which
//!   runs one `init` per key however many threads miss at once; for apps under the
//!   map's writer lock); later misses find the slot and await the same read. moka's
//!   async `try_get_with` would do the same, but only on its `future::Cache`, whose
//!   `get` is `async`: the hit path could not stay synchronous. The read runs as its
//!   own task so that a request that gives up does not stall the others, and it stores
//!   its answer (or, on a store error, removes its slot: errors are not cached) before
//!   anyone sees it.
//! - **The generation guard stays**: a read overtaken by an invalidation must be
//!   answered but not cached (test `a_read_overtaken_by_an_invalidation_is_answered_
//!   but_not_cached`). moka's per-key ordering does not give that: `get_with`/
//!   `try_get_with` insert their value when the read ends whatever `invalidate` did
//!   meanwhile, and `and_compute_with` serialises only with other computes, not with
//!   `invalidate`. So every invalidation bumps a counter, and a read caches its answer
//!   only if the counter did not move while it ran (re-checked after the insert).
//! - **One lookup per repeated token**: `RevocationCache::cached_stamped` hands the
//!   answer out as a `StampedCutoff` (this cache's id, its *epoch*, the answer and
//!   when it was read), which the gate keeps in the token's own cache entry; the next
//!   request of that token takes it (`RevocationCache::stamped`) after one atomic
//!   load and the TTL check, instead of probing both tables again. The epoch is
//!   bumped *after* every removal that a cutoff change makes (events, writes, a
//!   resync, an overtaken answer taken out again, a resize), so a stamp made after
//!   the bump saw the removal, and one made before fails the check: a recorded cutoff
//!   applies to the very next request, as with the tables alone. A stamp is never
//!   fresher than the two entries it was made from (the older `read_at` counts).

use super::{RevocationEvent, RevocationStore, StoreError, UserCutoffChange};
use crate::config::RevocationSettings;
use crate::reload::ConfigHandle;
use crate::time::{Cutoff, StampedCutoff, now_unix};
use arc_swap::{ArcSwap, ArcSwapOption};
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

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

impl moka::Equivalent<UserKey> for UserRef<'_> {
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

/// A cached answer and the unix second it was read from the store, in 12 bytes so
/// that a [`Slot`] is 16 and moka's value node stays in a 48-byte allocation.
#[derive(Debug, Clone, Copy)]
struct Cached {
    /// The cutoff's unix second, or [`NO_CUTOFF`].
    cutoff: i64,
    /// Unsigned: good until 2106.
    read_at: u32,
}

/// No cutoff date parses to this second (chrono stops ~262,000 years out).
const NO_CUTOFF: i64 = i64::MIN;

impl Cached {
    fn now(cutoff: Option<Cutoff>) -> Self {
        Cached::at(cutoff, now_unix())
    }

    fn at(cutoff: Option<Cutoff>, read_at: i64) -> Self {
        Cached {
            cutoff: cutoff.map_or(NO_CUTOFF, Cutoff::unix_seconds),
            read_at: u32::try_from(read_at.max(0)).unwrap_or(u32::MAX),
        }
    }

    fn cutoff(self) -> Option<Cutoff> {
        (self.cutoff != NO_CUTOFF).then(|| Cutoff::from_unix_seconds(self.cutoff))
    }

    /// The answer while it is younger than the TTL. The TTL is read at lookup, so a
    /// reload that shortens it applies to entries already cached.
    fn fresh(self, now: i64, ttl_seconds: i64) -> Option<Option<Cutoff>> {
        (now < i64::from(self.read_at).saturating_add(ttl_seconds)).then(|| self.cutoff())
    }
}

/// One store read's outcome, shared by every request that missed on the same key
/// (behind an `Arc`, to keep a [`Slot`] at 16 bytes).
type Read = Arc<Shared<BoxFuture<'static, StoreAnswer>>>;

/// What a table holds for a key.
#[derive(Clone)]
enum Slot {
    /// A [`Cached`], its fields inline so that the tag fits beside them.
    Ready {
        cutoff: i64,
        read_at: u32,
    },
    Reading(Read),
}

const _: () = assert!(std::mem::size_of::<Slot>() == 16);

impl From<Cached> for Slot {
    fn from(cached: Cached) -> Self {
        Slot::Ready {
            cutoff: cached.cutoff,
            read_at: cached.read_at,
        }
    }
}

impl Slot {
    fn ready(&self) -> Option<Cached> {
        match *self {
            Slot::Ready { cutoff, read_at } => Some(Cached { cutoff, read_at }),
            Slot::Reading(_) => None,
        }
    }

    fn fresh(&self, now: i64, ttl_seconds: i64) -> Option<Option<Cutoff>> {
        self.ready()?.fresh(now, ttl_seconds)
    }

    /// Whether a miss should start a new read instead of joining this slot: a stale
    /// answer, or a read that ended without leaving an answer behind it.
    fn replaceable(&self, now: i64, ttl_seconds: i64) -> bool {
        match self {
            Slot::Reading(read) => read.peek().is_some(),
            ready => ready.fresh(now, ttl_seconds).is_none(),
        }
    }
}

type Moka<K> = moka::sync::Cache<K, Slot, FastHash>;

/// Most apps whose cutoffs are kept: apps come from the config file, so this only
/// bounds a map that a long run of reloads could otherwise grow.
const APP_CAPACITY: usize = 4096;

/// A moka cache that can be replaced live (new capacity, resync) without dropping
/// what still fits.
struct Table<K> {
    current: ArcSwap<Moka<K>>,
    // The table being copied from while a new capacity is applied: invalidations
    // reach it too, so that the copy cannot bring back what they removed.
    retiring: ArcSwapOption<Moka<K>>,
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> Table<K> {
    fn new(capacity: u64) -> Self {
        Table {
            current: ArcSwap::from_pointee(Self::build(capacity)),
            retiring: ArcSwapOption::empty(),
        }
    }

    fn build(capacity: u64) -> Moka<K> {
        moka::sync::Cache::builder()
            .max_capacity(capacity)
            .build_with_hasher(FastHash::default())
    }

    fn get<Q: moka::Equivalent<K> + Hash + ?Sized>(&self, key: &Q) -> Option<Slot> {
        self.current.load().get(key)
    }

    fn invalidate<Q: moka::Equivalent<K> + Hash + ?Sized>(&self, key: &Q) {
        // The retiring table first: see `resize`.
        if let Some(retiring) = &*self.retiring.load() {
            retiring.invalidate(key);
        }
        self.current.load().invalidate(key);
    }

    fn clear(&self) {
        let capacity = self.capacity();
        self.current.store(Arc::new(Self::build(capacity)));
    }

    fn capacity(&self) -> u64 {
        let current = self.current.load();
        current.policy().max_capacity().unwrap_or(u64::MAX)
    }

    fn len(&self) -> u64 {
        let current = self.current.load();
        current.run_pending_tasks();
        current.entry_count()
    }

    /// Swaps in a table of `capacity` and copies into it the answers that fit.
    /// Invalidations during the copy remove from the old table, then the new one; the
    /// copy puts into the new table, then checks that the old one still has the key.
    /// Whichever order they interleave in, an invalidated key does not survive.
    fn resize(&self, capacity: u64) {
        let fresh = Arc::new(Self::build(capacity));
        let old = self.current.load_full();
        self.retiring.store(Some(old.clone()));
        self.current.store(fresh.clone());
        let mut copied = 0;
        for (key, slot) in old.iter() {
            if copied == capacity {
                break;
            }
            let Some(cached) = slot.ready() else { continue };
            if fresh.contains_key(&*key) {
                continue;
            }
            fresh.insert(K::clone(&key), cached.into());
            if !old.contains_key(&*key) {
                fresh.invalidate(&*key);
            }
            copied += 1;
        }
        self.retiring.store(None);
        fresh.run_pending_tasks();
    }
}

/// The app-wide cutoffs. An app's entry is read on every request and there are as
/// many entries as configured apps (a handful), changed only through `PATCH /app`: a
/// map swapped whole on each change, so a read is one `ArcSwap` load and one probe,
/// with no read to record and no clock to read. Writers (misses, answers,
/// invalidations) take a lock, so they see each other's changes as moka's per-key
/// ordering would: one read per app however many requests miss at once.
struct AppCutoffs {
    map: ArcSwap<HashMap<Arc<str>, Slot, FastHash>>,
    writer: Mutex<()>,
}

impl AppCutoffs {
    fn new() -> Self {
        AppCutoffs {
            map: ArcSwap::from_pointee(HashMap::default()),
            writer: Mutex::new(()),
        }
    }

    fn fresh(&self, app: &str, now: i64, ttl_seconds: i64) -> Option<Option<Cutoff>> {
        self.map.load().get(app)?.fresh(now, ttl_seconds)
    }

    fn ready(&self, app: &str) -> Option<Cached> {
        self.map.load().get(app)?.ready()
    }

    /// Copies the map, changes the copy, swaps it in: readers never wait.
    fn update<R>(&self, change: impl FnOnce(&mut HashMap<Arc<str>, Slot, FastHash>) -> R) -> R {
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let mut map = HashMap::clone(&self.map.load());
        let result = change(&mut map);
        self.map.store(Arc::new(map));
        result
    }

    /// The slot a miss waits on: the one already there unless it is `replaceable`,
    /// else `start()`'s, put in the map before anyone polls it.
    fn claim(&self, app: &Arc<str>, now: i64, ttl: i64, start: impl FnOnce() -> Slot) -> Slot {
        if let Some(slot) = self.map.load().get(&**app)
            && !slot.replaceable(now, ttl)
        {
            return slot.clone();
        }
        self.update(|map| match map.get(&**app) {
            Some(slot) if !slot.replaceable(now, ttl) => slot.clone(),
            _ => {
                let slot = start();
                Self::bounded_insert(map, app.clone(), slot.clone());
                slot
            }
        })
    }

    fn insert(&self, app: &Arc<str>, slot: Slot) {
        self.update(|map| Self::bounded_insert(map, app.clone(), slot));
    }

    /// Apps removed from the config leave their entries behind; past the bound,
    /// start over (a miss per app rebuilds it).
    fn bounded_insert(map: &mut HashMap<Arc<str>, Slot, FastHash>, app: Arc<str>, slot: Slot) {
        if map.len() >= APP_CAPACITY && !map.contains_key(&app) {
            map.clear();
        }
        map.insert(app, slot);
    }

    fn invalidate(&self, app: &str) {
        self.update(|map| map.remove(app));
    }

    fn clear(&self) {
        self.update(HashMap::clear);
    }

    fn len(&self) -> u64 {
        self.map.load().len() as u64
    }
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
    users: Table<UserKey>,
    apps: AppCutoffs,
    // The `[revocation]` settings a reload may change, read without a guard.
    capacity: AtomicU64,
    ttl_seconds: AtomicI64,
    store_timeout_ms: AtomicU64,
    // Bumped by every invalidation: a store read that started before one must not put
    // its (possibly older) answer in the cache.
    generation: AtomicU64,
    // Bumped after every removal a cutoff change makes: the stamps handed out before
    // it no longer hold (module docs).
    epoch: AtomicU64,
    // Tells this cache's stamps from another's (the same config, so the same tokens'
    // cache entries, may serve gates over different revocation caches).
    owner: u64,
    stats: CacheStats,
    // For the read tasks, which store their answer when they end.
    this: Weak<RevocationCache>,
}

/// The TTL in whole seconds, at least one.
fn ttl_seconds(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX).max(1)
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The next [`RevocationCache`]'s id.
static NEXT_OWNER: AtomicU64 = AtomicU64::new(1);

impl RevocationCache {
    /// A cache over `store`, sized and timed by `[revocation]`. Call
    /// [`RevocationCache::spawn_invalidation`] to follow the store's events.
    pub fn new(store: Arc<dyn RevocationStore>, settings: &RevocationSettings) -> Arc<Self> {
        Arc::new_cyclic(|this| RevocationCache {
            store,
            users: Table::new(settings.cache_capacity),
            apps: AppCutoffs::new(),
            capacity: AtomicU64::new(settings.cache_capacity),
            ttl_seconds: AtomicI64::new(ttl_seconds(settings.cache_ttl)),
            store_timeout_ms: AtomicU64::new(millis(settings.store_timeout)),
            generation: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            owner: NEXT_OWNER.fetch_add(1, Ordering::Relaxed),
            stats: CacheStats::default(),
            this: this.clone(),
        })
    }

    /// Follows `[revocation]` cache settings (`cache_capacity`, `cache_ttl_seconds`,
    /// `store_timeout_ms`) through config reloads, in place: a new capacity keeps the
    /// entries that fit, a shorter TTL applies to entries already cached, and nothing
    /// else is dropped. True when a setting changed.
    pub fn apply_settings(&self, settings: &RevocationSettings) -> bool {
        let mut changed = false;
        if self
            .capacity
            .swap(settings.cache_capacity, Ordering::Relaxed)
            != settings.cache_capacity
        {
            self.users.resize(settings.cache_capacity);
            // The copy may have put back, for a moment, what an invalidation removed.
            self.bump_epoch();
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

    /// Number of cached entries, reads in flight included (for metrics).
    pub fn entry_count(&self) -> u64 {
        self.users.len() + self.apps.len()
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
                self.users.invalidate(&UserRef { app, user });
            }
            RevocationEvent::App { app, .. } => self.apps.invalidate(app),
            RevocationEvent::Resync => {
                // New tables rather than moka's `invalidate_all`, which compares
                // insertion instants with the call's and so could keep an entry put in
                // the same instant.
                self.users.clear();
                self.apps.clear();
            }
        }
        self.bump_epoch();
    }

    /// After a removal: every stamp handed out before it is void.
    fn bump_epoch(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    fn ttl(&self) -> i64 {
        self.ttl_seconds.load(Ordering::Relaxed)
    }

    fn store_timeout(&self) -> Duration {
        Duration::from_millis(self.store_timeout_ms.load(Ordering::Relaxed))
    }

    #[cfg(test)]
    fn cached_app(&self, app: &str, now: i64) -> Option<Option<Cutoff>> {
        self.apps.fresh(app, now, self.ttl())
    }

    #[cfg(test)]
    fn cached_user(&self, app: &str, user: &str, now: i64) -> Option<Option<Cutoff>> {
        self.users
            .get(&UserRef { app, user })?
            .fresh(now, self.ttl())
    }

    /// The cutoff that applies to a user's tokens (the later of the user's and the
    /// app's stored cutoffs) when both are cached: no I/O, no `.await`, no allocation.
    /// `now` is the current unix second (the gate has it already).
    pub fn cached_cutoff(&self, app: &str, user: &str, now: i64) -> Option<Option<Cutoff>> {
        self.cached_stamped(app, user, now)
            .map(|stamp| stamp.cutoff)
    }

    /// [`RevocationCache::cached_cutoff`], stamped for [`RevocationCache::stamped`].
    pub(crate) fn cached_stamped(&self, app: &str, user: &str, now: i64) -> Option<StampedCutoff> {
        // Before the lookups: a removal that these lookups might not see bumps the
        // epoch after this load, and so voids the stamp.
        let epoch = self.epoch.load(Ordering::SeqCst);
        let ttl = self.ttl();
        let app_cached = self.apps.ready(app)?;
        app_cached.fresh(now, ttl)?;
        let user_cached = self.users.get(&UserRef { app, user })?.ready()?;
        user_cached.fresh(now, ttl)?;
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        Some(StampedCutoff {
            owner: self.owner,
            epoch,
            cutoff: app_cached.cutoff().max(user_cached.cutoff()),
            read_at: i64::from(app_cached.read_at.min(user_cached.read_at)),
        })
    }

    /// The answer a stamp holds, if it still holds: made by this cache, no removal
    /// since, and both entries it came from younger than the TTL. Counted as a hit.
    pub(crate) fn stamped(&self, stamp: &StampedCutoff, now: i64) -> Option<Option<Cutoff>> {
        let holds = stamp.owner == self.owner
            && stamp.epoch == self.epoch.load(Ordering::SeqCst)
            && now < stamp.read_at.saturating_add(self.ttl());
        if !holds {
            return None;
        }
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        Some(stamp.cutoff)
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
        let (now, ttl) = (now_unix(), self.ttl());
        let hit = self.users.get(&UserRef { app, user });
        let key = || UserKey {
            app: app.clone(),
            user: user.clone(),
        };
        self.lookup(hit.and_then(|slot| slot.fresh(now, ttl)), key, now, ttl)
            .await
    }

    /// The app-wide cutoff set through the API.
    pub async fn app_cutoff(&self, app: &Arc<str>) -> Result<Option<Cutoff>, StoreError> {
        let (now, ttl) = (now_unix(), self.ttl());
        let hit = self.apps.fresh(app, now, ttl);
        self.lookup(hit, || app.clone(), now, ttl).await
    }

    /// A hit, or the store read that every concurrent miss for the key shares.
    async fn lookup<K: CacheKey>(
        &self,
        hit: Option<Option<Cutoff>>,
        key: impl FnOnce() -> K,
        now: i64,
        ttl: i64,
    ) -> Result<Option<Cutoff>, StoreError> {
        if let Some(hit) = hit {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(hit);
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let key = key();
        // One `start` per key at a time; the other misses get its slot.
        let slot = key.claim(self, now, ttl, || Slot::Reading(self.read(key.clone())));
        match slot {
            Slot::Ready { .. } => Ok(slot.ready().and_then(Cached::cutoff)),
            Slot::Reading(read) => Shared::clone(&read).await,
        }
    }

    /// A shared store read for `key`, which stores its own answer. It starts when first
    /// polled, so after its slot is in the table: an answer stored before
    /// the slot would be overwritten by it.
    fn read<K: CacheKey>(&self, key: K) -> Read {
        let generation = self.generation.load(Ordering::SeqCst);
        let cache = self.this.clone();
        let read = bounded(self.store_timeout(), key.clone().read(self.store.clone()));
        async move {
            // A task of its own: a request that stops waiting does not stop the read.
            let task = tokio::spawn(async move {
                let result = read.await;
                if let Some(cache) = cache.upgrade() {
                    cache.store_answer(&key, &result, generation);
                }
                result
            });
            task.await
                .unwrap_or_else(|e| Err(StoreError::Unavailable(format!("store read: {e}"))))
        }
        .boxed()
        .shared()
        .into()
    }

    /// Puts a read's answer in the table, unless an invalidation overtook the read;
    /// removes its slot otherwise, store errors included (they are not cached).
    fn store_answer<K: CacheKey>(&self, key: &K, result: &StoreAnswer, generation: u64) {
        match result {
            Ok(cutoff) if self.generation.load(Ordering::SeqCst) == generation => {
                key.put(self, Cached::now(*cutoff).into());
                // An invalidation may have landed between the check and the insert;
                // its own removal then ran before our insert, so take the answer out
                // again. SeqCst here and on the bump: store-buffering between the two
                // sides must not let each miss the other.
                if self.generation.load(Ordering::SeqCst) != generation {
                    key.invalidate(self);
                    // A stamp may have been made from the answer while it was there.
                    self.bump_epoch();
                }
            }
            Ok(_) => key.invalidate(self),
            Err(_) => {
                self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                key.invalidate(self);
            }
        }
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
            self.users.invalidate(&UserRef {
                app,
                user: &change.user_id,
            });
        }
        self.bump_epoch();
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
        self.apps.invalidate(app);
        self.bump_epoch();
        Ok(())
    }

    fn count_error(&self, error: &StoreError) -> StoreError {
        self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
        error.clone()
    }
}

type StoreAnswer = Result<Option<Cutoff>, StoreError>;

/// What the user and the app table have in common for a miss: the slot every
/// concurrent miss shares, putting and dropping an answer, and how the store answers.
trait CacheKey: Clone + Send + Sync + 'static {
    fn claim(
        &self,
        cache: &RevocationCache,
        now: i64,
        ttl: i64,
        start: impl FnOnce() -> Slot,
    ) -> Slot;
    fn put(&self, cache: &RevocationCache, slot: Slot);
    fn invalidate(&self, cache: &RevocationCache);
    fn read(self, store: Arc<dyn RevocationStore>) -> BoxFuture<'static, StoreAnswer>;
}

impl CacheKey for UserKey {
    /// moka runs one `init` per key at a time; the others get its slot.
    fn claim(
        &self,
        cache: &RevocationCache,
        now: i64,
        ttl: i64,
        start: impl FnOnce() -> Slot,
    ) -> Slot {
        cache
            .users
            .current
            .load()
            .entry(self.clone())
            .or_insert_with_if(start, |slot| slot.replaceable(now, ttl))
            .into_value()
    }
    fn put(&self, cache: &RevocationCache, slot: Slot) {
        cache.users.current.load().insert(self.clone(), slot);
    }
    fn invalidate(&self, cache: &RevocationCache) {
        cache.users.invalidate(self);
    }
    fn read(self, store: Arc<dyn RevocationStore>) -> BoxFuture<'static, StoreAnswer> {
        async move { store.user_cutoff(&self.app, &self.user).await }.boxed()
    }
}

impl CacheKey for Arc<str> {
    fn claim(
        &self,
        cache: &RevocationCache,
        now: i64,
        ttl: i64,
        start: impl FnOnce() -> Slot,
    ) -> Slot {
        cache.apps.claim(self, now, ttl, start)
    }
    fn put(&self, cache: &RevocationCache, slot: Slot) {
        cache.apps.insert(self, slot);
    }
    fn invalidate(&self, cache: &RevocationCache) {
        cache.apps.invalidate(self);
    }
    fn read(self, store: Arc<dyn RevocationStore>) -> BoxFuture<'static, StoreAnswer> {
        async move { store.app_cutoff(&self).await }.boxed()
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
        app_reads: AtomicUsize,
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
            self.app_reads.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
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
            app_reads: AtomicUsize::new(0),
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
        assert!(moka::Equivalent::equivalent(&borrowed, &owned));
        // the split between app and user is part of the key
        let shifted = UserRef {
            app: "ap",
            user: "puser",
        };
        assert!(!moka::Equivalent::equivalent(&shifted, &owned));
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
    async fn app_cutoffs_share_one_read_and_follow_events_resync_and_the_ttl() {
        let store = probe(50, false);
        let cache = RevocationCache::new(store.clone(), &settings());
        let app: Arc<str> = Arc::from("a");
        let reads = (0..20).map(|_| cache.app_cutoff(&app));
        let results = futures_util::future::join_all(reads).await;
        assert!(results.iter().all(|r| *r == Ok(None)));
        assert_eq!(store.app_reads.load(Ordering::SeqCst), 1);
        let now = now_unix();
        assert_eq!(cache.cached_app(&app, now), Some(None));
        assert_eq!(cache.entry_count(), 1);

        // another app's event leaves it; its own drops it; the next lookup reads again
        let event = |app: &Arc<str>| RevocationEvent::App {
            app: app.clone(),
            cutoff: Some(Cutoff::from_unix_seconds(3)),
        };
        cache.apply_event(&event(&Arc::from("b"))).await;
        assert_eq!(cache.cached_app(&app, now), Some(None));
        cache.apply_event(&event(&app)).await;
        assert_eq!(cache.cached_app(&app, now), None);
        assert_eq!(cache.app_cutoff(&app).await, Ok(None));
        assert_eq!(store.app_reads.load(Ordering::SeqCst), 2);

        // a resync forgets it too
        cache.apply_event(&RevocationEvent::Resync).await;
        assert_eq!(cache.cached_app(&app, now), None);
        assert_eq!(cache.entry_count(), 0);
        assert_eq!(cache.app_cutoff(&app).await, Ok(None));
        assert_eq!(store.app_reads.load(Ordering::SeqCst), 3);

        // our TTL, read at lookup: stale a minute after the read, and a shorter TTL
        // from a reload applies to the entry already there
        let now = now_unix();
        assert!(cache.cached_app(&app, now + 58).is_some());
        assert!(cache.cached_app(&app, now + 62).is_none());
        let mut shorter = settings();
        shorter.cache_ttl = Duration::from_secs(5);
        assert!(cache.apply_settings(&shorter));
        assert!(cache.cached_app(&app, now + 7).is_none());
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
        assert!(
            (1..=10).contains(&kept),
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
            app_reads: AtomicUsize::new(0),
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
        cache.users.current.load().insert(
            UserKey {
                app: app.clone(),
                user: user.clone(),
            },
            Cached::at(None, now - 10).into(),
        );
        cache.cutoff(&app, &user).await.unwrap();
        assert_eq!(store.reads.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_stamp_holds_until_a_removal_the_ttl_or_another_cache() {
        let store = Arc::new(MemoryStore::new());
        let cache = RevocationCache::new(store.clone(), &settings());
        let (app, user): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("u"));
        let now = now_unix();
        assert!(cache.cached_stamped(&app, &user, now).is_none(), "cold");
        let stamp_now = || async {
            assert_eq!(cache.cutoff(&app, &user).await, Ok(None));
            cache.cached_stamped(&app, &user, now).expect("both cached")
        };
        let stamp = stamp_now().await;
        assert_eq!(stamp.cutoff, None);
        assert_eq!(cache.stamped(&stamp, now), Some(None));
        // The older entry's read counts, against the TTL read at use.
        assert!(cache.stamped(&stamp, stamp.read_at + 59).is_some());
        assert!(cache.stamped(&stamp, stamp.read_at + 60).is_none());
        let mut shorter = settings();
        shorter.cache_ttl = Duration::from_secs(5);
        cache.apply_settings(&shorter);
        assert!(cache.stamped(&stamp, stamp.read_at + 6).is_none());
        cache.apply_settings(&settings());
        assert!(
            cache.stamped(&stamp, now).is_some(),
            "a TTL alone voids nothing"
        );

        // Every removal voids the stamps made before it, even another user's.
        let other: Arc<str> = Arc::from("v");
        let removals: [RevocationEvent; 3] = [
            RevocationEvent::User {
                app: app.clone(),
                user: other,
                cutoff: None,
            },
            RevocationEvent::App {
                app: app.clone(),
                cutoff: None,
            },
            RevocationEvent::Resync,
        ];
        for event in &removals {
            let stamp = stamp_now().await;
            cache.apply_event(event).await;
            assert_eq!(cache.stamped(&stamp, now), None, "after {event:?}");
        }
        let stamp = stamp_now().await;
        let change = UserCutoffChange {
            user_id: "u".into(),
            cutoff: Some(Cutoff::from_unix_seconds(3)),
        };
        cache.set_user_cutoffs(&app, &[change]).await.unwrap();
        assert_eq!(cache.stamped(&stamp, now), None, "after a user write");
        assert_eq!(
            cache.cutoff(&app, &user).await,
            Ok(Some(Cutoff::from_unix_seconds(3)))
        );
        let stamp = cache.cached_stamped(&app, &user, now).unwrap();
        assert_eq!(stamp.cutoff, Some(Cutoff::from_unix_seconds(3)));
        cache
            .set_app_cutoff(&app, Some(Cutoff::from_unix_seconds(4)))
            .await
            .unwrap();
        assert_eq!(cache.stamped(&stamp, now), None, "after an app write");
        assert_eq!(
            cache.cutoff(&app, &user).await,
            Ok(Some(Cutoff::from_unix_seconds(4)))
        );
        let stamp = cache.cached_stamped(&app, &user, now).unwrap();
        assert_eq!(
            stamp.cutoff,
            Some(Cutoff::from_unix_seconds(4)),
            "the later one"
        );
        let mut smaller = settings();
        smaller.cache_capacity = 10;
        cache.apply_settings(&smaller);
        assert_eq!(cache.stamped(&stamp, now), None, "after a resize");

        // Another cache at the same epoch does not take this one's stamp.
        let stamp = cache.cached_stamped(&app, &user, now).unwrap();
        let other = RevocationCache::new(store, &settings());
        other.epoch.store(stamp.epoch, Ordering::SeqCst);
        assert_eq!(other.stamped(&stamp, now), None);
    }
}
