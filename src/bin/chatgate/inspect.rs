//! `chatgate token inspect`: explains, check by check, why a token is accepted or
//! refused under contract §2. Built only on the token module's public API
//! ([`segments`], [`decode_segment`], [`check_header`], [`read_claims`],
//! [`Keyring::matching_secret`], [`verify`]), so that it can move into the binary's CLI.

use chatgate::token::{
    DEVELOPER_SIGNATURE, Keyring, TokenRules, check_header, decode_segment, read_claims, segments,
    verify,
};

/// The app a token is inspected against.
#[derive(Debug, Clone, Copy)]
pub struct InspectedApp<'a> {
    /// Its api_key, named in the report.
    pub api_key: &'a str,
    /// Its secrets.
    pub keyring: &'a Keyring,
    /// Its rules.
    pub rules: TokenRules,
}

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
pub fn inspect(token: &str, app: Option<InspectedApp<'_>>, now: i64) -> Vec<Check> {
    let mut report = Vec::new();
    let mut push = |name, outcome| report.push(Check { name, outcome });
    let Ok((header, payload, signature)) = segments(token.trim()) else {
        push("structure", Err("not three '.'-separated segments".into()));
        return report;
    };
    push(
        "structure",
        Ok(format!("{} bytes, 3 segments", token.trim().len())),
    );
    match decode_segment(header) {
        Ok(bytes) => push("header", Ok(String::from_utf8_lossy(&bytes).into_owned())),
        Err(_) => push("header", Err("not base64url".into())),
    }
    push(
        "alg",
        check_header(header)
            .map(|_| "HS256".into())
            .map_err(|e| e.to_string()),
    );
    match decode_segment(payload) {
        Ok(bytes) => push("payload", Ok(String::from_utf8_lossy(&bytes).into_owned())),
        Err(_) => push("payload", Err("not base64url".into())),
    }
    let claims = read_claims(payload);
    match &claims {
        Ok(c) => push(
            "kind",
            Ok(match (&c.user_id, signature == DEVELOPER_SIGNATURE) {
                (Some(u), true) => format!("developer token for user {u:?}"),
                (Some(u), false) => format!("user token for user {u:?}"),
                (None, _) => "server token (no user_id)".into(),
            }),
        ),
        Err(e) => push("claims", Err(e.to_string())),
    }
    let Some(InspectedApp {
        api_key,
        keyring,
        rules,
    }) = app
    else {
        push(
            "signature",
            Ok("not checked: pass --config and --api-key to verify".into()),
        );
        return report;
    };
    let verdict = verify(token.trim(), keyring, &rules, now);
    if signature != DEVELOPER_SIGNATURE {
        let signed = &token.trim().as_bytes()[..header.len() + 1 + payload.len()];
        let tag = decode_segment(signature).unwrap_or_default();
        let matched = keyring.matching_secret(signed, &tag);
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
                    keyring.secret_count(),
                    api_key
                )),
            },
        );
    }
    if let Ok(c) = &claims {
        let leeway = rules.leeway_seconds;
        let when = |t: i64| chatgate::time::Cutoff::from_unix_seconds(t).to_rfc3339();
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

    const GO_EXPIRED: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJleHAiOjE1NjY5NDEyNzIsImlhdCI6MTU2Njk0MTI3MiwidXNlcl9pZCI6InRvbW1hc28ifQ.3HY2O_7o5ZjZ-6KCXLzyPpHZOlNEDy6_m3iNb5DKAMY";

    #[test]
    fn inspect_explains_without_echoing_secrets() {
        let keyring = Keyring::new(vec!["secret".into()]);
        let report = inspect(
            GO_EXPIRED,
            Some(InspectedApp {
                api_key: "key",
                keyring: &keyring,
                rules: TokenRules::default(),
            }),
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
