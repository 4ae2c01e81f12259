//! Ports for test servers that must be named before they start (a proxy's config file
//! names its listeners). Binding `127.0.0.1:0` and releasing the port, as before, drew
//! from the kernel's ephemeral range, which every other `bind(0)` of the same test
//! binary (upstreams, clients) draws from too: a port handed out and released could be
//! taken by another test before the proxy bound it, and a proxy that found its ports
//! answering (another test's proxy) was taken as ready and served the wrong test. Here
//! the ports come from below the ephemeral range, where no `bind(0)` lands, one after
//! the other from a counter, so two calls in one process never return the same port.

use std::sync::atomic::{AtomicU32, Ordering};

/// Lowest port handed out (above the well-known and common service ports).
const LOWEST: u32 = 10_000;

/// The first port of the kernel's ephemeral range (Linux's default when unreadable).
fn ephemeral_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// A port on 127.0.0.1 that was free a moment ago and that this process hands out once.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let end = ephemeral_start().clamp(LOWEST + 1_000, 65_536);
    let span = end - LOWEST;
    // Test binaries running at once start at different places (spread by the pid).
    let start = std::process::id().wrapping_mul(2_654_435_761) % span;
    for _ in 0..span {
        let port = LOWEST + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        if std::net::TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
    panic!("no free port on 127.0.0.1 between {LOWEST} and {end}");
}
