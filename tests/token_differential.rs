//! chatgate's verifier against `jsonwebtoken::decode` (HS256, the same leeway, exp and
//! nbf validated, no claim required): on every unpadded token generated — valid ones
//! signed with jsonwebtoken, mutated ones, claims of every JSON type, times around the
//! edges — both accept or both refuse, and when both accept they read the same claims.
//!
//! Where contract §2 makes chatgate decide otherwise, the disagreement is allowed only
//! as one of the [`Difference`]s below, each asserted exactly (which side accepts,
//! which code chatgate gives, which claim causes it), and each also pinned by a test of
//! its own so that none of them is merely tolerated.

use chatgate::AuthError;
use chatgate::error::Malformed;
use chatgate::token::{self, Claims, Keyring, TokenBuilder, TokenKind, TokenRules};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use proptest::prelude::*;
use serde_json::{Map, Value, json};
use std::sync::OnceLock;

const SECRET: &str = "differential-secret";
const LEEWAY: i64 = 5;

/// What jsonwebtoken is asked to read: the claims chatgate reads, typed as the
/// contract types them (`user_id` a string, dates integers).
#[derive(Debug, serde::Deserialize)]
struct JwtClaims {
    user_id: Option<String>,
    iat: Option<i64>,
    exp: Option<i64>,
    nbf: Option<i64>,
}

fn keyring() -> &'static Keyring {
    static KEYRING: OnceLock<Keyring> = OnceLock::new();
    KEYRING.get_or_init(|| Keyring::new(vec![SECRET.into()]))
}

fn rules() -> TokenRules {
    TokenRules {
        leeway_seconds: LEEWAY,
        // jsonwebtoken has no size limit: ours is tested as a named difference below.
        max_token_bytes: 65_536,
        developer_tokens: false,
    }
}

fn validation() -> Validation {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.leeway = LEEWAY as u64;
    validation.validate_exp = true;
    validation.validate_nbf = true;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    validation
}

/// Both verdicts, at the same second of the same clock (retried if a second boundary
/// fell between them, which would make the time edges disagree for no reason).
struct Verdicts {
    now: i64,
    ours: Result<token::VerifiedToken, AuthError>,
    theirs: Result<JwtClaims, ErrorKind>,
}

fn judge(token: &str, rules: &TokenRules) -> Verdicts {
    let key = DecodingKey::from_secret(SECRET.as_bytes()).unwrap();
    let validation = validation();
    for _ in 0..10 {
        let before = jsonwebtoken::get_current_timestamp() as i64;
        let theirs = jsonwebtoken::decode::<JwtClaims>(token, &key, &validation)
            .map(|data| data.claims)
            .map_err(|e| e.into_kind());
        let ours = token::verify_uncached(token, keyring(), rules, before);
        if jsonwebtoken::get_current_timestamp() as i64 == before {
            return Verdicts {
                now: before,
                ours,
                theirs,
            };
        }
    }
    panic!("the clock moved a second during each of ten tries");
}

/// The disagreements the contract demands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Difference {
    /// §2: `iat > now + leeway` is code 42; jsonwebtoken does not check `iat`.
    IatInTheFuture,
    /// §2: `now >= exp + leeway` is code 40; jsonwebtoken still accepts at
    /// `exp == now - leeway` (it refuses only `exp < now - leeway`).
    ExpiryBoundary,
    /// §2 reads `user_id` for a user token; an empty one names nobody (code 5), where
    /// jsonwebtoken has a string like any other.
    EmptyUserId,
    /// §2's NumericDate: chatgate reads a fractional date (truncated, as Stream's Go
    /// backend does), an integer beyond i64 (the far future), a negative `nbf` (the
    /// past) and a `null` date (absent); jsonwebtoken refuses each as a claim of the
    /// wrong format.
    NumericDateForms,
}

/// The one difference that explains the two verdicts, asserted in full, or a panic.
fn explain(verdicts: &Verdicts, payload: Option<&Value>) -> Difference {
    let Verdicts { now, ours, theirs } = verdicts;
    let limit = now + LEEWAY;
    match (ours, theirs) {
        (Err(AuthError::IssuedInFuture), Ok(claims)) => {
            assert!(claims.iat.is_some_and(|iat| iat > limit), "{claims:?}");
            Difference::IatInTheFuture
        }
        (Err(AuthError::Expired), Ok(claims)) => {
            assert_eq!(claims.exp, Some(now - LEEWAY), "{claims:?}");
            Difference::ExpiryBoundary
        }
        (Err(AuthError::Malformed(Malformed::EmptyUserId)), Ok(claims)) => {
            assert_eq!(claims.user_id.as_deref(), Some(""));
            Difference::EmptyUserId
        }
        (Ok(verified), Err(kind)) => {
            let payload = payload.expect("a token chatgate accepts has a JSON payload");
            // Dates jsonwebtoken cannot read as the i64 it was asked for: it refuses the
            // claims as JSON; chatgate truncates fractions and saturates big integers.
            let untyped: Vec<_> = ["iat", "exp", "nbf"]
                .into_iter()
                .filter_map(|claim| match payload.get(claim) {
                    Some(Value::Number(n)) if n.as_i64().is_none() => Some((claim, n)),
                    _ => None,
                })
                .collect();
            if untyped.is_empty() {
                // Dates its own validation cannot read as a u64: null, or a negative
                // `nbf` (a negative `exp` chatgate refuses too, as expired).
                let ErrorKind::InvalidClaimFormat(claim) = kind else {
                    panic!("jsonwebtoken refused a token chatgate accepts: {kind:?} {payload}");
                };
                let value = &payload[claim.as_str()];
                assert!(
                    value.is_null() || (claim == "nbf" && value.as_i64().is_some_and(|n| n < 0)),
                    "{claim} = {value}"
                );
                assert_eq!(date_of(&verified.claims, claim), value.as_i64(), "{claim}");
            } else {
                assert!(matches!(kind, ErrorKind::Json(_)), "{kind:?} {payload}");
                for (claim, n) in untyped {
                    let read = match n.as_f64() {
                        Some(_) if n.is_u64() => i64::MAX,
                        Some(f) => f as i64,
                        None => unreachable!("a JSON number is an f64"),
                    };
                    assert_eq!(date_of(&verified.claims, claim), Some(read), "{claim}");
                }
            }
            Difference::NumericDateForms
        }
        (ours, theirs) => {
            panic!("an unexplained difference: chatgate {ours:?}, jsonwebtoken {theirs:?}")
        }
    }
}

fn date_of(claims: &Claims, claim: &str) -> Option<i64> {
    match claim {
        "iat" => claims.issued_at,
        "exp" => claims.expires_at,
        _ => claims.not_before,
    }
}

/// Asserts agreement, or one named difference; returns which.
fn compare(token: &str) -> Option<Difference> {
    assert!(!token.contains('='), "only unpadded tokens are compared");
    let verdicts = judge(token, &rules());
    let payload = token
        .split('.')
        .nth(1)
        .and_then(|p| token::decode_segment(p).ok())
        .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok());
    match (&verdicts.ours, &verdicts.theirs) {
        (Ok(ours), Ok(theirs)) => {
            let claims = &ours.claims;
            assert_eq!(claims.user_id.as_deref(), theirs.user_id.as_deref());
            assert_eq!(
                (claims.issued_at, claims.expires_at, claims.not_before),
                (theirs.iat, theirs.exp, theirs.nbf)
            );
            let kind = match theirs.user_id {
                Some(_) => TokenKind::User,
                None => TokenKind::Server,
            };
            assert_eq!(ours.kind, kind);
            None
        }
        (Err(_), Err(_)) => None,
        _ => Some(explain(&verdicts, payload.as_ref())),
    }
}

// === generating tokens ===

const HEADERS: &[&str] = &[
    r#"{"alg":"HS256","typ":"JWT"}"#,
    r#"{"typ":"JWT","alg":"HS256"}"#,
    r#"{"alg":"HS256"}"#,
    r#"{"alg":"HS256","kid":"k1","typ":"JWT"}"#,
    r#"{"alg":"none"}"#,
    r#"{"alg":"HS384","typ":"JWT"}"#,
    r#"{"alg":"HS512"}"#,
    r#"{"alg":"RS256"}"#,
    r#"{"alg":"hs256"}"#,
    r#"{"alg":null}"#,
    r#"{"typ":"JWT"}"#,
    r#"[1]"#,
    "not json",
];

/// A claim's value, with dates as offsets from the second the test runs in.
#[derive(Debug, Clone)]
enum Spec {
    Absent,
    Null,
    Str(String),
    Int(i64),
    Float(f64),
    HugeInt,
    Bool,
    Array,
    /// now + offset
    Around(i64),
    /// now + offset + fraction
    AroundFloat(i64, f64),
}

fn date_spec() -> impl Strategy<Value = Spec> {
    prop_oneof![
        3 => Just(Spec::Absent),
        1 => Just(Spec::Null),
        6 => (-(LEEWAY + 3)..=(LEEWAY + 3)).prop_map(Spec::Around),
        2 => (-100_000i64..100_000).prop_map(Spec::Around),
        1 => (-8i64..8, 0.01f64..0.99).prop_map(|(o, f)| Spec::AroundFloat(o, f)),
        1 => prop_oneof![Just(0i64), Just(-5), Just(i64::MAX), Just(i64::MIN), Just(1)]
            .prop_map(Spec::Int),
        1 => Just(Spec::HugeInt),
        1 => Just(Spec::Float(1e300)),
        1 => "[0-9]{1,10}".prop_map(Spec::Str),
        1 => Just(Spec::Bool),
        1 => Just(Spec::Array),
    ]
}

fn user_spec() -> impl Strategy<Value = Spec> {
    prop_oneof![
        3 => Just(Spec::Absent),
        1 => Just(Spec::Null),
        6 => "[a-zA-Z0-9_@.-]{1,16}".prop_map(Spec::Str),
        1 => Just(Spec::Str(String::new())),
        1 => "\\PC{1,8}".prop_map(Spec::Str),
        1 => (0i64..1000).prop_map(Spec::Int),
        1 => Just(Spec::Bool),
        1 => Just(Spec::Array),
    ]
}

fn value_of(spec: &Spec, now: i64) -> Option<Value> {
    Some(match spec {
        Spec::Absent => return None,
        Spec::Null => Value::Null,
        Spec::Str(s) => Value::String(s.clone()),
        Spec::Int(n) => json!(n),
        Spec::Float(f) => json!(f),
        Spec::HugeInt => json!(u64::MAX),
        Spec::Bool => json!(true),
        Spec::Array => json!([1]),
        Spec::Around(offset) => json!(now + offset),
        Spec::AroundFloat(offset, fraction) => json!((now + offset) as f64 + fraction),
    })
}

#[derive(Debug, Clone)]
struct Case {
    header: &'static str,
    user_id: Spec,
    iat: Spec,
    exp: Spec,
    nbf: Spec,
    extra: u8,
    signer: u8,
    mutation: Mutation,
}

#[derive(Debug, Clone)]
enum Mutation {
    None,
    Replace(usize, char),
    Remove(usize),
    Insert(usize, char),
    Truncate(usize),
    SwapSegments,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    // '=' is left out: only unpadded tokens are compared ("padded" is a named test).
    let char = prop::sample::select("AQgwBRhxabcdefz0189-_.+/ ".chars().collect::<Vec<_>>());
    prop_oneof![
        6 => Just(Mutation::None),
        2 => (any::<usize>(), char.clone()).prop_map(|(i, c)| Mutation::Replace(i, c)),
        1 => any::<usize>().prop_map(Mutation::Remove),
        1 => (any::<usize>(), char).prop_map(|(i, c)| Mutation::Insert(i, c)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        1 => Just(Mutation::SwapSegments),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::sample::select(HEADERS),
        user_spec(),
        date_spec(),
        date_spec(),
        date_spec(),
        0u8..4,
        0u8..5,
        mutation(),
    )
        .prop_map(
            |(header, user_id, iat, exp, nbf, extra, signer, mutation)| Case {
                header,
                user_id,
                iat,
                exp,
                nbf,
                extra,
                signer,
                mutation,
            },
        )
}

fn base64url(bytes: &[u8]) -> String {
    base64_simd::URL_SAFE_NO_PAD.encode_to_string(bytes)
}

impl Case {
    fn claims(&self, now: i64) -> Map<String, Value> {
        let mut claims = Map::new();
        for (name, spec) in [
            ("user_id", &self.user_id),
            ("iat", &self.iat),
            ("exp", &self.exp),
            ("nbf", &self.nbf),
        ] {
            if let Some(value) = value_of(spec, now) {
                claims.insert(name.into(), value);
            }
        }
        match self.extra {
            1 => drop(claims.insert("server".into(), json!(true))),
            2 => drop(claims.insert("server".into(), json!("true"))),
            3 => {
                claims.insert("iss".into(), json!("x"));
                claims.insert("role".into(), json!("admin"));
                claims.insert("channel_cids".into(), json!(["messaging:a"]));
            }
            _ => {}
        }
        claims
    }

    fn token(&self, now: i64) -> String {
        let claims = self.claims(now);
        let key = EncodingKey::from_secret(SECRET.as_bytes()).unwrap();
        let token = match self.signer {
            // jsonwebtoken's own encoder: its header, our claims
            0 | 1 => jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap(),
            // jsonwebtoken's HS256 over a header of the case's spelling
            2 | 3 => {
                let input = format!(
                    "{}.{}",
                    base64url(self.header.as_bytes()),
                    base64url(&serde_json::to_vec(&claims).unwrap())
                );
                let signature =
                    jsonwebtoken::crypto::sign(input.as_bytes(), &key, Algorithm::HS256).unwrap();
                format!("{input}.{signature}")
            }
            // another secret
            _ => {
                let other = EncodingKey::from_secret(b"another-secret").unwrap();
                jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &other).unwrap()
            }
        };
        self.mutation.apply(token)
    }
}

impl Mutation {
    fn apply(&self, token: String) -> String {
        let mut chars: Vec<char> = token.chars().collect();
        let at = |i: usize, len: usize| if len == 0 { 0 } else { i % len };
        match *self {
            Mutation::None => return token,
            Mutation::Replace(i, c) => {
                let i = at(i, chars.len());
                chars[i] = c;
            }
            Mutation::Remove(i) => {
                chars.remove(at(i, chars.len()));
            }
            Mutation::Insert(i, c) => chars.insert(at(i, chars.len() + 1), c),
            Mutation::Truncate(i) => chars.truncate(at(i, chars.len())),
            Mutation::SwapSegments => {
                let parts: Vec<&str> = token.split('.').collect();
                return format!("{}.{}.{}", parts[1], parts[0], parts[2]);
            }
        }
        chars.into_iter().collect()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn chatgate_and_jsonwebtoken_agree_but_for_named_differences(case in case()) {
        let now = jsonwebtoken::get_current_timestamp() as i64;
        compare(&case.token(now));
    }
}

// === each named difference, pinned ===

fn signed(claims: Value) -> String {
    let key = EncodingKey::from_secret(SECRET.as_bytes()).unwrap();
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
}

/// Retries a token that depends on the current second until both verdicts came from
/// the second it was made in.
fn at_a_steady_second(make: impl Fn(i64) -> String) -> Option<Difference> {
    for _ in 0..10 {
        let now = jsonwebtoken::get_current_timestamp() as i64;
        let token = make(now);
        let verdicts = judge(&token, &rules());
        if verdicts.now == now {
            return compare(&token);
        }
    }
    panic!("the clock moved a second during each of ten tries");
}

#[test]
fn agreement_on_ordinary_tokens() {
    let cases = [
        json!({"user_id": "alice"}),
        json!({}),
        json!({"server": true}),
        json!({"user_id": "u", "exp": 4_000_000_000i64, "iat": 1}),
    ];
    for claims in cases {
        assert_eq!(compare(&signed(claims.clone())), None, "{claims}");
    }
    assert_eq!(compare(&TokenBuilder::user("bob").sign(SECRET)), None);
    assert_eq!(compare(&TokenBuilder::server().sign(SECRET)), None);
    assert_eq!(compare(&TokenBuilder::user("bob").sign("other")), None);
    // both refuse: expired long ago, negative exp, wrong types, another alg
    for claims in [
        json!({"user_id": "u", "exp": 1}),
        json!({"user_id": "u", "exp": -1}),
        json!({"user_id": 5}),
        json!({"user_id": "u", "exp": "1"}),
    ] {
        let verdicts = judge(&signed(claims.clone()), &rules());
        assert!(
            verdicts.ours.is_err() && verdicts.theirs.is_err(),
            "{claims}"
        );
    }
}

#[test]
fn difference_iat_in_the_future_is_code_42_for_chatgate_only() {
    let difference =
        at_a_steady_second(|now| signed(json!({"user_id": "u", "iat": now + LEEWAY + 1})));
    assert_eq!(difference, Some(Difference::IatInTheFuture));
    // at the leeway's edge both accept
    let agreement = at_a_steady_second(|now| signed(json!({"user_id": "u", "iat": now + LEEWAY})));
    assert_eq!(agreement, None);
}

#[test]
fn difference_at_the_expiry_boundary_chatgate_refuses_one_second_earlier() {
    let difference = at_a_steady_second(|now| signed(json!({"user_id": "u", "exp": now - LEEWAY})));
    assert_eq!(difference, Some(Difference::ExpiryBoundary));
    // a second either side, they agree
    for offset in [-LEEWAY - 1, -LEEWAY + 1] {
        let agreement =
            at_a_steady_second(|now| signed(json!({"user_id": "u", "exp": now + offset})));
        assert_eq!(agreement, None, "{offset}");
    }
}

#[test]
fn difference_an_empty_user_id_is_malformed_for_chatgate_only() {
    assert_eq!(
        compare(&signed(json!({"user_id": ""}))),
        Some(Difference::EmptyUserId)
    );
}

#[test]
fn difference_numeric_date_forms_are_read_by_chatgate_only() {
    for claims in [
        json!({"user_id": "u", "iat": 1_700_000_000.5}),
        json!({"user_id": "u", "exp": 4_000_000_000.9}),
        json!({"user_id": "u", "exp": u64::MAX}),
        json!({"user_id": "u", "nbf": -5}),
        json!({"user_id": "u", "exp": null}),
        json!({"user_id": "u", "nbf": null}),
    ] {
        assert_eq!(
            compare(&signed(claims.clone())),
            Some(Difference::NumericDateForms),
            "{claims}"
        );
    }
}

#[test]
fn difference_padded_segments_are_accepted_by_chatgate_only() {
    // {"user_id":"ab"} is 16 bytes: its base64url needs "==" of padding
    let token = signed(json!({"user_id": "ab"}));
    let (input, signature) = token.rsplit_once('.').unwrap();
    let (header, payload) = input.split_once('.').unwrap();
    assert_eq!(payload.len() % 4, 2);
    let padded_payload = format!("{header}.{payload}==");
    let key = EncodingKey::from_secret(SECRET.as_bytes()).unwrap();
    let resigned =
        jsonwebtoken::crypto::sign(padded_payload.as_bytes(), &key, Algorithm::HS256).unwrap();
    assert_eq!(signature.len() % 4, 3);
    for padded in [
        format!("{padded_payload}.{resigned}="),
        format!("{input}.{signature}="),
    ] {
        let verdicts = judge(&padded, &rules());
        assert_eq!(
            verdicts.ours.unwrap().claims.user_id.as_deref(),
            Some("ab"),
            "{padded}"
        );
        assert!(
            matches!(verdicts.theirs, Err(ErrorKind::Base64(_))),
            "{padded}"
        );
    }
}

#[test]
fn difference_developer_tokens_are_accepted_by_chatgate_only_where_allowed() {
    let token = TokenBuilder::developer_token("bender");
    let allowed = TokenRules {
        developer_tokens: true,
        ..rules()
    };
    let verdicts = judge(&token, &allowed);
    assert_eq!(verdicts.ours.unwrap().kind, TokenKind::Developer);
    assert!(verdicts.theirs.is_err());
    // otherwise both refuse it, chatgate as a bad signature (code 43)
    let verdicts = judge(&token, &rules());
    assert_eq!(verdicts.ours, Err(AuthError::BadSignature));
    assert!(verdicts.theirs.is_err());
}

#[test]
fn difference_tokens_beyond_max_token_bytes_are_refused_by_chatgate_only() {
    let token = signed(json!({"user_id": "u", "padding": "x".repeat(5000)}));
    let verdicts = judge(
        &token,
        &TokenRules {
            max_token_bytes: 4096,
            ..rules()
        },
    );
    assert_eq!(verdicts.ours, Err(AuthError::Malformed(Malformed::TooLong)));
    assert!(verdicts.theirs.is_ok());
}
