//! Compact-JWS verification exactly as contract §2 says: base64url with or without
//! padding but canonical, header and payload parsed as JSON (not compared as bytes),
//! `alg` HS256 only, claim types checked (a wrong type is code 5 naming the claim),
//! `devtoken` only where the rules allow it, then the times of [`TokenRules`].
//!
//! Hand-written on `hmac`/`sha2` rather than `jsonwebtoken::decode` because the
//! contract asks for what that crate does not do (padded segments, one Stream code per
//! failure, iat in the future refused) and because a check should hash only the token:
//! the keyed HMAC state is built once, in the [`Keyring`]. `tests/token_differential.rs`
//! holds it to `jsonwebtoken::decode` on every token both should judge alike and names
//! each place where the contract makes them differ; `benches/verify.rs` compares speed.

use crate::error::{AuthError, Malformed};
use crate::time::StampedCutoff;
use crate::token::{Keyring, TokenRules};
use serde::{Deserialize, Deserializer};
use std::borrow::Cow;
use std::mem::MaybeUninit;
use std::sync::Arc;

/// base64url without padding, as JWTs are written.
pub(crate) fn base64url(bytes: impl AsRef<[u8]>) -> String {
    base64_simd::URL_SAFE_NO_PAD.encode_to_string(bytes)
}

/// The base64url decoder for a segment: padded or not (the JS SDK's `DevToken` pads),
/// and either way canonical, with zero trailing bits, so that no two spellings of a
/// segment decode to the same bytes. base64-simd rather than the `base64` crate: it
/// decodes a token's payload and signature in a third of the time, and is as strict.
fn segment_decoder(segment: &str) -> &'static base64_simd::Base64 {
    if segment.ends_with('=') {
        &base64_simd::URL_SAFE
    } else {
        &base64_simd::URL_SAFE_NO_PAD
    }
}

/// Decodes a segment into `out` (left uninitialised: zeroing it showed in the
/// profile) and returns the decoded bytes.
fn decode_into<'a>(segment: &str, out: &'a mut [MaybeUninit<u8>]) -> Result<&'a [u8], AuthError> {
    let decoder = segment_decoder(segment);
    let malformed = || AuthError::Malformed(Malformed::Base64);
    let len = decoder
        .decoded_length(segment.as_bytes())
        .map_err(|_| malformed())?;
    let out = out.get_mut(..len).ok_or_else(malformed)?;
    decoder
        .decode(segment.as_bytes(), base64_simd::Out::from_uninit_slice(out))
        .map(|decoded| &*decoded)
        .map_err(|_| malformed())
}

/// Decodes a segment of any length, padded or not, by the same canonical rules as
/// [`verify`] (off the hot path: for reports such as `chatgate token inspect`).
pub fn decode_segment(segment: &str) -> Result<Vec<u8>, AuthError> {
    segment_decoder(segment)
        .decode_to_vec(segment.as_bytes())
        .map_err(|_| AuthError::Malformed(Malformed::Base64))
}

/// `{"alg":"HS256","typ":"JWT"}` as most SDKs write it: skipping its decode is the
/// common case.
pub(crate) const STANDARD_HEADER: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9";

/// `{"typ":"JWT","alg":"HS256"}`, the other common spelling: .NET's, and
/// `jsonwebtoken::encode`'s, which [`TokenBuilder`](crate::token::TokenBuilder) mints.
pub(crate) const TYP_FIRST_HEADER: &str = "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9";

/// The literal signature of developer tokens.
pub const DEVELOPER_SIGNATURE: &str = "devtoken";

/// What a valid token stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TokenKind {
    /// Signed, with `user_id`.
    User,
    /// Signed, without `user_id`: full access.
    Server,
    /// Signature `devtoken`, accepted because the app disables auth checks.
    Developer,
}

/// The claims chatgate reads; all others are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claims {
    /// `user_id`, shared: the identity handed to the handler holds the same allocation.
    pub user_id: Option<Arc<str>>,
    /// `iat`, seconds.
    pub issued_at: Option<i64>,
    /// `exp`, seconds.
    pub expires_at: Option<i64>,
    /// `nbf`, seconds.
    pub not_before: Option<i64>,
}

/// A token that passed every check but revocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    /// User, server or developer.
    pub kind: TokenKind,
    /// Its claims.
    pub claims: Claims,
}

#[derive(Deserialize)]
struct RawHeader<'a> {
    #[serde(borrow)]
    alg: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct RawClaims<'a> {
    #[serde(borrow, default)]
    user_id: Option<Cow<'a, str>>,
    #[serde(default, deserialize_with = "numeric_date")]
    iat: Option<i64>,
    #[serde(default, deserialize_with = "numeric_date")]
    exp: Option<i64>,
    #[serde(default, deserialize_with = "numeric_date")]
    nbf: Option<i64>,
}

/// JWT NumericDate: an integer, or (as Stream's own Go backend accepts) a fractional
/// number of seconds, truncated. A visitor rather than an untagged enum, which would
/// buffer every date through serde's `Content` on the hot path.
fn numeric_date<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<i64>, D::Error> {
    struct NumericDate;
    impl<'de> serde::de::Visitor<'de> for NumericDate {
        type Value = Option<i64>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a number of seconds or null")
        }
        fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Self::Value, E> {
            Ok(Some(n))
        }
        fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Self::Value, E> {
            // Beyond i64, as a float would be read: the far future.
            Ok(Some(i64::try_from(n).unwrap_or(i64::MAX)))
        }
        fn visit_f64<E: serde::de::Error>(self, f: f64) -> Result<Self::Value, E> {
            if f.is_finite() {
                Ok(Some(f as i64))
            } else {
                Err(E::custom("not a finite number"))
            }
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    deserializer.deserialize_any(NumericDate)
}

/// Splits a compact JWS into its header, payload and signature segments (code 5
/// unless there are exactly three and the first two are not empty).
pub fn segments(token: &str) -> Result<(&str, &str, &str), AuthError> {
    let malformed = || AuthError::Malformed(Malformed::Segments);
    let mut dots = memchr::memchr_iter(b'.', token.as_bytes());
    let (Some(first), Some(second), None) = (dots.next(), dots.next(), dots.next()) else {
        return Err(malformed());
    };
    let (header, payload) = (&token[..first], &token[first + 1..second]);
    if header.is_empty() || payload.is_empty() {
        return Err(malformed());
    }
    Ok((header, payload, &token[second + 1..]))
}

/// Decodes a base64url segment and hands the bytes to `f`; short segments (every real
/// token) decode on the stack.
fn with_decoded<T>(
    segment: &str,
    f: impl FnOnce(&[u8]) -> Result<T, AuthError>,
) -> Result<T, AuthError> {
    // Sized for real payloads: a user id and three dates are ~100 bytes.
    let mut stack = [MaybeUninit::<u8>::uninit(); 512];
    if segment.len() / 4 * 3 + 3 <= stack.len() {
        f(decode_into(segment, &mut stack)?)
    } else {
        f(&decode_segment(segment)?)
    }
}

/// Checks a header segment: JSON with `alg` = `HS256` (any other alg is code 43, a
/// missing one code 5); other fields are not read.
pub fn check_header(segment: &str) -> Result<(), AuthError> {
    if segment == STANDARD_HEADER || segment == TYP_FIRST_HEADER {
        return Ok(());
    }
    with_decoded(segment, |bytes| {
        let header: RawHeader<'_> =
            serde_json::from_slice(bytes).map_err(|_| AuthError::Malformed(Malformed::Json))?;
        match header.alg.as_deref() {
            None => Err(AuthError::Malformed(Malformed::MissingAlg)),
            Some("HS256") => Ok(()),
            Some(_) => Err(AuthError::AlgNotAllowed),
        }
    })
}

/// Decodes and reads a payload segment: the claims chatgate reads, with their types
/// checked (code 5 naming the claim).
pub fn read_claims(segment: &str) -> Result<Claims, AuthError> {
    with_decoded(segment, parse_claims)
}

/// Parses the payload; `user_id` is copied once, into the shared `Arc`.
fn parse_claims(bytes: &[u8]) -> Result<Claims, AuthError> {
    match serde_json::from_slice::<RawClaims<'_>>(bytes) {
        Ok(raw) => {
            if raw.user_id.as_deref() == Some("") {
                return Err(AuthError::Malformed(Malformed::EmptyUserId));
            }
            Ok(Claims {
                user_id: raw.user_id.map(|u| Arc::from(&*u)),
                issued_at: raw.iat,
                expires_at: raw.exp,
                not_before: raw.nbf,
            })
        }
        Err(_) => Err(AuthError::Malformed(claim_type_error(bytes))),
    }
}

/// Names the claim that made the payload fail to parse (error path only).
fn claim_type_error(bytes: &[u8]) -> Malformed {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(bytes) else {
        return Malformed::Json;
    };
    if map
        .get("user_id")
        .is_some_and(|v| !v.is_string() && !v.is_null())
    {
        return Malformed::ClaimType("user_id");
    }
    for claim in ["exp", "iat", "nbf"] {
        if map
            .get(claim)
            .is_some_and(|v| !v.is_number() && !v.is_null())
        {
            return Malformed::ClaimType(claim);
        }
    }
    Malformed::Json
}

/// Verifies a token against an app's keyring and rules: structure, alg, signature
/// over any of the keyring's secrets (or `devtoken` where the rules allow it), then
/// `exp` / `nbf` / `iat` with the leeway. Revocation is the gate's job, on top of this.
///
/// A token the keyring has kept (it keeps a token from its second verification on) is
/// taken from its cache instead of being decoded and hashed again; the rules are
/// applied to it on every use.
pub fn verify(
    token: &str,
    keyring: &Keyring,
    rules: &TokenRules,
    now: i64,
) -> Result<VerifiedToken, AuthError> {
    let (verified, cached) = verify_stamped(token, keyring, rules, now)?;
    if cached == Cached::No {
        keyring.remember(token, &verified, None);
    }
    Ok(verified)
}

/// Whether [`verify_stamped`] found the token in the keyring's cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cached {
    /// Found, with the revocation answer last stamped on it, if any.
    Yes(Option<StampedCutoff>),
    /// Verified now: the caller offers it to [`Keyring::remember`], with the user's
    /// revocation answer when it has one (one insert, not an insert and a restamp).
    No,
}

/// [`verify`], with the revocation answer the keyring's cache last kept for the
/// token (the gate's hit path: one cache lookup for both). A token verified now is
/// not kept: that is the caller's to do (see [`Cached::No`]).
pub(crate) fn verify_stamped(
    token: &str,
    keyring: &Keyring,
    rules: &TokenRules,
    now: i64,
) -> Result<(VerifiedToken, Cached), AuthError> {
    if token.len() > rules.max_token_bytes {
        return Err(AuthError::Malformed(Malformed::TooLong));
    }
    if let Some(known) = keyring.cached_stamped(token)
        && (known.verified.kind != TokenKind::Developer || rules.developer_tokens)
    {
        rules.check_times(&known.verified.claims, now)?;
        return Ok((known.verified, Cached::Yes(known.stamp)));
    }
    let verified = verify_uncached(token, keyring, rules, now)?;
    Ok((verified, Cached::No))
}

/// [`verify`] without the keyring's cache of verified tokens: what a token costs the
/// first time it is seen.
pub fn verify_uncached(
    token: &str,
    keyring: &Keyring,
    rules: &TokenRules,
    now: i64,
) -> Result<VerifiedToken, AuthError> {
    if token.len() > rules.max_token_bytes {
        return Err(AuthError::Malformed(Malformed::TooLong));
    }
    let (header, payload, signature) = segments(token)?;
    check_header(header)?;
    let claims = read_claims(payload)?;

    let kind = if signature == DEVELOPER_SIGNATURE {
        if !rules.developer_tokens {
            return Err(AuthError::BadSignature);
        }
        if claims.user_id.is_none() {
            return Err(AuthError::Malformed(Malformed::DeveloperTokenWithoutUser));
        }
        TokenKind::Developer
    } else {
        let mut tag = [MaybeUninit::<u8>::uninit(); 33];
        let tag = decode_into(signature, &mut tag)?;
        let signed = &token.as_bytes()[..header.len() + 1 + payload.len()];
        if keyring.matching_secret(signed, tag).is_none() {
            return Err(AuthError::BadSignature);
        }
        if claims.user_id.is_some() {
            TokenKind::User
        } else {
            TokenKind::Server
        }
    };

    rules.check_times(&claims, now)?;
    Ok(VerifiedToken { kind, claims })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::TokenBuilder;
    use hmac::{Hmac, KeyInit, Mac};

    const GO_VECTOR: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJ1c2VyX2lkIjoidG9tbWFzbyJ9.v-x-jt3ZnBXXbQ0GoWloIZtVnat2IE74U1a4Yuxd63M";
    const GO_EXPIRED: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJleHAiOjE1NjY5NDEyNzIsImlhdCI6MTU2Njk0MTI3MiwidXNlcl9pZCI6InRvbW1hc28ifQ.3HY2O_7o5ZjZ-6KCXLzyPpHZOlNEDy6_m3iNb5DKAMY";

    /// The config's defaults: leeway 5 s, 4096 bytes, no developer tokens.
    fn auth() -> TokenRules {
        TokenRules::default()
    }

    fn developer_rules() -> TokenRules {
        TokenRules {
            developer_tokens: true,
            ..TokenRules::default()
        }
    }

    fn app(secrets: &[&str]) -> Keyring {
        Keyring::new(secrets.iter().map(|s| s.to_string()).collect())
    }

    fn check(token: &str, app: &Keyring) -> Result<VerifiedToken, AuthError> {
        verify(token, app, &auth(), crate::time::now_unix())
    }

    fn hs256(secret: &[u8], input: &[u8]) -> [u8; 32] {
        Hmac::<sha2::Sha256>::new_from_slice(secret)
            .unwrap()
            .chain_update(input)
            .finalize()
            .into_bytes()
            .into()
    }

    #[test]
    fn go_sdk_vector_is_a_user_token_for_tommaso() {
        let verified = check(GO_VECTOR, &app(&["secret"])).unwrap();
        assert_eq!(verified.kind, TokenKind::User);
        assert_eq!(verified.claims.user_id.as_deref(), Some("tommaso"));
        assert_eq!(verified.claims.issued_at, None);
    }

    #[test]
    fn go_sdk_expired_vector_is_code_40() {
        assert_eq!(
            check(GO_EXPIRED, &app(&["secret"])),
            Err(AuthError::Expired)
        );
    }

    #[test]
    fn the_wrong_secret_is_code_43_and_rotation_accepts_any_listed_secret() {
        assert_eq!(
            check(GO_VECTOR, &app(&["other"])),
            Err(AuthError::BadSignature)
        );
        assert!(check(GO_VECTOR, &app(&["new", "secret"])).is_ok());
    }

    #[test]
    fn padded_segments_are_accepted() {
        let (h, p, s) = segments(GO_VECTOR).unwrap();
        // the payload is 36 chars (no padding needed); re-sign a payload that needs it
        let _ = (h, p, s);
        let payload = base64url(r#"{"user_id":"ab"}"#);
        assert_eq!(payload.len() % 4, 2);
        let signing_input = format!("{STANDARD_HEADER}.{payload}==");
        let tag = hs256(b"secret", signing_input.as_bytes());
        let token = format!("{signing_input}.{}=", base64url(tag));
        let verified = check(&token, &app(&["secret"])).unwrap();
        assert_eq!(verified.claims.user_id.as_deref(), Some("ab"));
    }

    #[test]
    fn standard_base64_characters_are_malformed() {
        let token = GO_VECTOR.replace('-', "+");
        assert_eq!(
            check(&token, &app(&["secret"])),
            Err(AuthError::Malformed(Malformed::Base64))
        );
    }

    fn signed(header: &str, payload: &str, secret: &str) -> String {
        let input = format!("{}.{}", base64url(header), base64url(payload));
        let tag = hs256(secret.as_bytes(), input.as_bytes());
        format!("{input}.{}", base64url(tag))
    }

    #[test]
    fn header_order_and_missing_typ_do_not_matter() {
        let a = app(&["s"]);
        for header in [
            r#"{"typ":"JWT","alg":"HS256"}"#,
            r#"{"alg":"HS256"}"#,
            r#"{"alg":"HS256","kid":"x"}"#,
        ] {
            assert!(
                check(&signed(header, r#"{"user_id":"u"}"#, "s"), &a).is_ok(),
                "{header}"
            );
        }
    }

    #[test]
    fn the_headers_read_without_decoding_are_what_they_claim() {
        for (segment, json) in [
            (STANDARD_HEADER, r#"{"alg":"HS256","typ":"JWT"}"#),
            (TYP_FIRST_HEADER, r#"{"typ":"JWT","alg":"HS256"}"#),
        ] {
            assert_eq!(base64url(json), segment);
            let token = signed(json, r#"{"user_id":"u"}"#, "s");
            assert!(token.starts_with(segment));
            assert!(check(&token, &app(&["s"])).is_ok());
        }
    }

    #[test]
    fn every_other_alg_is_code_43() {
        let a = app(&["s"]);
        for alg in ["none", "HS384", "HS512", "RS256", "hs256"] {
            let header = format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#);
            assert_eq!(
                check(&signed(&header, r#"{"user_id":"u"}"#, "s"), &a),
                Err(AuthError::AlgNotAllowed),
                "{alg}"
            );
        }
        let unsigned = format!(
            "{}.{}.",
            base64url(r#"{"alg":"none"}"#),
            base64url(r#"{"user_id":"u"}"#)
        );
        assert_eq!(check(&unsigned, &a), Err(AuthError::AlgNotAllowed));
    }

    #[test]
    fn server_token_shapes_are_all_server_tokens() {
        let a = app(&["s"]);
        let now = crate::time::now_unix();
        for payload in [
            r#"{"server":true}"#.to_owned(),
            r#"{"server":"true"}"#.to_owned(),
            "{}".to_owned(),
            format!(r#"{{"iat":{now},"nbf":{now},"exp":{}}}"#, now + 60),
        ] {
            let verified = check(&signed(r#"{"alg":"HS256"}"#, &payload, "s"), &a).unwrap();
            assert_eq!(verified.kind, TokenKind::Server, "{payload}");
        }
    }

    #[test]
    fn wrong_claim_types_are_code_5_naming_the_claim() {
        let a = app(&["s"]);
        for (payload, claim) in [
            (r#"{"user_id":42}"#, "user_id"),
            (r#"{"user_id":"u","exp":"soon"}"#, "exp"),
            (r#"{"user_id":"u","iat":true}"#, "iat"),
            (r#"{"user_id":"u","nbf":[1]}"#, "nbf"),
        ] {
            assert_eq!(
                check(&signed(r#"{"alg":"HS256"}"#, payload, "s"), &a),
                Err(AuthError::Malformed(Malformed::ClaimType(claim))),
                "{payload}"
            );
        }
        assert_eq!(
            check(&signed(r#"{"alg":"HS256"}"#, "[1]", "s"), &a),
            Err(AuthError::Malformed(Malformed::Json))
        );
    }

    #[test]
    fn unknown_claims_are_ignored_and_float_dates_accepted() {
        let a = app(&["s"]);
        let exp = crate::time::now_unix() as f64 + 60.5;
        let payload = format!(
            r#"{{"user_id":"u","iss":"x","sub":"y","role":"admin","channel_cids":["a"],"exp":{exp}}}"#
        );
        assert!(check(&signed(r#"{"alg":"HS256"}"#, &payload, "s"), &a).is_ok());
    }

    #[test]
    fn time_checks_use_the_leeway() {
        let a = app(&["s"]);
        let now = 1_800_000_000;
        let at = |payload: String| {
            verify(
                &signed(r#"{"alg":"HS256"}"#, &payload, "s"),
                &a,
                &auth(),
                now,
            )
        };
        assert!(at(format!(r#"{{"user_id":"u","exp":{}}}"#, now - 4)).is_ok());
        assert_eq!(
            at(format!(r#"{{"user_id":"u","exp":{}}}"#, now - 5)),
            Err(AuthError::Expired)
        );
        assert!(at(format!(r#"{{"user_id":"u","nbf":{}}}"#, now + 5)).is_ok());
        assert_eq!(
            at(format!(r#"{{"user_id":"u","nbf":{}}}"#, now + 6)),
            Err(AuthError::NotYetValid)
        );
        assert!(at(format!(r#"{{"user_id":"u","iat":{}}}"#, now + 5)).is_ok());
        assert_eq!(
            at(format!(r#"{{"user_id":"u","iat":{}}}"#, now + 6)),
            Err(AuthError::IssuedInFuture)
        );
    }

    #[test]
    fn developer_tokens_need_the_app_setting() {
        let token = TokenBuilder::developer_token("bender");
        let a = app(&["s"]);
        assert_eq!(check(&token, &a), Err(AuthError::BadSignature));
        let check = |token: &str, a: &Keyring| {
            verify(token, a, &developer_rules(), crate::time::now_unix())
        };
        let verified = check(&token, &a).unwrap();
        assert_eq!(verified.kind, TokenKind::Developer);
        assert_eq!(verified.claims.user_id.as_deref(), Some("bender"));
        // a developer token never makes a server token
        let serverish = format!("{STANDARD_HEADER}.{}.devtoken", base64url("{}"));
        assert_eq!(
            check(&serverish, &a),
            Err(AuthError::Malformed(Malformed::DeveloperTokenWithoutUser))
        );
        // exp still applies
        let expired = format!(
            "{STANDARD_HEADER}.{}.devtoken",
            base64url(r#"{"user_id":"b","exp":1000}"#)
        );
        assert_eq!(check(&expired, &a), Err(AuthError::Expired));
    }

    #[test]
    fn a_known_token_is_found_but_still_expires_and_only_successes_are_kept() {
        let a = app(&["s"]);
        let now = 1_700_000_000;
        let token = TokenBuilder::user("alice")
            .issued_at(now)
            .expires_at(now + 60)
            .sign("s");
        // kept from its second verification on
        assert!(verify(&token, &a, &auth(), now).is_ok());
        assert_eq!(a.cached_tokens(), 0);
        assert!(verify(&token, &a, &auth(), now).is_ok());
        assert_eq!(a.cached_tokens(), 1);
        assert!(verify(&token, &a, &auth(), now + 1).is_ok());
        assert_eq!(a.cached_tokens(), 1);
        assert_eq!(
            verify(&token, &a, &auth(), now + 3600),
            Err(AuthError::Expired)
        );
        // failures are not kept, and a near miss is not a hit
        let mut tampered = token.clone();
        tampered.push('A');
        assert!(verify(&tampered, &a, &auth(), now).is_err());
        assert!(verify("a.b.c", &a, &auth(), now).is_err());
        assert_eq!(a.cached_tokens(), 1);
        // each app keeps its own: another secret does not accept it
        let other = app(&["other"]);
        assert_eq!(
            verify(&token, &other, &auth(), now),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn a_kept_developer_token_needs_the_setting_still() {
        let a = app(&["s"]);
        let token = TokenBuilder::developer_token("bender");
        assert!(verify(&token, &a, &developer_rules(), 0).is_ok());
        assert_eq!(verify(&token, &a, &auth(), 0), Err(AuthError::BadSignature));
    }

    #[test]
    fn payloads_too_big_for_the_stack_buffer_verify_too() {
        let a = app(&["s"]);
        let padding = "x".repeat(1500);
        let token = TokenBuilder::user("alice")
            .claim("padding", padding.as_str())
            .sign("s");
        assert!(token.len() < auth().max_token_bytes);
        let verified = check(&token, &a).expect("a 2 KB token verifies");
        assert_eq!(verified.claims.user_id.as_deref(), Some("alice"));
        let tampered = token.replacen("eHh4", "eHh5", 1);
        assert_ne!(tampered, token);
        assert_eq!(check(&tampered, &a), Err(AuthError::BadSignature));
    }

    #[test]
    fn integer_float_and_null_dates_are_read_and_others_named() {
        let at = |payload: &str| parse_claims(payload.as_bytes());
        let claims = at(r#"{"user_id":"u","iat":10,"exp":20.9,"nbf":null}"#).unwrap();
        assert_eq!(
            (claims.issued_at, claims.expires_at, claims.not_before),
            (Some(10), Some(20), None)
        );
        assert_eq!(
            at(r#"{"exp":18446744073709551615}"#).unwrap().expires_at,
            Some(i64::MAX)
        );
        assert_eq!(
            at(r#"{"iat":"10"}"#),
            Err(AuthError::Malformed(Malformed::ClaimType("iat")))
        );
    }

    #[test]
    fn size_limit_and_segment_count_are_code_5() {
        let a = app(&["s"]);
        let long = format!("{GO_VECTOR}{}", "A".repeat(5000));
        assert_eq!(
            check(&long, &a),
            Err(AuthError::Malformed(Malformed::TooLong))
        );
        for bad in ["", "a.b", "a.b.c.d", ".b.c", "a..c"] {
            assert_eq!(
                check(bad, &a),
                Err(AuthError::Malformed(Malformed::Segments)),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn builder_tokens_verify_and_carry_iat_unless_told() {
        let a = app(&["s"]);
        let token = TokenBuilder::user("u").sign("s");
        assert!(check(&token, &a).unwrap().claims.issued_at.is_some());
        let token = TokenBuilder::user("u").without_iat().sign("s");
        assert!(check(&token, &a).unwrap().claims.issued_at.is_none());
        let token = TokenBuilder::server().sign("s");
        assert_eq!(check(&token, &a).unwrap().kind, TokenKind::Server);
    }
}
