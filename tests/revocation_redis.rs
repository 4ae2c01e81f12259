//! The Redis store against a real `redis-server` (started here on a free loopback
//! port): two gates sharing one Redis, Redis going away, and Redis coming back.

mod common;
#[path = "support/redis_server.rs"]
mod redis_server;

use chatgate::config::{RevocationSettings, StoreErrorPolicy, StoreKind};
use chatgate::revocation::redis::RedisStore;
use chatgate::revocation::{RevocationEvent, RevocationStore};
use chatgate::time::now_unix;
use chatgate::{
    AuthError, ConfigHandle, Decision, Gate, Identity, RevocationEndpoint, TokenBuilder,
};
use redis_server::RedisServer;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::{Instant, timeout};

const SECRET: &str = "redis-test-secret";
const TEST_TIMEOUT: Duration = Duration::from_secs(60);

struct Instance {
    gate: Gate,
    store: Arc<RedisStore>,
}

async fn instance(url: &str, policy: StoreErrorPolicy) -> Instance {
    let settings = RevocationSettings {
        store: StoreKind::Redis,
        path: "unused".into(),
        redis_url: url.to_owned(),
        cache_ttl: Duration::from_secs(300),
        cache_capacity: 10_000,
        on_store_error: policy,
        store_timeout: Duration::from_millis(200),
        redis: Default::default(),
    };
    let store = Arc::new(RedisStore::connect(url).await.expect("connect to redis"));
    let config = common::config(vec![common::app("key", SECRET)]).with_revocation(settings);
    Instance {
        gate: common::gate_over(ConfigHandle::new(config), store.clone()),
        store,
    }
}

async fn check(gate: &Gate, token: &str) -> Result<Decision, AuthError> {
    // Never a hang: a check that does not finish promptly fails the test.
    timeout(Duration::from_secs(5), common::check(gate, "key", token))
        .await
        .expect("gate.check must not hang")
}

fn server_identity() -> Identity {
    Identity::server("key")
}

async fn revoke_users(gate: &Gate, body: String) -> Result<(), AuthError> {
    gate.apply_revocation(
        &server_identity(),
        RevocationEndpoint::Users,
        body.as_bytes(),
    )
    .await
}

fn revoke_user_body(user: &str, cutoff: Option<i64>) -> String {
    let value = cutoff.map_or("null".to_owned(), |c| c.to_string());
    format!(r#"{{"users":[{{"id":"{user}","set":{{"revoke_tokens_issued_before":{value}}}}}]}}"#)
}

/// Polls `gate` until `token` is answered with code 40, for at most `within`.
async fn wait_revoked(gate: &Gate, token: &str, within: Duration) -> Duration {
    let started = Instant::now();
    for _ in 0..10_000 {
        match check(gate, token).await {
            Err(AuthError::Revoked) => return started.elapsed(),
            Ok(Decision::Allow(_)) => {}
            other => panic!("unexpected answer while waiting for the revocation: {other:?}"),
        }
        assert!(
            started.elapsed() < within,
            "the revocation did not reach the other gate within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("polling bound reached");
}

fn allowed(result: Result<Decision, AuthError>) {
    assert!(
        matches!(result, Ok(Decision::Allow(_))),
        "expected Allow, got {result:?}"
    );
}

#[tokio::test]
async fn a_revocation_through_one_gate_is_enforced_by_the_other_within_a_second() {
    timeout(TEST_TIMEOUT, async {
        let redis = RedisServer::start();
        let a = instance(&redis.url(), StoreErrorPolicy::Deny).await;
        let b = instance(&redis.url(), StoreErrorPolicy::Deny).await;
        let now = now_unix();
        let alice = TokenBuilder::user("alice")
            .issued_at(now - 100)
            .sign(SECRET);
        let bob = TokenBuilder::user("bob").issued_at(now - 100).sign(SECRET);
        let bob_no_iat = TokenBuilder::user("bob").without_iat().sign(SECRET);
        // B caches "no cutoff" for both users and for the app.
        allowed(check(&b.gate, &alice).await);
        allowed(check(&b.gate, &bob).await);
        allowed(check(&b.gate, &bob_no_iat).await);

        revoke_users(&a.gate, revoke_user_body("alice", Some(now)))
            .await
            .unwrap();
        let took = wait_revoked(&b.gate, &alice, Duration::from_secs(1)).await;
        eprintln!("user revocation reached gate B after {took:?}");
        allowed(check(&b.gate, &bob).await);

        // Un-revoking travels the same way.
        revoke_users(&a.gate, revoke_user_body("alice", None))
            .await
            .unwrap();
        let started = Instant::now();
        while !matches!(check(&b.gate, &alice).await, Ok(Decision::Allow(_))) {
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "un-revocation not seen by B"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        // App-wide, including the token without iat.
        a.gate
            .apply_revocation(
                &server_identity(),
                RevocationEndpoint::App,
                format!(r#"{{"revoke_tokens_issued_before":{now}}}"#).as_bytes(),
            )
            .await
            .unwrap();
        wait_revoked(&b.gate, &bob, Duration::from_secs(1)).await;
        assert_eq!(check(&b.gate, &bob_no_iat).await, Err(AuthError::Revoked));
        let fresh = TokenBuilder::user("bob").issued_at(now + 1).sign(SECRET);
        allowed(check(&b.gate, &fresh).await);
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn with_redis_down_cached_users_are_answered_and_misses_follow_the_policy_then_invalidations_resume()
 {
    timeout(TEST_TIMEOUT, async {
        let mut redis = RedisServer::start();
        let port = redis.port();
        let a = instance(&redis.url(), StoreErrorPolicy::Deny).await;
        let deny = instance(&redis.url(), StoreErrorPolicy::Deny).await;
        let allow = instance(&redis.url(), StoreErrorPolicy::Allow).await;
        let now = now_unix();
        let cached = TokenBuilder::user("cached")
            .issued_at(now - 100)
            .sign(SECRET);
        let revoked = TokenBuilder::user("revoked")
            .issued_at(now - 100)
            .sign(SECRET);
        let unseen = TokenBuilder::user("unseen")
            .issued_at(now - 100)
            .sign(SECRET);
        revoke_users(&a.gate, revoke_user_body("revoked", Some(now)))
            .await
            .unwrap();
        for instance in [&deny, &allow] {
            allowed(check(&instance.gate, &cached).await);
            assert_eq!(
                check(&instance.gate, &revoked).await,
                Err(AuthError::Revoked)
            );
        }

        redis.kill();
        // Cached answers, both ways, keep being served.
        for instance in [&deny, &allow] {
            allowed(check(&instance.gate, &cached).await);
            assert_eq!(
                check(&instance.gate, &revoked).await,
                Err(AuthError::Revoked)
            );
        }
        // A miss: deny answers the Stream-style 503, allow lets the token through.
        let error = check(&deny.gate, &unseen).await.unwrap_err();
        assert_eq!((error.code(), error.status().as_u16()), (-1, 503));
        let body: serde_json::Value = serde_json::from_slice(&error.response().body).unwrap();
        assert_eq!(body["StatusCode"], 503);
        allowed(check(&allow.gate, &unseen).await);
        // Writes fail cleanly too.
        let write = timeout(
            Duration::from_secs(5),
            revoke_users(&a.gate, revoke_user_body("unseen", Some(now))),
        )
        .await
        .expect("a write must not hang");
        assert_eq!(write.unwrap_err().code(), -1);

        let mut resyncs = deny.store.subscribe();
        let _redis = RedisServer::start_on(port);
        // The subscriber reconnects (backoff is at most 5 s) and says caches must resync.
        let resync_deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = resync_deadline.saturating_duration_since(Instant::now());
            match timeout(left, resyncs.recv()).await {
                Ok(Ok(RevocationEvent::Resync)) => break,
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => panic!("event channel: {e}"),
                Err(_) => panic!("no Resync within 20 s of Redis coming back"),
            }
        }
        // The command connection of A reconnects by itself; give it a bounded number of tries.
        let later = TokenBuilder::user("later")
            .issued_at(now - 100)
            .sign(SECRET);
        let mut tries = 0;
        loop {
            // The restarted Redis is empty; "later" has no cutoff, and B caches that.
            match check(&deny.gate, &later).await {
                Ok(Decision::Allow(_)) => break,
                other => {
                    tries += 1;
                    assert!(tries < 100, "deny gate never recovered: {other:?}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        let mut tries = 0;
        while let Err(error) = revoke_users(&a.gate, revoke_user_body("later", Some(now))).await {
            tries += 1;
            assert!(tries < 100, "writes never recovered: {error}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let took = wait_revoked(&deny.gate, &later, Duration::from_secs(1)).await;
        eprintln!("after the Redis restart, a revocation reached the other gate after {took:?}");
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_batch_of_100_users_is_one_hash_write_and_one_message() {
    use chatgate::revocation::redis::{APPS_KEY, CHANNEL, users_key};
    use futures_util::StreamExt;
    use std::collections::HashMap;

    timeout(TEST_TIMEOUT, async {
        let redis = RedisServer::start();
        let a = instance(&redis.url(), StoreErrorPolicy::Deny).await;
        let client = redis::Client::open(redis.url()).unwrap();
        let mut listener = client.get_async_pubsub().await.unwrap();
        listener.subscribe(CHANNEL).await.unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        let now = now_unix();

        let users: Vec<String> = (0..100)
            .map(|i| format!(r#"{{"id":"u{i}","set":{{"revoke_tokens_issued_before":{now}}}}}"#))
            .collect();
        revoke_users(&a.gate, format!(r#"{{"users":[{}]}}"#, users.join(",")))
            .await
            .unwrap();
        let stored: HashMap<String, i64> = redis::cmd("HGETALL")
            .arg(users_key("key"))
            .query_async(&mut connection)
            .await
            .unwrap();
        assert_eq!(stored.len(), 100);
        assert!(stored.values().all(|&cutoff| cutoff == now));

        a.gate
            .apply_revocation(
                &server_identity(),
                RevocationEndpoint::App,
                br#"{"revoke_tokens_issued_before":null}"#,
            )
            .await
            .unwrap();
        let apps: HashMap<String, i64> = redis::cmd("HGETALL")
            .arg(APPS_KEY)
            .query_async(&mut connection)
            .await
            .unwrap();
        assert!(apps.is_empty());

        // One message for the 100 users, then the app's: nothing in between.
        let mut messages = listener.on_message();
        let mut next = async || -> serde_json::Value {
            let message = timeout(Duration::from_secs(5), messages.next())
                .await
                .expect("a message within 5 s")
                .expect("the channel is open");
            serde_json::from_slice(message.get_payload_bytes()).unwrap()
        };
        let users_message = next().await;
        assert_eq!(users_message["kind"], "users");
        assert_eq!(users_message["app"], "key");
        assert_eq!(users_message["users"].as_array().unwrap().len(), 100);
        let app_message = next().await;
        assert_eq!(
            app_message,
            serde_json::json!({"kind": "app", "app": "key", "cutoff": null})
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn chatgate_revoke_on_a_redis_config_reaches_running_gates() {
    timeout(TEST_TIMEOUT, async {
        let redis = RedisServer::start();
        let gate = instance(&redis.url(), StoreErrorPolicy::Deny).await;
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[revocation]\nstore = \"redis\"\nredis_url = \"{}\"\n\
                 [[apps]]\napi_key = \"key\"\nsecrets = [\"{SECRET}\"]\n",
                redis.url()
            ),
        )
        .unwrap();
        let now = now_unix();
        let erin = TokenBuilder::user("erin").issued_at(now - 100).sign(SECRET);
        allowed(check(&gate.gate, &erin).await);

        // The command as a user runs it: its stdout is what it says it did.
        let run = |args: Vec<String>| {
            tokio::task::spawn_blocking(move || {
                let output = std::process::Command::new(env!("CARGO_BIN_EXE_chatgate"))
                    .args(&args[1..])
                    .output()
                    .expect("the chatgate binary runs");
                let said = String::from_utf8_lossy(&output.stdout).into_owned();
                if output.status.success() {
                    Ok(said)
                } else {
                    Err(String::from_utf8_lossy(&output.stderr).into_owned())
                }
            })
        };
        let args = |extra: &[&str]| {
            let mut args: Vec<String> = ["chatgate", "revoke", "user", "erin", "--api-key", "key"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            args.extend(extra.iter().map(|s| s.to_string()));
            args.extend(["--config".to_owned(), config.display().to_string()]);
            args
        };
        let said = run(args(&[])).await.unwrap().unwrap();
        assert!(said.contains("store: redis"), "{said}");
        wait_revoked(&gate.gate, &erin, Duration::from_secs(1)).await;
        run(args(&["--clear"])).await.unwrap().unwrap();
        let started = Instant::now();
        while !matches!(check(&gate.gate, &erin).await, Ok(Decision::Allow(_))) {
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "--clear not seen"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("test timed out");
}
