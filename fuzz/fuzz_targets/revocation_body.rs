//! The revocation fields of `PATCH /users` and `PATCH /app` bodies (contract §3), as
//! `Gate::apply_revocation` reads them. The input is the body; the clock is fixed
//! (2026-11-28T10:00:00Z) so that the seeds' dates keep their meaning.
//!
//! Invariants:
//! - no panic; a refusal is code 4 (400);
//! - a `PATCH /users` change names a user of the body (a non-empty id), there are at
//!   most `MAX_USERS_PER_UPDATE` of them, and no change sets a cutoff more than five
//!   minutes after now (the contract's limit, after the cutoff is rounded up to a
//!   whole second);
//! - a cutoff written back as the RFC 3339 the CLI prints, in a canonical body, reads
//!   as the same changes (for the years RFC 3339 can write);
//! - a `PATCH /app` date that is a number of seconds (or milliseconds) within chrono's
//!   range and not in the future is accepted, and its cutoff is that number rounded up.
#![no_main]

use chatgate::AuthError;
use chatgate::revocation::{MAX_USERS_PER_UPDATE, parse_app_update, parse_users_update};
use chatgate::time::Cutoff;
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

const NOW: i64 = 1_795_860_000;
const FIELD: &str = "revoke_tokens_issued_before";

fn check_refusal(error: &AuthError) {
    assert_eq!(error.code(), 4, "{error:?}");
    assert_eq!(error.status(), http::StatusCode::BAD_REQUEST);
}

/// The cutoff as `chatgate revoke` and the admin pages print it, when RFC 3339 can
/// write its year.
fn printable(cutoff: Cutoff) -> Option<String> {
    let text = cutoff.to_rfc3339();
    (text.len() == "2026-11-28T10:00:00Z".len() && text.as_bytes()[0].is_ascii_digit())
        .then_some(text)
}

fn check_cutoff(cutoff: Cutoff) {
    assert!(
        cutoff.unix_seconds() <= NOW + 300,
        "a cutoff {} s in the future was accepted",
        cutoff.unix_seconds() - NOW
    );
}

fn check_users(body: &[u8]) {
    let changes = match parse_users_update(body, NOW) {
        Err(error) => return check_refusal(&error),
        Ok(changes) => changes,
    };
    let document: Value = serde_json::from_slice(body).expect("accepted, so JSON");
    let users = document["users"]
        .as_array()
        .expect("accepted, so a users array");
    assert!(users.len() <= MAX_USERS_PER_UPDATE);
    assert!(changes.len() <= users.len());
    for change in &changes {
        assert!(!change.user_id.is_empty());
        assert!(
            users.iter().any(|u| u["id"] == change.user_id.as_str()),
            "{:?} is not in the body",
            change.user_id
        );
        if let Some(cutoff) = change.cutoff {
            check_cutoff(cutoff);
        }
    }
    // Written back canonically, the changes read the same.
    let mut printed = Vec::new();
    for change in &changes {
        let value = match change.cutoff {
            None => Value::Null,
            Some(cutoff) => match printable(cutoff) {
                Some(text) => Value::String(text),
                None => return,
            },
        };
        printed.push(json!({ "id": change.user_id, "set": { FIELD: value } }));
    }
    let canonical = json!({ "users": printed }).to_string();
    assert_eq!(
        parse_users_update(canonical.as_bytes(), NOW).as_ref(),
        Ok(&changes),
        "{canonical}"
    );
}

fn check_app(body: &[u8]) {
    let update = match parse_app_update(body, NOW) {
        Err(error) => {
            check_refusal(&error);
            // A plain number of seconds or milliseconds, in range and not in the
            // future, is a date SDKs send: it must not be refused.
            if let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body)
                && let Some(n) = map.get(FIELD).and_then(Value::as_f64)
            {
                let seconds = if n.abs() >= 1e11 { n / 1000.0 } else { n };
                assert!(
                    !(seconds.abs() < 8e12 && seconds < (NOW + 290) as f64),
                    "{n} refused: {error}"
                );
            }
            return;
        }
        Ok(update) => update,
    };
    let document: Value = serde_json::from_slice(body).expect("accepted, so JSON");
    match update {
        None => assert!(document.get(FIELD).is_none()),
        Some(None) => assert!(document[FIELD].is_null()),
        Some(Some(cutoff)) => {
            check_cutoff(cutoff);
            if let Some(n) = document[FIELD].as_f64() {
                let seconds = if n.abs() >= 1e11 { n / 1000.0 } else { n };
                // Rounded up to the whole second, to within float precision.
                let off = cutoff.unix_seconds() as f64 - seconds;
                let slack = 1e-6_f64.max(seconds.abs() * 1e-12);
                assert!(
                    (-slack..1.0 + slack).contains(&off),
                    "{n} read as {}",
                    cutoff.unix_seconds()
                );
            }
            if let Some(text) = printable(cutoff) {
                let canonical = json!({ FIELD: text }).to_string();
                assert_eq!(
                    parse_app_update(canonical.as_bytes(), NOW),
                    Ok(Some(Some(cutoff)))
                );
            }
        }
    }
}

fuzz_target!(|body: &[u8]| {
    check_users(body);
    check_app(body);
});
