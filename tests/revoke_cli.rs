//! `chatgate revoke` against a running proxy: with the memory store (which lives only
//! in that process) the command mints a server token from the config, sends the
//! contract's `PATCH /users` to `[server] listen`, and the proxy refuses the revoked
//! user's older token at once (code 40).

#[path = "common/proxy_harness.rs"]
mod harness;

use chatgate::TokenBuilder;
use chatgate::time::now_unix;
use harness::{Behaviour, STEP, TestUpstream, free_port, with_test_engine};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

const KEY: &str = "revokekey";
const SECRET: &str = "revoke-cli-test-secret-0123456789abcdef0123456789";

/// Kills the proxy when the test ends, however it ends.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn revoke_reaches_the_running_proxy_and_its_next_check() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let port = free_port();
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(
        file.path(),
        with_test_engine(&format!(
            "[server]\nlisten = \"{address}\"\nadmin_listen = \"off\"\nthreads = 1\ngrace_period_seconds = 1\n\
             [upstream]\naddresses = [\"{}\"]\n\
             [revocation]\nstore = \"memory\"\n\
             [[apps]]\napi_key = \"{KEY}\"\nsecrets = [\"{SECRET}\"]\n",
            upstream.address
        )),
    )
    .unwrap();
    let _proxy = Running(
        Command::new(env!("CARGO_BIN_EXE_chatgate"))
            .args(["serve", "--config"])
            .arg(file.path())
            .arg("--upgrade-sock")
            .arg(std::env::temp_dir().join(format!("chatgate-revoke-cli-{port}.sock")))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the chatgate binary runs"),
    );
    let mut listening = false;
    for _ in 0..300 {
        if tokio::net::TcpStream::connect(address).await.is_ok() {
            listening = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(listening, "chatgate did not listen on {address}");

    let token = TokenBuilder::user("alice")
        .issued_at(now_unix() - 60)
        .sign(SECRET);
    let client = reqwest::Client::builder().timeout(STEP).build().unwrap();
    let get = || {
        client
            .get(format!("http://{address}/channels?api_key={KEY}"))
            .header("authorization", &token)
            .header("stream-auth-type", "jwt")
            .send()
    };
    assert_eq!(get().await.unwrap().status(), 200);

    let output = tokio::task::spawn_blocking({
        let config = file.path().to_owned();
        move || {
            Command::new(env!("CARGO_BIN_EXE_chatgate"))
                .args(["revoke", "user", "alice", "--api-key", KEY, "--config"])
                .arg(config)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains(&format!("through the running proxy on {address}")),
        "{stdout}"
    );
    let refused = get().await.unwrap();
    assert_eq!(refused.status(), 401);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["code"], 40, "{body}");

    // The PATCH the upstream received is the contract's, from a server token.
    let patch = upstream
        .requests()
        .into_iter()
        .find(|r| r.method == "PATCH")
        .expect("the revocation was forwarded");
    assert_eq!(patch.target, format!("/users?api_key={KEY}"));
    let sent: serde_json::Value = serde_json::from_slice(&patch.body).unwrap();
    assert_eq!(sent["users"][0]["id"], "alice");
}
