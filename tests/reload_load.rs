//! Reloads under load: concurrent `Gate::check` calls (what both the tower layer and the
//! proxy run per request) while the watched file is rewritten ~50 times, rotating secrets
//! and adding/removing an app. A token valid in every version must never be refused; a
//! token whose secret is removed must be refused within 1 s of the write.
//!
//! 10 s by default; `CHATGATE_LOAD_SECONDS=20` for the longer run.

mod common;

use chatgate::reload::{ConfigHandle, ConfigWatcher};
use chatgate::revocation::MemoryStore;
use chatgate::{AuthError, Decision, Gate, RequestParts, TokenBuilder};
use http::{HeaderMap, Method, Uri, header::AUTHORIZATION};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

const WRITES: u64 = 50;
const WORKERS: usize = 8;

/// Version `n` of the file (its leeway is `n`, to tell versions apart): the `main` app rotates its first secret but always keeps
/// `stable`; `extra` exists in even versions only; the revocation cache size alternates
/// (so the cache is rebuilt under load too); `victim` keeps `victim-secret` unless
/// `drop_victim`.
fn version(n: u64, drop_victim: bool) -> String {
    let rotating = if n.is_multiple_of(2) {
        "rot-a"
    } else {
        "rot-b"
    };
    let capacity = 1000 + (n % 2) * 1000;
    let mut text = format!(
        "# version {n}\n[auth]\nleeway_seconds = {n}\n\n[revocation]\nstore = \"memory\"\ncache_capacity = {capacity}\n\n\
         [[apps]]\napi_key = \"main\"\nsecrets = [\"{rotating}\", \"stable\"]\n\n"
    );
    let victim = if drop_victim {
        "\"victim-new\""
    } else {
        "\"victim-new\", \"victim-secret\""
    };
    text.push_str(&format!(
        "[[apps]]\napi_key = \"victim\"\nsecrets = [{victim}]\n\n"
    ));
    if n.is_multiple_of(2) {
        text.push_str("[[apps]]\napi_key = \"extra\"\nsecrets = [\"e\"]\n");
    }
    text
}

/// Alternates in-place writes and editor-style rename-over.
fn write(path: &Path, n: u64, text: &str) {
    if n.is_multiple_of(2) {
        std::fs::write(path, text).unwrap();
    } else {
        let temp = path.with_file_name("config.toml.tmp");
        std::fs::write(&temp, text).unwrap();
        std::fs::rename(&temp, path).unwrap();
    }
}

async fn check(gate: &Gate, uri: &Uri, headers: &HeaderMap) -> Result<Decision, AuthError> {
    gate.check(RequestParts {
        method: &Method::GET,
        uri,
        headers,
        peer: None,
    })
    .await
}

fn request(api_key: &str, token: &str) -> (Uri, HeaderMap) {
    let uri = format!("/channels?api_key={api_key}").parse().unwrap();
    let mut headers = HeaderMap::new();
    headers.insert(AUTHORIZATION, token.parse().unwrap());
    (uri, headers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_reloads_under_load_fail_no_check_and_a_removed_secret_is_refused_within_1s() {
    // Failed reloads (e.g. a read racing an in-place write) show with --nocapture.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("chatgate::reload=warn")
        .with_test_writer()
        .try_init();
    let seconds: u64 = std::env::var("CHATGATE_LOAD_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10)
        .clamp(1, 600);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, version(0, false)).unwrap();
    let config = ConfigHandle::from_file(&path).unwrap();
    let gate = common::gate_over(config.clone(), Arc::new(MemoryStore::new()));
    let follower = gate.revocations().follow_config(&config);
    let watcher = ConfigWatcher::new(config.clone()).unwrap().spawn();

    let stop = Arc::new(AtomicBool::new(false));
    let checks = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (gate, stop, checks, failures) =
                (gate.clone(), stop.clone(), checks.clone(), failures.clone());
            tokio::spawn(async move {
                // Several users, so the revocation cache sees misses after each rebuild.
                let requests: Vec<_> = (0..4)
                    .map(|u| {
                        request(
                            "main",
                            &TokenBuilder::user(format!("u{w}-{u}")).sign("stable"),
                        )
                    })
                    .collect();
                let mut i = 0usize;
                // Bounded by `stop`, which the test sets after at most `seconds` + a few.
                while !stop.load(Ordering::Relaxed) {
                    let (uri, headers) = &requests[i % requests.len()];
                    match check(&gate, uri, headers).await {
                        Ok(Decision::Allow(_)) => {}
                        other => {
                            if failures.fetch_add(1, Ordering::Relaxed) < 5 {
                                eprintln!("worker {w}: check failed: {other:?}");
                            }
                        }
                    }
                    checks.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                    if i.is_multiple_of(16) {
                        // Cache hits never yield: let the writer and the watcher run.
                        tokio::task::yield_now().await;
                    }
                }
            })
        })
        .collect();

    let interval = Duration::from_millis(seconds * 1000 / WRITES);
    for n in 1..=WRITES {
        let text = version(n, false);
        let write_path = path.clone();
        tokio::task::spawn_blocking(move || write(&write_path, n, &text))
            .await
            .unwrap();
        tokio::time::sleep(interval).await;
    }
    // the last version is live (bounded)
    let deadline = Instant::now() + Duration::from_secs(5);
    while config.load().auth.leeway_seconds != WRITES as i64 {
        assert!(
            Instant::now() < deadline,
            "the last write not applied within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let versions_after_rotation = config.version();

    // remove the victim's old secret and time its refusal
    let (victim_uri, victim_headers) =
        request("victim", &TokenBuilder::user("v").sign("victim-secret"));
    assert!(matches!(
        check(&gate, &victim_uri, &victim_headers).await,
        Ok(Decision::Allow(_))
    ));
    let text = version(WRITES + 1, true);
    let write_path = path.clone();
    tokio::task::spawn_blocking(move || write(&write_path, WRITES + 1, &text))
        .await
        .unwrap();
    let written = Instant::now();
    let refused_after = loop {
        match check(&gate, &victim_uri, &victim_headers).await {
            Err(AuthError::BadSignature) => break written.elapsed(),
            Ok(Decision::Allow(_)) => {}
            other => panic!("unexpected answer for the victim token: {other:?}"),
        }
        assert!(
            written.elapsed() < Duration::from_secs(1),
            "a token whose secret was removed was still accepted 1 s after the write"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };

    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        tokio::time::timeout(Duration::from_secs(5), worker)
            .await
            .expect("a load worker did not stop")
            .unwrap();
    }
    let elapsed = started.elapsed();
    watcher.stop().await;
    follower.abort();

    let status = config.status();
    let (checks, failures) = (
        checks.load(Ordering::Relaxed),
        failures.load(Ordering::Relaxed),
    );
    println!(
        "reload load: {checks} checks in {:.1} s ({:.0}/s, {WORKERS} tasks, 2 threads, {} build), \
         {failures} failed; {} writes, {} reloads applied ({} before the victim write), \
         {} reloads failed; removed secret refused {} ms after the write",
        elapsed.as_secs_f64(),
        checks as f64 / elapsed.as_secs_f64(),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        WRITES + 1,
        status.reloads_ok,
        versions_after_rotation - 1,
        status.reloads_failed,
        refused_after.as_millis(),
    );
    assert_eq!(
        failures, 0,
        "checks with a token valid in every version failed"
    );
    assert!(checks > 0);
    assert!(status.reloads_ok >= 2, "{status:?}");
}
