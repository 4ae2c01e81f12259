//! Tokens minted by the official SDKs during the test run (Python `stream-chat`, JS
//! `stream-chat`), checked by the core exactly as contract §2 says. Nothing is pasted:
//! if an SDK changes its token format, these tests see it.

mod common;

use chatgate::AuthError;
use chatgate::config::{App, ConfigSnapshot};
use chatgate::gate::{Decision, IdentityKind, RequestParts};
use chatgate::time::now_unix;
use chatgate::token::{self, TokenKind};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

const SECRET: &str = "sdk-test-secret-0123456789abcdef0123456789";

fn sdk_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sdk")
}

fn json_tokens(output: std::process::Output, sdk: &str) -> HashMap<String, String> {
    assert!(
        output.status.success(),
        "{sdk} failed (install it: see .ci/run): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "{sdk} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// Tokens from the Python SDK: `create_token` in its shapes, and the server token it
/// sends on every server-side call.
fn python_tokens(now: i64) -> HashMap<String, String> {
    let script = format!(
        r#"
import json, warnings
warnings.simplefilter("ignore")
from stream_chat import StreamChat
c = StreamChat(api_key="k", api_secret="{SECRET}")
print(json.dumps({{
    "plain": c.create_token("alice"),
    "exp_iat": c.create_token("alice", exp={exp}, iat={now}),
    "expired": c.create_token("alice", exp={expired}),
    "claims": c.create_token("alice", role="admin", channel_cids=["messaging:a"]),
    "server": c.auth_token,
    "other_secret": StreamChat(api_key="k", api_secret="not-the-secret").create_token("alice"),
}}))
"#,
        exp = now + 3600,
        expired = now - 3600,
    );
    let output = Command::new("python3")
        .arg("-c")
        .arg(script)
        .output()
        .expect("python3 must be installed (see .ci/run)");
    json_tokens(output, "the Python SDK (pip install stream-chat)")
}

/// Tokens from the JS SDK: `DevToken`, `JWTUserToken`, `createToken`, `JWTServerToken`.
fn js_tokens(now: i64) -> HashMap<String, String> {
    let script = format!(
        r#"
const s = require('stream-chat');
const c = new s.StreamChat('k', '{SECRET}');
console.log(JSON.stringify({{
  dev: s.DevToken('bender'),
  user: s.JWTUserToken('{SECRET}', 'alice', {{}}),
  user_exp: s.JWTUserToken('{SECRET}', 'alice', {{ exp: {exp} }}),
  create: c.createToken('alice', {exp}, {now}),
  create_future_iat: c.createToken('alice', undefined, {future}),
  server: s.JWTServerToken('{SECRET}'),
}}));
"#,
        exp = now + 3600,
        future = now + 3600,
    );
    assert!(
        sdk_dir().join("node_modules/stream-chat").exists(),
        "the JS SDK is not installed: run `npm install` in tests/sdk (see .ci/run)"
    );
    let output = Command::new("node")
        .arg("-e")
        .arg(script)
        .current_dir(sdk_dir())
        .output()
        .expect("node must be installed (see .ci/run)");
    json_tokens(output, "the JS SDK (npm install stream-chat)")
}

fn app(dev: bool) -> App {
    let mut app = App::new("k", vec![SECRET.into()]);
    app.disable_auth_checks = dev;
    app
}

fn verify(token: &str, app: &App) -> Result<token::VerifiedToken, AuthError> {
    let config = ConfigSnapshot::with_apps(vec![]);
    token::verify(
        token,
        app.keyring(),
        &app.token_rules(&config.auth),
        now_unix(),
    )
}

#[test]
fn python_sdk_user_tokens_verify_with_their_claims() {
    let now = now_unix();
    let tokens = python_tokens(now);
    let plain = verify(&tokens["plain"], &app(false)).unwrap();
    assert_eq!(
        (plain.kind, plain.claims.user_id.as_deref()),
        (TokenKind::User, Some("alice"))
    );
    let timed = verify(&tokens["exp_iat"], &app(false)).unwrap();
    assert_eq!(timed.claims.issued_at, Some(now));
    assert_eq!(timed.claims.expires_at, Some(now + 3600));
    assert!(verify(&tokens["claims"], &app(false)).is_ok());
}

#[test]
fn python_sdk_expired_and_foreign_tokens_get_their_codes() {
    let tokens = python_tokens(now_unix());
    assert_eq!(
        verify(&tokens["expired"], &app(false)).unwrap_err().code(),
        40
    );
    assert_eq!(
        verify(&tokens["other_secret"], &app(false))
            .unwrap_err()
            .code(),
        43
    );
}

#[test]
fn python_sdk_server_token_is_a_server_token() {
    let tokens = python_tokens(now_unix());
    assert_eq!(
        verify(&tokens["server"], &app(false)).unwrap().kind,
        TokenKind::Server
    );
}

#[test]
fn js_sdk_user_and_server_tokens_verify() {
    let now = now_unix();
    let tokens = js_tokens(now);
    for name in ["user", "user_exp", "create"] {
        let verified = verify(&tokens[name], &app(false)).unwrap();
        assert_eq!(verified.kind, TokenKind::User, "{name}");
        assert_eq!(verified.claims.user_id.as_deref(), Some("alice"), "{name}");
    }
    assert_eq!(
        verify(&tokens["create"], &app(false))
            .unwrap()
            .claims
            .issued_at,
        Some(now)
    );
    assert_eq!(
        verify(&tokens["server"], &app(false)).unwrap().kind,
        TokenKind::Server
    );
    assert_eq!(
        verify(&tokens["create_future_iat"], &app(false))
            .unwrap_err()
            .code(),
        42
    );
}

#[test]
fn js_sdk_developer_token_needs_disable_auth_checks() {
    let tokens = js_tokens(now_unix());
    let dev = &tokens["dev"];
    // The JS SDK pads the payload with '=': the contract says to accept that.
    assert!(dev.contains('=') && dev.ends_with(".devtoken"), "{dev}");
    assert_eq!(verify(dev, &app(false)).unwrap_err().code(), 43);
    let verified = verify(dev, &app(true)).unwrap();
    assert_eq!(
        (verified.kind, verified.claims.user_id.as_deref()),
        (TokenKind::Developer, Some("bender"))
    );
}

#[tokio::test]
async fn sdk_tokens_pass_the_whole_gate_as_the_sdks_send_them() {
    let tokens = js_tokens(now_unix());
    let gate = common::gate(common::config(vec![app(true)]));
    let cases = [
        ("create", IdentityKind::User),
        ("server", IdentityKind::Server),
        ("dev", IdentityKind::Developer),
    ];
    for (name, kind) in cases {
        // HTTP: raw token in Authorization, stream-auth-type: jwt, api_key in the query.
        let mut headers = http::HeaderMap::new();
        headers.insert("authorization", tokens[name].parse().unwrap());
        headers.insert("stream-auth-type", "jwt".parse().unwrap());
        let uri: http::Uri = "/channels?api_key=k".parse().unwrap();
        let decision = gate
            .check(RequestParts {
                method: &http::Method::GET,
                uri: &uri,
                headers: &headers,
                peer: None,
            })
            .await
            .unwrap();
        let Decision::Allow(identity) = decision else {
            panic!("{name}: {decision:?}")
        };
        assert_eq!(identity.kind, kind, "{name}");
    }
    // WebSocket: the JS client puts the token in the query of /connect.
    let mut headers = http::HeaderMap::new();
    headers.insert("upgrade", "websocket".parse().unwrap());
    let json: String =
        form_urlencoded::byte_serialize(br#"{"user_id":"alice","user_details":{"id":"alice"}}"#)
            .collect();
    let uri: http::Uri = format!(
        "/connect?json={json}&api_key=k&authorization={}&stream-auth-type=jwt",
        tokens["create"]
    )
    .parse()
    .unwrap();
    let decision = gate
        .check(RequestParts {
            method: &http::Method::GET,
            uri: &uri,
            headers: &headers,
            peer: None,
        })
        .await
        .unwrap();
    assert!(
        matches!(decision, Decision::Allow(ref i) if i.user_id() == Some("alice")),
        "{decision:?}"
    );
}
