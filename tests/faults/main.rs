//! Fault tests (issue 12, item 4): the `chatgate` binary on loopback while what it depends
//! on fails under it — the embedded store's disk, Redis, the upstream, the config file.
//! Each module says what a regression would look like; every test bounds every wait.
//!
//! One test binary, split by subject, so the binary and its harness link once.

#[path = "../common/proxy_harness.rs"]
mod harness;
#[path = "../support/redis_server.rs"]
mod redis_server;

mod config;
mod redis;
mod store;
mod upstream;
