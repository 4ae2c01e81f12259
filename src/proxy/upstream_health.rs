//! Whether the upstream can be reached, for `/readyz` and `chatgate_upstream_up`
//! (issue 14 item 4; no section of the auth contract: this is operations). An instance
//! whose upstream refuses every connection can only answer 502: a balancer should send
//! its traffic elsewhere, and an operator should see why.
//!
//! A background loop (on the admin listener's runtime, never on the request path)
//! opens a TCP connection to every `[upstream] addresses` entry each
//! [`PROBE_INTERVAL`], with at most [`PROBE_TIMEOUT`] (or the shorter
//! `connect_timeout`) for the name lookup and the connect, then closes it without
//! sending a byte. The addresses are read from the live config every round, so a
//! reload changes what is probed. The first round runs before the admin listener
//! answers, so neither `/readyz` nor the metric has a moment of "not known yet".
//! A TCP connect, not an HTTP request: the chat API has no health path chatgate could
//! rely on, and accepting is what a proxied request needs first. (A TLS upstream sees a
//! connection closed before its handshake each second, as with HAProxy's plain `check`.)
//!
//! - `chatgate_upstream_up{upstream="host:port"}` is the raw last result per address
//!   (1 accepted, 0 not): what a dashboard and an alert want.
//! - `/readyz` reports `upstream` not ready when *no* address accepts: one live
//!   address is enough to serve, as the round robin retries a failed connect on the
//!   next peer. Its reason names every address and its error.
//!
//! Flapping. A readiness probe (Kubernetes' included) only decides whether a balancer
//! sends new traffic here; it never restarts the process (`/healthz` does not look at
//! the upstream, so a liveness probe on it cannot start a restart loop while the
//! upstream is away). A verdict that flips on every lost SYN would still make the
//! balancer add and remove the instance each second, so the verdict has hysteresis,
//! HAProxy's `fall`/`rise`: [`FALL`] consecutive failed rounds turn it not ready,
//! [`RISE`] consecutive good rounds turn it ready again; an upstream that alternates
//! keeps the verdict it had. Detection therefore takes up to
//! `FALL × PROBE_INTERVAL + PROBE_TIMEOUT` (about 3 s) either way, and a Kubernetes
//! probe's own `failureThreshold`/`successThreshold` add to that, not replace it.
//! When every replica shares the one upstream, all of them turn unready together and
//! the Service has no endpoints: clients then get the balancer's refusal instead of
//! chatgate's JSON 502, which is no worse for them, and every instance comes back
//! within `RISE` rounds of the upstream. The proxy itself keeps serving throughout:
//! readiness is advice to the balancer, never a switch on the proxy.

use super::metrics::ProxyMetrics;
use crate::reload::ConfigHandle;
use std::sync::Mutex;
use std::time::Duration;

/// How often the upstream addresses are probed.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Longest one probe (name lookup and TCP connect) may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Consecutive rounds with no address accepting before `/readyz` says not ready.
pub const FALL: u32 = 2;
/// Consecutive rounds with an address accepting before `/readyz` says ready again.
pub const RISE: u32 = 2;

/// The result of one probe of one configured address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// The address as configured (`host:port`).
    pub address: String,
    /// `Err` says why the connection was not accepted.
    pub result: Result<(), String>,
}

/// The upstream's reachability as `/readyz` reports it.
#[derive(Debug, Default)]
pub struct UpstreamHealth {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// `None` until a round was recorded (nothing probes, e.g. an embedding program
    /// that serves the admin routes itself): then the upstream is not judged.
    ready: Option<bool>,
    /// Consecutive rounds whose outcome disagreed with `ready`.
    streak: u32,
    last: Vec<Probe>,
}

impl UpstreamHealth {
    /// Records one round of probes and applies the hysteresis (see the module docs).
    pub fn record(&self, probes: Vec<Probe>) {
        let any_up = probes.iter().any(|p| p.result.is_ok());
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match state.ready {
            None => state.ready = Some(any_up),
            Some(ready) if ready == any_up => state.streak = 0,
            Some(ready) => {
                state.streak += 1;
                if state.streak >= if ready { FALL } else { RISE } {
                    state.ready = Some(any_up);
                    state.streak = 0;
                }
            }
        }
        state.last = probes;
    }

    /// `Ok` while ready (or never probed), else why: every address with its error.
    pub fn verdict(&self) -> Result<(), String> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.ready != Some(false) {
            return Ok(());
        }
        let failures: Vec<String> = state
            .last
            .iter()
            .map(|probe| match &probe.result {
                Ok(()) => format!("{} accepted again", probe.address),
                Err(error) => format!("{} {error}", probe.address),
            })
            .collect();
        Err(format!(
            "no upstream accepts a connection: {}",
            failures.join("; ")
        ))
    }

    /// The last round's result of each address (empty before the first round).
    pub fn last(&self) -> Vec<Probe> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last
            .clone()
    }
}

/// Probes every configured upstream address once, concurrently, and records the
/// round in `health` and `metrics`.
pub async fn probe_round(config: &ConfigHandle, health: &UpstreamHealth, metrics: &ProxyMetrics) {
    let settings = config.load_full();
    let timeout = settings.upstream.connect_timeout.min(PROBE_TIMEOUT);
    let probes = futures_util::future::join_all(
        settings
            .upstream
            .addresses
            .iter()
            .map(|address| probe(address, timeout)),
    )
    .await;
    metrics.upstreams_probed(
        probes
            .iter()
            .map(|p| (p.address.as_str(), p.result.is_ok())),
    );
    health.record(probes);
}

/// Probes every [`PROBE_INTERVAL`], for as long as the future is polled (the admin
/// service drops it with its listener).
pub async fn watch(config: ConfigHandle, health: &UpstreamHealth, metrics: &ProxyMetrics) {
    let mut ticks = tokio::time::interval(PROBE_INTERVAL);
    // A round that overran its slot is followed by a full interval, not a burst.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate: the caller has just run a round.
    ticks.tick().await;
    loop {
        ticks.tick().await;
        probe_round(&config, health, metrics).await;
    }
}

/// One TCP connect to `address` (the first address its name resolves to, as the
/// proxy's peer list uses), closed at once.
async fn probe(address: &str, timeout: Duration) -> Probe {
    let attempt = async {
        let target = tokio::net::lookup_host(address)
            .await
            .map_err(|e| format!("does not resolve ({e})"))?
            .next()
            .ok_or_else(|| "resolves to no address".to_owned())?;
        tokio::net::TcpStream::connect(target)
            .await
            .map(drop)
            .map_err(|e| format!("refused the connection ({e})"))
    };
    let result = match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("did not accept within {} ms", timeout.as_millis())),
    };
    Probe {
        address: address.to_owned(),
        result,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(up: &[bool]) -> Vec<Probe> {
        up.iter()
            .enumerate()
            .map(|(i, &up)| Probe {
                address: format!("10.0.0.{i}:80"),
                result: if up { Ok(()) } else { Err("refused".into()) },
            })
            .collect()
    }

    #[test]
    fn never_probed_is_not_judged_and_the_first_round_decides_at_once() {
        let health = UpstreamHealth::default();
        assert_eq!(health.verdict(), Ok(()));
        health.record(round(&[false, false]));
        let reason = health.verdict().unwrap_err();
        assert!(
            reason.contains("10.0.0.0:80 refused") && reason.contains("10.0.0.1:80 refused"),
            "{reason}"
        );
    }

    #[test]
    fn one_accepting_address_is_enough() {
        let health = UpstreamHealth::default();
        health.record(round(&[false, true]));
        assert_eq!(health.verdict(), Ok(()));
    }

    #[test]
    fn the_verdict_flips_only_after_fall_or_rise_rounds_in_a_row() {
        let health = UpstreamHealth::default();
        health.record(round(&[true]));
        for _ in 1..FALL {
            health.record(round(&[false]));
            assert_eq!(health.verdict(), Ok(()), "flipped before {FALL} rounds");
        }
        health.record(round(&[false]));
        assert!(health.verdict().is_err());
        for _ in 1..RISE {
            health.record(round(&[true]));
            assert!(health.verdict().is_err(), "flipped before {RISE} rounds");
        }
        health.record(round(&[true]));
        assert_eq!(health.verdict(), Ok(()));
    }

    #[test]
    fn an_alternating_upstream_keeps_the_verdict_it_had() {
        let health = UpstreamHealth::default();
        health.record(round(&[true]));
        for _ in 0..10 {
            health.record(round(&[false]));
            health.record(round(&[true]));
            assert_eq!(health.verdict(), Ok(()));
        }
        health.record(round(&[false]));
        health.record(round(&[false]));
        for _ in 0..10 {
            health.record(round(&[true]));
            health.record(round(&[false]));
            assert!(health.verdict().is_err());
        }
    }

    #[tokio::test]
    async fn a_probe_tells_an_open_port_from_a_closed_one() {
        let open = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = open.local_addr().unwrap().to_string();
        assert_eq!(probe(&address, PROBE_TIMEOUT).await.result, Ok(()));
        drop(open);
        let closed = probe(&address, PROBE_TIMEOUT).await;
        assert!(
            closed.result.as_ref().unwrap_err().contains("refused"),
            "{closed:?}"
        );
        // No port: refused before any lookup leaves the machine.
        let unresolvable = probe("127.0.0.1", PROBE_TIMEOUT).await;
        assert!(
            unresolvable
                .result
                .as_ref()
                .unwrap_err()
                .contains("resolve"),
            "{unresolvable:?}"
        );
    }
}
