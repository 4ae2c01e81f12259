//! The official Stream JS SDK (`stream-chat`, Node 20) against the demo chat API
//! behind `ChatAuthLayer` (the composition of `examples/axum_chat_api.rs`): connect,
//! refresh an expired token through a token provider, fail once with code 43, and
//! revoke tokens with the server-side client (`revokeUserToken`, `revokeTokens`), and
//! recover from a live session closed by a revocation.
//! Skips with a notice when `node` or `tests/sdk/node_modules` is missing.

mod common;

use chatgate::TokenBuilder;
use chatgate::demo::{DemoState, router};
use chatgate::time::now_unix;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

const KEY: &str = "sdk-key";
const SECRET: &str = "sdk-secret";
const NODE_TIMEOUT: Duration = Duration::from_secs(60);

fn sdk_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sdk")
}

fn sdk_available() -> bool {
    let node = std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let installed = sdk_dir().join("node_modules/stream-chat").is_dir()
        && sdk_dir().join("node_modules/ws").is_dir();
    if !(node && installed) {
        eprintln!(
            "NOTICE: skipping the JS SDK test: node available = {node}, tests/sdk/node_modules installed = {installed} (run `npm install` in tests/sdk)"
        );
    }
    node && installed
}

/// The example's stack on loopback; counts the `/connect` attempts that reach it.
async fn start() -> (SocketAddr, Arc<AtomicUsize>) {
    let layer = common::layer(common::config(vec![common::app(KEY, SECRET)])).await;
    let connects = Arc::new(AtomicUsize::new(0));
    let counter = connects.clone();
    let app = router(DemoState::new())
        .layer(layer)
        .layer(tower::util::MapRequestLayer::new(
            move |request: axum::extract::Request| {
                if request.uri().path() == "/connect" {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
                request
            },
        ));
    (common::serve(app).await, connects)
}

async fn run_node(addr: SocketAddr, scenario: &str, tokens: &[(&str, String)]) -> Value {
    let mut command = tokio::process::Command::new("node");
    command
        .arg("layer_connect.cjs")
        .current_dir(sdk_dir())
        .env("BASE_URL", format!("http://{addr}"))
        .env("API_KEY", KEY)
        .env("SCENARIO", scenario)
        .kill_on_drop(true);
    for (name, token) in tokens {
        command.env(name, token);
    }
    let output = tokio::time::timeout(NODE_TIMEOUT, command.output())
        .await
        .expect("node timed out")
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "node failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("no RESULT line:\n{stdout}\n{stderr}"));
    serde_json::from_str(line).unwrap()
}

#[tokio::test]
async fn connect_user_succeeds_with_a_valid_token() {
    if !sdk_available() {
        return;
    }
    let (addr, connects) = start().await;
    let token = TokenBuilder::user("alice").sign(SECRET);
    let result = run_node(addr, "connect", &[("VALID_TOKEN", token)]).await;
    assert_eq!(result["user"], "alice", "{result}");
    assert!(
        result["connection_id"]
            .as_str()
            .is_some_and(|id| !id.is_empty()),
        "{result}"
    );
    assert_eq!(result["channel"], "messaging:general", "{result}");
    assert_eq!(result["message_user"], "alice", "{result}");
    assert_eq!(connects.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_token_provider_refreshes_an_expired_token_and_connects() {
    if !sdk_available() {
        return;
    }
    let (addr, connects) = start().await;
    let expired = TokenBuilder::user("alice")
        .expires_at(now_unix() - 60)
        .sign(SECRET);
    let valid = TokenBuilder::user("alice").sign(SECRET);
    let result = run_node(
        addr,
        "refresh",
        &[("EXPIRED_TOKEN", expired), ("VALID_TOKEN", valid)],
    )
    .await;
    assert_eq!(result["user"], "alice", "{result}");
    assert_eq!(
        result["provided"],
        serde_json::json!(["expired", "valid"]),
        "{result}"
    );
    assert_eq!(connects.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_bad_signature_fails_with_code_43_and_no_reconnect_loop() {
    if !sdk_available() {
        return;
    }
    let (addr, connects) = start().await;
    let bad = TokenBuilder::user("alice").sign("not-the-secret");
    let result = run_node(addr, "badsig", &[("BAD_TOKEN", bad)]).await;
    assert_eq!(result["failed"], true, "{result}");
    assert_eq!(result["code"], 43, "{result}");
    // The script waited 3 s after the failure: one attempt, no retries.
    assert_eq!(connects.load(Ordering::SeqCst), 1, "{result}");
}

#[tokio::test]
async fn the_server_sdk_revokes_user_and_app_tokens_through_the_layer() {
    if !sdk_available() {
        return;
    }
    let (addr, _) = start().await;
    let old = TokenBuilder::user("alice")
        .issued_at(now_unix() - 100)
        .sign(SECRET);
    let result = run_node(
        addr,
        "revoke",
        &[("SECRET", SECRET.to_owned()), ("OLD_TOKEN", old)],
    )
    .await;
    let connected = serde_json::json!({"connected": "alice"});
    let revoked = serde_json::json!({"code": 40});
    assert_eq!(result["before"], connected, "{result}");
    assert_eq!(result["user_revoked"], revoked, "{result}");
    assert_eq!(result["user_restored"], connected, "{result}");
    assert_eq!(result["app_revoked"], revoked, "{result}");
    assert_eq!(result["app_restored"], connected, "{result}");
}

#[tokio::test]
async fn a_revoked_live_session_is_closed_and_the_sdk_refreshes_and_recovers() {
    if !sdk_available() {
        return;
    }
    let (addr, connects) = start().await;
    let now = now_unix();
    let valid = TokenBuilder::user("alice").issued_at(now - 10).sign(SECRET);
    // The script's tokenProvider mints the next token itself once the revocation is in:
    // one signed here ahead of time could fall under the cutoff if node starts slowly.
    let result = run_node(
        addr,
        "live",
        &[("SECRET", SECRET.to_owned()), ("VALID_TOKEN", valid)],
    )
    .await;
    assert_eq!(result["user"], "alice", "{result}");
    assert_eq!(result["provided"], 2, "{result}");
    assert_ne!(result["first"], result["second"], "{result}");
    // connect, reconnect refused with code 40, reconnect with the new token
    assert_eq!(connects.load(Ordering::SeqCst), 3, "{result}");
}
