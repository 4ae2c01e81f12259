//! Fault tests (issue 12, item 4): the `chatgate` binary on loopback while what it depends
//! on fails under it — the embedded store's disk, Redis, the upstream, the config file.
//! Each module says what a regression would look like; every test bounds every wait.
//!
//! One test binary, split by subject, so the binary and its harness link once.

#[path = "../common/proxy_harness.rs"]
mod harness;
#[path = "../support/redis_server.rs"]
mod redis_server;

mod config;
mod redis;
mod store;
mod upstream;

use std::time::Duration;

/// Runs `future`, failing the test if it takes longer than `limit` (a hang is a failure).
pub async fn within<T>(limit: Duration, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(limit, future)
        .await
        .unwrap_or_else(|_| panic!("test step did not finish within {limit:?}"))
}

/// Asserts that `body` is the contract's error object (§4) with this code and status,
/// and returns its message.
pub fn assert_stream_error(body: &serde_json::Value, code: i64, status: u16) -> String {
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["StatusCode"], status, "{body}");
    assert!(body["duration"].is_string(), "{body}");
    assert!(body["more_info"].is_string(), "{body}");
    let message = body["message"].as_str().unwrap_or_default().to_owned();
    assert!(!message.is_empty(), "{body}");
    message
}

/// `GET /channels` as `user` through the proxy: the status and the JSON body (if any).
pub async fn get_channels(
    client: &reqwest::Client,
    proxy: &harness::Proxy,
    token: &str,
) -> (u16, serde_json::Value) {
    let response = client
        .get(proxy.url(&format!("/channels?api_key={}", harness::KEY)))
        .header("authorization", token)
        .send()
        .await
        .expect("the proxy answers");
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(serde_json::Value::Null);
    (status, body)
}

/// `PATCH /users` through the proxy with a server token, revoking `users` with `cutoff`
/// (Unix seconds): the status and the JSON body.
pub async fn revoke(
    client: &reqwest::Client,
    proxy: &harness::Proxy,
    users: &[String],
    cutoff: i64,
) -> (u16, serde_json::Value) {
    let at = chrono::DateTime::from_timestamp(cutoff, 0)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let body = serde_json::json!({
        "users": users
            .iter()
            .map(|id| serde_json::json!({"id": id, "set": {"revoke_tokens_issued_before": at}}))
            .collect::<Vec<_>>()
    });
    let response = client
        .patch(proxy.url(&format!("/users?api_key={}", harness::KEY)))
        .header("authorization", harness::server_token())
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("the proxy answers");
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(serde_json::Value::Null);
    (status, body)
}
