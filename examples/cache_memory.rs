//! Memory per cached revocation entry (issue 11 target: 1,000,000 cached users within
//! 500 MB, the user id included), and a check that a cache hit does not allocate
//! (beyond moka's housekeeping, once per 64 reads).
//!
//! Fills the revocation cache with N users' "no cutoff" answers (the common case) the
//! way the gate does on misses, then reports, per cached entry, the growth of the
//! live heap (counted by a wrapping allocator, so it is exact) and of the RSS.
//! User ids are 20 to 36 bytes (28 on average), as real ids and UUIDs are.
//!
//! `cargo run --profile bench --example cache_memory -- 100000 1000000`
//! (each size in a fresh process, so one size's freed memory does not hide the next's).
#![allow(unsafe_code)] // a counting GlobalAlloc is an unsafe impl

use chatgate::config::ConfigSnapshot;
use chatgate::revocation::{MemoryStore, RevocationCache};
use chatgate::time::now_unix;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

struct Counting;

static LIVE_BYTES: AtomicU64 = AtomicU64::new(0);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        LIVE_BYTES.fetch_sub(layout.size() as u64, Ordering::Relaxed);
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("Linux /proc");
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// The i-th user id: 20 to 36 bytes.
fn user_id(i: u64) -> String {
    const PAD: &str = "-abcdefghijklmnop";
    format!("u{i:019}{}", &PAD[..(i % 17) as usize])
}

fn measure(users: u64) {
    let mut snapshot = ConfigSnapshot::with_apps(vec![]);
    snapshot.revocation.cache_capacity = users;
    // A debug build fills a million users slower than the default 60 s TTL.
    snapshot.revocation.cache_ttl = std::time::Duration::from_secs(3600);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let cache = RevocationCache::new(Arc::new(MemoryStore::new()), &snapshot.revocation);
    let app: Arc<str> = Arc::from("demo-key");
    runtime.block_on(cache.app_cutoff(&app)).unwrap();
    let (rss_before, heap_before) = (rss_bytes(), LIVE_BYTES.load(Ordering::Relaxed));
    let mut id_bytes = 0;
    for i in 0..users {
        // As a request does: the id comes from the token and only the cache keeps it,
        // so the id's own allocation counts.
        let id = user_id(i);
        id_bytes += id.len() as u64;
        let id: Arc<str> = Arc::from(id);
        runtime.block_on(cache.user_cutoff(&app, &id)).unwrap();
    }
    let entries = cache.entry_count();
    let (rss_after, heap_after) = (rss_bytes(), LIVE_BYTES.load(Ordering::Relaxed));
    let per = |bytes: u64| bytes as f64 / entries.max(1) as f64;
    println!(
        "{users} users ({entries} cached entries, ids {:.0} bytes on average): \
         heap +{:.1} MiB = {:.0} B/entry, RSS +{:.1} MiB = {:.0} B/entry",
        id_bytes as f64 / users as f64,
        (heap_after - heap_before) as f64 / 1048576.0,
        per(heap_after - heap_before),
        (rss_after - rss_before) as f64 / 1048576.0,
        per(rss_after - rss_before),
    );

    // The hit path, as `Gate::check_cached` runs it: no allocation of its own. moka
    // applies its buffered reads on the caller's thread every 64 reads
    // (READ_LOG_FLUSH_POINT) or 300 ms, and that housekeeping allocates once; nothing
    // else may.
    let now = now_unix();
    // The users cached last: a full cache may have evicted the first ones.
    let ids: Vec<String> = (users.saturating_sub(1000)..users).map(user_id).collect();
    let lookups = 100 * ids.len() as u64;
    let allocations = ALLOCATIONS.load(Ordering::Relaxed);
    let mut hits = 0;
    for _ in 0..100 {
        for id in &ids {
            hits += u64::from(cache.cached_cutoff(&app, id, now).is_some());
        }
    }
    let allocated = ALLOCATIONS.load(Ordering::Relaxed) - allocations;
    println!(
        "{lookups} cache lookups: {hits} hits, {allocated} allocations ({:.4} per lookup)",
        allocated as f64 / lookups as f64
    );
    assert_eq!(hits, lookups);
    assert!(
        allocated <= lookups / 32,
        "a cache hit allocates more than moka's batched housekeeping does"
    );
}

fn main() {
    let mut sizes: Vec<u64> = std::env::args()
        .skip(1)
        .map(|n| n.parse().expect("a number of users"))
        .collect();
    if sizes.is_empty() {
        sizes.push(1_000_000);
    }
    if let [users] = sizes[..] {
        return measure(users);
    }
    // One process per size: the allocator keeps what an earlier size freed.
    let me = std::env::current_exe().unwrap();
    for users in sizes {
        let status = std::process::Command::new(&me)
            .arg(users.to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }
}
