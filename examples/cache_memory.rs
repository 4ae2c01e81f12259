//! Resident memory per cached revocation entry (issue 7 target: at most 200 bytes).
//!
//! Fills the revocation cache with N users' "no cutoff" answers (the common case) the
//! way the gate does on misses, then reports the growth of the process's RSS.
//!
//! `cargo run --release --example cache_memory -- 1000000`

use chatgate::config::ConfigSnapshot;
use chatgate::revocation::{MemoryStore, RevocationCache};
use std::sync::Arc;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("Linux /proc");
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let users: u64 = std::env::args()
        .nth(1)
        .map(|n| n.parse().expect("a number of users"))
        .unwrap_or(1_000_000);
    let mut snapshot = ConfigSnapshot::with_apps(vec![]);
    snapshot.revocation.cache_capacity = users * 2;
    let cache = RevocationCache::new(Arc::new(MemoryStore::new()), &snapshot.revocation);
    let app: Arc<str> = Arc::from("demo-key");
    let before = rss_bytes();
    for i in 0..users {
        // As a request does: the id comes from the token and only the cache keeps it,
        // so the id's own allocation counts. Shaped like real ids: ~20 bytes.
        let id: Arc<str> = Arc::from(format!("user-{i:015}"));
        cache.user_cutoff(&app, &id).await.unwrap();
    }
    let after = rss_bytes();
    let entries = cache.entry_count();
    println!(
        "{entries} cached entries: RSS grew {:.1} MiB, {:.0} bytes per entry (user ids of 20 bytes included)",
        (after - before) as f64 / 1048576.0,
        (after - before) as f64 / entries.max(1) as f64,
    );
}
