//! `chatgate token inspect`: says which check of contract §2 a token passes or fails
//! and why. Presentation only, so it lives with the CLI; it reads the token through
//! the library's public [`token::take_apart`] and judges it with [`token::verify`], so
//! it can never disagree with the gate.

use chatgate::config::{App, AuthSettings};
use chatgate::time::Cutoff;
use chatgate::token::{self, DEVELOPER_SIGNATURE};

/// One line of [`inspect`]'s report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked.
    pub name: &'static str,
    /// `Ok(detail)` or `Err(why)`.
    pub outcome: Result<String, String>,
}

/// Decodes a token and reports each check: structure, header, claims, and, given an
/// app, signature and times. Never prints the token or a secret.
pub fn inspect(token: &str, app: Option<(&App, &AuthSettings)>, now: i64) -> Vec<Check> {
    let mut report = Vec::new();
    let mut push = |name, outcome| report.push(Check { name, outcome });
    let token = token.trim();
    let Ok(parts) = token::take_apart(token) else {
        push("structure", Err("not three '.'-separated segments".into()));
        return report;
    };
    push(
        "structure",
        Ok(format!("{} bytes, 3 segments", token.len())),
    );
    let text = |bytes: &Vec<u8>| String::from_utf8_lossy(bytes).into_owned();
    let not_base64 = |e: &chatgate::AuthError| format!("not base64url: {e}");
    push(
        "header",
        parts.header.as_ref().map(text).map_err(not_base64),
    );
    push(
        "alg",
        parts
            .alg
            .as_ref()
            .map(|()| "HS256".into())
            .map_err(|e| e.to_string()),
    );
    push(
        "payload",
        parts.payload.as_ref().map(text).map_err(not_base64),
    );
    match &parts.claims {
        Ok(c) => push(
            "kind",
            Ok(match (&c.user_id, parts.signature == DEVELOPER_SIGNATURE) {
                (Some(u), true) => format!("developer token for user {u:?}"),
                (Some(u), false) => format!("user token for user {u:?}"),
                (None, _) => "server token (no user_id)".into(),
            }),
        ),
        Err(e) => push("claims", Err(e.to_string())),
    }
    let Some((app, auth)) = app else {
        push(
            "signature",
            Ok("not checked: pass --config and --api-key to verify".into()),
        );
        return report;
    };
    let verdict = token::verify(token, app, auth, now);
    if parts.signature != DEVELOPER_SIGNATURE {
        let tag = parts.tag().unwrap_or_default();
        let matched = app
            .keys()
            .iter()
            .position(|k| tag.len() == 32 && k.verify(parts.signed, &tag));
        push(
            "signature",
            match matched {
                Some(0) => Ok("valid (current secret)".into()),
                Some(i) => Ok(format!(
                    "valid (secret #{}, an older one in rotation)",
                    i + 1
                )),
                None => Err(format!(
                    "matches none of the {} secret(s) of app {}",
                    app.secret_count(),
                    app.api_key
                )),
            },
        );
    }
    if let Ok(c) = &parts.claims {
        let leeway = auth.leeway_seconds;
        let when = |t: i64| Cutoff::from_unix_seconds(t).to_rfc3339();
        push(
            "exp",
            match c.expires_at {
                None => Ok("none: valid indefinitely".into()),
                Some(exp) if now >= exp + leeway => {
                    Err(format!("expired at {} ({}s ago)", when(exp), now - exp))
                }
                Some(exp) => Ok(format!("expires at {} (in {}s)", when(exp), exp - now)),
            },
        );
        if let Some(nbf) = c.not_before {
            push(
                "nbf",
                if nbf > now + leeway {
                    Err(format!("not valid before {}", when(nbf)))
                } else {
                    Ok(format!("valid since {}", when(nbf)))
                },
            );
        }
        push(
            "iat",
            match c.issued_at {
                None => Ok("none: any revocation cutoff revokes this token".into()),
                Some(iat) if iat > now + leeway => {
                    Err(format!("issued in the future, at {}", when(iat)))
                }
                Some(iat) => Ok(format!("issued at {}", when(iat))),
            },
        );
    }
    push(
        "verdict",
        verdict
            .map(|v| format!("accepted as a {:?} token (revocation not checked)", v.kind))
            .map_err(|e| format!("rejected with code {}: {e}", e.code())),
    );
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use chatgate::config::ConfigSnapshot;

    const GO_EXPIRED: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJleHAiOjE1NjY5NDEyNzIsImlhdCI6MTU2Njk0MTI3MiwidXNlcl9pZCI6InRvbW1hc28ifQ.3HY2O_7o5ZjZ-6KCXLzyPpHZOlNEDy6_m3iNb5DKAMY";

    #[test]
    fn inspect_explains_without_echoing_secrets() {
        let config = ConfigSnapshot::with_apps(vec![App::new("key", vec!["secret".into()])]);
        let app = config.app("key").unwrap();
        let report = inspect(
            GO_EXPIRED,
            Some((app, &config.auth)),
            chatgate::time::now_unix(),
        );
        let text = format!("{report:?}");
        assert!(text.contains("tommaso"));
        assert!(text.contains("rejected with code 40"));
        assert!(!text.contains("\"secret\""));
        let signature = report.iter().find(|c| c.name == "signature").unwrap();
        assert!(signature.outcome.is_ok());
    }
}
