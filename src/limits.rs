//! Contract §6 rule 7: failed authentication is rate limited, per client address.
//!
//! Transport-neutral: the [`Gate`](crate::gate::Gate) asks [`FailedAuthLimiter`] before
//! it checks anything and tells it about every counted refusal (codes 2, 5, 17,
//! 40-43), so the tower layer and the Pingora proxy limit the same way. The adapters
//! only supply the peer address ([`RequestParts::peer`](crate::gate::RequestParts));
//! [`client_address`] turns it into the client's, believing `X-Forwarded-For` only from
//! `[limits] trusted_proxies`.
//!
//! Design: a sliding window of one minute in one-second buckets per address, in a
//! moka cache bounded in entries ([`MAX_TRACKED_ADDRESSES`]) whose entries expire a
//! minute after their last failure, so memory is bounded whatever the traffic. Only
//! refusals write (one atomic compute per key, no lock held across an `.await`); a
//! request from an address that never failed costs one cache lookup, and nothing at
//! all when the limit is off. The limit itself is read from the current config on
//! every request, so a reload applies at once to the windows already counted.

use crate::config::TrustedProxies;
use http::HeaderMap;
use std::collections::VecDeque;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The window refusals are counted over.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Most client addresses tracked at once (about 1 KiB each at worst: 60 buckets).
/// Beyond it moka evicts the least useful windows, so memory stays bounded under a
/// spread-out attack.
pub const MAX_TRACKED_ADDRESSES: u64 = 100_000;

const WINDOW_SECONDS: u64 = WINDOW.as_secs();

/// Counted refusals per client address over the last minute.
pub struct FailedAuthLimiter {
    windows: moka::sync::Cache<IpAddr, Arc<Window>>,
    epoch: Instant,
}

impl Default for FailedAuthLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for FailedAuthLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailedAuthLimiter")
            .field("tracked", &self.windows.entry_count())
            .finish()
    }
}

impl FailedAuthLimiter {
    /// An empty limiter.
    pub fn new() -> Self {
        FailedAuthLimiter {
            windows: moka::sync::Cache::builder()
                .max_capacity(MAX_TRACKED_ADDRESSES)
                // Written on every counted refusal, so an entry lives a minute past the
                // last one: by then every bucket in it has left the window anyway.
                .time_to_live(WINDOW)
                .build(),
            epoch: Instant::now(),
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_secs()
    }

    /// Whether `client` already has `limit` counted refusals in the window: its
    /// requests are then answered 429 without being checked.
    pub fn is_over(&self, client: IpAddr, limit: u32) -> bool {
        self.is_over_at(client, limit, self.now())
    }

    /// Counts one refusal for `client`.
    pub fn record_failure(&self, client: IpAddr) {
        self.record_at(client, self.now());
    }

    fn is_over_at(&self, client: IpAddr, limit: u32, now: u64) -> bool {
        self.windows
            .get(&key(client))
            .is_some_and(|window| window.count(now) >= u64::from(limit))
    }

    fn record_at(&self, client: IpAddr, now: u64) {
        // Copy-on-write per key: moka runs computes on one key one at a time, so
        // concurrent refusals from one address are all counted.
        self.windows
            .entry(key(client))
            .and_compute_with(|existing| {
                let mut window = existing
                    .map(|entry| Window::clone(entry.value()))
                    .unwrap_or_default();
                window.record(now);
                moka::ops::compute::Op::Put(Arc::new(window))
            });
    }
}

/// The key an address is counted under: IPv4 as is (an IPv4-mapped IPv6 address is
/// its IPv4 address), IPv6 by its /64, which is one subscriber's allocation: keying by
/// the full address would give one client 2^64 windows.
fn key(address: IpAddr) -> IpAddr {
    match address.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

/// Refusals per second over the last [`WINDOW`]: at most 60 `(second, count)` pairs,
/// oldest first.
#[derive(Debug, Clone, Default)]
struct Window {
    buckets: VecDeque<(u64, u32)>,
}

impl Window {
    fn live(second: u64, now: u64) -> bool {
        second + WINDOW_SECONDS > now
    }

    fn count(&self, now: u64) -> u64 {
        self.buckets
            .iter()
            .filter(|(second, _)| Self::live(*second, now))
            .map(|(_, count)| u64::from(*count))
            .sum()
    }

    fn record(&mut self, now: u64) {
        while self
            .buckets
            .front()
            .is_some_and(|(second, _)| !Self::live(*second, now))
        {
            self.buckets.pop_front();
        }
        match self.buckets.back_mut() {
            Some((second, count)) if *second == now => *count = count.saturating_add(1),
            _ => self.buckets.push_back((now, 1)),
        }
    }
}

/// The client a request comes from: the peer, or, when the peer is a trusted proxy,
/// the right-most `X-Forwarded-For` address that is not itself a trusted proxy
/// (each proxy appends the address it received the request from, so everything left
/// of that is whatever the client chose to send). Several `X-Forwarded-For` headers
/// are one list in order (RFC 9110 §5.3). When every listed hop is trusted, the
/// left-most is the client; when the entry where the walk stops is not an address,
/// the request is counted against the last trusted hop rather than a name the client
/// may have made up.
pub fn client_address(peer: IpAddr, headers: &HeaderMap, trusted: &TrustedProxies) -> IpAddr {
    let peer = peer.to_canonical();
    if trusted.is_empty() || !trusted.contains(peer) {
        return peer;
    }
    let values: Vec<&[u8]> = headers
        .get_all("x-forwarded-for")
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    let mut current = peer;
    for value in values.iter().rev() {
        for entry in value.rsplit(|b| *b == b',') {
            let Some(address) = parse_forwarded_entry(entry) else {
                return current;
            };
            current = address;
            if !trusted.contains(address) {
                return address;
            }
        }
    }
    current
}

/// One `X-Forwarded-For` entry: an address, optionally with a port (`1.2.3.4:5678`,
/// `[2001:db8::1]:443`) or brackets, surrounded by optional whitespace.
fn parse_forwarded_entry(entry: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(entry).ok()?.trim();
    if let Ok(address) = text.parse::<IpAddr>() {
        return Some(address.to_canonical());
    }
    if let Ok(socket) = text.parse::<std::net::SocketAddr>() {
        return Some(socket.ip().to_canonical());
    }
    text.strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .and_then(|t| t.parse::<Ipv6Addr>().ok())
        .map(|v6| IpAddr::V6(v6).to_canonical())
}

/// Whether a refusal with this Stream code counts against its client (contract §6
/// rule 7): authentication failures, not bad input or the limiter's own 429s.
pub fn counts(code: i32) -> bool {
    matches!(code, 2 | 5 | 17 | 40..=43)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TrustedProxies;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn trusted(entries: &[&str]) -> TrustedProxies {
        TrustedProxies::new(
            entries
                .iter()
                .map(|e| TrustedProxies::parse_entry(e).unwrap())
                .collect(),
        )
    }

    fn headers(values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for value in values {
            map.append("x-forwarded-for", value.parse().unwrap());
        }
        map
    }

    #[test]
    fn an_address_is_over_at_the_limit_until_its_oldest_failures_leave_the_window() {
        let limiter = FailedAuthLimiter::new();
        let client = ip("192.0.2.7");
        limiter.record_at(client, 100);
        limiter.record_at(client, 110);
        assert!(!limiter.is_over_at(client, 3, 110));
        limiter.record_at(client, 110);
        assert!(limiter.is_over_at(client, 3, 110));
        assert!(limiter.is_over_at(client, 3, 159));
        // The failure of second 100 leaves the window at 160: room for one more.
        assert!(!limiter.is_over_at(client, 3, 160));
        // A lower limit read on the next request (a reload) applies to the same window.
        assert!(limiter.is_over_at(client, 2, 160));
        assert!(!limiter.is_over_at(client, 2, 170));
        // Other addresses are not affected.
        assert!(!limiter.is_over_at(ip("192.0.2.8"), 1, 110));
    }

    #[test]
    fn the_window_keeps_at_most_a_minute_of_buckets() {
        let mut window = Window::default();
        for second in 0..500 {
            window.record(second);
            window.record(second);
        }
        assert!(window.buckets.len() <= WINDOW_SECONDS as usize);
        assert_eq!(window.count(499), 2 * WINDOW_SECONDS);
        assert_eq!(window.count(499 + WINDOW_SECONDS), 0);
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64_and_mapped_ipv4_as_ipv4() {
        let limiter = FailedAuthLimiter::new();
        limiter.record_at(ip("2001:db8:1:2::1"), 5);
        assert!(limiter.is_over_at(ip("2001:db8:1:2:ffff::9"), 1, 5));
        assert!(!limiter.is_over_at(ip("2001:db8:1:3::1"), 1, 5));
        limiter.record_at(ip("::ffff:192.0.2.1"), 5);
        assert!(limiter.is_over_at(ip("192.0.2.1"), 1, 5));
    }

    #[test]
    fn only_authentication_failures_count() {
        for code in [2, 5, 17, 40, 41, 42, 43] {
            assert!(counts(code), "{code}");
        }
        for code in [4, 9, -1, 44, 16] {
            assert!(!counts(code), "{code}");
        }
    }

    #[test]
    fn forwarded_for_is_ignored_from_an_untrusted_peer() {
        let proxies = trusted(&["10.0.0.0/8"]);
        let spoofed = headers(&["203.0.113.9"]);
        assert_eq!(
            client_address(ip("192.0.2.1"), &spoofed, &proxies),
            ip("192.0.2.1")
        );
        assert_eq!(
            client_address(ip("192.0.2.1"), &spoofed, &TrustedProxies::default()),
            ip("192.0.2.1")
        );
    }

    #[test]
    fn the_right_most_untrusted_forwarded_address_is_the_client_in_every_spelling() {
        let proxies = trusted(&["10.0.0.0/8", "127.0.0.1", "fd00::/8"]);
        let peer = ip("10.1.1.1");
        let cases: &[(&[&str], &str)] = &[
            (&["203.0.113.9"], "203.0.113.9"),
            (&["  203.0.113.9  "], "203.0.113.9"),
            (&["198.51.100.1, 203.0.113.9"], "203.0.113.9"),
            (&["198.51.100.1,203.0.113.9,10.2.2.2"], "203.0.113.9"),
            (&["198.51.100.1 ,\t203.0.113.9 , 10.2.2.2"], "203.0.113.9"),
            // Several headers are one list, in order.
            (&["198.51.100.1", "203.0.113.9"], "203.0.113.9"),
            (&["198.51.100.1, 203.0.113.9", "10.2.2.2"], "203.0.113.9"),
            // IPv6, bracketed, with ports.
            (&["2001:db8::5"], "2001:db8::5"),
            (&["[2001:db8::5]"], "2001:db8::5"),
            (&["[2001:db8::5]:443"], "2001:db8::5"),
            (&["203.0.113.9:5555"], "203.0.113.9"),
            (&["::ffff:203.0.113.9"], "203.0.113.9"),
            (&["2001:db8::5, fd00::1"], "2001:db8::5"),
            // Garbage left of the client is never reached.
            (&["not-an-ip, 203.0.113.9"], "203.0.113.9"),
            (&["unknown", "203.0.113.9"], "203.0.113.9"),
            // Garbage where the client should be: the last trusted hop is counted.
            (&["198.51.100.1, garbage"], "10.1.1.1"),
            (&["203.0.113.9, 10.2.2.2, _hidden"], "10.1.1.1"),
            (&["198.51.100.1, 10.2.2.2, "], "10.1.1.1"),
            (&["203.0.113.9, 10.2.2.2", "garbage"], "10.1.1.1"),
            (&["203.0.113.9, 10.2.2.2, 1.2.3.4.5"], "10.1.1.1"),
            // Every hop trusted: the left-most is the client.
            (&["10.3.3.3, 127.0.0.1"], "10.3.3.3"),
        ];
        for (values, expected) in cases {
            assert_eq!(
                client_address(peer, &headers(values), &proxies),
                ip(expected),
                "{values:?}"
            );
        }
        // No header: the peer itself.
        assert_eq!(client_address(peer, &HeaderMap::new(), &proxies), peer);
        // A trusted peer seen as IPv4-mapped IPv6 is still trusted.
        assert_eq!(
            client_address(ip("::ffff:10.1.1.1"), &headers(&["203.0.113.9"]), &proxies),
            ip("203.0.113.9")
        );
    }
}
