//! Contract §6, tried as an attacker would: the `chatgate` binary driven with raw bytes
//! over a `TcpStream` (no HTTP client library, which would normalise or refuse what is
//! sent), in front of an upstream that records the raw request heads it receives. Each
//! test judges both what the client was answered and what the upstream actually got:
//! the gate and the upstream must see the same request.
//!
//! Spellings are tried in loops; a test collects every spelling that fails and reports
//! them together, so one run shows the whole picture.

#[path = "common/proxy_harness.rs"]
mod harness;
#[path = "common/raw_http.rs"]
mod raw_http;

use chatgate::TokenBuilder;
use chatgate::time::now_unix;
use harness::*;
use raw_http::*;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Percent-encodes a query value (form style).
fn enc(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// The JS client's `json` connect payload for `user`.
fn connect_json(user: &str) -> String {
    enc(&serde_json::json!({"user_id": user, "user_details": {"id": user}}).to_string())
}

fn server_token_b() -> String {
    TokenBuilder::server().sign(SECRET_B)
}

/// A user token issued `age` seconds ago (revocable by a cutoff of now).
fn old_user_token(user: &str, age: i64) -> String {
    TokenBuilder::user(user)
        .issued_at(now_unix() - age)
        .sign(SECRET)
}

/// The HTTP status the contract gives each code.
fn status_of(code: i64) -> u16 {
    match code {
        4 => 400,
        17 => 403,
        9 => 429,
        _ => 401,
    }
}

/// A recording upstream and a proxy in front of it.
struct Rig {
    upstream: TestUpstream,
    proxy: Proxy,
}

impl Rig {
    async fn start(configure: impl FnOnce(&mut ProxyOptions)) -> Rig {
        Rig::start_with(Behaviour::Echo, configure).await
    }

    async fn start_with(behaviour: Behaviour, configure: impl FnOnce(&mut ProxyOptions)) -> Rig {
        let upstream = TestUpstream::start(behaviour).await;
        let mut options = ProxyOptions {
            upstreams: vec![upstream.address.to_string()],
            ..ProxyOptions::default()
        };
        configure(&mut options);
        let proxy = Proxy::start(options).await;
        Rig { upstream, proxy }
    }

    /// Sends `request` on a new connection; returns the answer and what reached the
    /// upstream meanwhile. The upstream records a request before answering it, so
    /// anything forwarded is recorded by the time its answer arrives.
    async fn send(&self, request: &[u8]) -> (Answer, Vec<Recorded>) {
        let before = self.upstream.requests().len();
        let answer = exchange(self.proxy.address, request, STEP).await;
        let forwarded = self.upstream.requests().split_off(before);
        (answer, forwarded)
    }
}

// === judging ===

/// Failures of one test, reported together.
#[derive(Default)]
struct Findings(Vec<String>);

impl Findings {
    fn check(&mut self, what: &str, result: Result<(), String>) {
        if let Err(why) = result {
            self.0.push(format!("{what}: {why}"));
        }
    }

    fn assert_none(self) {
        assert!(
            self.0.is_empty(),
            "{} case(s) failed:\n  {}",
            self.0.len(),
            self.0.join("\n  ")
        );
    }
}

/// The answer is the contract's refusal with `code` (JSON over HTTP, or the WebSocket
/// rejection), and nothing reached the upstream.
fn refused(answer: &Answer, forwarded: &[Recorded], code: i64) -> Result<(), String> {
    if !forwarded.is_empty() {
        let targets: Vec<_> = forwarded.iter().map(|r| &r.target).collect();
        return Err(format!(
            "forwarded to the upstream as {targets:?}; answer {answer:?}"
        ));
    }
    match answer {
        Answer::Http { status, head, .. } => {
            if !head
                .to_ascii_lowercase()
                .contains("content-type: application/json")
            {
                return Err(format!("not JSON: {head}"));
            }
            let body = answer.json();
            if *status != status_of(code) || body["code"] != code {
                return Err(format!(
                    "expected HTTP {} code {code}, got {answer:?}",
                    status_of(code)
                ));
            }
            if body["StatusCode"] != *status as i64 {
                return Err(format!("StatusCode does not match the status: {body}"));
            }
            Ok(())
        }
        Answer::WsRefused { error, close } => {
            if error["code"] != code || error["StatusCode"] != status_of(code) as i64 {
                return Err(format!("expected WS error code {code}, got {error}"));
            }
            if *close != Some(1000) {
                return Err(format!(
                    "expected close 1000 after the error frame, got {close:?}"
                ));
            }
            Ok(())
        }
        other => Err(format!(
            "expected a refusal with code {code}, got {other:?}"
        )),
    }
}

/// Refused as HTTP (not as a WebSocket rejection) with `code`.
fn refused_http(answer: &Answer, forwarded: &[Recorded], code: i64) -> Result<(), String> {
    match answer {
        Answer::Http { .. } => refused(answer, forwarded, code),
        other => Err(format!("expected an HTTP refusal, got {other:?}")),
    }
}

/// Refused as a WebSocket rejection (101 + error frame + close 1000) with `code`.
fn refused_ws(answer: &Answer, forwarded: &[Recorded], code: i64) -> Result<(), String> {
    match answer {
        Answer::WsRefused { .. } => refused(answer, forwarded, code),
        other => Err(format!("expected a WebSocket rejection, got {other:?}")),
    }
}

/// Answered 200 by the upstream, which received exactly one request with `target`.
fn forwarded_as(answer: &Answer, forwarded: &[Recorded], target: &str) -> Result<(), String> {
    match answer {
        Answer::Http { status: 200, .. } => {}
        Answer::WsOpen { first_frame } if first_frame.contains("health.check") => {}
        other => return Err(format!("expected the upstream's answer, got {other:?}")),
    }
    match forwarded {
        [one] if one.target == target => Ok(()),
        [one] => Err(format!(
            "the upstream received {:?}, not {target:?}",
            one.target
        )),
        many => Err(format!("the upstream received {} requests", many.len())),
    }
}

/// A header name as an upstream framework may read it: case folded, `_` as `-`.
fn folded(name: &str) -> String {
    name.to_ascii_lowercase().replace('_', "-")
}

// === rule 1: one app, one credential ===

/// Every way of repeating one credential parameter in a query, each appended to a
/// request that is otherwise allowed.
fn repeated_parameters(token: &str, other_token: &str) -> Vec<String> {
    let json = connect_json("alice");
    let json_other = connect_json("mallory");
    vec![
        format!("api_key={KEY}&api_key={KEY}"),
        format!("api_key={KEY}&api_key={KEY_B}"),
        format!("api_key={KEY}&x=1&api_key={KEY}"),
        format!("api_key={KEY}&api_key="),
        format!("api_key={KEY}&%61pi_key={KEY_B}"),
        format!("api%5Fkey={KEY_B}&api_key={KEY}"),
        format!("api%5fkey={KEY}&api_key={KEY}"),
        format!("%61%70%69%5f%6b%65%79={KEY}&api_key={KEY}"),
        // `;` separates pairs for older Go and Python parsers.
        format!("api_key={KEY};api_key={KEY_B}"),
        format!("x=1;api_key={KEY_B}&api_key={KEY}"),
        format!("api_key={KEY}&authorization={token}&authorization={token}"),
        format!("api_key={KEY}&authorization={token}&%61uthorization={other_token}"),
        format!("api_key={KEY}&authorization={token}&authorization="),
        format!("api_key={KEY}&authorization={token}&json={json}&json={json}"),
        format!("api_key={KEY}&authorization={token}&json={json}&js%6Fn={json_other}"),
        format!("api_key={KEY}&authorization={token}&stream-auth-type=jwt&stream-auth-type=jwt"),
        format!(
            "api_key={KEY}&authorization={token}&stream-auth-type=jwt&stream%2Dauth-type=anonymous"
        ),
        format!("api_key={KEY}&authorization={token}&user_id=alice&user_id=alice"),
        format!("api_key={KEY}&authorization={token}&user_id=alice&user%5Fid=mallory"),
        format!("api_key={KEY}&authorization={token}&connection_id=c1&connection_id=c1"),
        format!("api_key={KEY}&authorization={token}&connection_id=c1&%63onnection_id=c2"),
    ]
}

#[tokio::test]
async fn a_repeated_credential_query_parameter_is_refused_with_code_4_and_never_forwarded() {
    let rig = Rig::start(|o| o.second_app = true).await;
    let token = user_token("alice");
    let other = user_token("mallory");
    within(Duration::from_secs(60), async {
        let mut findings = Findings::default();
        // The same request with each parameter once is allowed: what is refused below
        // is refused for the repetition alone.
        let once = format!(
            "/channels?api_key={KEY}&user_id=alice&connection_id=c1&stream-auth-type=jwt&json={}",
            connect_json("alice")
        );
        let (answer, forwarded) = rig.send(&get(&once, &[("Authorization", &token)])).await;
        findings.check(
            "each parameter once",
            forwarded_as(&answer, &forwarded, &once),
        );
        for query in repeated_parameters(&token, &other) {
            let target = format!("/channels?{query}");
            let (answer, forwarded) = rig.send(&get(&target, &[("Authorization", &token)])).await;
            findings.check(&target, refused_http(&answer, &forwarded, 4));
        }
        findings.assert_none();
    })
    .await;
}

#[tokio::test]
async fn a_repeated_credential_query_parameter_on_connect_is_refused_with_the_websocket_error() {
    let rig = Rig::start(|o| o.second_app = true).await;
    let token = user_token("alice");
    let other = user_token("mallory");
    within(Duration::from_secs(60), async {
        let mut findings = Findings::default();
        let once = format!(
            "/connect?api_key={KEY}&authorization={token}&stream-auth-type=jwt&user_id=alice&connection_id=c1&json={}",
            connect_json("alice")
        );
        let (answer, forwarded) = rig.send(&upgrade(&once, &[])).await;
        findings.check("each parameter once", forwarded_as(&answer, &forwarded, &once));
        for query in repeated_parameters(&token, &other) {
            let query = if query.contains("authorization=") {
                query
            } else {
                format!("{query}&authorization={token}")
            };
            let target = format!("/connect?{query}");
            let (answer, forwarded) = rig.send(&upgrade(&target, &[])).await;
            findings.check(&target, refused_ws(&answer, &forwarded, 4));
        }
        findings.assert_none();
    })
    .await;
}

#[tokio::test]
async fn a_repeated_authorization_or_auth_type_header_is_refused_whatever_its_case() {
    let rig = Rig::start(|_| {}).await;
    let token = user_token("alice");
    let other = user_token("mallory");
    let bearer = format!("Bearer {token}");
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        (
            "Authorization twice, same value",
            vec![("Authorization", &token), ("Authorization", &token)],
        ),
        (
            "Authorization and authorization",
            vec![("Authorization", &token), ("authorization", &token)],
        ),
        (
            "authorization and AUTHORIZATION, different tokens",
            vec![("authorization", &token), ("AUTHORIZATION", &other)],
        ),
        (
            "Authorization and an empty one",
            vec![("Authorization", &token), ("Authorization", "")],
        ),
        (
            "raw and Bearer spellings of one token",
            vec![("Authorization", &token), ("Authorization", &bearer)],
        ),
        (
            "stream-auth-type twice",
            vec![
                ("Authorization", &token),
                ("stream-auth-type", "jwt"),
                ("stream-auth-type", "jwt"),
            ],
        ),
        (
            "stream-auth-type and Stream-Auth-Type",
            vec![
                ("Authorization", &token),
                ("stream-auth-type", "jwt"),
                ("Stream-Auth-Type", "jwt"),
            ],
        ),
        (
            "stream-auth-type jwt then anonymous",
            vec![
                ("Authorization", &token),
                ("STREAM-AUTH-TYPE", "jwt"),
                ("stream-auth-type", "anonymous"),
            ],
        ),
    ];
    within(Duration::from_secs(60), async {
        let mut findings = Findings::default();
        let target = format!("/channels?api_key={KEY}");
        let connect = format!("/connect?api_key={KEY}");
        let (answer, forwarded) = rig
            .send(&get(
                &target,
                &[("Authorization", &token), ("stream-auth-type", "jwt")],
            ))
            .await;
        findings.check(
            "each header once",
            forwarded_as(&answer, &forwarded, &target),
        );
        let (answer, forwarded) = rig
            .send(&upgrade(&connect, &[("Authorization", &token)]))
            .await;
        findings.check(
            "each header once on /connect",
            forwarded_as(&answer, &forwarded, &connect),
        );
        for (what, headers) in &cases {
            let (answer, forwarded) = rig.send(&get(&target, headers)).await;
            findings.check(
                &format!("HTTP, {what}"),
                refused_http(&answer, &forwarded, 4),
            );
            let (answer, forwarded) = rig.send(&upgrade(&connect, headers)).await;
            findings.check(
                &format!("/connect, {what}"),
                refused_ws(&answer, &forwarded, 4),
            );
        }
        findings.assert_none();
    })
    .await;
}

#[tokio::test]
async fn on_connect_a_header_token_and_a_different_query_token_are_refused() {
    let rig = Rig::start(|_| {}).await;
    let alice = user_token("alice");
    let alice_again = TokenBuilder::user("alice")
        .issued_at(now_unix() - 10)
        .sign(SECRET);
    let mallory = user_token("mallory");
    within(Duration::from_secs(60), async {
        let mut findings = Findings::default();
        let query_of = |token: &str| format!("/connect?api_key={KEY}&authorization={token}");
        // The same token in both places is one credential.
        let target = query_of(&alice);
        let (answer, forwarded) = rig
            .send(&upgrade(&target, &[("Authorization", &alice)]))
            .await;
        findings.check(
            "the same token twice",
            forwarded_as(&answer, &forwarded, &target),
        );
        let bearer = format!("Bearer {alice}");
        let (answer, forwarded) = rig
            .send(&upgrade(&target, &[("Authorization", &bearer)]))
            .await;
        findings.check(
            "the same token, header as Bearer",
            forwarded_as(&answer, &forwarded, &target),
        );
        for (what, header, query) in [
            ("another user's token in the query", &alice, &mallory),
            ("another user's token in the header", &mallory, &alice),
            ("another token of the same user", &alice, &alice_again),
        ] {
            let (answer, forwarded) = rig
                .send(&upgrade(&query_of(query), &[("Authorization", header)]))
                .await;
            findings.check(what, refused_ws(&answer, &forwarded, 4));
        }
        // An empty query token (the JS SDK's anonymous spelling) next to a header token.
        let (answer, forwarded) = rig
            .send(&upgrade(&query_of("x.y.z"), &[("Authorization", &alice)]))
            .await;
        findings.check(
            "a junk query token beside a valid header",
            refused_ws(&answer, &forwarded, 4),
        );
        findings.assert_none();
    })
    .await;
}

/// `request` with the header value `NOT-TEXT` replaced by `bytes` (not UTF-8).
fn with_raw_value(request: &[u8], bytes: &[u8]) -> Vec<u8> {
    let at = find(request, b"NOT-TEXT").expect("the placeholder is in the request");
    [&request[..at], bytes, &request[at + b"NOT-TEXT".len()..]].concat()
}

#[tokio::test]
async fn a_credential_header_that_is_not_text_is_refused_not_read_as_absent() {
    let rig = Rig::start(|_| {}).await;
    let alice = user_token("alice");
    let bearer_latin1 = [b"Bearer ".as_slice(), alice.as_bytes(), b"\xe9"].concat();
    let mallory_latin1 = [user_token("mallory").as_bytes(), b"\xff"].concat();
    let spellings: [(&str, &[u8]); 5] = [
        ("a lone 0xff", b"\xff"),
        ("a broken two-byte sequence", b"\xc3\x28"),
        ("a stray continuation byte", b"\x80abc"),
        ("a valid bearer token plus a latin-1 byte", &bearer_latin1),
        ("another user's token plus 0xff", &mallory_latin1),
    ];
    within(Duration::from_secs(60), async {
        let mut findings = Findings::default();
        let connect = format!("/connect?api_key={KEY}&authorization={alice}");
        for (what, bytes) in spellings {
            // On /connect the gate would otherwise judge the query token alone while the
            // upstream still receives the header.
            for name in ["Authorization", "authorization", "Stream-Auth-Type"] {
                let request = upgrade(&connect, &[(name, "NOT-TEXT")]);
                let (answer, forwarded) = rig.send(&with_raw_value(&request, bytes)).await;
                findings.check(
                    &format!("{what} in {name} on /connect"),
                    refused_ws(&answer, &forwarded, 5),
                );
            }
            let request = get(
                &format!("/channels?api_key={KEY}"),
                &[("Authorization", "NOT-TEXT")],
            );
            let (answer, forwarded) = rig.send(&with_raw_value(&request, bytes)).await;
            findings.check(
                &format!("{what} in Authorization on HTTP"),
                refused_http(&answer, &forwarded, 5),
            );
        }
        findings.assert_none();
    })
    .await;
}

#[tokio::test]
async fn with_two_apps_one_apps_server_token_never_reaches_the_upstream_beside_the_other_api_key() {
    let rig = Rig::start(|o| o.second_app = true).await;
    let server_a = server_token();
    let server_b = server_token_b();
    within(Duration::from_secs(60), async {
        let mut findings = Findings::default();
        // Each app alone: its own server token passes, the other's fails its signature.
        for (key, token, expected) in [
            (KEY, &server_a, None),
            (KEY_B, &server_b, None),
            (KEY_B, &server_a, Some(43)),
            (KEY, &server_b, Some(43)),
        ] {
            let target = format!("/channels?api_key={key}");
            let (answer, forwarded) = rig.send(&get(&target, &[("Authorization", token)])).await;
            let what = format!("{target} alone, expecting {expected:?}");
            match expected {
                None => findings.check(&what, forwarded_as(&answer, &forwarded, &target)),
                Some(code) => findings.check(&what, refused_http(&answer, &forwarded, code)),
            }
        }
        for query in [
            format!("api_key={KEY}&api_key={KEY_B}"),
            format!("api_key={KEY_B}&api_key={KEY}"),
            format!("api_key={KEY}&%61pi_key={KEY_B}"),
            format!("%61pi_key={KEY}&api_key={KEY_B}"),
            format!("api_key={KEY}&api%5Fkey={KEY_B}"),
        ] {
            for token in [&server_a, &server_b] {
                let target = format!("/channels?{query}");
                let (answer, forwarded) =
                    rig.send(&get(&target, &[("Authorization", token)])).await;
                findings.check(
                    &format!("GET {target}"),
                    refused_http(&answer, &forwarded, 4),
                );
            }
        }
        // A revocation carrying both keys is neither recorded nor forwarded.
        let victim_a = old_user_token("u1", 100);
        let victim_b = TokenBuilder::user("u1")
            .issued_at(now_unix() - 100)
            .sign(SECRET_B);
        let body = format!(
            r#"{{"users":[{{"id":"u1","set":{{"revoke_tokens_issued_before":"{}"}}}}]}}"#,
            chrono::DateTime::from_timestamp(now_unix(), 0)
                .unwrap()
                .to_rfc3339()
        );
        let target = format!("/users?api_key={KEY}&api_key={KEY_B}");
        let (answer, forwarded) = rig
            .send(&raw(
                "PATCH",
                &target,
                &[("Authorization", &server_a)],
                &body,
            ))
            .await;
        findings.check(
            "PATCH /users with both keys",
            refused_http(&answer, &forwarded, 4),
        );
        for (key, token) in [(KEY, &victim_a), (KEY_B, &victim_b)] {
            let target = format!("/channels?api_key={key}");
            let (answer, forwarded) = rig.send(&get(&target, &[("Authorization", token)])).await;
            findings.check(
                &format!("u1 of {key} after the refused revocation"),
                forwarded_as(&answer, &forwarded, &target),
            );
        }
        findings.assert_none();
    })
    .await;
}

// === rule 2: identity headers are the gate's alone ===

/// Client-sent identity headers in every spelling an upstream might fold.
const FORGED: [(&str, &str); 7] = [
    ("x-chatgate-user-id", "mallory"),
    ("X-ChatGate-Auth", "server"),
    ("X-CHATGATE-USER-ID", "mallory"),
    ("x_chatgate_user_id", "mallory"),
    ("X_CHATGATE_AUTH", "server"),
    ("x-chatgate_user-id", "mallory"),
    ("x_chatgate-auth", "server"),
];

/// The identity header lines the upstream received, names folded.
fn identity_lines(recorded: &Recorded) -> Vec<(String, String)> {
    recorded
        .header_lines()
        .into_iter()
        .map(|(name, value)| (folded(&name), value))
        .filter(|(name, _)| name == "x-chatgate-user-id" || name == "x-chatgate-auth")
        .collect()
}

/// The upstream received exactly `expected` as identity headers (folded names), once each.
fn identity_is(forwarded: &[Recorded], expected: &[(&str, &str)]) -> Result<(), String> {
    let [one] = forwarded else {
        return Err(format!(
            "the upstream received {} requests",
            forwarded.len()
        ));
    };
    let mut got = identity_lines(one);
    got.sort();
    let mut want: Vec<(String, String)> = expected
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    want.sort();
    if got == want {
        Ok(())
    } else {
        Err(format!(
            "identity headers upstream {got:?}, expected {want:?}; head:\n{}",
            String::from_utf8_lossy(&one.raw_head)
        ))
    }
}

#[tokio::test]
async fn client_sent_identity_headers_in_any_spelling_never_reach_the_upstream() {
    for forward_identity in [false, true] {
        let rig = Rig::start(|o| {
            o.forward_identity = forward_identity;
            o.public_paths = vec!["/healthz".into()];
        })
        .await;
        let token = user_token("alice");
        within(Duration::from_secs(60), async {
            let mut findings = Findings::default();
            let gate_says: &[(&str, &str)] = if forward_identity {
                &[("x-chatgate-user-id", "alice"), ("x-chatgate-auth", "user")]
            } else {
                &[]
            };
            let server_says: &[(&str, &str)] = if forward_identity {
                &[("x-chatgate-auth", "server")]
            } else {
                &[]
            };
            let channels = format!("/channels?api_key={KEY}");
            let connect = format!("/connect?api_key={KEY}");
            for forged in FORGED.iter().map(std::slice::from_ref).chain([&FORGED[..]]) {
                let label = format!("forward_identity={forward_identity}, {forged:?}");
                let mut headers = vec![("Authorization", token.as_str())];
                headers.extend_from_slice(forged);
                let (answer, forwarded) = rig.send(&get(&channels, &headers)).await;
                findings.check(
                    &format!("user, {label}"),
                    forwarded_as(&answer, &forwarded, &channels),
                );
                findings.check(
                    &format!("user, {label}"),
                    identity_is(&forwarded, gate_says),
                );

                let server = server_token();
                let mut headers = vec![("Authorization", server.as_str())];
                headers.extend_from_slice(forged);
                let (_, forwarded) = rig.send(&get(&channels, &headers)).await;
                findings.check(
                    &format!("server, {label}"),
                    identity_is(&forwarded, server_says),
                );

                let (_, forwarded) = rig.send(&get("/healthz", forged)).await;
                findings.check(
                    &format!("public path, {label}"),
                    identity_is(&forwarded, &[]),
                );

                let mut headers = vec![("Authorization", token.as_str())];
                headers.extend_from_slice(forged);
                let (answer, forwarded) = rig.send(&upgrade(&connect, &headers)).await;
                findings.check(
                    &format!("/connect, {label}"),
                    forwarded_as(&answer, &forwarded, &connect),
                );
                findings.check(
                    &format!("/connect, {label}"),
                    identity_is(&forwarded, gate_says),
                );
            }
            findings.assert_none();
        })
        .await;
    }
}

#[tokio::test]
async fn the_gates_identity_headers_arrive_exactly_even_when_the_client_lists_them_in_connection() {
    let rig = Rig::start(|o| o.forward_identity = true).await;
    let token = user_token("alice");
    let server = server_token();
    let channels = format!("/channels?api_key={KEY}");
    let connect = format!("/connect?api_key={KEY}");
    let connections: [&[&str]; 7] = [
        &["x-chatgate-user-id"],
        &["close, X-Chatgate-Auth"],
        &["keep-alive, x-chatgate-user-id, x-chatgate-auth"],
        &["X-CHATGATE-USER-ID,X-CHATGATE-AUTH"],
        &["keep-alive", "x-chatgate-auth"],
        &["x-chatgate-user-id", "close", "x-chatgate-auth"],
        &["Keep-Alive, X-ChatGate-User-Id, Authorization"],
    ];
    within(Duration::from_secs(60), async {
        let mut findings = Findings::default();
        for connection in connections {
            let label = format!("Connection: {connection:?}");
            let mut headers: Vec<(&str, &str)> =
                connection.iter().map(|v| ("Connection", *v)).collect();
            headers.push(("Authorization", &token));
            // A forged value too, so a client listing the header cannot smuggle its own.
            headers.push(("X-Chatgate-User-Id", "mallory"));
            let (answer, forwarded) = rig.send(&get(&channels, &headers)).await;
            findings.check(
                &format!("user, {label}"),
                forwarded_as(&answer, &forwarded, &channels),
            );
            findings.check(
                &format!("user, {label}"),
                identity_is(
                    &forwarded,
                    &[("x-chatgate-user-id", "alice"), ("x-chatgate-auth", "user")],
                ),
            );
            let mut headers: Vec<(&str, &str)> =
                connection.iter().map(|v| ("Connection", *v)).collect();
            headers.push(("Authorization", &server));
            let (_, forwarded) = rig.send(&get(&channels, &headers)).await;
            findings.check(
                &format!("server, {label}"),
                identity_is(&forwarded, &[("x-chatgate-auth", "server")]),
            );
        }
        for connection in [
            "Upgrade, x-chatgate-user-id, x-chatgate-auth",
            "x-chatgate-auth, Upgrade",
            "UPGRADE,X-CHATGATE-USER-ID",
        ] {
            let request =
                upgrade_with_connection(&connect, connection, &[("Authorization", &token)]);
            let (answer, forwarded) = rig.send(&request).await;
            let label = format!("/connect, Connection: {connection}");
            findings.check(&label, forwarded_as(&answer, &forwarded, &connect));
            findings.check(
                &label,
                identity_is(
                    &forwarded,
                    &[("x-chatgate-user-id", "alice"), ("x-chatgate-auth", "user")],
                ),
            );
        }
        findings.assert_none();
    })
    .await;
}

/// The hop-by-hop headers an upgrade carries, in several spellings and repeated, and a
/// header its `Connection` names in another case than its own line: the upstream
/// receives none of them, and `Connection: Upgrade` / `Upgrade: websocket` once each.
/// (`Transfer-Encoding` is left out: on a `GET` it frames a body, which rule 9's and
/// the smuggling tests cover.)
#[tokio::test]
async fn an_upgrades_hop_by_hop_headers_never_reach_the_upstream_whatever_their_spelling() {
    let rig = Rig::start(|_| {}).await;
    let token = user_token("alice");
    let connect = format!("/connect?api_key={KEY}");
    let hop_by_hop: [&[(&str, &str)]; 4] = [
        &[
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Connection", "keep-alive"),
            ("TE", "trailers"),
            ("Trailer", "Expires"),
        ],
        &[
            ("keep-alive", "timeout=5"),
            ("KEEP-ALIVE", "max=9"),
            ("proxy-authorization", "Basic bWFsbG9yeTpw"),
            ("Proxy-Authenticate", "Basic"),
        ],
        &[
            ("HTTP2-Settings", "AAMAAABkAAQAAP__"),
            ("te", "trailers"),
            ("Te", "deflate"),
            ("PROXY-CONNECTION", "close"),
        ],
        &[("X-Secret-Hop", "1"), ("x-secret-hop", "2")],
    ];
    let gone = [
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "proxy-authorization",
        "proxy-authenticate",
        "http2-settings",
        "x-secret-hop",
    ];
    within(Duration::from_secs(60), async {
        let mut findings = Findings::default();
        for (round, headers) in hop_by_hop.iter().enumerate() {
            for connection in ["Upgrade, X-SECRET-HOP", "x-Secret-Hop,upgrade"] {
                let mut all = vec![("Authorization", token.as_str())];
                all.extend_from_slice(headers);
                let request = upgrade_with_connection(&connect, connection, &all);
                let (answer, forwarded) = rig.send(&request).await;
                let label = format!("round {round}, Connection: {connection}");
                findings.check(&label, forwarded_as(&answer, &forwarded, &connect));
                let Some(one) = forwarded.first() else {
                    continue;
                };
                let lines: Vec<(String, String)> = one
                    .header_lines()
                    .into_iter()
                    .map(|(name, value)| (folded(&name), value))
                    .collect();
                let reached: Vec<&(String, String)> = lines
                    .iter()
                    .filter(|(name, _)| gone.contains(&name.as_str()))
                    .collect();
                findings.check(
                    &label,
                    if reached.is_empty() {
                        Ok(())
                    } else {
                        Err(format!(
                            "hop-by-hop headers reached the upstream: {reached:?}"
                        ))
                    },
                );
                let upgrade_lines: Vec<String> = lines
                    .iter()
                    .filter(|(name, _)| name == "connection" || name == "upgrade")
                    .map(|(name, value)| format!("{name}: {}", value.to_ascii_lowercase()))
                    .collect();
                let mut sorted = upgrade_lines.clone();
                sorted.sort();
                findings.check(
                    &label,
                    if sorted == ["connection: upgrade", "upgrade: websocket"] {
                        Ok(())
                    } else {
                        Err(format!("upgrade headers as received: {upgrade_lines:?}"))
                    },
                );
            }
        }
        findings.assert_none();
    })
    .await;
}

// === rule 3: paths are judged in normal form, and forwarded in it ===

fn with_public_paths(o: &mut ProxyOptions) {
    o.public_paths = vec!["/healthz".into(), "/static/*".into()];
}

#[tokio::test]
async fn dot_segments_after_a_public_prefix_are_judged_and_forwarded_as_the_path_they_name() {
    let rig = Rig::start(with_public_paths).await;
    let token = user_token("alice");
    let query = format!("?api_key={KEY}");
    let expected = format!("/channels{query}");
    within(Duration::from_secs(90), async {
        let mut findings = Findings::default();
        for path in [
            "/static/../channels",
            "/static/%2e%2e/channels",
            "/static/%2E%2E/channels",
            "/static/.%2e/channels",
            "/static/%2e./channels",
            "/static/./../channels",
            "/static/%2e/../channels",
            "//static/../channels",
            "/static//../../channels",
            "/static/x/../../channels",
            "/static/../../../channels",
            "/static/%2e%2e/%2e%2e/channels",
            "http://127.0.0.1/static/../channels",
        ] {
            let target = format!("{path}{query}");
            let (answer, forwarded) = rig.send(&get(&target, &[])).await;
            findings.check(
                &format!("{target} without a token"),
                refused_http(&answer, &forwarded, 5),
            );
            let (answer, forwarded) = rig.send(&get(&target, &[("Authorization", &token)])).await;
            findings.check(
                &format!("{target} with a token"),
                forwarded_as(&answer, &forwarded, &expected),
            );
        }
        // The same on the WebSocket path: a dot segment does not make /connect public.
        for path in [
            "/static/../connect",
            "/static/%2e%2e/connect",
            "//static/./../connect",
        ] {
            let target = format!("{path}{query}");
            let (answer, forwarded) = rig.send(&upgrade(&target, &[])).await;
            findings.check(
                &format!("{target} upgrade without a token"),
                refused_ws(&answer, &forwarded, 5),
            );
            let (answer, forwarded) = rig
                .send(&upgrade(&target, &[("Authorization", &token)]))
                .await;
            findings.check(
                &format!("{target} upgrade with a token"),
                forwarded_as(&answer, &forwarded, &format!("/connect{query}")),
            );
        }
        findings.assert_none();
    })
    .await;
}

#[tokio::test]
async fn encoded_or_doubled_spellings_of_a_public_path_stay_public_and_are_forwarded_normalised() {
    let rig = Rig::start(with_public_paths).await;
    within(Duration::from_secs(60), async {
        let mut findings = Findings::default();
        for (target, expected) in [
            ("/static/x", "/static/x"),
            ("/%73tatic/x", "/static/x"),
            ("/%73%74%61%74%69%63/x", "/static/x"),
            ("//static///x", "/static/x"),
            ("/static/./x", "/static/x"),
            ("/static/y/../x", "/static/x"),
            ("/static/%2e/x", "/static/x"),
            ("/%68ealthz", "/healthz"),
            ("//healthz", "/healthz"),
            ("/static/%7Euser", "/static/~user"),
            // The query goes as sent: only the path is normalised.
            (
                "/%73tatic/x?v=%2e%2E&a=%2F&api_key=",
                "/static/x?v=%2e%2E&a=%2F&api_key=",
            ),
        ] {
            let (answer, forwarded) = rig.send(&get(target, &[])).await;
            findings.check(target, forwarded_as(&answer, &forwarded, expected));
        }
        findings.assert_none();
    })
    .await;
}

#[tokio::test]
async fn encoded_slashes_backslashes_and_control_characters_in_a_path_are_refused_with_code_4() {
    let rig = Rig::start(with_public_paths).await;
    let token = user_token("alice");
    let query = format!("?api_key={KEY}");
    within(Duration::from_secs(90), async {
        let mut findings = Findings::default();
        let paths: Vec<Vec<u8>> = [
            "/static/..%2Fchannels",
            "/static/..%2fchannels",
            "/channels%2F..",
            "/static%2F..%2Fchannels",
            "/static/..%5Cchannels",
            "/static/..%5cchannels",
            "/static/..\\channels",
            "/channels\\",
            "/channels%00",
            "/static/x%00",
            "/chan%01nels",
            "/channels%1F",
            "/channels%1f",
            "/channels%7F",
            "/chan%09nels",
            "/channels%0D%0AX-Injected:%201",
            "/static/%2e%2e%2fchannels",
            // A `%` that is not an escape: one decode of `%%32%65` would leave `%2e`.
            "/static/%%32%65%%32%65/channels",
            "/channels%zz",
            "/channels%2",
            // Path parameters: servlet containers read `/static/..;/channels` as `/channels`.
            "/static/..;/channels",
            "/channels;x=1",
        ]
        .iter()
        .map(|p| p.as_bytes().to_vec())
        // Raw control bytes in the request line (Pingora percent-encodes them before
        // the gate sees the path).
        .chain([
            b"/chan\x00nels".to_vec(),
            b"/chan\x01nels".to_vec(),
            b"/channels\x7f".to_vec(),
        ])
        .collect();
        for path in paths {
            let label = String::from_utf8_lossy(&path).escape_debug().to_string();
            let mut target = path.clone();
            target.extend_from_slice(query.as_bytes());
            let mut request = b"GET ".to_vec();
            request.extend_from_slice(&target);
            request.extend_from_slice(
                format!(" HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {token}\r\n\r\n")
                    .as_bytes(),
            );
            let (answer, forwarded) = rig.send(&request).await;
            findings.check(
                &format!("{label} with a token"),
                refused_http(&answer, &forwarded, 4),
            );
        }
        // Public prefixes do not skip the check.
        for target in [
            "/static/a%2Fb",
            "/static/a%5Cb",
            "/static/a\\b",
            "/static/%00",
        ] {
            let (answer, forwarded) = rig.send(&get(target, &[])).await;
            findings.check(
                &format!("{target} (public prefix)"),
                refused_http(&answer, &forwarded, 4),
            );
        }
        for target in [
            format!("/connect%2F{query}"),
            format!("/connect%5C{query}"),
            format!("/con%00nect{query}"),
        ] {
            let (answer, forwarded) = rig
                .send(&upgrade(&target, &[("Authorization", &token)]))
                .await;
            findings.check(
                &format!("{target} upgrade"),
                refused_ws(&answer, &forwarded, 4),
            );
        }
        findings.assert_none();
    })
    .await;
}

// === rule 4: every revocation the upstream would take is recorded by the gate ===

/// Spellings of `PATCH /users` and `PATCH /app`, with the path each normalises to.
const USERS_SPELLINGS: [(&str, &str); 8] = [
    ("/users", "/users"),
    ("/users/", "/users/"),
    ("//users", "/users"),
    ("/%75sers", "/users"),
    ("/x/../users", "/users"),
    ("/users/.", "/users/"),
    ("/./users", "/users"),
    ("/%2e/%75%73%65%72%73", "/users"),
];
const APP_SPELLINGS: [(&str, &str); 6] = [
    ("/app", "/app"),
    ("/app/", "/app/"),
    ("/%61pp", "/app"),
    ("//app", "/app"),
    ("/users/../app", "/app"),
    ("/app/%2e", "/app/"),
];

fn users_body(user: &str, at: i64) -> String {
    let cutoff = chrono::DateTime::from_timestamp(at, 0)
        .unwrap()
        .to_rfc3339();
    format!(r#"{{"users":[{{"id":"{user}","set":{{"revoke_tokens_issued_before":"{cutoff}"}}}}]}}"#)
}

fn app_body(at: Option<i64>) -> String {
    match at {
        Some(at) => format!(
            r#"{{"revoke_tokens_issued_before":"{}"}}"#,
            chrono::DateTime::from_timestamp(at, 0)
                .unwrap()
                .to_rfc3339()
        ),
        None => r#"{"revoke_tokens_issued_before":null}"#.into(),
    }
}

#[tokio::test]
async fn a_user_token_on_any_spelling_of_a_revocation_endpoint_is_refused_with_code_17() {
    let rig = Rig::start(|_| {}).await;
    let token = user_token("alice");
    within(Duration::from_secs(60), async {
        let mut findings = Findings::default();
        for (path, _) in USERS_SPELLINGS {
            let target = format!("{path}?api_key={KEY}");
            let body = users_body("alice", now_unix());
            let (answer, forwarded) = rig
                .send(&raw("PATCH", &target, &[("Authorization", &token)], &body))
                .await;
            findings.check(
                &format!("PATCH {target}"),
                refused_http(&answer, &forwarded, 17),
            );
        }
        for (path, _) in APP_SPELLINGS {
            let target = format!("{path}?api_key={KEY}");
            let (answer, forwarded) = rig
                .send(&raw(
                    "PATCH",
                    &target,
                    &[("Authorization", &token)],
                    &app_body(Some(now_unix())),
                ))
                .await;
            findings.check(
                &format!("PATCH {target}"),
                refused_http(&answer, &forwarded, 17),
            );
        }
        findings.assert_none();
    })
    .await;
}

#[tokio::test]
async fn a_server_token_revocation_under_any_spelling_is_recorded_then_forwarded_normalised() {
    let rig = Rig::start(|_| {}).await;
    let server = server_token();
    let channels = format!("/channels?api_key={KEY}");
    within(Duration::from_secs(90), async {
        let mut findings = Findings::default();
        for (i, (path, normalised)) in USERS_SPELLINGS.iter().enumerate() {
            let user = format!("victim{i}");
            let old = old_user_token(&user, 100);
            let (answer, forwarded) = rig.send(&get(&channels, &[("Authorization", &old)])).await;
            findings.check(
                &format!("{user} before"),
                forwarded_as(&answer, &forwarded, &channels),
            );
            let target = format!("{path}?api_key={KEY}");
            let body = users_body(&user, now_unix());
            let (answer, forwarded) = rig
                .send(&raw("PATCH", &target, &[("Authorization", &server)], &body))
                .await;
            let label = format!("PATCH {target}");
            findings.check(
                &label,
                forwarded_as(&answer, &forwarded, &format!("{normalised}?api_key={KEY}")),
            );
            if let [one] = &forwarded[..]
                && one.body != body.as_bytes()
            {
                findings.check(&label, Err("the body was not forwarded unchanged".into()));
            }
            let (answer, forwarded) = rig.send(&get(&channels, &[("Authorization", &old)])).await;
            findings.check(
                &format!("{user} after {label}"),
                refused_http(&answer, &forwarded, 40),
            );
        }
        let old = old_user_token("anyone", 100);
        for (path, normalised) in APP_SPELLINGS {
            let target = format!("{path}?api_key={KEY}");
            let label = format!("PATCH {target}");
            let (answer, forwarded) = rig
                .send(&raw(
                    "PATCH",
                    &target,
                    &[("Authorization", &server)],
                    &app_body(Some(now_unix())),
                ))
                .await;
            findings.check(
                &label,
                forwarded_as(&answer, &forwarded, &format!("{normalised}?api_key={KEY}")),
            );
            let (answer, forwarded) = rig.send(&get(&channels, &[("Authorization", &old)])).await;
            findings.check(
                &format!("an old token after {label}"),
                refused_http(&answer, &forwarded, 40),
            );
            // Undo through the canonical spelling, so the next spelling starts clean.
            let (answer, forwarded) = rig
                .send(&raw(
                    "PATCH",
                    &format!("/app?api_key={KEY}"),
                    &[("Authorization", &server)],
                    &app_body(None),
                ))
                .await;
            findings.check(
                &format!("undo after {label}"),
                forwarded_as(&answer, &forwarded, &format!("/app?api_key={KEY}")),
            );
            let (answer, forwarded) = rig.send(&get(&channels, &[("Authorization", &old)])).await;
            findings.check(
                &format!("an old token after undoing {label}"),
                forwarded_as(&answer, &forwarded, &channels),
            );
        }
        findings.assert_none();
    })
    .await;
}

/// **Decision** (contract §6 rule 4): HTTP methods are case-sensitive, but some servers
/// fold them, so a method that equals a standard one only case-insensitively (`patch`,
/// `Patch`, `get`) could be a revocation to the upstream and not to the gate. chatgate
/// refuses such a method (400, code 4) rather than guess which the upstream does.
#[tokio::test]
async fn a_standard_method_in_another_case_is_refused_with_code_4_and_records_nothing() {
    let rig = Rig::start(|_| {}).await;
    let server = server_token();
    let user = user_token("alice");
    let channels = format!("/channels?api_key={KEY}");
    within(Duration::from_secs(60), async {
        let mut findings = Findings::default();
        let old = old_user_token("victim", 100);
        for method in ["patch", "Patch", "pAtCh"] {
            for (target, body) in [
                (
                    format!("/users?api_key={KEY}"),
                    users_body("victim", now_unix()),
                ),
                (format!("/app?api_key={KEY}"), app_body(Some(now_unix()))),
            ] {
                for token in [&server, &user] {
                    let (answer, forwarded) = rig
                        .send(&raw(method, &target, &[("Authorization", token)], &body))
                        .await;
                    findings.check(
                        &format!("{method} {target}"),
                        refused_http(&answer, &forwarded, 4),
                    );
                }
            }
        }
        for method in ["get", "Get", "post"] {
            let (answer, forwarded) = rig
                .send(&raw(method, &channels, &[("Authorization", &user)], ""))
                .await;
            findings.check(
                &format!("{method} {channels}"),
                refused_http(&answer, &forwarded, 4),
            );
        }
        // Nothing was recorded: the victim's old token still works.
        let (answer, forwarded) = rig.send(&get(&channels, &[("Authorization", &old)])).await;
        findings.check(
            "the victim's old token afterwards",
            forwarded_as(&answer, &forwarded, &channels),
        );
        findings.assert_none();
    })
    .await;
}

// === rule 5: user ids are text, not control bytes ===

#[tokio::test]
async fn a_user_id_with_control_characters_or_edge_whitespace_is_malformed_and_never_forwarded() {
    // forward_identity: a control character in x-chatgate-user-id is what made a 502.
    let rig = Rig::start(|o| o.forward_identity = true).await;
    within(Duration::from_secs(90), async {
        let mut findings = Findings::default();
        let channels = format!("/channels?api_key={KEY}");
        // Inner spaces are text: the control case.
        for fine in ["alice smith", "josé", "用户"] {
            let token = user_token(fine);
            let (answer, forwarded) = rig
                .send(&get(&channels, &[("Authorization", &token)]))
                .await;
            findings.check(fine, forwarded_as(&answer, &forwarded, &channels));
            findings.check(
                fine,
                identity_is(
                    &forwarded,
                    &[("x-chatgate-user-id", fine), ("x-chatgate-auth", "user")],
                ),
            );
        }
        for id in [
            "alice\u{0}",
            "\u{1}alice",
            "ali\nce",
            "alice\r",
            "ali\u{1f}ce",
            "alice\u{7f}",
            "\u{1b}[31m",
            " alice",
            "alice ",
            "\talice",
            "alice\t",
            " ",
            "\u{0}",
        ] {
            let label = format!("user_id {id:?}");
            let token = user_token(id);
            let (answer, forwarded) = rig
                .send(&get(&channels, &[("Authorization", &token)]))
                .await;
            findings.check(
                &format!("HTTP, {label}"),
                refused_http(&answer, &forwarded, 5),
            );
            let connect = format!(
                "/connect?api_key={KEY}&authorization={token}&json={}",
                connect_json(id)
            );
            let (answer, forwarded) = rig.send(&upgrade(&connect, &[])).await;
            findings.check(
                &format!("/connect, {label}"),
                refused_ws(&answer, &forwarded, 5),
            );
            let developer = TokenBuilder::developer_token(id);
            let target = format!("/channels?api_key={DEV_KEY}");
            let (answer, forwarded) = rig
                .send(&get(&target, &[("Authorization", &developer)]))
                .await;
            findings.check(
                &format!("developer token, {label}"),
                refused_http(&answer, &forwarded, 5),
            );
            if answer.status().is_some_and(|s| s >= 500) {
                findings.check(&label, Err(format!("a 5xx: {answer:?}")));
            }
        }
        findings.assert_none();
    })
    .await;
}

// === rule 6: slow or huge request heads do not hold resources ===

const HEADER_TIMEOUT_MS: u64 = 1000;
/// How long past the header timeout the connection may take to end.
const SLACK: Duration = Duration::from_millis(1500);

#[tokio::test]
async fn a_request_head_dribbled_past_the_header_timeout_ends_the_connection_in_time() {
    let rig = Rig::start(|o| o.header_timeout_ms = Some(HEADER_TIMEOUT_MS)).await;
    let mut stream = TcpStream::connect(rig.proxy.address).await.unwrap();
    let started = Instant::now();
    stream
        .write_all(format!("GET /channels?api_key={KEY} HTTP/1.1\r\nX-Pad: ").as_bytes())
        .await
        .unwrap();
    let mut received = Vec::new();
    let mut ended = None;
    // One byte every 100 ms, never finishing the head; at most 6 s.
    for _ in 0..60 {
        if stream.write_all(b"a").await.is_err() {
            ended = Some(started.elapsed());
            break;
        }
        let mut chunk = [0u8; 1024];
        match tokio::time::timeout(Duration::from_millis(100), stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                ended = Some(started.elapsed());
                break;
            }
            Ok(Ok(n)) => received.extend_from_slice(&chunk[..n]),
            Err(_) => {}
        }
    }
    let ended = ended.expect("the connection was still open after 6 s of a dribbled head");
    assert!(
        ended <= Duration::from_millis(HEADER_TIMEOUT_MS) + SLACK,
        "ended after {ended:?}, header timeout {HEADER_TIMEOUT_MS} ms"
    );
    assert!(
        received.is_empty() || received.starts_with(b"HTTP/1.1 408"),
        "answered {:?}",
        String::from_utf8_lossy(&received)
    );
    assert!(rig.upstream.requests().is_empty());
}

#[tokio::test]
async fn a_request_head_over_max_header_bytes_is_answered_431_or_closed_and_never_forwarded() {
    let rig = Rig::start(|o| o.max_header_bytes = Some(8192)).await;
    let token = user_token("alice");
    let target = format!("/channels?api_key={KEY}");
    within(Duration::from_secs(30), async {
        // Under the limit: served.
        let pad = "a".repeat(4096);
        let (answer, forwarded) = rig
            .send(&get(&target, &[("Authorization", &token), ("X-Pad", &pad)]))
            .await;
        forwarded_as(&answer, &forwarded, &target).unwrap();
        // Over it, in one header or in many, sent at once or in pieces.
        let big = "a".repeat(16 * 1024);
        let many: Vec<(String, String)> = (0..400)
            .map(|i| (format!("X-Pad-{i}"), "b".repeat(40)))
            .collect();
        let mut many_headers: Vec<(&str, &str)> = vec![("Authorization", &token)];
        many_headers.extend(many.iter().map(|(n, v)| (n.as_str(), v.as_str())));
        for (what, request) in [
            (
                "one big header",
                get(&target, &[("Authorization", &token), ("X-Pad", &big)]),
            ),
            ("many headers", get(&target, &many_headers)),
            (
                "a big target",
                get(&format!("{target}&pad={big}"), &[("Authorization", &token)]),
            ),
        ] {
            let before = rig.upstream.requests().len();
            let mut stream = TcpStream::connect(rig.proxy.address).await.unwrap();
            for piece in request.chunks(1024) {
                if stream.write_all(piece).await.is_err() {
                    break;
                }
            }
            let mut buffer = Vec::new();
            let answer = read_answer(&mut stream, &mut buffer, STEP).await;
            assert!(
                matches!(answer, Answer::Closed | Answer::Http { status: 431, .. }),
                "{what}: {answer:?}"
            );
            assert_eq!(
                rig.upstream.requests().len(),
                before,
                "{what} was forwarded"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_not_cut_by_the_header_timeout() {
    let rig = Rig::start(|o| o.header_timeout_ms = Some(HEADER_TIMEOUT_MS)).await;
    let token = user_token("alice");
    let target = format!("/channels?api_key={KEY}");
    within(Duration::from_secs(30), async {
        let mut stream = TcpStream::connect(rig.proxy.address).await.unwrap();
        let mut buffer = Vec::new();
        for round in 0..2 {
            stream
                .write_all(&get(&target, &[("Authorization", &token)]))
                .await
                .unwrap();
            let answer = read_answer(&mut stream, &mut buffer, STEP).await;
            assert_eq!(answer.status(), Some(200), "round {round}: {answer:?}");
            // Idle between requests for well over the header timeout.
            tokio::time::sleep(Duration::from_millis(HEADER_TIMEOUT_MS * 5 / 2)).await;
        }
    })
    .await;
}

// === a request body that stops arriving does not hold the request ===

const BODY_TIMEOUT_MS: u64 = 1000;

/// Sends `head` and `sent` bytes of a body (for a stall, fewer than it announced), then
/// nothing more; returns what the client heard and when its connection ended (at most
/// 8 s).
async fn stalled_body(rig: &Rig, head: &str, sent: &str) -> (Vec<u8>, Duration) {
    let mut stream = TcpStream::connect(rig.proxy.address).await.unwrap();
    let started = Instant::now();
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(sent.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    // Bounded: 80 reads of at most 100 ms each.
    for _ in 0..80 {
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(Duration::from_millis(100), stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (received, started.elapsed()),
            Ok(Ok(n)) => received.extend_from_slice(&chunk[..n]),
            Err(_) => {}
        }
    }
    panic!(
        "the connection was still open 8 s into a stalled body; heard {:?}",
        String::from_utf8_lossy(&received)
    );
}

/// The two requests whose bodies the proxy reads, with the body framed by `framing`
/// (one header): an allowed request's body, streamed upstream, and a revocation's,
/// read whole before the gate decides. Each is `(what, head)`.
fn heads_with_a_body(framing: &str) -> [(&'static str, String); 2] {
    let token = user_token("alice");
    let server = server_token();
    [
        (
            "an allowed request's body (streamed upstream)",
            format!(
                "POST /channels?api_key={KEY} HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\n\
                 Stream-Auth-Type: jwt\r\nContent-Type: application/json\r\n{framing}\r\n\r\n"
            ),
        ),
        (
            "a revocation body (read before the gate decides)",
            format!(
                "PATCH /users?api_key={KEY} HTTP/1.1\r\nHost: x\r\nAuthorization: {server}\r\n\
                 Stream-Auth-Type: jwt\r\nContent-Type: application/json\r\n{framing}\r\n\r\n"
            ),
        ),
    ]
}

#[tokio::test]
async fn a_request_body_that_stops_arriving_ends_the_request_at_the_client_body_timeout() {
    let rig = Rig::start(|o| o.client_body_timeout_ms = Some(BODY_TIMEOUT_MS)).await;
    let cases = heads_with_a_body("Content-Length: 100");
    for (what, head) in cases {
        let (received, ended) = stalled_body(&rig, &head, "{\"users\"").await;
        // Both engines answer a stalled body with the contract's input error (400,
        // code 4, JSON) and close the connection: not the 502 or 504 of an upstream
        // failure (the upstream did nothing wrong), nor Pingora's bare 400.
        if let Err(wrong) = input_error_then_close(&received) {
            panic!("{what}: {wrong}");
        }
        assert!(
            ended >= Duration::from_millis(BODY_TIMEOUT_MS),
            "{what}: ended after {ended:?}, before the body timeout"
        );
        assert!(
            ended <= Duration::from_millis(BODY_TIMEOUT_MS) + SLACK,
            "{what}: ended after {ended:?}, body timeout {BODY_TIMEOUT_MS} ms"
        );
    }
    // The revocation was never whole, so never forwarded.
    assert!(
        rig.upstream.requests().iter().all(|r| r.method != "PATCH"),
        "{:?}",
        rig.upstream.requests()
    );
}

/// `received` is one whole HTTP response and the end of the connection: 400 with the
/// contract's code-4 JSON (`refused_http`'s checks: content type, status, code,
/// `StatusCode`), a `Content-Length` that is the body's, and `Connection: close`.
fn input_error_then_close(received: &[u8]) -> Result<(), String> {
    let heard = String::from_utf8_lossy(received);
    let Some((head, body)) = heard.split_once("\r\n\r\n") else {
        return Err(format!("no whole response head: {heard:?}"));
    };
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3)?.parse().ok())
        .ok_or_else(|| format!("no HTTP/1.1 status line: {heard:?}"))?;
    let answer = Answer::Http {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    };
    refused_http(&answer, &[], 4).map_err(|wrong| format!("{wrong}; heard {heard:?}"))?;
    let head = head.to_ascii_lowercase();
    if !head.contains(&format!("\r\ncontent-length: {}", body.len())) {
        return Err(format!("Content-Length is not the body's: {heard:?}"));
    }
    if !head.contains("\r\nconnection: close") {
        return Err(format!("no Connection: close: {heard:?}"));
    }
    Ok(())
}

#[tokio::test]
async fn a_malformed_chunked_body_is_refused_with_code_4_in_json_and_the_connection_closes() {
    // An upstream that never answers: an answering one can, on a loaded machine, start
    // its response before the proxy reads the broken body, and a started response
    // cannot be replaced by a refusal (the client then sees the connection close).
    let rig = Rig::start_with(Behaviour::Silent, |_| {}).await;
    let cases = heads_with_a_body("Transfer-Encoding: chunked");
    for (what, head) in cases {
        // "zz" is no chunk size: the body's framing is broken from its first line.
        let (received, _) = stalled_body(&rig, &head, "zz\r\n{\"users\":[]}\r\n0\r\n\r\n").await;
        if let Err(wrong) = input_error_then_close(&received) {
            panic!("{what}: {wrong}");
        }
    }
    assert!(
        rig.upstream.requests().iter().all(|r| r.method != "PATCH"),
        "{:?}",
        rig.upstream.requests()
    );
}

// === rule 7: failed authentication is rate limited ===

/// One refusal of each counted code: `(code, request)`.
fn failing_requests() -> Vec<(i64, Vec<u8>)> {
    let target = format!("/channels?api_key={KEY}");
    let now = now_unix();
    vec![
        (
            2,
            get(
                "/channels?api_key=nope",
                &[("Authorization", &user_token("alice"))],
            ),
        ),
        (5, get(&target, &[("Authorization", "not-a-token")])),
        (
            17,
            raw(
                "PATCH",
                &format!("/users?api_key={KEY}"),
                &[("Authorization", &user_token("alice"))],
                &users_body("alice", now),
            ),
        ),
        (
            40,
            get(
                &target,
                &[(
                    "Authorization",
                    &TokenBuilder::user("alice")
                        .expires_at(now - 60)
                        .sign(SECRET),
                )],
            ),
        ),
        (
            41,
            get(
                &target,
                &[(
                    "Authorization",
                    &TokenBuilder::user("alice")
                        .not_before(now + 600)
                        .sign(SECRET),
                )],
            ),
        ),
        (
            42,
            get(
                &target,
                &[(
                    "Authorization",
                    &TokenBuilder::user("alice")
                        .issued_at(now + 600)
                        .sign(SECRET),
                )],
            ),
        ),
        (
            43,
            get(
                &target,
                &[("Authorization", &TokenBuilder::user("alice").sign("wrong"))],
            ),
        ),
    ]
}

fn with_forwarded_for(request: &[u8], forwarded_for: &str) -> Vec<u8> {
    let text = String::from_utf8_lossy(request);
    text.replacen(
        "\r\n",
        &format!("\r\nX-Forwarded-For: {forwarded_for}\r\n"),
        1,
    )
    .into_bytes()
}

fn rate_limited(answer: &Answer, forwarded: &[Recorded]) -> Result<(), String> {
    refused_http(answer, forwarded, 9)?;
    let message = answer.json()["message"].as_str().unwrap_or("").to_owned();
    if message.to_ascii_lowercase().contains("too many requests") {
        Ok(())
    } else {
        Err(format!("message {message:?}"))
    }
}

#[tokio::test]
async fn after_n_failed_authentications_an_address_gets_429_code_9_without_being_checked() {
    let failing = failing_requests();
    let limit = failing.len() as u32;
    let rig = Rig::start(|o| o.failed_auth_per_minute = Some(limit)).await;
    let token = user_token("alice");
    let target = format!("/channels?api_key={KEY}");
    within(Duration::from_secs(60), async {
        // A header the peer is not trusted to send: each failure claims another address.
        for (i, (code, request)) in failing.iter().enumerate() {
            let request = with_forwarded_for(request, &format!("10.0.0.{i}"));
            let (answer, forwarded) = rig.send(&request).await;
            refused_http(&answer, &forwarded, *code).unwrap();
        }
        let (answer, forwarded) = rig.send(&get(&target, &[("Authorization", &token)])).await;
        rate_limited(&answer, &forwarded).unwrap();
        let (answer, forwarded) = rig
            .send(&with_forwarded_for(
                &get(&target, &[("Authorization", &token)]),
                "10.9.9.9",
            ))
            .await;
        rate_limited(&answer, &forwarded).unwrap();
        // Unchecked: a request that would have been refused otherwise gets the 429 too.
        let (answer, forwarded) = rig.send(&failing[1].1).await;
        rate_limited(&answer, &forwarded).unwrap();
    })
    .await;
}

#[tokio::test]
async fn rate_limited_requests_do_not_count_so_the_window_frees_up() {
    let rig = Rig::start(|o| o.failed_auth_per_minute = Some(2)).await;
    let token = user_token("alice");
    let target = format!("/channels?api_key={KEY}");
    within(Duration::from_secs(90), async {
        let started = Instant::now();
        for (code, request) in failing_requests().into_iter().take(2) {
            let (answer, forwarded) = rig.send(&request).await;
            refused_http(&answer, &forwarded, code).unwrap();
        }
        // Keep asking while limited: if the 429s counted, the window would never free up.
        let mut limited = 0;
        loop {
            let (answer, forwarded) = rig.send(&get(&target, &[("Authorization", &token)])).await;
            if answer.status() == Some(200) {
                forwarded_as(&answer, &forwarded, &target).unwrap();
                break;
            }
            rate_limited(&answer, &forwarded).unwrap();
            limited += 1;
            assert!(
                started.elapsed() < Duration::from_secs(65),
                "still limited after {:?} ({limited} requests answered 429)",
                started.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
        assert!(limited > 0, "the limit never applied");
    })
    .await;
}

#[tokio::test]
async fn x_forwarded_for_is_believed_only_from_a_trusted_proxy() {
    let rig = Rig::start(|o| {
        o.failed_auth_per_minute = Some(2);
        o.trusted_proxies = vec!["127.0.0.1".into()];
    })
    .await;
    let token = user_token("alice");
    let target = format!("/channels?api_key={KEY}");
    let valid = get(&target, &[("Authorization", &token)]);
    within(Duration::from_secs(60), async {
        for (code, request) in failing_requests().into_iter().take(2) {
            let (answer, forwarded) = rig.send(&with_forwarded_for(&request, "10.0.0.1")).await;
            refused_http(&answer, &forwarded, code).unwrap();
        }
        let (answer, forwarded) = rig.send(&with_forwarded_for(&valid, "10.0.0.1")).await;
        rate_limited(&answer, &forwarded).unwrap();
        // The client cannot escape by prepending an address: the trusted proxy appended
        // the real one last.
        let (answer, forwarded) = rig
            .send(&with_forwarded_for(&valid, "10.0.0.2, 10.0.0.1"))
            .await;
        rate_limited(&answer, &forwarded).unwrap();
        // Other clients behind the same proxy, and the proxy itself, are not limited.
        let (answer, forwarded) = rig.send(&with_forwarded_for(&valid, "10.0.0.2")).await;
        forwarded_as(&answer, &forwarded, &target).unwrap();
        let (answer, forwarded) = rig.send(&valid).await;
        forwarded_as(&answer, &forwarded, &target).unwrap();
    })
    .await;
}

// === rule 8: no credential in any log ===

#[tokio::test]
async fn at_trace_level_no_token_secret_or_server_token_reaches_the_proxy_output() {
    let mut rig = Rig::start(|o| {
        o.second_app = true;
        o.rust_log = Some("trace".into());
        o.capture_output = true;
    })
    .await;
    let header_token = user_token("alice");
    let bearer_token = user_token("bearer-user");
    let bad_signature = TokenBuilder::user("alice").sign("not-the-secret");
    let expired = TokenBuilder::user("alice")
        .expires_at(now_unix() - 600)
        .sign(SECRET);
    let query_token = user_token("ws-user");
    let json_token = user_token("json-user");
    let server_a = server_token();
    let server_b = server_token_b();
    let secret_tokens = [
        &header_token,
        &bearer_token,
        &bad_signature,
        &expired,
        &query_token,
        &json_token,
        &server_a,
        &server_b,
    ];
    within(Duration::from_secs(60), async {
        let channels = format!("/channels?api_key={KEY}");
        let requests = vec![
            get(&channels, &[("Authorization", &header_token)]),
            get(
                &channels,
                &[("authorization", &format!("Bearer {bearer_token}"))],
            ),
            get(&channels, &[("Authorization", &bad_signature)]),
            get(&channels, &[("Authorization", &expired)]),
            get(
                &format!("/channels?api_key={KEY_B}"),
                &[("Authorization", &server_b)],
            ),
            upgrade(
                &format!(
                    "/connect?api_key={KEY}&authorization={query_token}&json={}",
                    enc(
                        &serde_json::json!({"user_id": "ws-user", "token": json_token}).to_string()
                    )
                ),
                &[],
            ),
            upgrade(
                &format!("/connect?api_key={KEY}&authorization={bad_signature}"),
                &[],
            ),
            raw(
                "PATCH",
                &format!("/users?api_key={KEY}"),
                &[("Authorization", &server_a)],
                &users_body("someone", now_unix()),
            ),
        ];
        for request in requests {
            let (answer, _) = rig.send(&request).await;
            assert!(answer.status().is_some(), "{answer:?}");
        }
    })
    .await;
    rig.proxy.stop();
    let output = rig.proxy.output();
    // Trace really was on, or the test would prove nothing.
    assert!(
        output.contains("TRACE") || output.contains("DEBUG"),
        "no debug output at all: {output:.2000}"
    );
    let mut leaks = Vec::new();
    for token in secret_tokens {
        let segments: Vec<&str> = token.split('.').collect();
        // The whole token, and the payload and signature alone (a log may split them).
        for piece in [token.as_str(), segments[1], segments[2]] {
            if output.contains(piece) {
                leaks.push(piece.to_owned());
            }
        }
    }
    // SECRET ("secret") is a common word; the other apps' secrets are not.
    for secret in [SECRET_B, DEV_SECRET] {
        if output.contains(secret) {
            leaks.push(secret.to_owned());
        }
    }
    assert!(
        leaks.is_empty(),
        "credentials in the proxy's output: {leaks:?}"
    );
}

// === rule 9: pipelined requests ===

/// Longest an answer (or the close) may take once the one before it arrived, beyond
/// the upstream's own time: "at once" for a proxy on loopback.
const AT_ONCE: Duration = Duration::from_secs(3);

/// Sends `writes` on one connection, `pause` apart; returns each answer in order,
/// stopping at the first that does not come (the connection closed, or stayed silent
/// for `AT_ONCE` plus `upstream_time`).
async fn pipeline(
    rig: &Rig,
    writes: &[Vec<u8>],
    pause: Duration,
    expected: usize,
    upstream_time: Duration,
) -> Vec<Answer> {
    let mut stream = TcpStream::connect(rig.proxy.address).await.unwrap();
    for (i, write) in writes.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(pause).await;
        }
        // A proxy that closed after an earlier answer may refuse the later bytes.
        if stream.write_all(write).await.is_err() {
            break;
        }
    }
    let mut buffer = Vec::new();
    let mut answers = Vec::new();
    for _ in 0..expected {
        let answer = read_answer(&mut stream, &mut buffer, AT_ONCE + upstream_time).await;
        let last = matches!(answer, Answer::Closed | Answer::Silent);
        answers.push(answer);
        if last {
            break;
        }
    }
    answers
}

/// One pipelined request: what is sent, the status it must get, and its path.
struct Piped {
    request: Vec<u8>,
    status: u16,
    path: &'static str,
}

/// Judges the answers to `spec` and what reached the upstream since `before`: answers
/// in order, each the right one, until the end or a close; never silence; refused
/// requests never forwarded, allowed ones forwarded in order.
fn judge_pipeline(
    label: &str,
    spec: &[Piped],
    answers: &[Answer],
    forwarded: &[Recorded],
    findings: &mut Findings,
) {
    let mut answered = 0;
    for (answer, piped) in answers.iter().zip(spec) {
        let what = format!("{label}, {}", piped.path);
        match answer {
            Answer::Closed => break,
            Answer::Silent => {
                findings.check(
                    &what,
                    Err("left without an answer on an open connection".into()),
                );
                break;
            }
            Answer::Http { status, .. } if *status == piped.status => {
                if *status == 200 {
                    let echoed = answer.json()["target"].as_str().unwrap_or("").to_owned();
                    if !echoed.starts_with(&format!("{}?", piped.path)) {
                        findings.check(
                            &what,
                            Err(format!("answered with the response to {echoed}")),
                        );
                    }
                }
                answered += 1;
            }
            other => findings.check(
                &what,
                Err(format!("expected {}, got {other:?}", piped.status)),
            ),
        }
    }
    if answered == 0 {
        findings.check(label, Err("not even the first request was answered".into()));
    }
    let forwarded: Vec<String> = forwarded
        .iter()
        .map(|r| r.target.split('?').next().unwrap_or("").to_owned())
        .collect();
    let allowed: Vec<String> = spec
        .iter()
        .filter(|p| p.status == 200)
        .map(|p| p.path.to_owned())
        .collect();
    if !allowed.starts_with(&forwarded) {
        findings.check(
            label,
            Err(format!("forwarded {forwarded:?}, allowed were {allowed:?}")),
        );
    }
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_or_the_connection_is_closed_at_once() {
    let rig = Rig::start(|_| {}).await;
    let token = user_token("alice");
    let allowed = |path: &'static str| Piped {
        request: get(
            &format!("{path}?api_key={KEY}"),
            &[("Authorization", &token)],
        ),
        status: 200,
        path,
    };
    let no_token = |path: &'static str| Piped {
        request: get(&format!("{path}?api_key={KEY}"), &[]),
        status: 401,
        path,
    };
    let refused_with_body = |path: &'static str| Piped {
        request: raw("POST", &format!("{path}?api_key=nope"), &[], "hello"),
        status: 401,
        path,
    };
    let allowed_with_body = |path: &'static str| Piped {
        request: raw(
            "POST",
            &format!("{path}?api_key={KEY}"),
            &[("Authorization", &token)],
            "world",
        ),
        status: 200,
        path,
    };
    let pipelines = [
        vec![
            allowed("/p1"),
            no_token("/p2"),
            allowed("/p3"),
            refused_with_body("/p4"),
            allowed_with_body("/p5"),
        ],
        vec![no_token("/q1"), allowed("/q2"), allowed("/q3")],
        vec![
            refused_with_body("/r1"),
            no_token("/r2"),
            allowed_with_body("/r3"),
        ],
        vec![
            allowed_with_body("/s1"),
            refused_with_body("/s2"),
            allowed("/s3"),
        ],
    ];
    within(Duration::from_secs(90), async {
        let mut findings = Findings::default();
        for (n, spec) in pipelines.iter().enumerate() {
            let before = rig.upstream.requests().len();
            let all: Vec<u8> = spec.iter().flat_map(|p| p.request.clone()).collect();
            let answers = pipeline(&rig, &[all], Duration::ZERO, spec.len(), Duration::ZERO).await;
            let forwarded = rig.upstream.requests().split_off(before);
            judge_pipeline(
                &format!("pipeline {n}"),
                spec,
                &answers,
                &forwarded,
                &mut findings,
            );
        }
        findings.assert_none();
    })
    .await;
}

#[tokio::test]
async fn requests_pipelined_while_the_first_is_upstream_are_answered_in_order_or_closed() {
    // The upstream takes SLOW_ANSWER per request, so the later requests arrive while the
    // first is in flight rather than in the same read.
    let rig = Rig::start_with(Behaviour::Slow, |_| {}).await;
    let token = user_token("alice");
    let first = Piped {
        request: get(&format!("/t1?api_key={KEY}"), &[("Authorization", &token)]),
        status: 200,
        path: "/t1",
    };
    let rest = vec![
        Piped {
            request: get(&format!("/t2?api_key={KEY}"), &[]),
            status: 401,
            path: "/t2",
        },
        Piped {
            request: get(&format!("/t3?api_key={KEY}"), &[("Authorization", &token)]),
            status: 200,
            path: "/t3",
        },
    ];
    within(Duration::from_secs(60), async {
        let mut findings = Findings::default();
        let before = rig.upstream.requests().len();
        let later: Vec<u8> = rest.iter().flat_map(|p| p.request.clone()).collect();
        let writes = [first.request.clone(), later];
        let answers = pipeline(&rig, &writes, Duration::from_millis(300), 3, SLOW_ANSWER).await;
        let forwarded = rig.upstream.requests().split_off(before);
        let spec: Vec<Piped> = std::iter::once(first).chain(rest).collect();
        judge_pipeline("slow upstream", &spec, &answers, &forwarded, &mut findings);
        findings.assert_none();
    })
    .await;
}
