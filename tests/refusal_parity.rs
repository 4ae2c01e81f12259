//! The two adapters refuse alike (contract §4): the same request, sent to the Pingora
//! proxy (the `chatgate` binary) and to `ChatAuthLayer` in an axum server over the same
//! apps, gets byte-identical refusals: status, content type and JSON body over HTTP;
//! 101, accept key and the frames after it on a WebSocket upgrade. Both copy out the
//! one `Rejection`, and this test keeps it so.

mod common;
#[path = "common/proxy_harness.rs"]
mod harness;

use axum::Router;
use chatgate::TokenBuilder;
use chatgate::time::now_unix;
use harness::*;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const STEP_LIMIT: Duration = Duration::from_secs(10);
const WS_HEADERS: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
/// The close frame ending every WebSocket refusal: 1000, no reason.
const CLOSE_NORMAL: [u8; 4] = [0x88, 0x02, 0x03, 0xe8];

/// The layer over the same apps as the harness's proxy config.
async fn start_layer() -> SocketAddr {
    let mut dev = common::app(DEV_KEY, DEV_SECRET);
    dev.disable_auth_checks = true;
    dev.allow_anonymous = true;
    let config = common::config(vec![common::app(KEY, SECRET), dev]);
    let routes = Router::new().fallback(|| async { "reached the service" });
    common::layer_app(config, routes).await.0
}

/// What a refusal put on the wire, with what differs by server (Date, Server) left out.
#[derive(Debug, PartialEq, Eq)]
struct Refusal {
    status: u16,
    /// The headers a refusal is made of, lowercased names, in a fixed order.
    headers: Vec<(String, String)>,
    /// The HTTP body, or the bytes after a 101.
    after_head: Vec<u8>,
}

const COMPARED_HEADERS: [&str; 5] = [
    "content-type",
    "content-length",
    "upgrade",
    "connection",
    "sec-websocket-accept",
];

/// Sends one raw request and reads the refusal: the body by its length, or after a 101
/// everything up to the close frame.
async fn refusal(address: SocketAddr, request: &str) -> Refusal {
    tokio::time::timeout(STEP_LIMIT, async {
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut buffer = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed before the response head");
            buffer.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8(buffer[..head_end].to_vec()).unwrap();
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let mut all = Vec::new();
        for line in lines.filter(|l| !l.is_empty()) {
            let (name, value) = line.split_once(':').unwrap();
            all.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
        // `Connection` over HTTP is each server's keep-alive bookkeeping (Pingora says
        // keep-alive, hyper leaves it implied); on a 101 it is part of the handshake.
        let headers: Vec<(String, String)> = COMPARED_HEADERS
            .iter()
            .filter(|name| status == 101 || **name != "connection")
            .filter_map(|name| all.iter().find(|(n, _)| n == name).cloned())
            .collect();
        let mut after_head = buffer[head_end..].to_vec();
        let complete = |bytes: &[u8]| match status {
            101 => bytes.ends_with(&CLOSE_NORMAL),
            _ => {
                let length: usize = headers
                    .iter()
                    .find(|(n, _)| n == "content-length")
                    .expect("a refusal has a content-length")
                    .1
                    .parse()
                    .unwrap();
                bytes.len() >= length
            }
        };
        while !complete(&after_head) {
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed before the refusal was complete");
            after_head.extend_from_slice(&chunk[..n]);
        }
        Refusal {
            status,
            headers,
            after_head,
        }
    })
    .await
    .expect("a refusal arrives in time")
}

/// One class of refused request: a name, then the raw request (the `Host` is added).
fn cases() -> Vec<(&'static str, String)> {
    let now = now_unix();
    let user = user_token("alice");
    let expired = TokenBuilder::user("alice")
        .issued_at(now - 100)
        .expires_at(now - 50)
        .sign(SECRET);
    let bad_signature = TokenBuilder::user("alice").sign("not-the-secret");
    let server = server_token();
    let json: String = form_urlencoded::byte_serialize(br#"{"user_id":"mallory"}"#).collect();
    vec![
        (
            "missing api_key (2)",
            "GET /channels HTTP/1.1\r\n".to_owned(),
        ),
        (
            "unknown api_key (2)",
            format!("GET /channels?api_key=nope HTTP/1.1\r\nAuthorization: {user}\r\n"),
        ),
        (
            "missing token (5)",
            format!("GET /channels?api_key={KEY} HTTP/1.1\r\n"),
        ),
        (
            "bad stream-auth-type (5)",
            format!(
                "GET /channels?api_key={KEY} HTTP/1.1\r\nAuthorization: {user}\r\nStream-Auth-Type: oauth\r\n"
            ),
        ),
        (
            "anonymous not allowed (5)",
            format!("GET /channels?api_key={KEY} HTTP/1.1\r\nStream-Auth-Type: anonymous\r\n"),
        ),
        (
            "expired (40)",
            format!("GET /channels?api_key={KEY} HTTP/1.1\r\nAuthorization: {expired}\r\n"),
        ),
        (
            "bad signature (43)",
            format!("GET /channels?api_key={KEY} HTTP/1.1\r\nAuthorization: {bad_signature}\r\n"),
        ),
        (
            "user token on a revocation endpoint (17)",
            format!(
                "PATCH /users?api_key={KEY} HTTP/1.1\r\nAuthorization: {user}\r\nContent-Length: 2\r\n\r\n{{}}"
            ),
        ),
        (
            "anonymous on a revocation endpoint (17)",
            format!(
                "PATCH /app?api_key={DEV_KEY} HTTP/1.1\r\nStream-Auth-Type: anonymous\r\nContent-Length: 2\r\n\r\n{{}}"
            ),
        ),
        (
            "bad revocation body from a server token (4)",
            format!(
                "PATCH /users?api_key={KEY} HTTP/1.1\r\nAuthorization: {server}\r\nContent-Length: 8\r\n\r\nnot json"
            ),
        ),
        (
            "WebSocket with an expired token (40)",
            format!(
                "GET /connect?api_key={KEY}&authorization={expired}&stream-auth-type=jwt HTTP/1.1\r\n{WS_HEADERS}"
            ),
        ),
        (
            "WebSocket without a token (5)",
            format!(
                "GET /connect?api_key={KEY}&authorization=&stream-auth-type=jwt HTTP/1.1\r\n{WS_HEADERS}"
            ),
        ),
        (
            "WebSocket for another user (17)",
            format!(
                "GET /connect?api_key={KEY}&authorization={user}&json={json} HTTP/1.1\r\n{WS_HEADERS}"
            ),
        ),
        (
            "WebSocket with an unknown api_key (2)",
            format!("GET /connect?api_key=nope&authorization={user} HTTP/1.1\r\n{WS_HEADERS}"),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_and_the_layer_refuse_every_request_class_identically() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let proxy = Proxy::start(ProxyOptions {
        upstreams: vec![upstream.address.to_string()],
        ..ProxyOptions::default()
    })
    .await;
    let layer = start_layer().await;
    for (name, request) in cases() {
        let with_host = |address: SocketAddr| {
            let (line, rest) = request.split_once("\r\n").unwrap();
            let rest = if rest.contains("\r\n\r\n") {
                rest.to_owned()
            } else {
                format!("{rest}\r\n")
            };
            format!("{line}\r\nHost: {address}\r\n{rest}")
        };
        let from_proxy = refusal(proxy.address, &with_host(proxy.address)).await;
        let from_layer = refusal(layer, &with_host(layer)).await;
        assert_eq!(from_proxy, from_layer, "{name}");
        // and it is a refusal in the contract's shape, not merely the same answer
        let object: serde_json::Value = if from_proxy.status == 101 {
            assert!(from_proxy.after_head.ends_with(&CLOSE_NORMAL), "{name}");
            let frame = &from_proxy.after_head[..from_proxy.after_head.len() - CLOSE_NORMAL.len()];
            assert_eq!(frame[0], 0x81, "{name}: one text frame");
            let start = if frame[1] == 126 { 4 } else { 2 };
            serde_json::from_slice::<serde_json::Value>(&frame[start..]).unwrap()["error"].clone()
        } else {
            serde_json::from_slice(&from_proxy.after_head).unwrap()
        };
        let code = object["code"].as_i64().unwrap();
        let expected: i64 = name
            .rsplit_once('(')
            .and_then(|(_, c)| c.trim_end_matches(')').parse().ok())
            .unwrap();
        assert_eq!(code, expected, "{name}");
    }
    assert!(
        upstream.requests().is_empty(),
        "no refused request reaches the upstream"
    );
}
