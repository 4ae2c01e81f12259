//! The edge proxy end to end: the `chatgate` binary on loopback in front of a recording
//! test upstream, driven by real HTTP and WebSocket clients.

#[path = "common/proxy_harness.rs"]
mod harness;

use base64::Engine as _;
use chatgate::TokenBuilder;
use chatgate::time::now_unix;
use futures_util::{SinkExt, StreamExt};
use harness::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

async fn within<T>(limit: Duration, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(limit, future)
        .await
        .expect("test step timed out")
}

async fn echo_proxy() -> (TestUpstream, Proxy) {
    echo_proxy_with(|_| {}).await
}

async fn echo_proxy_with(configure: impl FnOnce(&mut ProxyOptions)) -> (TestUpstream, Proxy) {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let mut options = ProxyOptions {
        upstreams: vec![upstream.address.to_string()],
        ..ProxyOptions::default()
    };
    configure(&mut options);
    let proxy = Proxy::start(options).await;
    (upstream, proxy)
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// One refusal: what, the api_key query value, the token, the auth type, and the
/// expected Stream code and HTTP status.
type Case = (
    &'static str,
    Option<&'static str>,
    Option<String>,
    &'static str,
    i64,
    u16,
);

fn contract_errors() -> Vec<Case> {
    let now = now_unix();
    let alg_none = format!(
        "{}.{}.{}",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(br#"{"user_id":"u"}"#),
        b64(b"x")
    );
    vec![
        (
            "missing api_key",
            None,
            Some(user_token("u")),
            "jwt",
            2,
            401,
        ),
        (
            "unknown api_key",
            Some("nope"),
            Some(user_token("u")),
            "jwt",
            2,
            401,
        ),
        ("missing token", Some(KEY), None, "jwt", 5, 401),
        (
            "malformed token",
            Some(KEY),
            Some("abc".into()),
            "jwt",
            5,
            401,
        ),
        (
            "bad auth type",
            Some(KEY),
            Some(user_token("u")),
            "oauth",
            5,
            401,
        ),
        (
            "anonymous not allowed",
            Some(KEY),
            None,
            "anonymous",
            5,
            401,
        ),
        (
            "expired",
            Some(KEY),
            Some(TokenBuilder::user("u").expires_at(now - 100).sign(SECRET)),
            "jwt",
            40,
            401,
        ),
        (
            "nbf in the future",
            Some(KEY),
            Some(TokenBuilder::user("u").not_before(now + 1000).sign(SECRET)),
            "jwt",
            41,
            401,
        ),
        (
            "iat in the future",
            Some(KEY),
            Some(TokenBuilder::user("u").issued_at(now + 1000).sign(SECRET)),
            "jwt",
            42,
            401,
        ),
        (
            "bad signature",
            Some(KEY),
            Some(TokenBuilder::user("u").sign("wrong")),
            "jwt",
            43,
            401,
        ),
        ("alg none", Some(KEY), Some(alg_none), "jwt", 43, 401),
    ]
}

fn assert_stream_error(body: &serde_json::Value, code: i64, status: u16, what: &str) {
    assert_eq!(body["code"], code, "{what}: {body}");
    assert_eq!(body["StatusCode"], status, "{what}: {body}");
    assert!(body["message"].is_string(), "{what}: {body}");
    assert!(body["more_info"].is_string(), "{what}: {body}");
}

#[tokio::test]
async fn every_contract_error_is_answered_as_stream_json_over_http() {
    let (upstream, proxy) = echo_proxy().await;
    let client = reqwest::Client::new();
    within(Duration::from_secs(60), async {
        for (what, api_key, token, auth_type, code, status) in contract_errors() {
            let url = match api_key {
                Some(key) => proxy.url(&format!("/channels?api_key={key}")),
                None => proxy.url("/channels"),
            };
            let mut request = client.get(url).header("stream-auth-type", auth_type);
            if let Some(token) = token {
                request = request.header("authorization", token);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status().as_u16(), status, "{what}");
            assert_eq!(
                response.headers()["content-type"],
                "application/json",
                "{what}"
            );
            let body: serde_json::Value = response.json().await.unwrap();
            assert_stream_error(&body, code, status, what);
        }
        // a user token may not call the server-only revocation endpoint
        let response = client
            .patch(proxy.url(&format!("/users?api_key={KEY}")))
            .header("authorization", user_token("u"))
            .body(r#"{"users":[]}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 403);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_stream_error(&body, 17, 403, "user token on PATCH /users");
    })
    .await;
    assert!(
        upstream.requests().is_empty(),
        "no refused request may reach the upstream: {:?}",
        upstream.requests()
    );
}

/// Connects and returns the first message and how the socket was closed.
async fn websocket_rejection(url: &str) -> (serde_json::Value, Option<CloseCode>) {
    let (mut socket, response) = tokio_tungstenite::connect_async(url)
        .await
        .expect("a rejected upgrade still completes (101)");
    assert_eq!(response.status().as_u16(), 101);
    let first = socket.next().await.expect("an error frame").unwrap();
    let Message::Text(text) = first else {
        panic!("expected a text frame, got {first:?}")
    };
    let frame: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut close = None;
    // The close frame follows at once; then the server ends the connection.
    while let Some(Ok(message)) = socket.next().await {
        if let Message::Close(frame) = message {
            close = frame.map(|f| f.code);
            break;
        }
    }
    (frame, close)
}

#[tokio::test]
async fn every_contract_error_on_a_websocket_is_101_then_an_error_frame_then_close_1000() {
    let (upstream, proxy) = echo_proxy().await;
    within(Duration::from_secs(60), async {
        let mut cases: Vec<(&str, String, i64, u16)> = contract_errors()
            .into_iter()
            .map(|(what, api_key, token, auth_type, code, status)| {
                let mut query = format!("stream-auth-type={auth_type}");
                if let Some(key) = api_key {
                    query.push_str(&format!("&api_key={key}"));
                }
                if let Some(token) = token {
                    query.push_str(&format!("&authorization={token}"));
                }
                (what, format!("/connect?{query}"), code, status)
            })
            .collect();
        let json: String = form_urlencoded::byte_serialize(br#"{"user_id":"mallory"}"#).collect();
        cases.push((
            "connect payload names another user",
            format!(
                "/connect?api_key={KEY}&authorization={}&json={json}",
                user_token("alice")
            ),
            17,
            403,
        ));
        for (what, path, code, status) in cases {
            let (frame, close) = websocket_rejection(&proxy.ws_url(&path)).await;
            assert_stream_error(&frame["error"], code, status, what);
            assert_eq!(close, Some(CloseCode::Normal), "{what}");
        }
    })
    .await;
    assert!(upstream.requests().is_empty());
}

#[tokio::test]
async fn a_valid_websocket_is_proxied_and_frames_flow_both_ways() {
    let (upstream, proxy) = echo_proxy().await;
    within(Duration::from_secs(30), async {
        // Several rounds: the upstream answers the upgrade instantly and speaks first,
        // the timing that breaks tunnels when the 101 races the empty request body.
        for round in 0..5 {
            let url = proxy.ws_url(&format!(
                "/connect?api_key={KEY}&authorization={}&stream-auth-type=jwt",
                user_token("alice")
            ));
            let (mut socket, response) = tokio_tungstenite::connect_async(url).await.unwrap();
            assert_eq!(response.status().as_u16(), 101);
            let greeting = socket.next().await.unwrap().unwrap().into_text().unwrap();
            let greeting: serde_json::Value = serde_json::from_str(&greeting).unwrap();
            assert_eq!(greeting["type"], "health.check");
            for i in 0..3 {
                socket
                    .send(Message::Text(format!("ping {round}.{i}").into()))
                    .await
                    .unwrap();
                let echoed = socket.next().await.unwrap().unwrap();
                assert_eq!(
                    echoed,
                    Message::Text(format!("echo:ping {round}.{i}").into())
                );
            }
            socket.close(None).await.unwrap();
        }
    })
    .await;
    assert_eq!(upstream.requests().len(), 5);
}

/// A WebSocket connected through the proxy as `user`, its greeting read; and its URL.
async fn connected(
    proxy: &Proxy,
    user: &str,
) -> (
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    String,
) {
    let url = proxy.ws_url(&format!(
        "/connect?api_key={KEY}&authorization={}",
        user_token(user)
    ));
    let (mut socket, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    socket.next().await.unwrap().unwrap(); // greeting
    (socket, url)
}

/// Revokes every token `user` holds, through the proxy's `PATCH /users`.
async fn revoke(proxy: &Proxy, user: &str) {
    // one second ahead: tokens minted this second are covered too
    let cutoff = now_unix() + 1;
    let body = format!(
        r#"{{"users":[{{"id":"{user}","set":{{"revoke_tokens_issued_before":{cutoff}}}}}]}}"#
    );
    let response = reqwest::Client::new()
        .patch(proxy.url(&format!("/users?api_key={KEY}")))
        .header("authorization", server_token())
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
}

#[tokio::test]
async fn a_live_websocket_whose_token_is_revoked_is_closed_with_4000_then_refused_with_40() {
    let (_upstream, proxy) = echo_proxy().await;
    within(Duration::from_secs(30), async {
        let (mut socket, url) = connected(&proxy, "rita").await;
        // an answer is on its way from the upstream while the token is revoked
        socket
            .send(Message::Text("later:800:too late".into()))
            .await
            .unwrap();
        revoke(&proxy, "rita").await;
        let next = socket.next().await.expect("a frame").unwrap();
        let Message::Close(Some(close)) = next else {
            panic!("expected the 4000 close instead of the upstream's answer, got {next:?}")
        };
        assert_eq!(u16::from(close.code), 4000);
        assert_eq!(close.reason, "token revoked");
        // what the SDK does next: reconnect, and learn the token must be refreshed
        let (frame, code) = websocket_rejection(&url).await;
        assert_stream_error(&frame["error"], 40, 401, "reconnect with a revoked token");
        assert_eq!(code, Some(CloseCode::Normal));
    })
    .await;
}

#[tokio::test]
async fn a_revoked_client_that_speaks_first_is_cut_off_then_refused_with_40() {
    let (_upstream, proxy) = echo_proxy().await;
    within(Duration::from_secs(30), async {
        let (mut socket, url) = connected(&proxy, "sam").await;
        revoke(&proxy, "sam").await;
        // The watch learns of the revocation asynchronously: keep talking (bounded)
        // until the proxy ends the connection. No echo may follow the end.
        let mut ended = false;
        for i in 0..50 {
            if socket
                .send(Message::Text(format!("said {i}").into()))
                .await
                .is_err()
            {
                ended = true;
                break;
            }
            match socket.next().await {
                Some(Ok(Message::Text(text))) => assert_eq!(text, format!("echo:said {i}")),
                Some(Ok(Message::Close(frame))) => {
                    assert_ne!(frame.map(|f| f.code), Some(CloseCode::Normal));
                    ended = true;
                    break;
                }
                Some(Ok(other)) => panic!("unexpected {other:?}"),
                None | Some(Err(_)) => {
                    ended = true;
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(ended, "the connection outlived the revocation");
        let (frame, _) = websocket_rejection(&url).await;
        assert_stream_error(&frame["error"], 40, 401, "reconnect with a revoked token");
    })
    .await;
}

#[tokio::test]
async fn an_idle_websocket_stays_up_past_60_seconds() {
    let (_upstream, proxy) = echo_proxy().await;
    within(Duration::from_secs(120), async {
        let url = proxy.ws_url(&format!(
            "/connect?api_key={KEY}&authorization={}",
            user_token("alice")
        ));
        let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        socket.next().await.unwrap().unwrap(); // greeting
        // Longer than Pingora's default 60 s body read timeout, with no traffic at all.
        tokio::time::sleep(Duration::from_secs(65)).await;
        socket
            .send(Message::Text("still there?".into()))
            .await
            .unwrap();
        let echoed = socket.next().await.unwrap().unwrap();
        assert_eq!(echoed, Message::Text("echo:still there?".into()));
        let metrics = reqwest::get(proxy.admin_url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(metrics.contains("chatgate_websockets_open 1"), "{metrics}");
    })
    .await;
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_json_502() {
    let dead = format!("127.0.0.1:{}", free_port());
    let proxy = Proxy::start(ProxyOptions {
        upstreams: vec![dead],
        ..ProxyOptions::default()
    })
    .await;
    within(Duration::from_secs(30), async {
        for method in [reqwest::Method::GET, reqwest::Method::POST] {
            let response = reqwest::Client::new()
                .request(
                    method.clone(),
                    proxy.url(&format!("/channels?api_key={KEY}")),
                )
                .header("authorization", user_token("alice"))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status().as_u16(), 502, "{method}");
            let body: serde_json::Value = response.json().await.unwrap();
            assert_stream_error(&body, -1, 502, "upstream down");
        }
    })
    .await;
}

#[tokio::test]
async fn a_silent_upstream_is_a_json_504() {
    let upstream = TestUpstream::start(Behaviour::Silent).await;
    let proxy = Proxy::start(ProxyOptions {
        upstreams: vec![upstream.address.to_string()],
        read_timeout_ms: Some(300),
        ..ProxyOptions::default()
    })
    .await;
    within(Duration::from_secs(30), async {
        let response = reqwest::Client::new()
            .post(proxy.url(&format!("/channels?api_key={KEY}")))
            .header("authorization", user_token("alice"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 504);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_stream_error(&body, -1, 504, "upstream timeout");
    })
    .await;
}

#[tokio::test]
async fn idempotent_requests_to_a_dead_peer_are_retried_on_the_next() {
    let live = TestUpstream::start(Behaviour::Echo).await;
    let dead = format!("127.0.0.1:{}", free_port());
    let proxy = Proxy::start(ProxyOptions {
        upstreams: vec![dead, live.address.to_string()],
        ..ProxyOptions::default()
    })
    .await;
    within(Duration::from_secs(30), async {
        let client = reqwest::Client::new();
        for _ in 0..4 {
            let response = client
                .get(proxy.url(&format!("/channels?api_key={KEY}")))
                .header("authorization", user_token("alice"))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status().as_u16(), 200);
        }
    })
    .await;
    assert_eq!(live.requests().len(), 4);
}

#[tokio::test]
async fn client_sent_identity_headers_never_reach_the_upstream() {
    for forward_identity in [false, true] {
        let (upstream, proxy) = echo_proxy_with(|o| o.forward_identity = forward_identity).await;
        // One token: two calls to user_token can straddle a second and differ in iat.
        let token = user_token("alice");
        within(Duration::from_secs(30), async {
            let response = reqwest::Client::new()
                .get(proxy.url(&format!("/channels?api_key={KEY}")))
                .header("authorization", &token)
                .header("x-chatgate-user-id", "mallory")
                .header("x-chatgate-auth", "server")
                .send()
                .await
                .unwrap();
            assert_eq!(response.status().as_u16(), 200);
        })
        .await;
        let seen = upstream.requests();
        assert_eq!(seen.len(), 1);
        let headers = &seen[0].headers;
        // The original token always goes upstream unchanged.
        assert_eq!(headers["authorization"], token);
        if forward_identity {
            assert_eq!(headers["x-chatgate-user-id"], "alice");
            assert_eq!(headers["x-chatgate-auth"], "user");
        } else {
            assert!(!headers.contains_key("x-chatgate-user-id"), "{headers:?}");
            assert!(!headers.contains_key("x-chatgate-auth"), "{headers:?}");
        }
    }
}

#[tokio::test]
async fn a_revocation_is_applied_then_the_same_body_is_forwarded() {
    let (upstream, proxy) = echo_proxy().await;
    let client = reqwest::Client::new();
    let old = TokenBuilder::user("u1")
        .issued_at(now_unix() - 100)
        .sign(SECRET);
    let url = proxy.url(&format!("/channels?api_key={KEY}"));
    within(Duration::from_secs(30), async {
        let before = client
            .get(&url)
            .header("authorization", &old)
            .send()
            .await
            .unwrap();
        assert_eq!(before.status().as_u16(), 200);
        let cutoff = chrono::DateTime::from_timestamp(now_unix(), 0)
            .unwrap()
            .to_rfc3339();
        let body = format!(
            r#"{{"users":[{{"id":"u1","set":{{"revoke_tokens_issued_before":"{cutoff}","name":"kept for the API"}}}}]}}"#
        );
        let response = client
            .patch(proxy.url(&format!("/users?api_key={KEY}")))
            .header("authorization", server_token())
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
        let echoed: serde_json::Value = response.json().await.unwrap();
        assert_eq!(echoed["method"], "PATCH");
        let forwarded = upstream
            .requests()
            .into_iter()
            .find(|r| r.method == "PATCH")
            .expect("the PATCH reached the upstream");
        assert_eq!(String::from_utf8(forwarded.body).unwrap(), body);
        let after = client
            .get(&url)
            .header("authorization", &old)
            .send()
            .await
            .unwrap();
        assert_eq!(after.status().as_u16(), 401);
        let error: serde_json::Value = after.json().await.unwrap();
        assert_eq!(error["code"], 40);
        // a bad body is refused before anything is forwarded
        let bad = client
            .patch(proxy.url(&format!("/users?api_key={KEY}")))
            .header("authorization", server_token())
            .body("not json")
            .send()
            .await
            .unwrap();
        assert_eq!(bad.status().as_u16(), 400);
        let error: serde_json::Value = bad.json().await.unwrap();
        assert_eq!(error["code"], 4);
    })
    .await;
    assert_eq!(
        upstream
            .requests()
            .iter()
            .filter(|r| r.method == "PATCH")
            .count(),
        1
    );
}

/// Reads one HTTP/1.1 response with a Content-Length body from a raw socket.
async fn read_response(stream: &mut tokio::net::TcpStream, buffer: &mut Vec<u8>) -> (u16, String) {
    let head_end = loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed before a response");
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).to_ascii_lowercase();
    let status: u16 = head[9..12].parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0);
    while buffer.len() < head_end + length {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed inside a body");
        buffer.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buffer[head_end..head_end + length]).to_string();
    buffer.drain(..head_end + length);
    (status, body)
}

#[tokio::test]
async fn the_client_connection_stays_open_after_a_rejection() {
    let (_upstream, proxy) = echo_proxy().await;
    within(Duration::from_secs(30), async {
        let mut stream = tokio::net::TcpStream::connect(proxy.address).await.unwrap();
        let mut buffer = Vec::new();
        // The refused request even carries a body the proxy must skip.
        let refused = format!(
            "POST /channels?api_key={KEY} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
        );
        stream.write_all(refused.as_bytes()).await.unwrap();
        let (status, body) = read_response(&mut stream, &mut buffer).await;
        assert_eq!(status, 401, "{body}");
        let allowed = format!(
            "GET /channels?api_key={KEY} HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\r\n",
            user_token("alice")
        );
        stream.write_all(allowed.as_bytes()).await.unwrap();
        let (status, body) = read_response(&mut stream, &mut buffer).await;
        assert_eq!(status, 200, "{body}");
    })
    .await;
}

#[tokio::test]
async fn admin_endpoints_report_health_readiness_metrics_and_config() {
    let (_upstream, proxy) = echo_proxy().await;
    within(Duration::from_secs(30), async {
        let client = reqwest::Client::new();
        client
            .get(proxy.url(&format!("/channels?api_key={KEY}")))
            .send()
            .await
            .unwrap();
        let health = client
            .get(proxy.admin_url("/healthz"))
            .send()
            .await
            .unwrap();
        assert_eq!(health.status().as_u16(), 200);
        let ready = client.get(proxy.admin_url("/readyz")).send().await.unwrap();
        assert_eq!(ready.status().as_u16(), 200);
        let metrics = client
            .get(proxy.admin_url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            metrics.contains(
                r#"chatgate_requests_denied_total{app="key",code="5",reason="malformed"} 1"#
            ),
            "{metrics}"
        );
        assert!(metrics.contains("chatgate_check_duration_seconds_count 1"));
        let config: serde_json::Value = client
            .get(proxy.admin_url("/config"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(config["content_hash"].is_string());
        assert!(config["loaded_at"].is_string());
    })
    .await;
}

#[tokio::test]
async fn sigquit_hands_the_listener_to_a_new_instance_without_failing_a_request() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let mut old = Proxy::start(ProxyOptions {
        upstreams: vec![upstream.address.to_string()],
        ..ProxyOptions::default()
    })
    .await;
    let _ = std::fs::remove_file(old.upgrade_sock());
    let mut successor = old.start_successor();
    // the successor waits for the sockets on the handover socket
    within(STEP, async {
        while !old.upgrade_sock().exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // A new connection for every request, the whole time: none may be refused or fail.
    let url = old.url(&format!("/channels?api_key={KEY}"));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let load = tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        let token = user_token("alice");
        let mut outcomes = Vec::new();
        // bounded: at most 3,000 requests, 10 ms apart
        for _ in 0..3_000 {
            if *stopped.borrow() {
                break;
            }
            let outcome = client
                .get(&url)
                .header("authorization", &token)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .map_err(|e| e.to_string());
            outcomes.push(outcome);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        outcomes
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    old.quit();
    // grace period (3 s) plus Pingora's runtime shutdown
    old.wait_exit(Duration::from_secs(20)).await;
    assert!(successor.running(), "the new instance is still serving");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.send(true).unwrap();
    let outcomes = within(STEP, load).await.unwrap();
    let failed: Vec<_> = outcomes.iter().filter(|o| **o != Ok(200)).collect();
    assert!(
        outcomes.len() > 100,
        "only {} requests made",
        outcomes.len()
    );
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        outcomes.len()
    );
    // the new instance takes the admin port over once the old one has gone
    within(STEP, async {
        loop {
            match reqwest::get(old.admin_url("/healthz")).await {
                Ok(response) if response.status() == 200 => break,
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await;
}

#[tokio::test]
async fn sigterm_lets_in_flight_requests_finish_then_exits() {
    let upstream = TestUpstream::start(Behaviour::Slow).await;
    let mut proxy = Proxy::start(ProxyOptions {
        upstreams: vec![upstream.address.to_string()],
        ..ProxyOptions::default()
    })
    .await;
    let url = proxy.url(&format!("/channels?api_key={KEY}"));
    let in_flight = tokio::spawn(async move {
        reqwest::Client::new()
            .get(url)
            .header("authorization", user_token("alice"))
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    // Terminate once the request is at the upstream, well before it is answered.
    within(STEP, async {
        while upstream.requests().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    proxy.terminate();
    let status = within(STEP, in_flight).await.unwrap();
    assert_eq!(status.unwrap(), 200);
    // grace period (3 s) plus Pingora's runtime shutdown
    proxy.wait_exit(Duration::from_secs(20)).await;
}

#[tokio::test]
async fn a_config_reload_reaches_the_running_proxy() {
    let (_upstream, mut proxy) = echo_proxy().await;
    let client = reqwest::Client::new();
    let token = chatgate::TokenBuilder::user("alice").sign("new-secret");
    let url = proxy.url("/channels?api_key=newkey");
    within(Duration::from_secs(30), async {
        let before = client
            .get(&url)
            .header("authorization", &token)
            .send()
            .await
            .unwrap();
        assert_eq!(before.status().as_u16(), 401);
        proxy.append_config("[[apps]]\napi_key = \"newkey\"\nsecrets = [\"new-secret\"]\n");
        // The watcher debounces; poll the admin status until the new version is live.
        let mut version = serde_json::Value::Null;
        for _ in 0..200 {
            let status: serde_json::Value = client
                .get(proxy.admin_url("/config"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            version = status["version"].clone();
            if version == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(version, 2, "the edit was never applied");
        let after = client
            .get(&url)
            .header("authorization", &token)
            .send()
            .await
            .unwrap();
        assert_eq!(after.status().as_u16(), 200);
    })
    .await;
}

/// The layer's options are the gate's `Policy`; `chatgate serve`'s TOML says each of
/// them (the mapping is in `src/gate/policy.rs`): the `[[apps]]` list for `only_apps`,
/// each app's `allow_anonymous` for the anonymous override, `[auth] public_paths` for
/// extra public paths.
#[tokio::test]
async fn the_proxy_config_says_what_the_layer_options_say() {
    let (upstream, mut proxy) = echo_proxy().await;
    let client = reqwest::Client::new();
    let status = |request: reqwest::RequestBuilder| async move {
        request.send().await.unwrap().status().as_u16()
    };
    within(Duration::from_secs(30), async {
        // only_apps: an app the file does not list is unknown (code 2, 401).
        let stranger = chatgate::TokenBuilder::user("alice").sign("other-secret");
        let get = |url: String| client.get(url);
        let unknown = get(proxy.url("/channels?api_key=elsewhere"))
            .header("authorization", &stranger)
            .send()
            .await
            .unwrap();
        assert_eq!(unknown.status().as_u16(), 401);
        let body: serde_json::Value = unknown.json().await.unwrap();
        assert_eq!(body["code"], 2);
        let listed = get(proxy.url(&format!("/channels?api_key={KEY}")))
            .header("authorization", user_token("alice"));
        assert_eq!(status(listed).await, 200);

        // allow_anonymous, per app: refused (code 5) where false, admitted where true.
        let anonymous = |key: &str| {
            get(proxy.url(&format!("/channels?api_key={key}")))
                .header("stream-auth-type", "anonymous")
        };
        let refused = anonymous(KEY).send().await.unwrap();
        assert_eq!(refused.status().as_u16(), 401);
        let body: serde_json::Value = refused.json().await.unwrap();
        assert_eq!(body["code"], 5);
        assert_eq!(status(anonymous(DEV_KEY)).await, 200);

        // public_path: not public until [auth] public_paths names it.
        assert_eq!(status(get(proxy.url("/static/app.js"))).await, 401);
        proxy.append_config("[auth]\npublic_paths = [\"/healthz\", \"/static/*\"]\n");
        let mut public = 0;
        for _ in 0..200 {
            public = status(get(proxy.url("/static/app.js"))).await;
            if public == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(public, 200, "[auth] public_paths was never applied");
        assert_eq!(status(get(proxy.url("/channels"))).await, 401);
    })
    .await;
    let forwarded: Vec<String> = upstream.requests().into_iter().map(|r| r.target).collect();
    assert!(
        forwarded.contains(&"/static/app.js".to_owned()),
        "{forwarded:?}"
    );
    assert!(
        !forwarded.iter().any(|t| t.contains("elsewhere")),
        "{forwarded:?}"
    );
}

#[tokio::test]
async fn a_websocket_idle_longer_than_the_configured_timeout_is_closed() {
    let (_upstream, proxy) = echo_proxy_with(|o| o.websocket_idle_timeout_seconds = Some(1)).await;
    within(Duration::from_secs(30), async {
        let url = proxy.ws_url(&format!(
            "/connect?api_key={KEY}&authorization={}",
            user_token("alice")
        ));
        let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        socket.next().await.unwrap().unwrap(); // greeting
        // Silent past the 1 s idle limit: the proxy ends the tunnel by itself.
        let end = socket.next().await;
        assert!(
            !matches!(end, Some(Ok(Message::Text(_)))),
            "expected the socket to end, got {end:?}"
        );
    })
    .await;
}

/// `openssl s_server -www` on loopback with a fresh self-signed certificate: a TLS
/// upstream that answers any GET with a status page. Killed on drop.
struct TlsUpstream {
    address: std::net::SocketAddr,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh self-signed certificate for `localhost` (`cert.pem`, `key.pem`) in a
/// directory of its own, made by the openssl command line tool.
fn self_signed_localhost() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-subj",
            "/CN=localhost",
            "-keyout",
            "key.pem",
            "-out",
            "cert.pem",
        ])
        .current_dir(dir.path())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("the openssl command line tool is installed");
    assert!(status.success());
    dir
}

async fn tls_upstream() -> TlsUpstream {
    let dir = self_signed_localhost();
    let port = free_port();
    let child = std::process::Command::new("openssl")
        .args([
            "s_server", "-quiet", "-www", "-cert", "cert.pem", "-key", "key.pem",
        ])
        .arg("-accept")
        .arg(format!("127.0.0.1:{port}"))
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let upstream = TlsUpstream {
        address,
        child,
        _dir: dir,
    };
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(address).await.is_ok() {
            return upstream;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("openssl s_server did not start");
}

#[tokio::test]
async fn a_tls_upstream_is_reached_over_tls_and_its_certificate_checked_when_asked() {
    let upstream = tls_upstream().await;
    for (verify_cert, expected) in [(false, 200), (true, 502)] {
        let proxy = Proxy::start(ProxyOptions {
            upstreams: vec![upstream.address.to_string()],
            tls: Some(("localhost".into(), verify_cert)),
            ..ProxyOptions::default()
        })
        .await;
        within(Duration::from_secs(30), async {
            let response = reqwest::Client::new()
                .get(proxy.url(&format!("/channels?api_key={KEY}")))
                .header("authorization", user_token("alice"))
                .send()
                .await
                .unwrap();
            assert_eq!(
                response.status().as_u16(),
                expected,
                "verify_cert = {verify_cert}"
            );
            let body = response.text().await.unwrap();
            if expected == 200 {
                // Only a TLS handshake gets s_server's page; plain HTTP would fail.
                assert!(body.contains("s_server"), "{body}");
            } else {
                // A self-signed certificate fails verification: the JSON 502.
                assert!(body.contains(r#""code":-1"#), "{body}");
            }
        })
        .await;
    }
}

/// A WebSocket upstream over TLS (as Stream's own API is): a fresh self-signed
/// certificate, one std thread per connection (openssl's blocking `SslStream`), which
/// reads the upgrade request, answers `101` with a text frame `hello` in the same
/// write, then echoes each masked client text frame back unmasked until the client
/// closes. Every read is bounded by a socket timeout.
struct TlsWebSocketUpstream {
    address: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

fn tls_websocket_upstream() -> TlsWebSocketUpstream {
    use openssl::ssl::{SslAcceptor, SslFiletype, SslMethod};
    use std::io::{Read, Write};
    let dir = self_signed_localhost();
    let mut acceptor = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).unwrap();
    acceptor
        .set_private_key_file(dir.path().join("key.pem"), SslFiletype::PEM)
        .unwrap();
    acceptor
        .set_certificate_chain_file(dir.path().join("cert.pem"))
        .unwrap();
    let acceptor = std::sync::Arc::new(acceptor.build());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for socket in listener.incoming() {
            let Ok(socket) = socket else { return };
            let acceptor = acceptor.clone();
            std::thread::spawn(move || {
                socket
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                let Ok(mut tls) = acceptor.accept(socket) else {
                    return;
                };
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if tls.read(&mut byte).unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let mut answer = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n".to_vec();
                answer.extend_from_slice(b"\x81\x05hello");
                if tls.write_all(&answer).is_err() {
                    return;
                }
                // Masked client text frames of under 126 bytes, echoed unmasked.
                loop {
                    let mut header = [0u8; 6];
                    if tls.read_exact(&mut header).is_err() {
                        return;
                    }
                    let length = usize::from(header[1] & 0x7f);
                    let mut payload = vec![0u8; length];
                    if tls.read_exact(&mut payload).is_err() {
                        return;
                    }
                    for (i, b) in payload.iter_mut().enumerate() {
                        *b ^= header[2 + i % 4];
                    }
                    let mut frame = vec![0x81, length as u8];
                    frame.extend_from_slice(&payload);
                    if tls.write_all(&frame).is_err() {
                        return;
                    }
                }
            });
        }
    });
    TlsWebSocketUpstream { address, _dir: dir }
}

/// Stream's own API is reached over TLS: a WebSocket relayed to a TLS upstream gets the
/// upstream's 101 with the frame that came with it, and frames both ways after it (the
/// handshake and the relay over the TLS stream, not the bare socket of a plain one).
#[tokio::test]
async fn a_websocket_to_a_tls_upstream_is_relayed_both_ways() {
    let upstream = tls_websocket_upstream();
    let proxy = Proxy::start(ProxyOptions {
        upstreams: vec![upstream.address.to_string()],
        tls: Some(("localhost".into(), false)),
        ..ProxyOptions::default()
    })
    .await;
    within(Duration::from_secs(30), async {
        for round in 0..3 {
            let mut stream = tokio::net::TcpStream::connect(proxy.address).await.unwrap();
            let request = format!(
                "GET /connect?api_key={KEY}&authorization={} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                user_token("alice")
            );
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut seen = Vec::new();
            // The 101 and the upstream's greeting behind it.
            while !seen.ends_with(b"\x81\x05hello") {
                let mut chunk = [0u8; 4096];
                let n = stream.read(&mut chunk).await.unwrap();
                assert!(n > 0, "closed before the greeting: {}", String::from_utf8_lossy(&seen));
                seen.extend_from_slice(&chunk[..n]);
            }
            assert!(seen.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&seen));
            let text = format!("round {round}");
            stream.write_all(&masked_text_frame(text.as_bytes())).await.unwrap();
            let mut echo = vec![0u8; 2 + text.len()];
            stream.read_exact(&mut echo).await.unwrap();
            assert_eq!(&echo[2..], text.as_bytes());
        }
    })
    .await;
}

/// A masked client text frame (RFC 6455 §5.3), for writing by hand.
fn masked_text_frame(payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    let mut frame = vec![0x81, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

#[tokio::test]
async fn a_frame_sent_right_behind_the_upgrade_request_is_not_lost() {
    let (_upstream, proxy) = echo_proxy().await;
    within(Duration::from_secs(30), async {
        for round in 0..5 {
            let mut stream = tokio::net::TcpStream::connect(proxy.address).await.unwrap();
            // Handshake and first frame in one write, before the 101 could arrive: the
            // proxy must not mistake the frame for a request body or drop it.
            let mut bytes = format!(
                "GET /connect?api_key={KEY}&authorization={} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                user_token("alice")
            )
            .into_bytes();
            bytes.extend(masked_text_frame(format!("early {round}").as_bytes()));
            stream.write_all(&bytes).await.unwrap();
            let mut seen = Vec::new();
            let wanted = format!("echo:early {round}");
            // Read until the echo shows up (101, greeting, echo), bounded by `within`.
            while !String::from_utf8_lossy(&seen).contains(&wanted) {
                let mut chunk = [0u8; 4096];
                let n = stream.read(&mut chunk).await.unwrap();
                assert!(n > 0, "closed before the echo: {}", String::from_utf8_lossy(&seen));
                seen.extend_from_slice(&chunk[..n]);
            }
            assert!(seen.starts_with(b"HTTP/1.1 101"));
        }
    })
    .await;
}

#[tokio::test]
async fn demo_mode_serves_the_demo_chat_api_behind_the_proxy() {
    let proxy = Proxy::start(ProxyOptions {
        upstreams: vec![format!("127.0.0.1:{}", free_port())],
        demo: true,
        ..ProxyOptions::default()
    })
    .await;
    within(Duration::from_secs(30), async {
        let client = reqwest::Client::new();
        let url = proxy.url(&format!("/channels?api_key={KEY}"));
        // The demo API may take a moment after the proxy listens.
        let mut status = 0;
        for _ in 0..100 {
            let response = client
                .get(&url)
                .header("authorization", user_token("alice"))
                .send()
                .await
                .unwrap();
            status = response.status().as_u16();
            if status == 200 {
                let body: serde_json::Value = response.json().await.unwrap();
                assert!(body["channels"].is_array(), "{body}");
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(status, 200);
        let refused = client.get(&url).send().await.unwrap();
        assert_eq!(refused.status().as_u16(), 401);
        let json: String = form_urlencoded::byte_serialize(br#"{"user_id":"alice"}"#).collect();
        let ws = proxy.ws_url(&format!(
            "/connect?api_key={KEY}&authorization={}&json={json}",
            user_token("alice")
        ));
        let (mut socket, _) = tokio_tungstenite::connect_async(ws).await.unwrap();
        let first = socket.next().await.unwrap().unwrap().into_text().unwrap();
        let first: serde_json::Value = serde_json::from_str(&first).unwrap();
        assert_eq!(first["type"], "health.check", "{first}");
        assert_eq!(first["me"]["id"], "alice", "{first}");
    })
    .await;
}

/// An upstream for WebSocket handshakes: reads each connection's request head, answers
/// with `answer(head)`, then keeps the connection until the proxy closes it (a
/// connection that sends no head, such as a readiness probe, is dropped). Returns its
/// address and the first head it received.
async fn one_handshake_upstream(
    answer: fn(&str) -> String,
) -> (std::net::SocketAddr, tokio::sync::oneshot::Receiver<String>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (sender, received) = tokio::sync::oneshot::channel();
    let sender = std::sync::Arc::new(std::sync::Mutex::new(Some(sender)));
    tokio::spawn(async move {
        // Ends with the test's runtime.
        while let Ok((mut stream, _)) = listener.accept().await {
            let sender = sender.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8(head).unwrap();
                stream.write_all(answer(&head).as_bytes()).await.unwrap();
                if let Some(sender) = sender.lock().unwrap().take() {
                    let _ = sender.send(head);
                }
                let mut rest = [0u8; 1024];
                while stream.read(&mut rest).await.unwrap_or(0) > 0 {}
            });
        }
    });
    (address, received)
}

/// A raw upgrade request for `/connect` with alice's token and `extra` header lines.
fn raw_upgrade(extra: &str) -> String {
    format!(
        "GET /connect?api_key={KEY}&authorization={} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n",
        user_token("alice")
    )
}

/// Everything the proxy sends until it closes the connection (bounded by `within`).
async fn read_until_closed(stream: &mut tokio::net::TcpStream) -> String {
    let mut seen = Vec::new();
    stream.read_to_end(&mut seen).await.unwrap();
    String::from_utf8_lossy(&seen).into_owned()
}

#[tokio::test]
async fn an_upstream_refusing_an_upgrade_is_answered_as_http_and_the_connection_closes() {
    let (address, _head) = one_handshake_upstream(|_| {
        "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 7\r\n\r\nno room"
            .into()
    })
    .await;
    let proxy = Proxy::start(ProxyOptions {
        upstreams: vec![address.to_string()],
        ..ProxyOptions::default()
    })
    .await;
    within(Duration::from_secs(30), async {
        let mut stream = tokio::net::TcpStream::connect(proxy.address).await.unwrap();
        stream.write_all(raw_upgrade("").as_bytes()).await.unwrap();
        let answer = read_until_closed(&mut stream).await;
        assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
        assert!(answer.ends_with("\r\n\r\nno room"), "{answer}");
    })
    .await;
}

#[tokio::test]
async fn an_upgrade_reaches_the_upstream_with_its_upgrade_headers_and_no_hop_by_hop_or_forged_ones()
{
    let (address, head) = one_handshake_upstream(|head| {
        let key = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .starts_with("sec-websocket-key:")
                    .then(|| l.split_once(':').unwrap().1.trim().to_owned())
            })
            .unwrap();
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
            chatgate::ws::accept_key(key.as_bytes())
        )
    })
    .await;
    let proxy = Proxy::start(ProxyOptions {
        upstreams: vec![address.to_string()],
        forward_identity: true,
        ..ProxyOptions::default()
    })
    .await;
    within(Duration::from_secs(30), async {
        let mut stream = tokio::net::TcpStream::connect(proxy.address).await.unwrap();
        let request = raw_upgrade(
            "Connection: X-Nominated\r\nX-Nominated: 1\r\nKeep-Alive: timeout=5\r\nX-Chatgate-User-Id: mallory\r\nx_chatgate_auth: server\r\n",
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = [0u8; 12];
        stream.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"HTTP/1.1 101");
        let head = head.await.unwrap().to_ascii_lowercase();
        assert!(head.starts_with("get /connect?api_key="), "{head}");
        assert!(head.contains("\r\nconnection: upgrade\r\n"), "{head}");
        assert!(head.contains("\r\nupgrade: websocket\r\n"), "{head}");
        assert!(head.contains("\r\nsec-websocket-key: dghlihnhbxbszsbub25jzq==\r\n"), "{head}");
        assert!(head.contains("\r\nx-chatgate-user-id: alice\r\n"), "{head}");
        assert!(head.contains("\r\nx-chatgate-auth: user\r\n"), "{head}");
        for gone in ["x-nominated", "keep-alive", "mallory", "x_chatgate_auth"] {
            assert!(!head.contains(gone), "{gone} reached the upstream: {head}");
        }
    })
    .await;
}

#[tokio::test]
async fn an_upgrade_whose_upstream_is_down_is_a_json_502_and_the_connection_closes() {
    let dead = format!("127.0.0.1:{}", free_port());
    let proxy = Proxy::start(ProxyOptions {
        upstreams: vec![dead],
        ..ProxyOptions::default()
    })
    .await;
    within(Duration::from_secs(30), async {
        let mut stream = tokio::net::TcpStream::connect(proxy.address).await.unwrap();
        stream.write_all(raw_upgrade("").as_bytes()).await.unwrap();
        let answer = read_until_closed(&mut stream).await;
        assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
        let (_, body) = answer.split_once("\r\n\r\n").unwrap();
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_stream_error(&body, -1, 502, "upstream down");
    })
    .await;
}
