//! A bounded soak (issue 12, item 5): the `chatgate` binary built by the test profile
//! (debug, with the binary's allocator, mimalloc) under a mixed load for
//! `CHATGATE_SOAK_SECONDS` (default 600): HTTP requests with valid, expired, forged and
//! missing tokens, config reloads, revocations into the embedded store, WebSocket churn
//! and slow clients. Every 10 s it samples the process's RSS (`/proc/<pid>/status`
//! VmRSS) and open file descriptors (`/proc/<pid>/fd`) into a CSV
//! (`CHATGATE_SOAK_CSV`, default `target/soak.csv`).
//!
//! Passes when, after the warm-up (the first fifth of the run), RSS grew less than 5%
//! and the descriptor count stayed flat, with no 5xx and no failed connection. Not in
//! the regular test run (it takes 10 minutes):
//!
//! ```text
//! cargo test --all-features --test soak -- --ignored --nocapture
//! ```

#[path = "common/proxy_harness.rs"]
mod harness;

use chatgate::TokenBuilder;
use chatgate::time::now_unix;
use futures_util::{SinkExt, StreamExt};
use harness::*;
use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

const SAMPLE_EVERY: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT_MS: u64 = 2000;
/// Distinct users of the steady load (a tenth of the requests use a never-seen user).
const USERS: u64 = 200;

/// What the load did, counted by every task.
#[derive(Default)]
struct Counts {
    http: AtomicU64,
    ok: AtomicU64,
    refused: AtomicU64,
    server_errors: AtomicU64,
    transport_errors: AtomicU64,
    websockets: AtomicU64,
    websocket_refusals: AtomicU64,
    slow_clients: AtomicU64,
    reloads: AtomicU64,
    revocations: AtomicU64,
}

fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

struct Sample {
    at: u64,
    rss_kb: u64,
    fds: usize,
    http: u64,
    websockets: u64,
    reloads: u64,
    revocations: u64,
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// A token for request `i`: mostly valid (for one of [`USERS`] users, or a fresh one),
/// sometimes expired, forged, a server token, or none.
fn token_for(i: u64) -> Option<String> {
    let now = now_unix();
    let user = if i % 10 == 3 {
        format!("fresh-{i}")
    } else {
        format!("u{}", i % USERS)
    };
    match i % 20 {
        0 => None,
        1 => Some(TokenBuilder::user(&user).expires_at(now - 60).sign(SECRET)),
        2 => Some(TokenBuilder::user(&user).sign("not-the-secret")),
        5 => Some(server_token()),
        _ => Some(TokenBuilder::user(&user).issued_at(now - 1).sign(SECRET)),
    }
}

async fn http_worker(proxy: Arc<Proxy>, worker: u64, stop: Arc<AtomicBool>, counts: Arc<Counts>) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut i = worker * 1_000_000;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let mut request = if i.is_multiple_of(3) {
            client
                .post(proxy.url(&format!(
                    "/channels/messaging/c{}/message?api_key={KEY}",
                    i % 7
                )))
                .body(format!("{{\"message\":{{\"text\":\"{i}\"}}}}"))
        } else {
            client.get(proxy.url(&format!("/channels?api_key={KEY}")))
        };
        if let Some(token) = token_for(i) {
            request = request.header("authorization", token);
        }
        count(&counts.http);
        match request.send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                let _ = response.bytes().await;
                match status {
                    200..=299 => count(&counts.ok),
                    500.. => count(&counts.server_errors),
                    _ => count(&counts.refused),
                }
            }
            Err(_) => count(&counts.transport_errors),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Connects, reads the greeting (or the error frame), says something, closes; some
/// sockets are held open a while, some are refused (forged token).
async fn websocket_worker(
    proxy: Arc<Proxy>,
    worker: u64,
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
) {
    let mut i = worker * 1_000_000;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let user = format!("u{}", i % USERS);
        let secret = if i.is_multiple_of(5) {
            "forged"
        } else {
            SECRET
        };
        let token = TokenBuilder::user(&user)
            .issued_at(now_unix() - 1)
            .sign(secret);
        let json = format!("%7B%22user_id%22%3A%22{user}%22%7D");
        let url = proxy.ws_url(&format!(
            "/connect?api_key={KEY}&authorization={token}&json={json}"
        ));
        let session = async {
            let (mut socket, _) = tokio_tungstenite::connect_async(&url).await.ok()?;
            let first = socket.next().await?.ok()?;
            let text = first.into_text().ok()?;
            if text.contains("\"error\"") {
                count(&counts.websocket_refusals);
                return Some(());
            }
            socket
                .send(Message::Text(format!("hi {i}").into()))
                .await
                .ok()?;
            let echo = socket.next().await?.ok()?;
            if !echo.into_text().ok()?.starts_with("echo:") {
                return None;
            }
            if i.is_multiple_of(7) {
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            socket.close(None).await.ok()?;
            count(&counts.websockets);
            Some(())
        };
        if tokio::time::timeout(Duration::from_secs(10), session)
            .await
            .ok()
            .flatten()
            .is_none()
        {
            count(&counts.transport_errors);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client that sends its request head a few bytes at a time: in time (answered), or
/// stalling past `header_timeout_ms` (the proxy ends the connection); and one that reads
/// its answer only after a pause.
async fn slow_client(proxy: Arc<Proxy>, stop: Arc<AtomicBool>, counts: Arc<Counts>) {
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let head = format!(
            "GET /channels?api_key={KEY} HTTP/1.1\r\nHost: soak\r\nAuthorization: {}\r\nConnection: close\r\n\r\n",
            TokenBuilder::user("slow")
                .issued_at(now_unix() - 1)
                .sign(SECRET)
        );
        let proxy = proxy.clone();
        let counts = counts.clone();
        tokio::spawn(async move {
            let outcome = tokio::time::timeout(Duration::from_secs(15), async {
                let mut stream = tokio::net::TcpStream::connect(proxy.address).await.ok()?;
                let bytes = head.as_bytes();
                match i % 3 {
                    // In time: 40 chunks 25 ms apart (1 s) is well inside the timeout.
                    0 => {
                        for chunk in bytes.chunks(bytes.len().div_ceil(40)) {
                            stream.write_all(chunk).await.ok()?;
                            tokio::time::sleep(Duration::from_millis(25)).await;
                        }
                    }
                    // Stalled: half the head, then nothing past the header timeout.
                    1 => {
                        stream.write_all(&bytes[..bytes.len() / 2]).await.ok()?;
                        tokio::time::sleep(Duration::from_millis(HEADER_TIMEOUT_MS + 1000)).await;
                        let _ = stream.write_all(&bytes[bytes.len() / 2..]).await;
                    }
                    // A slow reader: the whole head, then a pause before reading.
                    _ => {
                        stream.write_all(bytes).await.ok()?;
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                }
                let mut answer = Vec::new();
                let _ = stream.read_to_end(&mut answer).await;
                let stalled = i % 3 == 1;
                // A stalled head may get a 408 or a bare close; the others a 200.
                (stalled || answer.starts_with(b"HTTP/1.1 200")).then_some(())
            })
            .await;
            match outcome {
                Ok(Some(())) => count(&counts.slow_clients),
                _ => count(&counts.transport_errors),
            }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Rewrites the config every 5 s (write a temporary file, rename it over), adding and
/// removing the second app and changing the leeway, so every reload is a real swap.
async fn reloader(
    path: std::path::PathBuf,
    base: String,
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_secs(5)).await;
        n += 1;
        let mut text = base.replace(
            "[revocation]",
            &format!("[auth]\nleeway_seconds = {}\n[revocation]", 5 + n % 3),
        );
        if n.is_multiple_of(2) {
            text.push_str(&format!(
                "[[apps]]\napi_key = \"{KEY_B}\"\nsecrets = [\"{SECRET_B}\"]\n"
            ));
        }
        let next = path.with_extension("next");
        let mut file = std::fs::File::create(&next).unwrap();
        file.write_all(text.as_bytes()).unwrap();
        file.sync_all().unwrap();
        std::fs::rename(&next, &path).unwrap();
        count(&counts.reloads);
    }
}

/// Revokes one to five users every 2 s (into the embedded store, fsynced), and now and
/// then lifts a cutoff again.
async fn revoker(proxy: Arc<Proxy>, stop: Arc<AtomicBool>, counts: Arc<Counts>) {
    let client = reqwest::Client::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        n += 1;
        let cutoff = if n.is_multiple_of(4) {
            serde_json::Value::Null
        } else {
            chrono::Utc::now()
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                .into()
        };
        let users: Vec<serde_json::Value> = (0..1 + n % 5)
            .map(|k| {
                serde_json::json!({"id": format!("u{}", (n * 7 + k) % USERS),
                    "set": {"revoke_tokens_issued_before": cutoff}})
            })
            .collect();
        let response = client
            .patch(proxy.url(&format!("/users?api_key={KEY}")))
            .header("authorization", server_token())
            .body(serde_json::json!({ "users": users }).to_string())
            .send()
            .await;
        match response.map(|r| r.status().as_u16()) {
            Ok(200) => count(&counts.revocations),
            Ok(500..) => count(&counts.server_errors),
            _ => count(&counts.transport_errors),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a 10-minute soak: cargo test --all-features --test soak -- --ignored --nocapture"]
async fn soak_rss_and_fds_stay_flat_under_mixed_load() {
    let seconds: u64 = std::env::var("CHATGATE_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let csv_path = std::env::var("CHATGATE_SOAK_CSV")
        .unwrap_or_else(|_| format!("{}/../soak.csv", env!("CARGO_TARGET_TMPDIR")));
    let store = tempfile::tempdir().unwrap();
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let proxy = Arc::new(
        Proxy::start(ProxyOptions {
            upstreams: vec![upstream.address.to_string()],
            header_timeout_ms: Some(HEADER_TIMEOUT_MS),
            revocation: Some(format!(
                "store = \"embedded\"\npath = \"{}\"\ncache_capacity = 5000",
                store.path().join("revocations.db").display()
            )),
            ..ProxyOptions::default()
        })
        .await,
    );
    let pid = proxy.pid();
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let mut tasks = Vec::new();
    for worker in 0..4 {
        tasks.push(tokio::spawn(http_worker(
            proxy.clone(),
            worker,
            stop.clone(),
            counts.clone(),
        )));
    }
    for worker in 0..2 {
        tasks.push(tokio::spawn(websocket_worker(
            proxy.clone(),
            worker,
            stop.clone(),
            counts.clone(),
        )));
    }
    tasks.push(tokio::spawn(slow_client(
        proxy.clone(),
        stop.clone(),
        counts.clone(),
    )));
    tasks.push(tokio::spawn(reloader(
        proxy.config_path().to_owned(),
        proxy.config_text().to_owned(),
        stop.clone(),
        counts.clone(),
    )));
    tasks.push(tokio::spawn(revoker(
        proxy.clone(),
        stop.clone(),
        counts.clone(),
    )));

    let started = Instant::now();
    let mut samples = Vec::new();
    let mut csv = String::from("seconds,rss_kb,fds,http_requests,websockets,reloads,revocations\n");
    for tick in 0..=seconds / SAMPLE_EVERY.as_secs() {
        let due = started + SAMPLE_EVERY * tick as u32;
        tokio::time::sleep_until(due.into()).await;
        let sample = Sample {
            at: started.elapsed().as_secs(),
            rss_kb: rss_kb(pid),
            fds: fds(pid),
            http: counts.http.load(Ordering::Relaxed),
            websockets: counts.websockets.load(Ordering::Relaxed),
            reloads: counts.reloads.load(Ordering::Relaxed),
            revocations: counts.revocations.load(Ordering::Relaxed),
        };
        let line = format!(
            "{},{},{},{},{},{},{}\n",
            sample.at,
            sample.rss_kb,
            sample.fds,
            sample.http,
            sample.websockets,
            sample.reloads,
            sample.revocations
        );
        eprint!("soak {line}");
        csv.push_str(&line);
        std::fs::write(&csv_path, &csv).unwrap();
        samples.push(sample);
    }
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("a load task ends")
            .unwrap();
    }
    // Connections the load left are closed: the count the process settles to.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let settled_fds = fds(pid);

    let c = &counts;
    let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
    eprintln!(
        "soak: {} http ({} 2xx, {} refused, {} 5xx), {} websockets (+{} refused), {} slow clients, {} reloads, {} revocations, {} transport errors; {} fds after the load; CSV {csv_path}",
        load(&c.http),
        load(&c.ok),
        load(&c.refused),
        load(&c.server_errors),
        load(&c.websockets),
        load(&c.websocket_refusals),
        load(&c.slow_clients),
        load(&c.reloads),
        load(&c.revocations),
        load(&c.transport_errors),
        settled_fds,
    );
    let warm = samples.len() / 5;
    let after_warmup = &samples[warm..];
    let base = after_warmup[0].rss_kb as f64;
    let end = samples.last().unwrap().rss_kb as f64;
    let peak = after_warmup.iter().map(|s| s.rss_kb).max().unwrap() as f64;
    let growth = (end - base) / base * 100.0;
    let (fd_min, fd_max) = after_warmup.iter().fold((usize::MAX, 0), |(lo, hi), s| {
        (lo.min(s.fds), hi.max(s.fds))
    });
    let half = after_warmup.len() / 2;
    let early_fd_max = after_warmup[..half].iter().map(|s| s.fds).max().unwrap();
    let late_fd_max = after_warmup[half..].iter().map(|s| s.fds).max().unwrap();
    eprintln!(
        "soak: after warm-up ({} s): RSS {base} kB -> {end} kB ({growth:+.2}%, peak {peak} kB); fds {fd_min}..{fd_max} (first half max {early_fd_max}, second half max {late_fd_max})",
        after_warmup[0].at
    );
    assert_eq!(
        load(&c.server_errors),
        0,
        "5xx under a healthy upstream and disk"
    );
    assert_eq!(load(&c.transport_errors), 0, "failed connections");
    assert!(growth < 5.0, "RSS grew {growth:.2}% after warm-up");
    // Flat: the second half never holds more descriptors than the first half did
    // (the load's own connections come and go, so the count moves within a band).
    assert!(
        late_fd_max <= early_fd_max + 2,
        "fds climbed: first half max {early_fd_max}, second half max {late_fd_max}"
    );
}
