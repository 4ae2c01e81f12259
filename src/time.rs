//! Clock and the date formats Stream SDKs send for `revoke_tokens_issued_before`.

use chrono::{DateTime, NaiveDateTime, Utc};
use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A revocation cutoff, kept as the whole second it rounds **up** to (contract §3):
/// a token is revoked iff it has no `iat` or `iat < cutoff.secs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cutoff(i64);

impl Cutoff {
    /// A cutoff at a whole second.
    pub const fn from_unix_seconds(secs: i64) -> Self {
        Cutoff(secs)
    }

    /// A cutoff from an instant, rounded up to the next whole second when it has a fraction.
    pub fn from_datetime(at: DateTime<Utc>) -> Self {
        let secs = at.timestamp();
        if at.timestamp_subsec_nanos() > 0 {
            Cutoff(secs + 1)
        } else {
            Cutoff(secs)
        }
    }

    /// The whole second this cutoff stands for.
    pub const fn unix_seconds(self) -> i64 {
        self.0
    }

    /// Whether a token with this `iat` (if any) is revoked by the cutoff.
    pub fn revokes(self, issued_at: Option<i64>) -> bool {
        match issued_at {
            None => true,
            Some(iat) => iat < self.0,
        }
    }

    /// RFC 3339 in UTC, for the CLI and the admin pages.
    pub fn to_rfc3339(self) -> String {
        DateTime::<Utc>::from_timestamp(self.0, 0)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_else(|| self.0.to_string())
    }
}

/// The revocation cache's answer for one user (the later of the user's and the app's
/// stored cutoffs), stamped with the state of the cache it came from, so that the
/// token's own cache entry can carry it: on the next request of the same token the
/// answer is checked against that state (same cache, no invalidation since, younger
/// than the TTL) instead of being looked up again. Made and judged only by
/// `revocation::RevocationCache`; it lives here, at the bottom of the module graph,
/// because `token` keeps it and must not import `revocation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StampedCutoff {
    /// The cache that answered (an id unique in the process).
    pub(crate) owner: u64,
    /// That cache's invalidation epoch when the answer was read.
    pub(crate) epoch: u64,
    /// The answer.
    pub(crate) cutoff: Option<Cutoff>,
    /// The unix second the older of the two cached entries was read from the store.
    pub(crate) read_at: i64,
}

/// Why a date from a config file, an API body or the command line was not taken.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TimeError {
    /// A string in none of the formats [`parse_stream_time`] reads.
    #[error("{0:?} is not a date: expected RFC 3339 like \"2026-11-28T10:00:00Z\"")]
    NotADate(String),
    /// A JSON number that does not fit a float.
    #[error("not a number")]
    NotANumber,
    /// A number of seconds no date has.
    #[error("{0} is out of range for a date")]
    OutOfRange(f64),
    /// A JSON value that is neither a string nor a number.
    #[error("expected a date string, got {0}")]
    NotADateValue(String),
}

/// Parses the date formats SDKs send: RFC 3339 with or without fraction and offset
/// (`Z`, `+00:00`), naive ISO 8601 from Python's `isoformat()` (taken as UTC), with a
/// `T` or a space between date and time, or a bare date.
pub fn parse_stream_time(text: &str) -> Result<DateTime<Utc>, TimeError> {
    let text = text.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    // RFC 3339 requires the `T`, ISO 8601 as Python prints with str() uses a space.
    if let Ok(t) = DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%:z") {
        return Ok(t.with_timezone(&Utc));
    }
    for format in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(text, format) {
            return Ok(t.and_utc());
        }
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc());
    }
    Err(TimeError::NotADate(text.to_owned()))
}

/// Reads a JSON date value: a string in any [`parse_stream_time`] format, or a number of
/// seconds (or milliseconds, when larger than any plausible second count) since the epoch.
pub fn parse_json_time(value: &serde_json::Value) -> Result<DateTime<Utc>, TimeError> {
    match value {
        serde_json::Value::String(s) => parse_stream_time(s),
        serde_json::Value::Number(n) => {
            let raw = n.as_f64().ok_or(TimeError::NotANumber)?;
            // 1e11 seconds is the year 5138: anything bigger is milliseconds (Java's Date).
            let seconds = if raw.abs() >= 1e11 { raw / 1000.0 } else { raw };
            // Whole seconds down and a non-negative fraction, carried when it rounds
            // to a whole second: `fract()` of 0.9999999999 rounded to 10^9 ns was an
            // invalid nanosecond count (a valid date refused as out of range), and a
            // negative fraction was lost in the cast.
            let whole = seconds.floor();
            let mut nanos = ((seconds - whole) * 1e9).round();
            let mut whole = whole as i64;
            if nanos >= 1e9 {
                nanos = 0.0;
                whole = whole.saturating_add(1);
            }
            DateTime::<Utc>::from_timestamp(whole, nanos as u32).ok_or(TimeError::OutOfRange(raw))
        }
        other => Err(TimeError::NotADateValue(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(text: &str) -> i64 {
        parse_stream_time(text).unwrap().timestamp()
    }

    #[test]
    fn accepts_every_sdk_format_as_the_same_instant() {
        let expected = 1_795_860_000; // 2026-11-28T10:00:00Z
        for text in [
            "2026-11-28T10:00:00Z",
            "2026-11-28T10:00:00.000Z",
            "2026-11-28T10:00:00+00:00",
            "2026-11-28T11:00:00+01:00",
            "2026-11-28T10:00:00.1234567+00:00",
            "2026-11-28T10:00:00",
            "2026-11-28T10:00:00.123456",
            "2026-11-28 10:00:00",
            "2026-11-28 10:00:00.5+00:00",
        ] {
            assert_eq!(ts(text), expected, "{text}");
        }
    }

    #[test]
    fn naive_times_are_utc() {
        assert_eq!(
            parse_stream_time("2026-11-28T10:00:00").unwrap(),
            parse_stream_time("2026-11-28T10:00:00Z").unwrap()
        );
    }

    #[test]
    fn garbage_is_an_error_naming_the_input() {
        let err = parse_stream_time("yesterday").unwrap_err().to_string();
        assert!(err.contains("yesterday"));
    }

    #[test]
    fn cutoff_rounds_fractions_up_and_keeps_whole_seconds() {
        let whole = Cutoff::from_datetime(parse_stream_time("2026-11-28T10:00:00Z").unwrap());
        let fraction = Cutoff::from_datetime(parse_stream_time("2026-11-28T10:00:00.4Z").unwrap());
        assert_eq!(whole.unix_seconds(), 1_795_860_000);
        assert_eq!(fraction.unix_seconds(), 1_795_860_001);
        // a token issued in the same second as a revocation made at 10:00:00.4 is revoked
        assert!(fraction.revokes(Some(1_795_860_000)));
        // a cutoff of exactly 10:00:00 spares a token with iat 10:00:00
        assert!(!whole.revokes(Some(1_795_860_000)));
        assert!(whole.revokes(Some(1_795_859_999)));
        assert!(whole.revokes(None));
    }

    #[test]
    fn json_numbers_are_seconds_or_milliseconds() {
        let secs = parse_json_time(&serde_json::json!(1_795_860_000)).unwrap();
        let millis = parse_json_time(&serde_json::json!(1_795_860_000_000i64)).unwrap();
        assert_eq!(secs, millis);
        assert!(parse_json_time(&serde_json::json!(true)).is_err());
    }

    #[test]
    fn fractions_that_round_to_a_whole_second_carry_and_negative_ones_count() {
        let at = |n: f64| parse_json_time(&serde_json::json!(n)).map(Cutoff::from_datetime);
        assert_eq!(at(0.9999999999), Ok(Cutoff::from_unix_seconds(1)));
        assert_eq!(at(1.9999999999), Ok(Cutoff::from_unix_seconds(2)));
        // -1.5 s is half a second before -1 s: its cutoff rounds up to -1.
        let before = parse_json_time(&serde_json::json!(-1.5)).unwrap();
        assert_eq!(before.timestamp(), -2);
        assert_eq!(before.timestamp_subsec_nanos(), 500_000_000);
        assert_eq!(at(-1.5), Ok(Cutoff::from_unix_seconds(-1)));
        assert_eq!(
            at(1_795_860_000.25),
            Ok(Cutoff::from_unix_seconds(1_795_860_001))
        );
    }
}
