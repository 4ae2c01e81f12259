//! The upstream fails under a request: killed, reset, slow, or cut off mid-body.
//!
//! What the contract (§4) and the README promise: before the response head is sent the
//! client gets Stream JSON, `502` (unreachable, closed, reset) or `504` (no answer within
//! `read_timeout_ms`), code -1; after it, HTTP can only close the connection, and it must
//! be closed — never a hang, never a body that looks complete. A regression shows up as
//! a timeout here (a hang), an empty reply or a non-JSON 5xx, or a body read that succeeds.

use super::harness::*;
use std::time::{Duration, Instant};

/// Read timeout of the proxies here: what bounds every wait on a silent upstream.
const READ_TIMEOUT: Duration = Duration::from_millis(400);

async fn proxy_in_front_of(upstream: &TestUpstream) -> Proxy {
    Proxy::start(ProxyOptions {
        upstreams: vec![upstream.address.to_string()],
        read_timeout_ms: Some(READ_TIMEOUT.as_millis() as u64),
        ..ProxyOptions::default()
    })
    .await
}

fn client() -> reqwest::Client {
    // The client's own timeout is far above the proxy's: if it fires, the proxy hung.
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// One request through `proxy` per method: the status, the JSON body, and how long the
/// answer took.
async fn answers(proxy: &Proxy) -> Vec<(reqwest::Method, u16, serde_json::Value, Duration)> {
    let mut out = Vec::new();
    for method in [reqwest::Method::GET, reqwest::Method::POST] {
        let started = Instant::now();
        let response = client()
            .request(
                method.clone(),
                proxy.url(&format!("/channels?api_key={KEY}")),
            )
            .header("authorization", user_token("alice"))
            .body("{}")
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method}: no answer at all: {e}"));
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(
            content_type.as_deref(),
            Some("application/json"),
            "{method}"
        );
        let body: serde_json::Value = response.json().await.unwrap();
        out.push((method, status, body, started.elapsed()));
    }
    out
}

#[tokio::test]
async fn an_upstream_that_closes_or_resets_before_answering_is_a_json_502() {
    for behaviour in [Behaviour::CloseBeforeAnswer, Behaviour::ResetBeforeAnswer] {
        let upstream = TestUpstream::start(behaviour).await;
        let proxy = proxy_in_front_of(&upstream).await;
        within(Duration::from_secs(30), async {
            for (method, status, body, took) in answers(&proxy).await {
                assert_eq!(status, 502, "{behaviour:?} {method}: {body}");
                let message = assert_stream_error(&body, -1, 502);
                assert_eq!(message, "upstream unavailable", "{behaviour:?} {method}");
                // It failed at once: nothing waited for a timeout.
                assert!(took < READ_TIMEOUT, "{behaviour:?} {method}: took {took:?}");
            }
        })
        .await;
        // The request did reach the upstream: this is a failure mid-request, not a refused connect.
        assert!(!upstream.requests().is_empty(), "{behaviour:?}");
    }
}

#[tokio::test]
async fn a_slow_upstream_is_a_json_504_at_read_timeout_and_no_later() {
    let upstream = TestUpstream::start(Behaviour::Slow).await;
    let proxy = proxy_in_front_of(&upstream).await;
    within(Duration::from_secs(30), async {
        for (method, status, body, took) in answers(&proxy).await {
            assert_eq!(status, 504, "{method}: {body}");
            let message = assert_stream_error(&body, -1, 504);
            assert_eq!(message, "upstream timed out", "{method}");
            // Answered by the proxy's timeout, well before the upstream would have answered.
            assert!(
                took >= READ_TIMEOUT && took < SLOW_ANSWER,
                "{method}: took {took:?} (read timeout {READ_TIMEOUT:?}, upstream answers after {SLOW_ANSWER:?})"
            );
        }
    })
    .await;
}

/// Reads a response whose head announces `FAULT_BODY_LEN` bytes: the status, the body
/// bytes that arrived, whether the body read failed, and when it ended.
async fn cut_response(proxy: &Proxy) -> (u16, usize, bool, Duration) {
    let started = Instant::now();
    let mut response = client()
        .get(proxy.url(&format!("/channels?api_key={KEY}")))
        .header("authorization", user_token("alice"))
        .send()
        .await
        .expect("the head arrives");
    let status = response.status().as_u16();
    let mut received = 0;
    let failed = loop {
        match response.chunk().await {
            Ok(Some(chunk)) => received += chunk.len(),
            Ok(None) => break false,
            Err(_) => break true,
        }
    };
    (status, received, failed, started.elapsed())
}

#[tokio::test]
async fn an_upstream_cut_off_mid_body_closes_the_client_connection_not_a_complete_body() {
    for behaviour in [
        Behaviour::ResetMidBody,
        Behaviour::CloseMidBody,
        Behaviour::StallMidBody,
    ] {
        let upstream = TestUpstream::start(behaviour).await;
        let proxy = proxy_in_front_of(&upstream).await;
        let (status, received, failed, took) =
            within(Duration::from_secs(30), cut_response(&proxy)).await;
        // The head was already on its way: the status is the upstream's.
        assert_eq!(status, 200, "{behaviour:?}");
        assert!(
            received < FAULT_BODY_LEN,
            "{behaviour:?}: {received} bytes, all that was announced"
        );
        // A body that ends cleanly short of what was announced would be a silent
        // truncation: the client must see the connection fail.
        assert!(
            failed,
            "{behaviour:?}: the body ended as if complete after {received} of {FAULT_BODY_LEN} bytes"
        );
        // A stalled body ends at the read timeout (plus scheduling), not at the client's.
        assert!(
            took < READ_TIMEOUT * 10,
            "{behaviour:?}: the cut took {took:?}"
        );
    }
}

/// A Python upstream in its own process: answers the head and half the body, then waits
/// to be killed.
const HALF_THEN_WAIT: &str = r#"
import socket, sys, threading, time
# One thread per connection: the proxy's upstream health check connects and sends nothing,
# and must not hold up the request.
def serve(conn):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return
        data += chunk
    if sys.argv[1] == "mid-body":
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 65536\r\n\r\n" + b"x" * 32768)
    print("reached", flush=True)
    time.sleep(600)
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(8)
print(listener.getsockname()[1], flush=True)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"#;

struct PythonUpstream {
    child: tokio::process::Child,
    stdout: tokio::io::BufReader<tokio::process::ChildStdout>,
    port: u16,
}

impl PythonUpstream {
    async fn start(mode: &str) -> Self {
        use tokio::io::AsyncBufReadExt as _;
        let mut child = tokio::process::Command::new("python3")
            .args(["-c", HALF_THEN_WAIT, mode])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 runs");
        let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        within(Duration::from_secs(10), stdout.read_line(&mut line))
            .await
            .unwrap();
        let port = line.trim().parse().expect("the upstream prints its port");
        PythonUpstream {
            child,
            stdout,
            port,
        }
    }

    /// Waits until the upstream says the request reached it (and, mid-body, that half the
    /// body was sent): a fixed sleep is too short on a loaded machine.
    async fn reached(&mut self) {
        use tokio::io::AsyncBufReadExt as _;
        let mut line = String::new();
        within(Duration::from_secs(10), self.stdout.read_line(&mut line))
            .await
            .unwrap();
        assert_eq!(line.trim(), "reached", "the upstream reports the request");
    }

    async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}

#[tokio::test]
async fn an_upstream_process_killed_mid_request_is_a_502_before_the_head_and_a_cut_after() {
    for mode in ["before-head", "mid-body"] {
        let mut upstream = PythonUpstream::start(mode).await;
        // A long read timeout: only the kill can end these requests in time.
        let proxy = Proxy::start(ProxyOptions {
            upstreams: vec![format!("127.0.0.1:{}", upstream.port)],
            read_timeout_ms: Some(30_000),
            ..ProxyOptions::default()
        })
        .await;
        let request = client()
            .get(proxy.url(&format!("/channels?api_key={KEY}")))
            .header("authorization", user_token("alice"))
            .send();
        let request = tokio::spawn(request);
        // Kill only once the request reached the upstream (and, mid-body, half the body left
        // it).
        upstream.reached().await;
        let killed = Instant::now();
        upstream.kill().await;
        within(Duration::from_secs(10), async {
            let response = request.await.unwrap().expect("the proxy answers");
            let status = response.status().as_u16();
            if mode == "before-head" {
                assert_eq!(status, 502, "{mode}");
                let body: serde_json::Value = response.json().await.unwrap();
                assert_stream_error(&body, -1, 502);
            } else {
                assert_eq!(status, 200, "{mode}");
                let body = response.bytes().await;
                assert!(
                    body.is_err(),
                    "{mode}: a body cut by the kill read as complete ({} bytes)",
                    body.map(|b| b.len()).unwrap_or(0)
                );
            }
        })
        .await;
        // Ended by the kill, not by any timeout.
        assert!(killed.elapsed() < Duration::from_secs(5), "{mode}");
    }
}
