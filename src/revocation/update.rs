//! The revocation fields of `PATCH /users` and `PATCH /app` bodies (contract §3): which
//! users' cutoffs change and to what, with the contract's limits (at most
//! [`MAX_USERS_PER_UPDATE`] users a request, no cutoff more than 5 minutes in the
//! future, naive times are UTC). Kept apart from the gate, which only decides who may
//! send these bodies, and from the cache, which only stores what they say.
//!
//! Other fields belong to the upstream API and are left alone: a body that does not
//! touch `revoke_tokens_issued_before` parses to "no change" and is still forwarded.

use super::UserCutoffChange;
use crate::error::AuthError;
use crate::time::{Cutoff, parse_json_time};

/// Most users one `PATCH /users` may change (Stream's own limit).
pub const MAX_USERS_PER_UPDATE: usize = 100;
/// How far in the future a revocation cutoff may be (contract §3).
const MAX_FUTURE_CUTOFF_SECONDS: i64 = 300;

fn bad_input(message: impl Into<String>) -> AuthError {
    AuthError::BadInput(message.into())
}

/// Reads a `revoke_tokens_issued_before` value: a date, or `null` to clear.
fn parse_cutoff_value(
    value: &serde_json::Value,
    now: i64,
    field: &str,
) -> Result<Option<Cutoff>, AuthError> {
    if value.is_null() {
        return Ok(None);
    }
    let at = parse_json_time(value).map_err(|m| bad_input(format!("{field}: {m}")))?;
    // The limit is on the cutoff as stored, rounded up to its second: judged on the
    // instant's whole second, `now + 300.5` passed and stored `now + 301` (found by
    // fuzz/ `revocation_body`).
    let cutoff = Cutoff::from_datetime(at);
    if cutoff.unix_seconds() > now.saturating_add(MAX_FUTURE_CUTOFF_SECONDS) {
        return Err(bad_input(format!(
            "{field}: revoke_tokens_issued_before is more than 5 minutes in the future"
        )));
    }
    Ok(Some(cutoff))
}

/// Parses `{"users":[{"id":..,"set":{..},"unset":[..]}]}` into cutoff changes.
pub fn parse_users_update(body: &[u8], now: i64) -> Result<Vec<UserCutoffChange>, AuthError> {
    const FIELD: &str = "revoke_tokens_issued_before";
    let document: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        bad_input(format!(
            "UpdateUsersPartial failed: body is not valid JSON: {e}"
        ))
    })?;
    let users = document
        .get("users")
        .and_then(|u| u.as_array())
        .ok_or_else(|| bad_input("UpdateUsersPartial failed: users must be an array"))?;
    if users.len() > MAX_USERS_PER_UPDATE {
        return Err(bad_input(format!(
            "UpdateUsersPartial failed: at most {MAX_USERS_PER_UPDATE} users per request"
        )));
    }
    let mut changes = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let id = user
            .get("id")
            .and_then(|v| v.as_str())
            .filter(|id| !id.is_empty())
            .ok_or_else(|| {
                bad_input(format!(
                    "UpdateUsersPartial failed: users[{i}].id is required"
                ))
            })?;
        let set = match user.get("set") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Object(set)) => set.get(FIELD),
            Some(_) => {
                return Err(bad_input(format!(
                    "UpdateUsersPartial failed: users[{i}].set must be an object"
                )));
            }
        };
        let unset = match user.get("unset") {
            None | Some(serde_json::Value::Null) => false,
            Some(serde_json::Value::Array(fields)) => fields.iter().any(|f| f == FIELD),
            Some(_) => {
                return Err(bad_input(format!(
                    "UpdateUsersPartial failed: users[{i}].unset must be an array"
                )));
            }
        };
        let cutoff = match set {
            Some(value) => parse_cutoff_value(value, now, &format!("users[{i}].set.{FIELD}"))?,
            None if unset => None,
            None => continue,
        };
        changes.push(UserCutoffChange {
            user_id: id.to_owned(),
            cutoff,
        });
    }
    Ok(changes)
}

/// Parses `{"revoke_tokens_issued_before": <time> | null}`; `Ok(None)` when the body
/// does not touch it.
pub fn parse_app_update(body: &[u8], now: i64) -> Result<Option<Option<Cutoff>>, AuthError> {
    const FIELD: &str = "revoke_tokens_issued_before";
    let document: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| bad_input(format!("UpdateApp failed: body is not valid JSON: {e}")))?;
    let object = document
        .as_object()
        .ok_or_else(|| bad_input("UpdateApp failed: body must be a JSON object"))?;
    match object.get(FIELD) {
        None => Ok(None),
        Some(value) => Ok(Some(parse_cutoff_value(value, now, FIELD)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::now_unix;
    use proptest::prelude::*;

    fn revoke_user(body: &str) -> Result<Vec<UserCutoffChange>, AuthError> {
        parse_users_update(body.as_bytes(), now_unix())
    }

    #[test]
    fn bad_revocation_bodies_are_code_4() {
        for body in [
            "not json",
            r#"{"users":{}}"#,
            r#"{"users":[{"set":{"revoke_tokens_issued_before":null}}]}"#,
            r#"{"users":[{"id":"u","set":{"revoke_tokens_issued_before":"someday"}}]}"#,
            r#"{"users":[{"id":"u","set":{"revoke_tokens_issued_before":"2999-01-01T00:00:00Z"}}]}"#,
        ] {
            assert_eq!(revoke_user(body).unwrap_err().code(), 4, "{body}");
        }
        let many: Vec<String> = (0..101)
            .map(|i| format!(r#"{{"id":"u{i}","set":{{"revoke_tokens_issued_before":null}}}}"#))
            .collect();
        let body = format!(r#"{{"users":[{}]}}"#, many.join(","));
        assert_eq!(revoke_user(&body).unwrap_err().code(), 4);
        // bodies without revocation fields pass untouched
        assert_eq!(
            revoke_user(r#"{"users":[{"id":"u","set":{"name":"n"}}]}"#).unwrap(),
            vec![]
        );
    }

    #[test]
    fn the_app_body_sets_clears_or_leaves_the_app_cutoff() {
        let now = 1_795_860_000;
        let parse = |body: &str| parse_app_update(body.as_bytes(), now);
        assert_eq!(
            parse(r#"{"revoke_tokens_issued_before":"2026-11-28T10:00:00.4Z"}"#),
            Ok(Some(Some(Cutoff::from_unix_seconds(now + 1))))
        );
        assert_eq!(
            parse(r#"{"revoke_tokens_issued_before":null}"#),
            Ok(Some(None))
        );
        assert_eq!(parse(r#"{"name":"x"}"#), Ok(None));
        for body in [
            "[]",
            "nope",
            r#"{"revoke_tokens_issued_before":"2026-11-28T10:05:01Z"}"#,
        ] {
            assert_eq!(parse(body).unwrap_err().code(), 4, "{body}");
        }
    }

    /// fuzz/seeds/revocation_body/regression-cutoff-301s-ahead: an instant half a
    /// second past the limit rounds up to a cutoff a whole second past it.
    #[test]
    fn a_fraction_of_a_second_past_the_limit_is_refused() {
        let now = 1_795_860_000;
        for body in [
            r#"{"users":[{"id":"a","set":{"revoke_tokens_issued_before":1795860300.5}}]}"#,
            r#"{"users":[{"id":"a","set":{"revoke_tokens_issued_before":"2026-11-28T10:05:00.001Z"}}]}"#,
        ] {
            assert_eq!(
                parse_users_update(body.as_bytes(), now).unwrap_err().code(),
                4,
                "{body}"
            );
        }
        let at_the_limit = r#"{"users":[{"id":"a","set":{"revoke_tokens_issued_before":"2026-11-28T10:05:00Z"}}]}"#;
        assert_eq!(
            parse_users_update(at_the_limit.as_bytes(), now),
            Ok(vec![UserCutoffChange {
                user_id: "a".into(),
                cutoff: Some(Cutoff::from_unix_seconds(now + 300)),
            }])
        );
    }

    /// One user's entry in a generated body, and the change it must parse to.
    fn user_entry() -> impl Strategy<Value = (String, Option<Option<i64>>)> {
        let id = "[a-zA-Z0-9_@.-]{1,36}";
        // (how the entry says it, offset of the cutoff from now when it sets one)
        let how = prop_oneof![
            (-1_000_000_000i64..=MAX_FUTURE_CUTOFF_SECONDS).prop_map(|d| (0u8, d)),
            Just((1u8, 0)),
            Just((2u8, 0)),
            Just((3u8, 0)),
        ];
        (id, how).prop_map(|(id, (how, offset))| match how {
            0 => (
                format!(
                    r#"{{"id":"{id}","set":{{"revoke_tokens_issued_before":{},"name":"n"}}}}"#,
                    NOW + offset
                ),
                Some(Some(NOW + offset)),
            ),
            1 => (
                format!(r#"{{"id":"{id}","set":{{"revoke_tokens_issued_before":null}}}}"#),
                Some(None),
            ),
            2 => (
                format!(r#"{{"id":"{id}","unset":["revoke_tokens_issued_before"]}}"#),
                Some(None),
            ),
            _ => (format!(r#"{{"id":"{id}","set":{{"role":"admin"}}}}"#), None),
        })
    }

    const NOW: i64 = 1_795_860_000;

    proptest! {
        #[test]
        fn a_users_body_parses_to_exactly_the_changes_it_names(
            entries in proptest::collection::vec(user_entry(), 0..=MAX_USERS_PER_UPDATE)
        ) {
            let body = format!(
                r#"{{"users":[{}]}}"#,
                entries.iter().map(|(json, _)| json.as_str()).collect::<Vec<_>>().join(",")
            );
            let expected: Vec<UserCutoffChange> = entries
                .iter()
                .filter_map(|(json, change)| {
                    let id = serde_json::from_str::<serde_json::Value>(json).unwrap()["id"]
                        .as_str()
                        .unwrap()
                        .to_owned();
                    change.map(|cutoff| UserCutoffChange {
                        user_id: id,
                        cutoff: cutoff.map(Cutoff::from_unix_seconds),
                    })
                })
                .collect();
            prop_assert_eq!(parse_users_update(body.as_bytes(), NOW), Ok(expected));
        }

        #[test]
        fn a_cutoff_more_than_5_minutes_ahead_is_refused_and_any_other_taken(
            offset in -10_000i64..10_000
        ) {
            let body = format!(r#"{{"revoke_tokens_issued_before":{}}}"#, NOW + offset);
            let parsed = parse_app_update(body.as_bytes(), NOW);
            if offset > MAX_FUTURE_CUTOFF_SECONDS {
                prop_assert_eq!(parsed.unwrap_err().code(), 4);
            } else {
                prop_assert_eq!(parsed, Ok(Some(Some(Cutoff::from_unix_seconds(NOW + offset)))));
            }
        }

        #[test]
        fn any_body_is_parsed_or_refused_as_code_4_never_a_panic(
            body in proptest::collection::vec(any::<u8>(), 0..200)
        ) {
            for result in [
                parse_users_update(&body, NOW).map(|_| ()),
                parse_app_update(&body, NOW).map(|_| ()),
            ] {
                if let Err(error) = result {
                    prop_assert_eq!(error.code(), 4);
                }
            }
        }
    }
}
