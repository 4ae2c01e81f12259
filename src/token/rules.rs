//! [`TokenRules`]: what an app accepts beyond a valid signature — the time checks of
//! contract §2 with their leeway, the size limit, and developer tokens.
//!
//! A plain `Copy` value rather than fields of the config: the verifier needs these
//! three facts and nothing else of the config, so `token` never imports `config`.

use crate::error::AuthError;
use crate::token::Claims;

/// The checks a verified signature still has to pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenRules {
    /// Allowed clock skew for `exp`, `nbf` and `iat`, in seconds (0 allowed).
    pub leeway_seconds: i64,
    /// Longest token accepted (code 5 beyond).
    pub max_token_bytes: usize,
    /// Accept developer tokens (signature `devtoken`): the app's `disable_auth_checks`.
    pub developer_tokens: bool,
}

impl Default for TokenRules {
    /// The config's defaults: 5 s leeway, 4096 bytes, no developer tokens.
    fn default() -> Self {
        TokenRules {
            leeway_seconds: 5,
            max_token_bytes: 4096,
            developer_tokens: false,
        }
    }
}

impl TokenRules {
    /// The time checks of contract §2, in its order: `now >= exp + leeway` is 40,
    /// `nbf > now + leeway` is 41, `iat > now + leeway` is 42. Run on every use of a
    /// token, cached or not, since time moves on.
    pub fn check_times(&self, claims: &Claims, now: i64) -> Result<(), AuthError> {
        let leeway = self.leeway_seconds;
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extreme_dates_saturate_instead_of_overflowing() {
        let rules = TokenRules::default();
        let claims = Claims {
            expires_at: Some(i64::MAX),
            not_before: Some(i64::MIN),
            issued_at: Some(i64::MIN),
            ..Claims::default()
        };
        assert_eq!(rules.check_times(&claims, i64::MAX - 1), Ok(()));
        let expired = Claims {
            expires_at: Some(i64::MIN),
            ..Claims::default()
        };
        assert_eq!(rules.check_times(&expired, 0), Err(AuthError::Expired));
    }
}
