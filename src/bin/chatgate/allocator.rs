//! The binary's allocator: mimalloc, with its purge delay set so that memory freed when
//! sessions close goes back to the OS even while the proxy then sits idle (issue 13's
//! "memory is returned once sessions close"; README, "Memory returned after sessions
//! close", has the measurements behind the value).
//!
//! mimalloc (v3) returns freed pages to the OS `purge_delay` ms after they empty, but
//! only when the allocator runs again: with its default (1,000 ms) an edge whose
//! sessions all closed keeps their memory at the peak, as no allocation comes to purge
//! it. With 0 the pages are purged as they are freed. The library leaves allocation to
//! its embedder; the binary owns the global allocator, so the choice is made here.

use std::ffi::OsStr;

// mimalloc measured ~10% more proxy throughput than the system allocator (perf-notes).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay`: its index in `mi_option_t` (mimalloc.h, v3.3 as
/// libmimalloc-sys 0.1.49 builds it, and v2 alike). The binding leaves the purge options
/// out of its constants ("not exposed for stability reasons") and says to pass the index;
/// the startup log (and tests/allocator.rs) reads back an environment value through it,
/// so a wrong index shows.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// chatgate's purge delay in milliseconds, used unless the environment sets one.
pub const PURGE_DELAY_MS: i64 = 0;

/// The environment names mimalloc reads for the purge delay (the second is its legacy
/// name); it matches them without regard to case.
const PURGE_DELAY_VARS: [&str; 2] = ["MIMALLOC_PURGE_DELAY", "MIMALLOC_RESET_DELAY"];

/// Where the purge delay in effect came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The operator's `MIMALLOC_PURGE_DELAY` (or its legacy name): mimalloc read it at
    /// load and chatgate left it alone.
    Environment,
    /// chatgate's [`PURGE_DELAY_MS`].
    Chatgate,
}

/// The purge delay in effect after [`configure`], for the startup log.
#[derive(Debug, Clone, Copy)]
pub struct PurgeDelay {
    /// Milliseconds, as mimalloc reports it.
    pub millis: i64,
    /// Who chose it.
    pub source: Source,
}

/// Sets chatgate's purge delay unless the environment names one, and reports the value
/// mimalloc now uses. Called first thing in `main`.
pub fn configure() -> PurgeDelay {
    let source = if environment_sets_purge_delay(std::env::vars_os().map(|(name, _)| name)) {
        Source::Environment
    } else {
        set_purge_delay(PURGE_DELAY_MS);
        Source::Chatgate
    };
    PurgeDelay {
        millis: purge_delay(),
        source,
    }
}

fn environment_sets_purge_delay<N: AsRef<OsStr>>(names: impl IntoIterator<Item = N>) -> bool {
    names.into_iter().any(|name| {
        name.as_ref()
            .to_str()
            .is_some_and(|name| PURGE_DELAY_VARS.iter().any(|v| v.eq_ignore_ascii_case(name)))
    })
}

// The mimalloc crate has no safe setter for its options, so this calls the C library's
// own (through libmimalloc-sys, the crate that links it).
#[allow(unsafe_code)]
fn set_purge_delay(millis: i64) {
    let value = std::ffi::c_long::try_from(millis).unwrap_or(std::ffi::c_long::MAX);
    // SAFETY: `mi_option_set` takes any option index below `_mi_option_last` and any
    // value; it stores them in mimalloc's option table (plain word-sized stores that
    // mimalloc reads racily by design), so it is sound from any thread at any time.
    // The index is below `_mi_option_last` (see `MI_OPTION_PURGE_DELAY`).
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, value) }
}

#[allow(unsafe_code)]
fn purge_delay() -> i64 {
    // SAFETY: `mi_option_get` reads the option table (see `set_purge_delay`); the
    // option index is in range.
    i64::from(unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_environment_value_under_either_name_in_any_case_wins() {
        assert!(environment_sets_purge_delay(["PATH", "MIMALLOC_PURGE_DELAY"]));
        assert!(environment_sets_purge_delay(["mimalloc_purge_delay"]));
        assert!(environment_sets_purge_delay(["MIMALLOC_RESET_DELAY"]));
        assert!(!environment_sets_purge_delay(["PATH", "MIMALLOC_PURGE_DELAYS"]));
        assert!(!environment_sets_purge_delay(["MIMALLOC_VERBOSE"]));
        assert!(!environment_sets_purge_delay(Vec::<&str>::new()));
    }

    #[test]
    fn the_setter_reaches_the_linked_mimalloc() {
        // Tests run in one process with threads; the value is restored before return
        // and no other test here reads it.
        let before = purge_delay();
        set_purge_delay(before + 7);
        assert_eq!(purge_delay(), before + 7);
        set_purge_delay(before);
        assert_eq!(purge_delay(), before);
    }
}
