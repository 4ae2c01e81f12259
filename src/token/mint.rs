//! [`TokenBuilder`]: mints Stream-compatible tokens (contract §2) for the CLI's
//! `token create`, tests and examples.
//!
//! Signing goes through `jsonwebtoken::encode` (HS256): minting is off the hot path,
//! and a well-known encoder is a better witness than our own that what chatgate
//! accepts is what other JWT libraries write. Its header is
//! `{"typ":"JWT","alg":"HS256"}`, which the verifier reads without decoding.

use crate::token::verify::{DEVELOPER_SIGNATURE, STANDARD_HEADER, base64url};

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

    /// Signs with HS256 and `secret`, through `jsonwebtoken::encode`.
    ///
    /// # Panics
    /// If `secret` is empty: jsonwebtoken refuses an empty HMAC key, as the config
    /// refuses an empty secret.
    pub fn sign(&self, secret: &str) -> String {
        let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes())
            .expect("an HMAC secret must not be empty");
        let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        jsonwebtoken::encode(&header, &self.claims, &key)
            .expect("HS256 over a JSON map with an HMAC key always signs")
    }

    /// A developer token (signature `devtoken`), as the client SDKs' `devToken()` makes
    /// it: their fixed header, then the payload; there is nothing to sign, so no
    /// JWT library is involved.
    pub fn developer_token(user_id: &str) -> String {
        let payload = serde_json::json!({ "user_id": user_id }).to_string();
        format!(
            "{STANDARD_HEADER}.{}.{DEVELOPER_SIGNATURE}",
            base64url(payload)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::verify::TYP_FIRST_HEADER;

    #[test]
    fn signed_tokens_carry_jsonwebtokens_header_and_the_claims_as_set() {
        let token = TokenBuilder::user("alice")
            .issued_at(10)
            .not_before(11)
            .expires_at(12)
            .claim("role", "admin")
            .sign("s");
        let mut parts = token.split('.');
        assert_eq!(parts.next(), Some(TYP_FIRST_HEADER));
        let payload = crate::token::decode_segment(parts.next().unwrap()).unwrap();
        let payload: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(
            payload,
            serde_json::json!({"user_id":"alice","iat":10,"nbf":11,"exp":12,"role":"admin"})
        );
        // and jsonwebtoken reads back what it wrote
        let key = jsonwebtoken::DecodingKey::from_secret(b"s").unwrap();
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.validate_exp = false;
        validation.required_spec_claims.clear();
        assert!(jsonwebtoken::decode::<serde_json::Value>(&token, &key, &validation).is_ok());
    }

    #[test]
    fn developer_tokens_are_the_sdks_literal_shape() {
        assert_eq!(
            TokenBuilder::developer_token("bender"),
            "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJ1c2VyX2lkIjoiYmVuZGVyIn0.devtoken"
        );
    }
}
