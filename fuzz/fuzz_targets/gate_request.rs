//! The gate's decision on one request head (contract §1-§4 and §6 rules 1, 3, 4, 5):
//! credential extraction from the query and headers, path normalisation, public paths,
//! revocation endpoints, WebSocket upgrades.
//!
//! The input is a request head as text, as the hostile-request suite writes it:
//! `METHOD TARGET` on the first line, then `name: value` lines (bytes, not necessarily
//! UTF-8). `{user}`, `{server}`, `{dev}`, `{expired}`, `{revoked}`, `{other}` (a user of
//! the second app) and `{forged}` (a bad signature) stand for tokens minted at start,
//! so that mutations reach past the signature.
//!
//! Invariants, on every head that parses into an `http` request:
//! - no panic, in the decision or in building the refusal;
//! - a refusal has a contract code (2, 4, 5, 17, 40-43), its HTTP body is Stream's JSON
//!   object with that code, and no message echoes a token;
//! - normalisation is idempotent (`path(path(p)) == path(p)`), its result has no empty,
//!   `.` or `..` segment nor an escaped unreserved character, and survives
//!   `with_path` unchanged;
//! - the gate judges what the upstream receives: the same request with its path
//!   replaced by the normal form gets the same decision;
//! - every admission passed normalisation; a public one is a public path in normal form;
//!   a revocation is a `PATCH` of `/users` or `/app` by a server token; an admitted
//!   request's `api_key` is the one value `form_urlencoded` reads, its credentials
//!   were sent where the contract reads them, and a user id is text.
#![no_main]

use chatgate::config::ConfigSnapshot;
use chatgate::normalize;
use chatgate::revocation::{MemoryStore, RevocationCache, UserCutoffChange};
use chatgate::time::{Cutoff, now_unix};
use chatgate::token::TokenBuilder;
use chatgate::{AuthError, ConfigHandle, Decision, Gate, IdentityKind, Rejection, RequestParts};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use libfuzzer_sys::fuzz_target;
use std::path::Path;
use std::sync::{Arc, OnceLock};

const SECRET: &str = "fuzz-secret-0123456789abcdef0123";
const OTHER_SECRET: &str = "fuzz-secret-other-0123456789abcd";
const CONFIG: &str = r#"
[auth]
public_paths = ["/healthz", "/static/*"]

[revocation]
store = "memory"

[[apps]]
api_key = "key"
secrets = ["fuzz-secret-0123456789abcdef0123"]
disable_auth_checks = true

[[apps]]
api_key = "key2"
secrets = ["fuzz-secret-other-0123456789abcd"]
allow_anonymous = true
"#;

struct World {
    runtime: tokio::runtime::Runtime,
    gate: Gate,
    tokens: Vec<(&'static str, String)>,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime");
        let config = ConfigSnapshot::parse(CONFIG, Path::new("fuzz.toml")).expect("valid config");
        let cache = RevocationCache::new(Arc::new(MemoryStore::new()), &config.revocation);
        let now = now_unix();
        runtime
            .block_on(cache.set_user_cutoffs(
                &Arc::from("key"),
                &[UserCutoffChange {
                    user_id: "revoked".into(),
                    cutoff: Some(Cutoff::from_unix_seconds(now + 60)),
                }],
            ))
            .expect("the memory store takes a cutoff");
        let gate = Gate::new(ConfigHandle::new(config), cache);
        let tokens = vec![
            ("{user}", TokenBuilder::user("alice").sign(SECRET)),
            ("{server}", TokenBuilder::server().sign(SECRET)),
            ("{dev}", TokenBuilder::developer_token("dev")),
            (
                "{expired}",
                TokenBuilder::user("alice")
                    .expires_at(now - 3600)
                    .issued_at(now - 7200)
                    .sign(SECRET),
            ),
            ("{revoked}", TokenBuilder::user("revoked").sign(SECRET)),
            ("{other}", TokenBuilder::user("bob").sign(OTHER_SECRET)),
            (
                "{forged}",
                TokenBuilder::user("alice").sign("not-the-secret-at-all"),
            ),
        ];
        World {
            runtime,
            gate,
            tokens,
        }
    })
}

fn substitute(world: &World, bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for (name, token) in &world.tokens {
        let mut at = 0;
        // Bounded: each replacement moves past what it wrote.
        while let Some(found) = find(&out[at..], name.as_bytes()) {
            let start = at + found;
            out.splice(start..start + name.len(), token.bytes());
            at = start + token.len();
        }
    }
    out
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Parses the head; `None` when `http` itself would refuse it (no adapter sees that).
fn parse(world: &World, data: &[u8]) -> Option<(Method, Uri, HeaderMap)> {
    let data = substitute(world, data);
    let mut lines = data.split(|b| *b == b'\n');
    let request_line = lines.next()?;
    let space = request_line.iter().position(|b| *b == b' ')?;
    let method = Method::from_bytes(&request_line[..space]).ok()?;
    let target = request_line[space + 1..]
        .strip_suffix(b"\r")
        .unwrap_or(&request_line[space + 1..]);
    let uri = Uri::try_from(target).ok()?;
    let mut headers = HeaderMap::new();
    for line in lines {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        let colon = line.iter().position(|b| *b == b':')?;
        let name = HeaderName::from_bytes(&line[..colon]).ok()?;
        // Optional whitespace around a field value is not part of it (RFC 9110 §5.5).
        let value = line[colon + 1..].trim_ascii();
        headers.append(name, HeaderValue::from_bytes(value).ok()?);
    }
    Some((method, uri, headers))
}

fn decide(world: &World, parts: RequestParts<'_>) -> Result<Decision, AuthError> {
    match world.gate.check_cached(parts) {
        Ok(decision) => decision,
        Err(pending) => world.runtime.block_on(world.gate.finish(pending)),
    }
}

fn check_normal_form(raw: &str, uri: &Uri) {
    let Ok(normal) = normalize::path(raw) else {
        return;
    };
    assert_eq!(
        normalize::path(&normal).as_deref(),
        Ok(&*normal),
        "not idempotent: {raw:?}"
    );
    if &*normal != "*" {
        assert!(normal.starts_with('/'));
        let segments: Vec<&str> = normal[1..].split('/').collect();
        for (i, segment) in segments.iter().enumerate() {
            assert!(!matches!(*segment, "." | ".."), "{raw:?} -> {normal:?}");
            assert!(
                segment.len() > 0 || i + 1 == segments.len(),
                "{raw:?} -> {normal:?}"
            );
        }
        let bytes = normal.as_bytes();
        for (i, _) in normal.match_indices('%') {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).expect("two hex digits");
            let byte = u8::from_str_radix(hex, 16).expect("two hex digits");
            assert!(
                !(byte.is_ascii_alphanumeric() || b"-._~".contains(&byte)),
                "{raw:?} -> {normal:?} keeps an escaped unreserved character"
            );
        }
    }
    let rebuilt = normalize::with_path(uri, &normal);
    assert_eq!(
        rebuilt.path(),
        &*normal,
        "with_path changed the normal path"
    );
    assert_eq!(rebuilt.query(), uri.query(), "with_path changed the query");
}

fn query_values<'a>(uri: &'a Uri, name: &str) -> Vec<String> {
    form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.into_owned())
        .collect()
}

fn check_refusal(world: &World, error: &AuthError, parts: &RequestParts<'_>) {
    assert!(
        matches!(error.code(), 2 | 4 | 5 | 17 | 40 | 41 | 42 | 43),
        "{error:?} has no contract code here"
    );
    let rejection = Rejection::new(error, parts);
    let http = Rejection::http(error);
    assert_eq!(http.status(), error.status());
    let body: serde_json::Value =
        serde_json::from_slice(http.body()).expect("the refusal body is JSON");
    assert_eq!(body["code"], error.code());
    assert_eq!(body["StatusCode"], error.status().as_u16());
    if rejection.is_upgrade() {
        assert!(parts.is_websocket_upgrade());
    } else {
        assert_eq!(rejection, http);
    }
    let message = error.to_string();
    for (_, token) in &world.tokens {
        assert!(
            !message.contains(token.as_str()),
            "the refusal echoes a token"
        );
    }
}

fn check_admission(decision: &Decision, method: &Method, uri: &Uri, headers: &HeaderMap) {
    let normal = normalize::request(method, uri, headers).expect("admitted, so normalised");
    let identity = match decision {
        Decision::Public => {
            assert!(
                normal == "/healthz" || normal.starts_with("/static/"),
                "public on {normal:?} (raw {:?})",
                uri.path()
            );
            return;
        }
        Decision::Allow(identity) => identity,
        Decision::Revocation(identity, endpoint) => {
            assert_eq!(method, Method::PATCH);
            let path = normal.strip_suffix('/').unwrap_or(&normal);
            assert!(
                matches!(
                    (endpoint, path),
                    (chatgate::RevocationEndpoint::Users, "/users")
                        | (chatgate::RevocationEndpoint::App, "/app")
                ),
                "{endpoint:?} on {normal:?}"
            );
            assert!(identity.is_server(), "a revocation by {identity:?}");
            identity
        }
        other => panic!("unknown decision {other:?}"),
    };
    // Every upstream parser reads the one api_key the gate read.
    assert_eq!(query_values(uri, "api_key"), vec![identity.app.to_string()]);
    let websocket = RequestParts {
        method,
        uri,
        headers,
        peer: None,
    }
    .is_websocket_upgrade();
    let header = |name: &str| headers.get_all(name).iter().count();
    let sent = |name: &str| header(name) == 1 || (websocket && query_values(uri, name).len() == 1);
    match identity.kind {
        IdentityKind::Anonymous => assert!(sent("stream-auth-type")),
        _ => assert!(sent("authorization"), "{identity:?} without a token"),
    }
    if let Some(user) = identity.user_id() {
        assert!(normalize::user_id_is_text(user), "user id {user:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let world = world();
    let Some((method, uri, headers)) = parse(world, data) else {
        return;
    };
    let parts = RequestParts {
        method: &method,
        uri: &uri,
        headers: &headers,
        peer: None,
    };
    check_normal_form(uri.path(), &uri);
    let decision = decide(world, parts);
    match &decision {
        Err(error) => check_refusal(world, error, &parts),
        Ok(decision) => check_admission(decision, &method, &uri, &headers),
    }
    // What the upstream receives is the normal form: it must be judged alike.
    if let Ok(normal) = normalize::path(uri.path()) {
        let forwarded = normalize::with_path(&uri, &normal);
        let again = decide(
            world,
            RequestParts {
                uri: &forwarded,
                ..parts
            },
        );
        assert_eq!(
            again, decision,
            "{:?} and {:?} judged apart",
            uri, forwarded
        );
    }
});
