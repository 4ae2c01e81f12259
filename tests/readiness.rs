//! Honest readiness and shutdown, through the `chatgate` binary: `/readyz` is 200 only
//! while the proxy's listener accepts and some upstream accepts a connection (503
//! naming the upstream while none does, 200 again when it is back), 503 `draining` (on
//! a still-open admin port) after SIGTERM, and a listen port that cannot be bound ends
//! the process at once with the address in the message and a non-zero exit.

#[path = "common/proxy_harness.rs"]
mod harness;

use harness::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The proxy in front of `upstream`, and a client whose every request is bounded.
async fn proxy_before(upstream: &TestUpstream) -> (Proxy, reqwest::Client) {
    let proxy = Proxy::start(ProxyOptions {
        upstreams: vec![upstream.address.to_string()],
        ..ProxyOptions::default()
    })
    .await;
    let client = reqwest::Client::builder().timeout(STEP).build().unwrap();
    (proxy, client)
}

#[tokio::test]
async fn readyz_checks_the_listener_and_turns_503_draining_while_the_admin_port_stays_up() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let (mut proxy, client) = proxy_before(&upstream).await;
    let ready = client.get(proxy.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(
        (&body["listener"], &body["draining"]),
        (&"ok".into(), &false.into())
    );

    proxy.terminate();
    // The harness's grace period is 3 s: the admin port answers through it.
    let deadline = Instant::now() + Duration::from_secs(2);
    // Pingora may close the proxy's listener a moment before the admin service sees the
    // shutdown: that first 503 names the listener; wait for the one that says draining.
    let body = loop {
        let response = client.get(proxy.admin_url("/readyz")).send().await.unwrap();
        if response.status() == 503 {
            let body = response.json::<serde_json::Value>().await.unwrap();
            if body["draining"] == true {
                break body;
            }
        }
        assert!(
            Instant::now() < deadline,
            "/readyz not 503 draining within 2 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        (&body["ready"], &body["draining"]),
        (&false.into(), &true.into())
    );
    let health = client
        .get(proxy.admin_url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        health.status(),
        200,
        "the admin listener is up during the drain"
    );
    let status = proxy.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "{status}");
}

/// Polls `/readyz` until `wanted` holds for its status and body, at most `limit`.
async fn readyz_until(
    client: &reqwest::Client,
    proxy: &Proxy,
    limit: Duration,
    wanted: impl Fn(u16, &serde_json::Value) -> bool,
) -> (u16, serde_json::Value) {
    let deadline = Instant::now() + limit;
    loop {
        let response = client.get(proxy.admin_url("/readyz")).send().await.unwrap();
        let status = response.status().as_u16();
        let body: serde_json::Value = response.json().await.unwrap();
        if wanted(status, &body) {
            return (status, body);
        }
        assert!(
            Instant::now() < deadline,
            "/readyz not as wanted within {limit:?}; last: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn metrics(client: &reqwest::Client, proxy: &Proxy) -> String {
    let response = client
        .get(proxy.admin_url("/metrics"))
        .send()
        .await
        .unwrap();
    response.text().await.unwrap()
}

#[tokio::test]
async fn readyz_is_503_naming_the_upstream_while_it_refuses_and_200_when_it_is_back() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let address = upstream.address;
    let (proxy, client) = proxy_before(&upstream).await;
    // Right from the start: the first probe ran before the admin port answered.
    let ready = client.get(proxy.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["upstream"], "ok", "{body}");
    let series = format!("chatgate_upstream_up{{upstream=\"{address}\"}}");
    let text = metrics(&client, &proxy).await;
    assert!(text.contains(&format!("{series} 1")), "{text}");

    // Probes every second, two failed rounds in a row to turn unready: well within 10 s.
    drop(upstream);
    let (status, body) = readyz_until(&client, &proxy, Duration::from_secs(10), |status, _| {
        status == 503
    })
    .await;
    assert_eq!(status, 503);
    let reason = body["upstream"].as_str().unwrap();
    assert!(
        reason.contains("no upstream accepts") && reason.contains(&address.to_string()),
        "{body}"
    );
    assert_eq!(
        (&body["listener"], &body["store"], &body["draining"]),
        (&"ok".into(), &"ok".into(), &false.into()),
        "only the upstream is wrong: {body}"
    );
    let text = metrics(&client, &proxy).await;
    assert!(text.contains(&format!("{series} 0")), "{text}");

    let _back = TestUpstream::start_at(Behaviour::Echo, address).await;
    let (_, body) = readyz_until(&client, &proxy, Duration::from_secs(10), |status, _| {
        status == 200
    })
    .await;
    assert_eq!(
        (&body["ready"], &body["upstream"]),
        (&true.into(), &"ok".into())
    );
    let text = metrics(&client, &proxy).await;
    assert!(text.contains(&format!("{series} 1")), "{text}");
}

#[tokio::test]
async fn a_busy_listen_port_ends_the_process_with_the_address_and_a_failure_status() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = busy.local_addr().unwrap();
    let config = format!(
        "[server]\nlisten = \"{address}\"\nadmin_listen = \"off\"\nthreads = 1\n\
         [upstream]\naddresses = [\"127.0.0.1:9\"]\n\
         [revocation]\nstore = \"memory\"\n\
         [[apps]]\napi_key = \"k\"\nsecrets = [\"s\"]\n"
    );
    let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(file.path(), with_test_engine(&config)).unwrap();
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_chatgate"))
        .args(["serve", "--config"])
        .arg(file.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the chatgate binary runs");
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > STEP {
            let _ = child.kill();
            panic!("chatgate kept running with its listen port taken");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!status.success());
    assert!(
        stderr.contains(&address.to_string()) && stderr.contains("[server] listen"),
        "{stderr}"
    );
    drop(busy);
}
