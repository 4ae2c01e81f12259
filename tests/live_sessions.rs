//! Contract §4, live sessions at the edge, against the `chatgate` binary: the bytes a
//! relayed WebSocket carries when its token is revoked in the middle of a large
//! fragmented message (the close lands at a frame boundary, the upstream gets a masked
//! 1001), an upstream that stalls mid-frame, a revocation through one proxy closing a
//! session held by another over Redis (with the official JS SDK), an app-wide cutoff
//! set in the config file and applied by a reload, and the end of a drain (1001 both
//! ways, then the process exits without waiting out the grace period).

#[path = "common/proxy_harness.rs"]
mod harness;
#[path = "support/redis_server.rs"]
mod redis_server;
#[path = "common/sdk_js.rs"]
mod sdk_js;

use chatgate::TokenBuilder;
use chatgate::time::now_unix;
use harness::*;
use sdk_js::*;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

/// The contract's bound on closing a live session.
const WITHIN: Duration = Duration::from_secs(1);

/// A WebSocket upstream the test drives byte by byte: it answers one upgrade with a
/// 101, then writes whatever the test sends on `to_client` and records everything it
/// receives; other requests (the revocations the proxy forwards) get `200 {}`.
struct ScriptedUpstream {
    address: SocketAddr,
    to_client: mpsc::UnboundedSender<Vec<u8>>,
    received: Arc<Mutex<Vec<u8>>>,
    closed: Arc<tokio::sync::Notify>,
}

impl ScriptedUpstream {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (to_client, script) = mpsc::unbounded_channel::<Vec<u8>>();
        let received = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new(tokio::sync::Notify::new());
        let (rec, done) = (received.clone(), closed.clone());
        let script = Arc::new(Mutex::new(Some(script)));
        tokio::spawn(async move {
            // Bounded by the test's runtime; each connection on its own task (the
            // proxy's upstream health probes connect and close without a request).
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (script, rec, done) = (script.clone(), rec.clone(), done.clone());
                tokio::spawn(async move {
                    let _ = serve_one(stream, script, rec, done).await;
                });
            }
        });
        ScriptedUpstream {
            address,
            to_client,
            received,
            closed,
        }
    }

    fn send(&self, bytes: &[u8]) {
        self.to_client.send(bytes.to_vec()).unwrap();
    }

    /// What the proxy sent after the 101, once it closed the connection.
    async fn received_until_closed(&self) -> Vec<u8> {
        timeout(STEP, self.closed.notified())
            .await
            .expect("the proxy closed the upstream connection");
        self.received.lock().unwrap().clone()
    }
}

/// One connection to the [`ScriptedUpstream`]: the upgrade (the first one only) or a
/// plain request answered `200 {}`.
async fn serve_one(
    mut stream: TcpStream,
    script: Arc<Mutex<Option<mpsc::UnboundedReceiver<Vec<u8>>>>>,
    rec: Arc<Mutex<Vec<u8>>>,
    done: Arc<tokio::sync::Notify>,
) -> Option<()> {
    let head = try_read_head(&mut stream).await?;
    let lower = head.to_ascii_lowercase();
    if lower.contains("upgrade: websocket") {
        let key = head.lines().find_map(|l| {
            l.to_ascii_lowercase()
                .starts_with("sec-websocket-key:")
                .then(|| l.split_once(':').unwrap().1.trim().to_owned())
        })?;
        let answer = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
            chatgate::ws::accept_key(key.as_bytes())
        );
        stream.write_all(answer.as_bytes()).await.ok()?;
        let mut script = script.lock().unwrap().take()?;
        let mut buf = vec![0u8; 65536];
        loop {
            tokio::select! {
                bytes = script.recv() => {
                    let _ = stream.write_all(&bytes?).await;
                }
                n = stream.read(&mut buf) => match n {
                    Ok(0) | Err(_) => { done.notify_one(); return Some(()); }
                    Ok(n) => rec.lock().unwrap().extend_from_slice(&buf[..n]),
                },
            }
        }
    }
    let length = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse::<usize>().unwrap_or(0));
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.ok()?;
    stream
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        .await
        .ok()
}

/// [`read_head`] for a peer that may close first: `None` then.
async fn try_read_head(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let byte = timeout(STEP, stream.read_u8()).await.ok()?.ok()?;
        head.push(byte);
        if head.len() >= 65536 {
            return None;
        }
    }
    String::from_utf8(head).ok()
}

/// Reads an HTTP head (through the empty line), one byte at a time so nothing after
/// it is consumed.
async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let byte = timeout(STEP, stream.read_u8()).await.unwrap().unwrap();
        head.push(byte);
        assert!(head.len() < 65536, "head too large");
    }
    String::from_utf8(head).unwrap()
}

/// A raw client upgraded through the proxy as `user`, past the 101.
async fn raw_session(proxy: &Proxy, user: &str) -> TcpStream {
    raw_session_of(proxy, (KEY, SECRET), user).await
}

/// [`raw_session`] for the app `(api key, secret)`.
async fn raw_session_of(proxy: &Proxy, (key, secret): (&str, &str), user: &str) -> TcpStream {
    let token = TokenBuilder::user(user)
        .issued_at(now_unix() - 10)
        .sign(secret);
    let mut stream = TcpStream::connect(proxy.address).await.unwrap();
    let request = format!(
        "GET /connect?api_key={key}&authorization={token}&stream-auth-type=jwt&json=%7B%22user_id%22%3A%22{user}%22%7D HTTP/1.1\r\n\
         Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    stream
}

/// Reads until `stream` has delivered `n` bytes in all (into `got`), within [`STEP`].
async fn read_at_least(stream: &mut TcpStream, got: &mut Vec<u8>, n: usize) {
    let mut buf = vec![0u8; 65536];
    while got.len() < n {
        let read = timeout(STEP, stream.read(&mut buf)).await.unwrap().unwrap();
        assert!(read > 0, "closed after {} of {n} bytes", got.len());
        got.extend_from_slice(&buf[..read]);
    }
}

/// Reads to the end of the stream (within [`STEP`]); the instant each byte count was
/// reached is kept so a test can tell when a given byte arrived.
async fn read_to_end(stream: &mut TcpStream, got: &mut Vec<u8>) -> Vec<(usize, Instant)> {
    let mut arrivals = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        match timeout(STEP, stream.read(&mut buf)).await.unwrap() {
            Ok(0) | Err(_) => return arrivals,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                arrivals.push((got.len(), Instant::now()));
            }
        }
    }
}

/// A server frame (unmasked) with the given first byte (FIN and opcode).
fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    match payload.len() {
        0..=125 => out.push(payload.len() as u8),
        126..=0xFFFF => {
            out.push(126);
            out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
    out
}

/// `PATCH /users` through the proxy with a server token: revokes `user`'s tokens.
async fn revoke(proxy: &Proxy, user: &str) {
    let response = reqwest::Client::new()
        .patch(proxy.url(&format!("/users?api_key={KEY}")))
        .header("authorization", server_token())
        .header("stream-auth-type", "jwt")
        .header("content-type", "application/json")
        .body(format!(
            r#"{{"users":[{{"id":"{user}","set":{{"revoke_tokens_issued_before":{}}}}}]}}"#,
            now_unix()
        ))
        .timeout(STEP)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

/// The one frame in `bytes`: (first byte, payload unmasked).
fn single_frame(bytes: &[u8]) -> (u8, Vec<u8>) {
    assert!(bytes.len() >= 2, "{bytes:?}");
    let masked = bytes[1] & 0x80 != 0;
    let len = usize::from(bytes[1] & 0x7f);
    assert!(len < 126, "a control frame: {bytes:?}");
    let (key, payload) = if masked {
        (Some(&bytes[2..6]), &bytes[6..])
    } else {
        (None, &bytes[2..])
    };
    assert_eq!(payload.len(), len, "exactly one frame: {bytes:?}");
    let payload = match key {
        Some(key) => payload
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ key[i % 4])
            .collect(),
        None => payload.to_vec(),
    };
    (bytes[0], payload)
}

async fn scripted_proxy(options: ProxyOptions) -> (ScriptedUpstream, Proxy) {
    let upstream = ScriptedUpstream::start().await;
    let proxy = Proxy::start(ProxyOptions {
        upstreams: vec![upstream.address.to_string()],
        ..options
    })
    .await;
    (upstream, proxy)
}

#[tokio::test]
async fn a_revocation_mid_message_closes_with_4000_right_after_the_frame_in_progress() {
    let (upstream, proxy) = scripted_proxy(ProxyOptions::default()).await;
    let mut client = raw_session(&proxy, "alice").await;

    // A fragmented message: a first fragment, then a large continuation the upstream
    // is half-way through sending when the user is revoked.
    let first = frame(0x01, b"hello ");
    let continuation = frame(0x00, &vec![b'x'; 70_000]);
    let split = first.len() + 30_000;
    let mut stream = first.clone();
    stream.extend_from_slice(&continuation);
    upstream.send(&stream[..split]);
    let mut got = Vec::new();
    read_at_least(&mut client, &mut got, split).await;

    revoke(&proxy, "alice").await;
    let revoked_at = Instant::now();
    // The rest of the continuation, the final fragment and another message follow
    // (after the relay has seen the revocation): only the frame in progress may pass.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut rest = stream[split..].to_vec();
    rest.extend_from_slice(&frame(0x80, b"end"));
    rest.extend_from_slice(&frame(0x81, b"after the revocation"));
    upstream.send(&rest);

    let arrivals = read_to_end(&mut client, &mut got).await;
    let close = chatgate::ws::close_frame(4000, "token revoked");
    let mut expected = stream.clone();
    expected.extend_from_slice(&close);
    assert_eq!(
        got.len(),
        expected.len(),
        "the bytes after the frame in progress"
    );
    assert!(
        got == expected,
        "the client got the frame in progress, then the close"
    );
    let close_arrived = arrivals
        .iter()
        .find(|(count, _)| *count >= expected.len())
        .unwrap()
        .1;
    assert!(
        close_arrived.duration_since(revoked_at) <= WITHIN,
        "close {:?} after the revocation's 2xx",
        close_arrived.duration_since(revoked_at)
    );

    // The client sent nothing: the upstream got a masked close 1001 at a boundary.
    let (first_byte, payload) = single_frame(&upstream.received_until_closed().await);
    assert_eq!(first_byte, 0x88);
    assert_eq!(&payload[..2], &1001u16.to_be_bytes());
}

#[tokio::test]
async fn a_cutoff_set_in_the_config_file_closes_that_apps_idle_sessions_on_reload() {
    let (upstream, mut proxy) = scripted_proxy(ProxyOptions {
        second_app: true,
        ..ProxyOptions::default()
    })
    .await;
    let mut client = raw_session_of(&proxy, (KEY_B, SECRET_B), "carol").await;
    // The harness's config ends with app B's table: the cutoff lands there.
    let cutoff = chatgate::time::Cutoff::from_unix_seconds(now_unix()).to_rfc3339();
    proxy.append_config(&format!("revoke_tokens_issued_before = \"{cutoff}\"\n"));
    proxy
        .wait_config_status(STEP, "the reload with app B's cutoff", |status| {
            status["version"] == 2
        })
        .await;
    let reloaded_at = Instant::now();
    let mut got = Vec::new();
    let arrivals = read_to_end(&mut client, &mut got).await;
    assert!(
        got == chatgate::ws::close_frame(4000, "token revoked"),
        "the idle client got close 4000, nothing else: {got:?}"
    );
    let closed_at = arrivals.last().unwrap().1;
    assert!(
        closed_at.duration_since(reloaded_at) <= WITHIN,
        "close {:?} after the reload was live",
        closed_at.duration_since(reloaded_at)
    );
    let (first_byte, payload) = single_frame(&upstream.received_until_closed().await);
    assert_eq!(first_byte, 0x88);
    assert_eq!(&payload[..2], &1001u16.to_be_bytes());
}

#[tokio::test]
async fn an_upstream_stalled_mid_frame_is_cut_within_a_second_without_a_broken_frame() {
    let (upstream, proxy) = scripted_proxy(ProxyOptions::default()).await;
    let mut client = raw_session(&proxy, "bob").await;
    let big = frame(0x82, &vec![7u8; 50_000]);
    upstream.send(&big[..20_000]);
    let mut got = Vec::new();
    read_at_least(&mut client, &mut got, 20_000).await;
    revoke(&proxy, "bob").await;
    let revoked_at = Instant::now();
    // The upstream never finishes its frame: a close frame would land inside it, so the
    // connection ends without one, within the bound.
    read_to_end(&mut client, &mut got).await;
    assert!(Instant::now().duration_since(revoked_at) <= WITHIN);
    assert_eq!(
        got,
        big[..20_000].to_vec(),
        "nothing was added to the frame"
    );
    let (first_byte, payload) = single_frame(&upstream.received_until_closed().await);
    assert_eq!(first_byte, 0x88);
    assert_eq!(&payload[..2], &1001u16.to_be_bytes());
}

#[tokio::test]
async fn at_the_end_of_the_drain_sessions_get_1001_and_the_process_exits() {
    let grace = 4;
    let (upstream, mut proxy) = scripted_proxy(ProxyOptions {
        grace_period_seconds: Some(grace),
        ..ProxyOptions::default()
    })
    .await;
    let mut client = raw_session(&proxy, "carol").await;
    upstream.send(&frame(0x81, b"hi"));
    let mut got = Vec::new();
    read_at_least(&mut client, &mut got, 4).await;
    proxy.terminate();
    read_to_end(&mut client, &mut got).await;
    let (first_byte, payload) = single_frame(&got[4..]);
    assert_eq!(first_byte, 0x88);
    assert_eq!(&payload[..2], &1001u16.to_be_bytes());
    assert_eq!(&payload[2..], b"going away");
    let (first_byte, payload) = single_frame(&upstream.received_until_closed().await);
    assert_eq!(first_byte, 0x88);
    assert_eq!(&payload[..2], &1001u16.to_be_bytes());
    // Closed sessions leave nothing to wait for: the process exits well before
    // Pingora's own backstop (grace + 5 s) would end it.
    let status = proxy.wait_exit(Duration::from_secs(grace + 4)).await;
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn a_drain_with_nothing_left_ends_long_before_the_grace_period() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let mut proxy = Proxy::start(ProxyOptions {
        upstreams: vec![upstream.address.to_string()],
        grace_period_seconds: Some(120),
        ..ProxyOptions::default()
    })
    .await;
    // Serving for real (Pingora installs its signal handlers once it runs) before the
    // SIGTERM.
    let client = reqwest::Client::new();
    for _ in 0..100 {
        let ready = client
            .get(proxy.admin_url("/readyz"))
            .timeout(STEP)
            .send()
            .await;
        if ready.is_ok_and(|r| r.status() == 200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.terminate();
    let status = proxy.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "{status}");
}

/// Contract §4 across instances: the JS SDK is connected, idle, through proxy B; its
/// user is revoked through proxy A (the JS server SDK); both share one Redis. B closes
/// the session with 4000 within a second of A's answer, and the SDK reconnects.
#[tokio::test]
async fn a_revocation_through_one_proxy_closes_the_session_held_by_another_over_redis() {
    let redis = redis_server::RedisServer::start();
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let options = || ProxyOptions {
        upstreams: vec![upstream.address.to_string()],
        revocation: Some(format!(
            "store = \"redis\"\nredis_url = \"{}\"",
            redis.url()
        )),
        ..ProxyOptions::default()
    };
    let a = Proxy::start(options()).await;
    let b = Proxy::start(options()).await;
    let first = TokenBuilder::user("frank")
        .issued_at(now_unix() - 10)
        .sign(SECRET);
    let script = idle_session_script(
        KEY,
        SECRET,
        &b.url(""),
        &a.url(""),
        "frank",
        &format!("'{first}'"),
        "await sleep(300);\n  await server.revokeUserToken('frank', new Date());\n  markAt = Date.now();",
    );
    let out = run_script(js_command(script), JS_SDK).await;
    assert_eq!(out["connected"], true, "{out}");
    assert_eq!(out["first_socket_closed"], 1, "{out}");
    assert_eq!(out["close_code"], 4000, "{out}");
    assert!(
        out["close_after_mark_ms"].as_i64().unwrap() <= 1000,
        "{out}"
    );
    assert_eq!(out["reconnected"], true, "{out}");
}
