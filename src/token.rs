//! Stream JWTs: parsing and verification exactly as contract §2 says, plus
//! [`TokenBuilder`] to mint them and [`take_apart`] for tools that explain one.
//!
//! Verification is hand-rolled on `hmac`/`sha2` instead of `jsonwebtoken::decode` for
//! three reasons the contract forces: padded base64url must be accepted, each failure
//! must map to its own Stream code (a wrong claim type is 5, not a generic "invalid"),
//! and the keyed HMAC state is built once per secret at config load, so a check hashes
//! only the token. The bench `benches/verify.rs` keeps it honest against the bare
//! `jsonwebtoken::decode`.

use crate::config::{App, AuthSettings};
use crate::error::{AuthError, Malformed};
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Deserializer};
use sha2::Sha256;
use std::borrow::Cow;
use std::mem::MaybeUninit;
use std::sync::Arc;

/// base64url without padding, as JWTs are written.
fn base64url(bytes: impl AsRef<[u8]>) -> String {
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

/// Decodes a segment of any length (off the hot path).
fn decode_to_vec(segment: &str) -> Result<Vec<u8>, base64_simd::Error> {
    segment_decoder(segment).decode_to_vec(segment.as_bytes())
}

/// `{"alg":"HS256","typ":"JWT"}` as every SDK but .NET writes it: skipping its decode is
/// the common case.
const STANDARD_HEADER: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9";

/// The literal signature of developer tokens.
pub const DEVELOPER_SIGNATURE: &str = "devtoken";

/// An HMAC-SHA256 key with its inner and outer pads already hashed.
#[derive(Clone)]
pub struct HmacKey(Hmac<Sha256>);

impl HmacKey {
    /// Prepares a key from the secret's bytes.
    pub fn new(secret: &[u8]) -> Self {
        HmacKey(Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length"))
    }

    /// Whether `tag` is the MAC of `message` (constant time).
    pub fn verify(&self, message: &[u8], tag: &[u8]) -> bool {
        self.0
            .clone()
            .chain_update(message)
            .verify_slice(tag)
            .is_ok()
    }

    /// The MAC of `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 32] {
        self.0
            .clone()
            .chain_update(message)
            .finalize()
            .into_bytes()
            .into()
    }
}

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

/// Splits a compact JWS into its three segments.
fn segments(token: &str) -> Result<(&str, &str, &str), AuthError> {
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
        let bytes = decode_to_vec(segment).map_err(|_| AuthError::Malformed(Malformed::Base64))?;
        f(&bytes)
    }
}

fn parse_header(segment: &str) -> Result<(), AuthError> {
    if segment == STANDARD_HEADER {
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

/// Parses the payload. Claims borrow from `scratch` when they need no unescaping.
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

/// Verifies a token for `app`: structure, alg, signature over any of the app's secrets
/// (or `devtoken` where allowed), then `exp` / `nbf` / `iat` with the leeway.
/// Revocation is the gate's job, on top of this.
///
/// A token the app already verified is found in [`App::verified_tokens`] instead of
/// being decoded and hashed again; its times are checked on every use.
pub fn verify(
    token: &str,
    app: &App,
    auth: &AuthSettings,
    now: i64,
) -> Result<VerifiedToken, AuthError> {
    if token.len() > auth.max_token_bytes {
        return Err(AuthError::Malformed(Malformed::TooLong));
    }
    if let Some(known) = app.verified_tokens().get(token)
        && (known.kind != TokenKind::Developer || app.disable_auth_checks)
    {
        check_times(&known.claims, auth.leeway_seconds, now)?;
        return Ok(known);
    }
    let verified = verify_uncached(token, app, auth, now)?;
    app.verified_tokens().insert(token, &verified);
    Ok(verified)
}

/// How many verified tokens an app keeps.
const VERIFIED_TOKENS_PER_APP: u64 = 65_536;

/// Tokens that passed every check for one app. Every request of a client session
/// repeats the same token, so a hit skips the base64, JSON and HMAC work for a hash
/// and a comparison of the token. Only successes are kept, so invalid tokens cannot
/// fill it; it lives in the app's config snapshot, so a reload (a secret rotated out,
/// developer tokens turned off) starts it empty; times are checked on every hit.
pub struct VerifiedTokens(
    quick_cache::sync::Cache<
        TokenKey,
        VerifiedToken,
        quick_cache::UnitWeighter,
        foldhash::fast::RandomState,
    >,
);

impl Default for VerifiedTokens {
    fn default() -> Self {
        let options = quick_cache::OptionsBuilder::new()
            .weight_capacity(VERIFIED_TOKENS_PER_APP)
            .estimated_items_capacity(1024)
            .build()
            .expect("a positive capacity");
        VerifiedTokens(quick_cache::sync::Cache::with_options(
            options,
            quick_cache::UnitWeighter,
            foldhash::fast::RandomState::default(),
            Default::default(),
        ))
    }
}

impl VerifiedTokens {
    fn get(&self, token: &str) -> Option<VerifiedToken> {
        self.0.get(&TokenRef(token))
    }

    fn insert(&self, token: &str, verified: &VerifiedToken) {
        self.0.insert(TokenKey(Box::from(token)), verified.clone());
    }

    /// Tokens kept.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A verified token as the cache keeps it. Equality never stops early: a lookup must
/// not tell, by its timing, how much of a presented token matches a valid one.
struct TokenKey(Box<str>);

/// A presented token, for lookups; hashes exactly as [`TokenKey`] does.
struct TokenRef<'a>(&'a str);

impl std::hash::Hash for TokenKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write(self.0.as_bytes());
    }
}

impl std::hash::Hash for TokenRef<'_> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write(self.0.as_bytes());
    }
}

/// Compares without stopping at the first difference (so the time says nothing about
/// where they differ) but, unlike `subtle`'s byte-by-byte barrier, in a loop the compiler
/// can vectorise: a 200-byte token compares in nanoseconds.
fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |difference, (x, y)| difference | (x ^ y))
            == 0
}

impl PartialEq for TokenKey {
    fn eq(&self, other: &Self) -> bool {
        same_token(&self.0, &other.0)
    }
}

impl Eq for TokenKey {}

impl quick_cache::Equivalent<TokenKey> for TokenRef<'_> {
    fn equivalent(&self, key: &TokenKey) -> bool {
        same_token(self.0, &key.0)
    }
}

/// [`verify`] without the app's cache of verified tokens: what a token costs the first
/// time it is seen.
pub fn verify_uncached(
    token: &str,
    app: &App,
    auth: &AuthSettings,
    now: i64,
) -> Result<VerifiedToken, AuthError> {
    if token.len() > auth.max_token_bytes {
        return Err(AuthError::Malformed(Malformed::TooLong));
    }
    let (header, payload, signature) = segments(token)?;
    parse_header(header)?;
    let claims = with_decoded(payload, parse_claims)?;

    let kind = if signature == DEVELOPER_SIGNATURE {
        if !app.disable_auth_checks {
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
        if tag.len() != 32 || !app.keys().iter().any(|key| key.verify(signed, tag)) {
            return Err(AuthError::BadSignature);
        }
        if claims.user_id.is_some() {
            TokenKind::User
        } else {
            TokenKind::Server
        }
    };

    check_times(&claims, auth.leeway_seconds, now)?;
    Ok(VerifiedToken { kind, claims })
}

fn check_times(claims: &Claims, leeway: i64, now: i64) -> Result<(), AuthError> {
    if claims
        .expires_at
        .is_some_and(|exp| now >= exp.saturating_add(leeway))
    {
        return Err(AuthError::Expired);
    }
    if claims
        .not_before
        .is_some_and(|nbf| nbf > now.saturating_add(leeway))
    {
        return Err(AuthError::NotYetValid);
    }
    if claims
        .issued_at
        .is_some_and(|iat| iat > now.saturating_add(leeway))
    {
        return Err(AuthError::IssuedInFuture);
    }
    Ok(())
}

// === minting ===

/// Mints Stream-compatible tokens.
///
/// ```
/// use chatgate::token::TokenBuilder;
/// let user = TokenBuilder::user("alice").expires_in(std::time::Duration::from_secs(3600)).sign("secret");
/// let server = TokenBuilder::server().sign("secret");
/// assert_eq!(user.split('.').count(), 3);
/// assert_ne!(user, server);
/// ```
#[derive(Debug, Clone)]
pub struct TokenBuilder {
    claims: serde_json::Map<String, serde_json::Value>,
}

impl TokenBuilder {
    /// A user token with `iat` = now (so that it can be revoked).
    pub fn user(user_id: impl Into<String>) -> Self {
        let mut claims = serde_json::Map::new();
        claims.insert("user_id".into(), user_id.into().into());
        claims.insert("iat".into(), crate::time::now_unix().into());
        TokenBuilder { claims }
    }

    /// A server token, `{"server": true}`, as the JS SDK makes it.
    pub fn server() -> Self {
        let mut claims = serde_json::Map::new();
        claims.insert("server".into(), true.into());
        TokenBuilder { claims }
    }

    /// Drops `iat` (legacy SDKs' default; such tokens fall to any cutoff).
    pub fn without_iat(mut self) -> Self {
        self.claims.remove("iat");
        self
    }

    /// Sets `iat`.
    pub fn issued_at(self, unix_seconds: i64) -> Self {
        self.claim("iat", unix_seconds)
    }

    /// Sets `exp` = now + `ttl`.
    pub fn expires_in(self, ttl: std::time::Duration) -> Self {
        let exp = crate::time::now_unix().saturating_add(ttl.as_secs() as i64);
        self.claim("exp", exp)
    }

    /// Sets `exp`.
    pub fn expires_at(self, unix_seconds: i64) -> Self {
        self.claim("exp", unix_seconds)
    }

    /// Sets `nbf`.
    pub fn not_before(self, unix_seconds: i64) -> Self {
        self.claim("nbf", unix_seconds)
    }

    /// Sets any other claim.
    pub fn claim(mut self, name: &str, value: impl Into<serde_json::Value>) -> Self {
        self.claims.insert(name.to_owned(), value.into());
        self
    }

    /// The payload as JSON.
    pub fn claims(&self) -> &serde_json::Map<String, serde_json::Value> {
        &self.claims
    }

    /// Signs with HS256 and `secret`.
    pub fn sign(&self, secret: &str) -> String {
        let payload = serde_json::to_vec(&self.claims).expect("a JSON map always encodes");
        let signing_input = format!("{STANDARD_HEADER}.{}", base64url(payload));
        let tag = HmacKey::new(secret.as_bytes()).sign(signing_input.as_bytes());
        format!("{signing_input}.{}", base64url(tag))
    }

    /// A developer token (signature `devtoken`), as the client SDKs' `devToken()` makes it.
    pub fn developer_token(user_id: &str) -> String {
        let payload = serde_json::json!({ "user_id": user_id }).to_string();
        format!(
            "{STANDARD_HEADER}.{}.{DEVELOPER_SIGNATURE}",
            base64url(payload)
        )
    }
}

// === taking a token apart ===

/// A token taken apart without verifying it, for tools that explain a token
/// (`chatgate token inspect`). Each part is decoded on its own, so one bad segment does
/// not hide what the others say; [`verify`] stays the only judge.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Unverified<'a> {
    /// The header segment, base64url-decoded.
    pub header: Result<Vec<u8>, AuthError>,
    /// Whether the header names the one algorithm accepted (HS256).
    pub alg: Result<(), AuthError>,
    /// The payload segment, base64url-decoded.
    pub payload: Result<Vec<u8>, AuthError>,
    /// The claims, parsed as [`verify`] parses them.
    pub claims: Result<Claims, AuthError>,
    /// `header.payload`: the bytes the signature is over.
    pub signed: &'a [u8],
    /// The signature segment as written ([`DEVELOPER_SIGNATURE`] for developer tokens).
    pub signature: &'a str,
}

/// Splits `token` into its three segments and decodes each; `Err` only when it is not
/// three `.`-separated segments.
pub fn take_apart(token: &str) -> Result<Unverified<'_>, AuthError> {
    let (header, payload, signature) = segments(token)?;
    let base64 = |_| AuthError::Malformed(Malformed::Base64);
    Ok(Unverified {
        header: decode_to_vec(header).map_err(base64),
        alg: parse_header(header),
        payload: decode_to_vec(payload).map_err(base64),
        claims: with_decoded(payload, parse_claims),
        signed: &token.as_bytes()[..header.len() + 1 + payload.len()],
        signature,
    })
}

impl Unverified<'_> {
    /// The signature's bytes, or `None` when it is not base64url.
    pub fn tag(&self) -> Option<Vec<u8>> {
        decode_to_vec(self.signature).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PublicPaths;

    const GO_VECTOR: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJ1c2VyX2lkIjoidG9tbWFzbyJ9.v-x-jt3ZnBXXbQ0GoWloIZtVnat2IE74U1a4Yuxd63M";
    const GO_EXPIRED: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJleHAiOjE1NjY5NDEyNzIsImlhdCI6MTU2Njk0MTI3MiwidXNlcl9pZCI6InRvbW1hc28ifQ.3HY2O_7o5ZjZ-6KCXLzyPpHZOlNEDy6_m3iNb5DKAMY";

    fn auth() -> AuthSettings {
        AuthSettings {
            leeway_seconds: 5,
            max_token_bytes: 4096,
            public_paths: PublicPaths::default(),
        }
    }

    fn app(secrets: &[&str]) -> App {
        App::new("key", secrets.iter().map(|s| s.to_string()).collect())
    }

    fn check(token: &str, app: &App) -> Result<VerifiedToken, AuthError> {
        verify(token, app, &auth(), crate::time::now_unix())
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
        let tag = HmacKey::new(b"secret").sign(signing_input.as_bytes());
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
        let tag = HmacKey::new(secret.as_bytes()).sign(input.as_bytes());
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
        let mut a = app(&["s"]);
        assert_eq!(check(&token, &a), Err(AuthError::BadSignature));
        a.disable_auth_checks = true;
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
        assert!(verify(&token, &a, &auth(), now).is_ok());
        assert_eq!(a.verified_tokens().len(), 1);
        assert!(verify(&token, &a, &auth(), now + 1).is_ok());
        assert_eq!(a.verified_tokens().len(), 1);
        assert_eq!(
            verify(&token, &a, &auth(), now + 3600),
            Err(AuthError::Expired)
        );
        // failures are not kept, and a near miss is not a hit
        let mut tampered = token.clone();
        tampered.push('A');
        assert!(verify(&tampered, &a, &auth(), now).is_err());
        assert!(verify("a.b.c", &a, &auth(), now).is_err());
        assert_eq!(a.verified_tokens().len(), 1);
        // each app keeps its own: another secret does not accept it
        let other = app(&["other"]);
        assert_eq!(
            verify(&token, &other, &auth(), now),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn a_kept_developer_token_needs_the_setting_still() {
        let mut a = app(&["s"]);
        a.disable_auth_checks = true;
        let token = TokenBuilder::developer_token("bender");
        assert!(verify(&token, &a, &auth(), 0).is_ok());
        a.disable_auth_checks = false;
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
