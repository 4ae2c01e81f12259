//! The binary's allocator: mimalloc, plus a thread that lets it return memory freed when
//! sessions close while the proxy then sits idle (issue 13: "memory is returned once
//! sessions close"; README, "Memory returned after sessions close", has the measurements
//! behind this design).
//!
//! mimalloc (v3) gives freed pages back to the OS `purge_delay` ms after they empty,
//! but only when some thread runs the allocator's collection again: an edge whose
//! sessions all closed allocates nothing more, so their memory stayed at the peak. A
//! purge delay of 0 purges on every free instead, which cost a fifth more CPU per
//! proxied HTTP request (pages empty and refill all the time under load, each time a
//! decommit and a page fault). So a thread of ours calls `mi_collect(false)` once a
//! second: that runs the purges whose delay has passed, whoever freed the pages (the
//! arenas are process-wide), and does nothing when none is due; under load it only
//! does sooner what the workers' own allocations would.
//!
//! The delay is [`PURGE_DELAY_MS`] unless the operator sets `MIMALLOC_PURGE_DELAY`:
//! with mimalloc's 1 s, sessions that come and go (a batch opened, closed, the next a
//! second or two later) had their pages purged between batches and faulted back in,
//! often as whole 2 MiB huge pages zeroed (671 faults per 1,000 upgrade handshakes,
//! against 232 at 3 s and 3 with purging off; HAProxy's own: 215). Memory still
//! comes back within the delay plus a collection after the last session closes. The
//! library leaves allocation to its embedder; the binary owns the global allocator,
//! so this lives here.

use std::time::Duration;

// mimalloc measured ~10% more proxy throughput than the system allocator (perf-notes).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How often the collector runs mimalloc's due purges: memory freed at once comes back
/// at most `purge_delay` plus this much later.
pub const COLLECT_EVERY: Duration = Duration::from_secs(1);

/// mimalloc's `mi_option_purge_delay`: its index in `mi_option_t` (mimalloc.h, v3.3 as
/// libmimalloc-sys 0.1.49 builds it, and v2 alike). The binding leaves the purge options
/// out of its constants ("not exposed for stability reasons") and says to pass the index.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// The purge delay (ms) the binary sets when `MIMALLOC_PURGE_DELAY` is not set.
pub const PURGE_DELAY_MS: i64 = 5_000;

/// Sets the purge delay, starts the collector thread and returns the purge delay in
/// effect (ms), for the startup log. Called first thing in `main`.
pub fn start_collector() -> std::io::Result<i64> {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        set_purge_delay(PURGE_DELAY_MS);
    }
    std::thread::Builder::new()
        .name("mimalloc-collect".into())
        .spawn(|| {
            init_thread();
            loop {
                std::thread::sleep(COLLECT_EVERY);
                collect();
            }
        })?;
    Ok(purge_delay())
}

// The mimalloc crate has no safe wrappers for these three calls, so this calls the C
// library's own (through libmimalloc-sys, the crate that links it).
#[allow(unsafe_code)]
fn init_thread() {
    // SAFETY: `mi_thread_init` takes no arguments and only sets up the calling thread's
    // heap (a no-op when it exists); without one `mi_collect` returns at once.
    unsafe { libmimalloc_sys::mi_thread_init() }
}

#[allow(unsafe_code)]
fn collect() {
    // SAFETY: `mi_collect(false)` collects the calling thread's heap, which nothing else
    // uses, and purges arena memory whose delay has passed, under mimalloc's own locks;
    // mimalloc documents it as callable from any thread at any time.
    unsafe { libmimalloc_sys::mi_collect(false) }
}

// `c_long` is `i64` here but `i32` on some targets: the conversion is lossless there
// for the values this binary sets.
#[allow(unsafe_code, clippy::useless_conversion)]
fn set_purge_delay(millis: i64) {
    let millis = std::os::raw::c_long::try_from(millis).unwrap_or(std::os::raw::c_long::MAX);
    // SAFETY: `mi_option_set` takes any index below `_mi_option_last` (15 is) and
    // stores a word in mimalloc's option table, which it reads racily by design; the
    // purge delay is read each time a purge is scheduled, so a change applies from then.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, millis) }
}

// `c_long` is `i64` here but `i32` on some targets: the conversion is not useless there.
#[allow(unsafe_code, clippy::useless_conversion)]
fn purge_delay() -> i64 {
    // SAFETY: `mi_option_get` takes any index below `_mi_option_last` (15 is) and reads
    // mimalloc's option table, word-sized values it reads racily by design.
    i64::from(unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) })
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test, not two: the second step changes a process-wide option the first reads.
    #[test]
    fn the_option_index_is_the_purge_delay_and_the_binary_sets_its_own() {
        // mimalloc reads MIMALLOC_PURGE_DELAY itself; without it the delay is its
        // documented default. Either way index 15 must read that, not another option.
        let operator: Option<i64> = std::env::var("MIMALLOC_PURGE_DELAY")
            .ok()
            .and_then(|v| v.parse().ok());
        assert_eq!(purge_delay(), operator.unwrap_or(1000));
        // Then the binary's own delay, unless the operator set one.
        let in_effect = start_collector().expect("a collector thread");
        assert_eq!(in_effect, operator.unwrap_or(PURGE_DELAY_MS));
        assert_eq!(purge_delay(), in_effect);
    }
}
