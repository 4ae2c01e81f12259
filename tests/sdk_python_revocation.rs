//! The official Python SDK drives the revocation endpoints end to end:
//! `revoke_user_token`, `revoke_users_token`, `revoke_tokens`, and un-revoking with
//! `None`, against a loopback HTTP server running the [`Gate`] the way an adapter does
//! (check, buffer the body of a revocation call, apply it, then answer like the
//! upstream). Tokens are then checked over HTTP too, and the effect with and without
//! `iat` must match contract §3.
//!
//! Needs `python3` with `stream_chat` (`pip install stream-chat`; `.ci/run` does).

mod common;

use bytes::Bytes;
use chatgate::revocation::embedded::EmbeddedStore;
use chatgate::time::now_unix;
use chatgate::{ConfigHandle, Decision, ErrorResponse, Gate, RequestParts};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;

const API_KEY: &str = "py-key";
const SECRET: &str = "py-revocation-secret";

/// What the server saw: `(method, path, answered status)`.
type Seen = Arc<Mutex<Vec<(String, String, u16)>>>;

fn json_response(status: http::StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, ErrorResponse::CONTENT_TYPE)
        .body(Full::new(body))
        .expect("a valid response")
}

/// One request, as an adapter handles it; allowed requests get what Stream answers.
async fn handle(gate: Gate, seen: Seen, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let decision = gate.check(RequestParts::from(&parts)).await;
    let outcome = match decision {
        Ok(Decision::Revocation(identity, endpoint)) => match body.collect().await {
            Ok(body) => {
                gate.apply_revocation(&identity, endpoint, &body.to_bytes())
                    .await
            }
            Err(e) => Err(chatgate::AuthError::BadInput(format!("body: {e}"))),
        },
        Ok(_) => Ok(()),
        Err(error) => Err(error),
    };
    let response = match outcome {
        Ok(()) => json_response(
            http::StatusCode::OK,
            Bytes::from(r#"{"duration":"0.00ms"}"#),
        ),
        Err(error) => {
            let rendered = error.response();
            json_response(rendered.status, rendered.body)
        }
    };
    seen.lock().unwrap().push((
        parts.method.to_string(),
        parts.uri.path().to_owned(),
        response.status().as_u16(),
    ));
    response
}

async fn serve(listener: TcpListener, gate: Gate, seen: Seen) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let (gate, seen) = (gate.clone(), seen.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let (gate, seen) = (gate.clone(), seen.clone());
                async move { Ok::<_, Infallible>(handle(gate, seen, request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Runs one SDK call against the server; panics with the SDK's error if it failed.
async fn python(port: u16, call: &str) {
    let script = format!(
        r#"
import datetime, json, sys, warnings
warnings.simplefilter("ignore")
try:
    from stream_chat import StreamChat
except ImportError:
    print("MISSING-STREAM-CHAT")
    sys.exit(3)
UTC = datetime.timezone.utc
def at(seconds):
    return datetime.datetime.fromtimestamp(seconds, UTC)
c = StreamChat(api_key="{API_KEY}", api_secret="{SECRET}", base_url="http://127.0.0.1:{port}", timeout=10)
r = {call}
status = r.status_code() if callable(r.status_code) else r.status_code
print(json.dumps({{"status": status}}))
"#
    );
    let child = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), child)
        .await
        .unwrap_or_else(|_| panic!("python3 did not finish within 60 s: {call}"))
        .expect("python3 must be installed (.ci/run has it)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        !stdout.contains("MISSING-STREAM-CHAT"),
        "the Python SDK is not installed: pip install stream-chat (.ci/run does)"
    );
    assert!(
        output.status.success() && stdout.contains(r#""status": 200"#),
        "{call} failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `None` when the server lets the token through, else the Stream error code.
async fn code(client: &reqwest::Client, port: u16, token: &str) -> Option<i64> {
    let response = client
        .get(format!(
            "http://127.0.0.1:{port}/channels?api_key={API_KEY}"
        ))
        .header("authorization", token)
        .header("stream-auth-type", "jwt")
        .send()
        .await
        .expect("request to the gate");
    if response.status() == 200 {
        return None;
    }
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.expect("a JSON error");
    assert_eq!(body["StatusCode"], status);
    Some(body["code"].as_i64().expect("a code"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_revokes_and_unrevokes_users_and_the_app() {
    tokio::time::timeout(Duration::from_secs(300), scenario())
        .await
        .expect("the scenario did not finish within 300 s");
}

async fn scenario() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::config(vec![common::app(API_KEY, SECRET)]);
    let store = EmbeddedStore::open(&dir.path().join("revocations.db")).unwrap();
    let gate = common::gate_over(ConfigHandle::new(config), Arc::new(store));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Seen::default();
    let server = tokio::spawn(serve(listener, gate, seen.clone()));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    let now = now_unix();
    // The cutoff: 50 s ago plus 0.4 s, so that it rounds up (contract §3).
    let cutoff = now - 50;
    let token = |user: &str, iat: Option<i64>| {
        let builder = chatgate::TokenBuilder::user(user);
        match iat {
            Some(iat) => builder.issued_at(iat),
            None => builder.without_iat(),
        }
        .sign(SECRET)
    };
    let users = ["alice", "bob", "carol", "dave"];
    // per user: no iat, well before, the cutoff's own second, the second after
    let tokens: Vec<(&str, &str, String)> = users
        .iter()
        .flat_map(|&user| {
            [
                (user, "no_iat", token(user, None)),
                (user, "old", token(user, Some(now - 100))),
                (user, "same_second", token(user, Some(cutoff))),
                (user, "after", token(user, Some(cutoff + 1))),
            ]
        })
        .collect();
    let expect = |revoked: &'static [&'static str]| {
        let tokens = &tokens;
        let client = &client;
        async move {
            for (user, kind, token) in tokens {
                let is_revoked = *kind != "after" && revoked.contains(user);
                let want = is_revoked.then_some(40);
                assert_eq!(
                    code(client, port, token).await,
                    want,
                    "{user}'s {kind} token (revoked users: {revoked:?})"
                );
            }
        }
    };
    expect(&[]).await;

    // An aware datetime with microseconds: isoformat() sends "...+00:00".
    python(
        port,
        &format!("c.revoke_user_token('alice', at({cutoff} + 0.4))"),
    )
    .await;
    expect(&["alice"]).await;

    // A naive datetime, as utcnow() gives: isoformat() has no offset, which means UTC.
    python(
        port,
        &format!("c.revoke_users_token(['bob', 'carol'], at({cutoff} + 0.4).replace(tzinfo=None))"),
    )
    .await;
    expect(&["alice", "bob", "carol"]).await;

    python(port, "c.revoke_user_token('alice', None)").await;
    expect(&["bob", "carol"]).await;
    python(port, "c.revoke_users_token(['bob', 'carol'], None)").await;
    expect(&[]).await;

    // App-wide: every user token issued before it, with or without iat; the SDK's own
    // server token keeps working (the next call is made with it).
    python(port, &format!("c.revoke_tokens(at({cutoff} + 0.4))")).await;
    expect(&["alice", "bob", "carol", "dave"]).await;
    python(port, "c.revoke_tokens(None)").await;
    expect(&[]).await;

    // A string cutoff is passed through as is.
    let text = chrono::DateTime::from_timestamp(cutoff, 400_000_000)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    python(port, &format!("c.revoke_tokens('{text}')")).await;
    expect(&["alice", "bob", "carol", "dave"]).await;
    python(port, "c.revoke_tokens(None)").await;

    let seen = seen.lock().unwrap().clone();
    let calls: Vec<(&str, &str, u16)> = seen
        .iter()
        .filter(|(method, _, _)| method == "PATCH")
        .map(|(m, p, s)| (m.as_str(), p.as_str(), *s))
        .collect();
    assert_eq!(
        calls,
        [
            ("PATCH", "/users", 200),
            ("PATCH", "/users", 200),
            ("PATCH", "/users", 200),
            ("PATCH", "/users", 200),
            ("PATCH", "/app", 200),
            ("PATCH", "/app", 200),
            ("PATCH", "/app", 200),
            ("PATCH", "/app", 200),
        ]
    );
    server.abort();
}
