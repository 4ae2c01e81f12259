//! The proxy suite again, on the filter engine (issue 16): the binary's default is the
//! forward engine, and the Pingora filter (`ProxyHttp`, which users embed in their own
//! Pingora proxy, and which serves WebSocket upgrades and HTTP/2 for both engines) stays
//! tested end to end. Each engine-sensitive test binary is included here as a module;
//! the harness sees this crate's name and writes `engine = "filter"` into every config
//! (`CHATGATE_TEST_ENGINE` moves the other binaries, never this one).
//!
//! One binary for all of them, so the suite links once more rather than ten times.

// Each included file declares the shared helpers (the harness, the JS SDK driver, the
// Redis server) as its own module, as it must when it is a binary of its own; here that
// loads them once per including module, which is intended.
#![allow(clippy::duplicate_mod)]

#[path = "access_log.rs"]
mod access_log;
#[path = "faults/main.rs"]
mod faults;
#[path = "hostile.rs"]
mod hostile;
#[path = "live_sessions.rs"]
mod live_sessions;
#[path = "proxy.rs"]
mod proxy;
#[path = "readiness.rs"]
mod readiness;
#[path = "refusal_parity.rs"]
mod refusal_parity;
#[path = "revoke_cli.rs"]
mod revoke_cli;
#[path = "sdk_proxy.rs"]
mod sdk_proxy;
#[path = "tls.rs"]
mod tls;

#[path = "common/proxy_harness.rs"]
mod harness;

/// Guards the mechanism above: were the crate renamed, or the harness to stop reading
/// the name, every module here would quietly run on the default engine instead.
#[test]
fn every_config_written_here_names_the_filter_engine() {
    assert_eq!(
        harness::with_test_engine("[server]\nlisten = \"127.0.0.1:1\"\n"),
        "[server]\nengine = \"filter\"\nlisten = \"127.0.0.1:1\"\n"
    );
}
