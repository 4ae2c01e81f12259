//! Redis hung (SIGSTOP), then killed (SIGKILL), then restarted on its port, while two
//! proxies on it (one `on_store_error = "deny"`, one `"allow"`) take a steady load of
//! cached users and cache misses.
//!
//! What must hold (README "Revocation"): cached answers keep coming; a miss follows
//! `on_store_error` (deny: the contract's 503, code -1; allow: through); no request waits
//! past `store_timeout_ms` (plus the proxy's own time); after the restart both proxies
//! recover by themselves, and a revocation made then is enforced by both. A regression
//! shows as a request slower than the bound (a store call without its timeout), a miss
//! answered against the policy, or a proxy that never answers a miss 200 again.

use super::harness::*;
use super::redis_server::RedisServer;
use chatgate::TokenBuilder;
use chatgate::time::now_unix;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const STORE_TIMEOUT: Duration = Duration::from_millis(300);
/// What a request may take beyond the store timeout: the proxy's own work in a debug
/// build on a busy two-core machine. A store call without its timeout takes seconds.
const SLACK: Duration = Duration::from_millis(1000);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Healthy = 0,
    Hung = 1,
    Killed = 2,
    Restarted = 3,
}

fn phase_of(n: u8) -> Phase {
    [Phase::Healthy, Phase::Hung, Phase::Killed, Phase::Restarted][n as usize]
}

#[derive(Debug)]
struct Sample {
    phase: Phase,
    policy: &'static str,
    miss: bool,
    status: u16,
    code: i64,
    took: Duration,
}

fn revocation(url: &str, policy: &str) -> String {
    format!(
        "store = \"redis\"\nredis_url = \"{url}\"\non_store_error = \"{policy}\"\nstore_timeout_ms = {}",
        STORE_TIMEOUT.as_millis()
    )
}

/// Keeps requesting through `proxy` until `stop`: a user it has seen (cached) and a user
/// never seen before (a miss), in turn; records each request whose phase did not change
/// while it ran.
async fn load(
    proxy: Arc<Proxy>,
    policy: &'static str,
    worker: usize,
    phase: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    fresh: Arc<AtomicU64>,
) -> Vec<Sample> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let now = now_unix();
    let cached = TokenBuilder::user(format!("steady-{policy}-{worker}"))
        .issued_at(now - 60)
        .sign(SECRET);
    let mut samples = Vec::new();
    // Bounded by `stop`, which the test sets after a fixed schedule, and by the cap.
    for i in 0..100_000 {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let miss = i % 2 == 1;
        let token = if miss {
            let n = fresh.fetch_add(1, Ordering::Relaxed);
            TokenBuilder::user(format!("fresh-{n}"))
                .issued_at(now - 60)
                .sign(SECRET)
        } else {
            cached.clone()
        };
        let before = phase.load(Ordering::SeqCst);
        let started = Instant::now();
        let (status, body) = get_channels(&client, &proxy, &token).await;
        let took = started.elapsed();
        if phase.load(Ordering::SeqCst) != before {
            continue;
        }
        samples.push(Sample {
            phase: phase_of(before),
            policy,
            miss,
            status,
            code: body["code"].as_i64().unwrap_or(0),
            took,
        });
        if status == 503 {
            assert_stream_error(&body, -1, 503);
        }
    }
    samples
}

#[tokio::test]
async fn redis_hung_killed_and_restarted_under_load() {
    let mut redis = RedisServer::start();
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let start = |policy: &str| {
        Proxy::start(ProxyOptions {
            upstreams: vec![upstream.address.to_string()],
            revocation: Some(revocation(&redis.url(), policy)),
            ..ProxyOptions::default()
        })
    };
    let deny = Arc::new(start("deny").await);
    let allow = Arc::new(start("allow").await);
    let phase = Arc::new(AtomicU8::new(Phase::Healthy as u8));
    let stop = Arc::new(AtomicBool::new(false));
    let fresh = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for worker in 0..3 {
        for (proxy, policy) in [(&deny, "deny"), (&allow, "allow")] {
            workers.push(tokio::spawn(load(
                proxy.clone(),
                policy,
                worker,
                phase.clone(),
                stop.clone(),
                fresh.clone(),
            )));
        }
    }
    let set = |p: Phase| phase.store(p as u8, Ordering::SeqCst);
    let client = reqwest::Client::new();
    // A revocation while Redis is away: refused (never acknowledged unstored), in time.
    let refused_write = |what: &'static str| {
        let (client, deny) = (client.clone(), deny.clone());
        async move {
            let started = Instant::now();
            let (status, body) =
                revoke(&client, &deny, &[format!("during-{what}")], now_unix()).await;
            let took = started.elapsed();
            assert_eq!(status, 503, "{what}: {body}");
            assert_stream_error(&body, -1, 503);
            assert!(
                took < STORE_TIMEOUT + SLACK,
                "{what}: a revocation waited {took:?}"
            );
        }
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    set(Phase::Hung);
    redis.signal("STOP");
    tokio::time::sleep(Duration::from_secs(1)).await;
    refused_write("hung").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    set(Phase::Killed);
    redis.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    refused_write("killed").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let port = redis.port();
    set(Phase::Restarted);
    let _redis = RedisServer::start_on(port);

    // Recovery is automatic: misses are answered 200 again by both, within 20 s.
    let now = now_unix();
    let recovered = within(Duration::from_secs(30), async {
        let started = Instant::now();
        for n in 0.. {
            let probe = TokenBuilder::user(format!("probe-{n}"))
                .issued_at(now - 60)
                .sign(SECRET);
            let deny_ok = get_channels(&client, &deny, &probe).await.0 == 200;
            let allow_ok = deny_ok
                && revoke(&client, &allow, &[format!("probe-write-{n}")], now)
                    .await
                    .0
                    == 200;
            if deny_ok && allow_ok {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "no recovery within 20 s of Redis coming back"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        unreachable!()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    let mut samples = Vec::new();
    for worker in workers {
        samples.extend(within(Duration::from_secs(30), worker).await.unwrap());
    }

    // A revocation made after recovery is enforced by both proxies (the other one
    // through Redis pub/sub, within a second).
    let victim = "revoked-after-recovery";
    let token = TokenBuilder::user(victim).issued_at(now - 60).sign(SECRET);
    for proxy in [&deny, &allow] {
        assert_eq!(get_channels(&client, proxy, &token).await.0, 200);
    }
    let (status, body) = revoke(&client, &deny, &[victim.to_owned()], now).await;
    assert_eq!(status, 200, "{body}");
    for proxy in [&deny, &allow] {
        within(Duration::from_secs(2), async {
            loop {
                let (status, body) = get_channels(&client, proxy, &token).await;
                if status == 401 {
                    assert_stream_error(&body, 40, 401);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }

    // What the load saw, phase by phase.
    let bound = STORE_TIMEOUT + SLACK;
    let mut table = String::new();
    for phase in [Phase::Healthy, Phase::Hung, Phase::Killed, Phase::Restarted] {
        for policy in ["deny", "allow"] {
            for miss in [false, true] {
                let group: Vec<&Sample> = samples
                    .iter()
                    .filter(|s| s.phase == phase && s.policy == policy && s.miss == miss)
                    .collect();
                let slowest = group.iter().map(|s| s.took).max().unwrap_or_default();
                let refused = group.iter().filter(|s| s.status == 503).count();
                table.push_str(&format!(
                    "{phase:?} {policy} {}: {} requests, {refused} 503, slowest {slowest:?}\n",
                    if miss { "miss" } else { "cached" },
                    group.len()
                ));
            }
        }
    }
    eprintln!("{table}recovered {recovered:?} after the restart");
    for sample in &samples {
        assert!(
            sample.took < bound,
            "waited past the store timeout: {sample:?}\n{table}"
        );
        let outage = matches!(sample.phase, Phase::Hung | Phase::Killed);
        match (sample.phase, sample.policy) {
            // Until its connection is back (and its emptied cache refilled), the deny
            // proxy refuses what it cannot look up.
            (Phase::Restarted, "deny") => {
                assert!([200, 503].contains(&sample.status), "{sample:?}\n{table}")
            }
            (_, "deny") if outage && sample.miss => {
                assert_eq!(sample.status, 503, "{sample:?}\n{table}")
            }
            _ => assert_eq!(sample.status, 200, "{sample:?}\n{table}"),
        }
        if sample.status == 503 {
            assert_eq!(sample.code, -1, "{sample:?}");
        }
    }
    // The outage was really under load, and really exercised both policies' misses.
    for phase in [Phase::Hung, Phase::Killed] {
        for policy in ["deny", "allow"] {
            let misses = samples
                .iter()
                .filter(|s| s.phase == phase && s.policy == policy && s.miss)
                .count();
            assert!(
                misses >= 3,
                "{phase:?} {policy}: only {misses} misses\n{table}"
            );
        }
    }
}
