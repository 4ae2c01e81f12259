//! The embedded store survives kill -9: a child process (this test binary, re-run with
//! an env var and an exact filter) revokes 100 users through a `Gate`, prints `written`
//! the moment `apply_revocation` returned Ok, and is SIGKILLed as soon as the parent
//! reads that line. The reopened file must reject every old token with code 40.

mod common;

use chatgate::revocation::embedded::EmbeddedStore;
use chatgate::time::now_unix;
use chatgate::{
    AuthError, ConfigHandle, Decision, Gate, Identity, RequestParts, RevocationEndpoint,
    TokenBuilder,
};
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

const CHILD_ENV: &str = "CHATGATE_DURABILITY_DB";
const CHILD_TEST: &str = "child_revokes_then_waits_to_be_killed";
const SECRET: &str = "durability-secret";
const USERS: usize = 100;
/// The cutoff the child writes: far enough in the past to be fixed, recent enough to
/// revoke the parent's "old" tokens.
const OLD_IAT: i64 = 1_700_000_000;
const CUTOFF: i64 = 1_700_000_100;

fn gate(path: &std::path::Path) -> Gate {
    let config = common::config(vec![common::app("key", SECRET)]);
    let store = EmbeddedStore::open(path).expect("open the embedded store");
    common::gate_over(ConfigHandle::new(config), Arc::new(store))
}

/// Kills the child (SIGKILL) if the test ends early.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs only as the child, started by the test below.
#[test]
#[ignore = "the child half of the kill -9 test; it is started by that test"]
fn child_revokes_then_waits_to_be_killed() {
    let path = std::env::var(CHILD_ENV).expect("run by the kill -9 test, which sets the db path");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let gate = gate(std::path::Path::new(&path));
        let users: Vec<String> = (0..USERS)
            .map(|i| {
                format!(r#"{{"id":"user-{i}","set":{{"revoke_tokens_issued_before":{CUTOFF}}}}}"#)
            })
            .collect();
        let body = format!(r#"{{"users":[{}]}}"#, users.join(","));
        let server = Identity::server("key");
        gate.apply_revocation(&server, RevocationEndpoint::Users, body.as_bytes())
            .await
            .expect("revocation written");
        // libtest has printed "test NAME ... " without a newline: start a line of our own.
        println!("\nwritten");
        use std::io::Write;
        std::io::stdout().flush().unwrap();
        // The parent kills us long before this ends.
        tokio::time::sleep(Duration::from_secs(60)).await;
    });
    panic!("the parent never killed the child");
}

#[test]
fn a_revocation_survives_kill_9_right_after_it_was_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("revocations.db");
    let mut child = KillOnDrop(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                CHILD_TEST,
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("re-run this test binary as the child"),
    );
    let stdout = child.0.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines_rx.recv_timeout(left) {
            Ok(line) if line.trim() == "written" => break,
            Ok(_) => continue,
            Err(e) => panic!("the child never reported its write: {e}"),
        }
    }
    child.0.kill().expect("SIGKILL the child");
    let status = child.0.wait().unwrap();
    assert!(!status.success(), "the child must have died by the signal");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let gate = gate(&path);
        let uri: http::Uri = "/channels?api_key=key".parse().unwrap();
        let check = |user: String, iat: Option<i64>| {
            let gate = gate.clone();
            let uri = uri.clone();
            async move {
                let builder = TokenBuilder::user(user);
                let token = match iat {
                    Some(iat) => builder.issued_at(iat),
                    None => builder.without_iat(),
                }
                .sign(SECRET);
                let mut headers = http::HeaderMap::new();
                headers.insert(http::header::AUTHORIZATION, token.parse().unwrap());
                gate.check(RequestParts {
                    method: &http::Method::GET,
                    uri: &uri,
                    headers: &headers,
                    peer: None,
                })
                .await
            }
        };
        // All 100 users of the one write are there: nothing lost, nothing half-written.
        for i in 0..USERS {
            let error = check(format!("user-{i}"), Some(OLD_IAT)).await.unwrap_err();
            assert_eq!(error, AuthError::Revoked, "user-{i}");
            assert_eq!(error.code(), 40);
        }
        assert_eq!(check("user-0".into(), None).await, Err(AuthError::Revoked));
        let fresh = check("user-0".into(), Some(now_unix())).await;
        assert!(matches!(fresh, Ok(Decision::Allow(_))), "{fresh:?}");
        let other = check("someone-else".into(), Some(OLD_IAT)).await;
        assert!(matches!(other, Ok(Decision::Allow(_))), "{other:?}");
    });
}
