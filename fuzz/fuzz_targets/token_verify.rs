//! Token verification (contract §2) against a two-secret keyring.
//!
//! Two kinds of input, told apart by the second byte (the first holds the rules:
//! bit 0 developer tokens, bit 1 padded segments, bits 2-6 the leeway):
//! - `R` then text: the text is the token, as a client would send it;
//! - anything else: three lines, a header, a payload and a signature choice. The header
//!   and payload are base64url-encoded as they are (JSON or not) and the token is signed
//!   as the third line says (`L0`/`L1` a listed secret, `U` an unlisted one, `D`
//!   `devtoken`, anything else is the signature segment itself). This reaches the
//!   signature and time checks with claims the fuzzer mutated, which random bytes
//!   never do, and keeps the seeds readable.
//!
//! Invariants, on every input:
//! - no panic; a refusal is one of the token codes (5, 40, 41, 42, 43) and its message
//!   does not echo the token;
//! - a signed acceptance carries a tag that an independent HMAC (the `hmac` and `base64`
//!   crates, not chatgate's base64-simd path) computes for one of the keyring's secrets,
//!   and, for unpadded tokens, that `jsonwebtoken::crypto::verify` accepts;
//! - conversely, a standard header, readable claims and a tag jsonwebtoken accepts are
//!   never refused as a bad signature;
//! - the kind follows the claims (user iff `user_id`), `devtoken` only where allowed;
//! - an accepted token's times satisfy the rules at `now`;
//! - the cached path (`verify`, twice) gives what the uncached one gives, and the
//!   claims read back from the payload segment are the accepted claims.
#![no_main]

use base64::Engine as _;
use chatgate::AuthError;
use chatgate::token::{self, Keyring, TokenKind, TokenRules};
use hmac::{Hmac, KeyInit, Mac};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

const SECRETS: [&str; 2] = ["fuzz-secret-current", "fuzz-secret-previous"];
const UNLISTED: &str = "fuzz-secret-unlisted";
/// A fixed clock (2026-11-28T10:00:00Z), so that seeds keep their meaning.
const NOW: i64 = 1_795_860_000;

fn keyring() -> &'static Keyring {
    static KEYRING: OnceLock<Keyring> = OnceLock::new();
    KEYRING.get_or_init(|| Keyring::new(SECRETS.iter().map(|s| s.to_string()).collect()))
}

fn b64(bytes: &[u8], pad: bool) -> String {
    if pad {
        base64::engine::general_purpose::URL_SAFE.encode(bytes)
    } else {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }
}

fn hs256(secret: &str, input: &[u8]) -> Vec<u8> {
    Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes any key")
        .chain_update(input)
        .finalize()
        .into_bytes()
        .to_vec()
}

/// A token from a header, a payload and a signature choice (see the module doc).
fn build(spec: &[u8], pad: bool) -> Option<String> {
    let mut lines = spec.splitn(3, |b| *b == b'\n');
    let (header, payload) = (lines.next()?, lines.next()?);
    let choice = std::str::from_utf8(lines.next().unwrap_or(b"L0")).ok()?;
    let signing_input = format!("{}.{}", b64(header, pad), b64(payload, pad));
    let signature = match choice {
        "L0" => b64(&hs256(SECRETS[0], signing_input.as_bytes()), pad),
        "L1" => b64(&hs256(SECRETS[1], signing_input.as_bytes()), pad),
        "U" => b64(&hs256(UNLISTED, signing_input.as_bytes()), pad),
        "D" => token::DEVELOPER_SIGNATURE.to_owned(),
        raw => raw.to_owned(),
    };
    Some(format!("{signing_input}.{signature}"))
}

/// The secret whose HS256 tag `signature` is, computed without chatgate's code.
fn independent_signer(signing_input: &str, signature: &str) -> Option<&'static str> {
    let engine = if signature.ends_with('=') {
        &base64::engine::general_purpose::URL_SAFE
    } else {
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
    };
    let tag = engine.decode(signature).ok()?;
    SECRETS
        .into_iter()
        .find(|secret| hs256(secret, signing_input.as_bytes()) == tag)
}

/// jsonwebtoken's verdict on the signature alone (unpadded tokens only: it reads no
/// padding).
fn jsonwebtoken_signer(signing_input: &str, signature: &str) -> Option<&'static str> {
    SECRETS.into_iter().find(|secret| {
        let key = jsonwebtoken::DecodingKey::from_secret(secret.as_bytes())
            .expect("a non-empty HMAC secret");
        jsonwebtoken::crypto::verify(
            signature,
            signing_input.as_bytes(),
            &key,
            jsonwebtoken::Algorithm::HS256,
        )
        .unwrap_or(false)
    })
}

fn check(token: &str, rules: &TokenRules) {
    let uncached = token::verify_uncached(token, keyring(), rules, NOW);
    match &uncached {
        Err(error) => {
            assert!(
                matches!(error.code(), 5 | 40 | 41 | 42 | 43),
                "{error:?} is not a token refusal"
            );
            if token.len() >= 8 {
                assert!(
                    !error.to_string().contains(token),
                    "the message echoes the token"
                );
                assert!(
                    !error.to_json_object().contains(token),
                    "the body echoes the token"
                );
            }
        }
        Ok(verified) => {
            assert!(token.len() <= rules.max_token_bytes);
            let (header, payload, signature) =
                token::segments(token).expect("an accepted token has three segments");
            let signing_input = &token[..header.len() + 1 + payload.len()];
            match verified.kind {
                TokenKind::Developer => {
                    assert!(
                        rules.developer_tokens,
                        "devtoken accepted where not allowed"
                    );
                    assert_eq!(signature, token::DEVELOPER_SIGNATURE);
                    assert!(verified.claims.user_id.is_some());
                }
                TokenKind::User | TokenKind::Server => {
                    assert!(
                        independent_signer(signing_input, signature).is_some(),
                        "accepted without a listed secret's signature"
                    );
                    if !token.contains('=') {
                        assert!(
                            jsonwebtoken_signer(signing_input, signature).is_some(),
                            "accepted a signature jsonwebtoken refuses"
                        );
                    }
                    assert_eq!(
                        verified.kind == TokenKind::User,
                        verified.claims.user_id.is_some()
                    );
                }
                other => panic!("unknown kind {other:?}"),
            }
            let claims = &verified.claims;
            if let Some(user) = &claims.user_id {
                assert!(!user.is_empty());
            }
            let limit = NOW.saturating_add(rules.leeway_seconds);
            assert!(
                claims
                    .expires_at
                    .is_none_or(|exp| NOW < exp.saturating_add(rules.leeway_seconds))
            );
            assert!(claims.not_before.is_none_or(|nbf| nbf <= limit));
            assert!(claims.issued_at.is_none_or(|iat| iat <= limit));
            assert_eq!(token::read_claims(payload).as_ref(), Ok(claims));
        }
    }

    // A standard header, readable claims and a tag jsonwebtoken accepts: never code 43.
    if let Ok((header, payload, signature)) = token::segments(token)
        && !token.contains('=')
        && token.len() <= rules.max_token_bytes
        && token::check_header(header).is_ok()
        && token::read_claims(payload).is_ok()
        && jsonwebtoken_signer(&token[..header.len() + 1 + payload.len()], signature).is_some()
    {
        assert_ne!(
            uncached,
            Err(AuthError::BadSignature),
            "a valid signature refused"
        );
    }

    // The keyring's cache must not change a verdict: first use fills it, second reads it.
    let first = token::verify(token, keyring(), rules, NOW);
    let second = token::verify(token, keyring(), rules, NOW);
    assert_eq!(first, uncached);
    assert_eq!(second, uncached);
}

fuzz_target!(|data: &[u8]| {
    let [flags, mode, rest @ ..] = data else {
        return;
    };
    let rules = TokenRules {
        developer_tokens: flags & 1 != 0,
        leeway_seconds: i64::from(flags >> 2 & 0x1f),
        ..TokenRules::default()
    };
    let token = if *mode == b'R' {
        // Headers reach the gate as UTF-8 or not at all.
        let Ok(token) = std::str::from_utf8(rest) else {
            return;
        };
        token.to_owned()
    } else {
        let Some(token) = build(rest, flags & 2 != 0) else {
            return;
        };
        token
    };
    check(&token, &rules);
});
