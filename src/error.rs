//! The one error type of a gate decision, mapped once to Stream's code, HTTP status
//! and JSON body (contract §4). Adapters copy out the [`Rejection`] built from it;
//! nothing outside this module (and its `rejection` submodule) matches on
//! [`AuthError`]'s variants.

mod rejection;

pub use rejection::Rejection;

use bytes::Bytes;
use http::StatusCode;
use std::fmt::Write as _;

/// Where Stream's own error bodies point developers; SDKs surface it verbatim.
pub const MORE_INFO_URL: &str = "https://getstream.io/chat/docs/api_errors_response";

/// Why a token is malformed (Stream code 5). Kept as a closed set so messages can
/// never echo a token or a secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Malformed {
    /// No token was sent where one was required.
    Missing,
    /// The token is longer than `[auth] max_token_bytes`.
    TooLong,
    /// The token is not three `.`-separated segments.
    Segments,
    /// A segment is not base64url (or uses `+` / `/`).
    Base64,
    /// The header or payload is not a JSON object.
    Json,
    /// The header has no `alg`.
    MissingAlg,
    /// A claim has the wrong JSON type (`user_id` not a string, `exp` not a number, ...).
    ClaimType(&'static str),
    /// `user_id` is present but empty.
    EmptyUserId,
    /// `user_id` has a control character or whitespace at either end (contract §6 rule 5).
    UserIdNotText,
    /// `stream-auth-type` is neither `jwt` nor `anonymous`.
    AuthType,
    /// A developer token without a `user_id`.
    DeveloperTokenWithoutUser,
}

impl Malformed {
    fn describe(self, out: &mut String) {
        let _ = match self {
            Malformed::Missing => out.write_str(
                "token is missing: send it in the Authorization header (or the authorization query parameter on /connect)",
            ),
            Malformed::TooLong => out.write_str("token is longer than the configured maximum"),
            Malformed::Segments => {
                out.write_str("token contains an invalid number of segments")
            }
            Malformed::Base64 => out.write_str("token segment is not valid base64url"),
            Malformed::Json => out.write_str("token header or payload is not a JSON object"),
            Malformed::MissingAlg => out.write_str("token header has no alg"),
            Malformed::ClaimType(claim) => write!(out, "claim {claim} has the wrong type"),
            Malformed::EmptyUserId => out.write_str("claim user_id is empty"),
            Malformed::UserIdNotText => out.write_str(
                "claim user_id contains a control character or leading or trailing whitespace",
            ),
            Malformed::AuthType => {
                out.write_str("stream-auth-type must be \"jwt\" or \"anonymous\"")
            }
            Malformed::DeveloperTokenWithoutUser => {
                out.write_str("developer token has no user_id")
            }
        };
    }
}

/// Every way a request can be refused. One variant per distinct cause; the Stream
/// code, status and message come from [`AuthError::code`], [`AuthError::status`] and
/// the `Display` impl.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The `api_key` query parameter is missing (code 2).
    #[error("api_key not found: send it as the api_key query parameter")]
    MissingApiKey,
    /// The `api_key` names no configured app (code 2).
    #[error("api_key not valid: no app is configured with this api_key")]
    UnknownApiKey,
    /// The request body or a parameter is invalid (code 4).
    #[error("{0}")]
    BadInput(String),
    /// The token or the auth headers are malformed (code 5).
    #[error("JWTAuth error: {}", MalformedDisplay(*.0))]
    Malformed(Malformed),
    /// `stream-auth-type: anonymous` for an app that does not allow anonymous users (code 5).
    #[error("anonymous users are not allowed for this app")]
    AnonymousNotAllowed,
    /// Authenticated, but not allowed to do this (code 17).
    #[error("{0}")]
    NotAllowed(&'static str),
    /// `exp` has passed (code 40).
    #[error("JWTAuth error: token is expired (exp)")]
    Expired,
    /// A revocation cutoff applies to the token (code 40, so SDKs fetch a new one).
    #[error("JWTAuth error: token was revoked (issued before revoke_tokens_issued_before)")]
    Revoked,
    /// `nbf` is in the future (code 41).
    #[error("JWTAuth error: token is not valid yet (nbf)")]
    NotYetValid,
    /// `iat` is in the future (code 42).
    #[error("JWTAuth error: token used before issue at (iat)")]
    IssuedInFuture,
    /// The signature matches none of the app's secrets (code 43).
    #[error(
        "JWTAuth error: signature is not valid. Make sure the token is created using the secret for this API key"
    )]
    BadSignature,
    /// The header's `alg` is not HS256 (code 43).
    #[error("JWTAuth error: signing method not allowed, only HS256 is accepted")]
    AlgNotAllowed,
    /// Too many failed authentications from this client address (code 9, HTTP 429;
    /// contract §6 rule 7). The message is the one SDKs back off on.
    #[error("Too many requests")]
    RateLimited,
    /// The revocation store could not answer and the policy is to deny (HTTP 503).
    #[error("revocation store unavailable, try again shortly")]
    StoreUnavailable,
    /// The upstream could not be reached (HTTP 502).
    #[error("upstream unavailable")]
    UpstreamUnavailable,
    /// The upstream did not answer in time (HTTP 504).
    #[error("upstream timed out")]
    UpstreamTimeout,
}

struct MalformedDisplay(Malformed);

impl std::fmt::Display for MalformedDisplay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = String::new();
        self.0.describe(&mut s);
        f.write_str(&s)
    }
}

impl AuthError {
    /// Stream's error code (contract §4). `-1` is Stream's internal-error code, used for
    /// failures of chatgate's own dependencies.
    pub fn code(&self) -> i32 {
        match self {
            AuthError::MissingApiKey | AuthError::UnknownApiKey => 2,
            AuthError::BadInput(_) => 4,
            AuthError::Malformed(_) | AuthError::AnonymousNotAllowed => 5,
            AuthError::NotAllowed(_) => 17,
            AuthError::Expired | AuthError::Revoked => 40,
            AuthError::NotYetValid => 41,
            AuthError::IssuedInFuture => 42,
            AuthError::BadSignature | AuthError::AlgNotAllowed => 43,
            AuthError::RateLimited => 9,
            AuthError::StoreUnavailable
            | AuthError::UpstreamUnavailable
            | AuthError::UpstreamTimeout => -1,
        }
    }

    /// The HTTP status that goes with [`AuthError::code`].
    pub fn status(&self) -> StatusCode {
        match self {
            AuthError::BadInput(_) => StatusCode::BAD_REQUEST,
            AuthError::NotAllowed(_) => StatusCode::FORBIDDEN,
            AuthError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            AuthError::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            AuthError::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            AuthError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::UNAUTHORIZED,
        }
    }

    /// A short stable label for metrics and logs (`expired`, `bad_signature`, ...).
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::MissingApiKey => "missing_api_key",
            AuthError::UnknownApiKey => "unknown_api_key",
            AuthError::BadInput(_) => "bad_input",
            AuthError::Malformed(_) => "malformed",
            AuthError::AnonymousNotAllowed => "anonymous_not_allowed",
            AuthError::NotAllowed(_) => "not_allowed",
            AuthError::Expired => "expired",
            AuthError::Revoked => "revoked",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::IssuedInFuture => "issued_in_future",
            AuthError::BadSignature => "bad_signature",
            AuthError::AlgNotAllowed => "alg_not_allowed",
            AuthError::RateLimited => "rate_limited",
            AuthError::StoreUnavailable => "store_unavailable",
            AuthError::UpstreamUnavailable => "upstream_unavailable",
            AuthError::UpstreamTimeout => "upstream_timeout",
        }
    }

    /// The Stream error object: `{"code":..,"message":..,"StatusCode":..,...}`.
    pub fn to_json_object(&self) -> String {
        let message = serde_json::to_string(&self.to_string()).expect("a string serializes");
        format!(
            r#"{{"code":{},"message":{},"StatusCode":{},"duration":"0.00ms","more_info":"{}","details":[]}}"#,
            self.code(),
            message,
            self.status().as_u16(),
            MORE_INFO_URL
        )
    }

    /// Everything an adapter needs to answer this error over HTTP or WebSocket.
    pub fn response(&self) -> ErrorResponse {
        let object = self.to_json_object();
        ErrorResponse {
            status: self.status(),
            ws_frame: Bytes::from(format!(r#"{{"error":{object}}}"#)),
            body: Bytes::from(object),
        }
    }
}

/// Stream's error object rendered once: the JSON body, its status, and the text of the
/// WebSocket error frame. [`Rejection`] puts it on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorResponse {
    /// HTTP status (equal to the body's `StatusCode`).
    pub status: StatusCode,
    /// The JSON body, served with `Content-Type: application/json`.
    pub body: Bytes,
    /// The text of the single WebSocket frame a rejected upgrade sends: `{"error":{...}}`.
    pub ws_frame: Bytes,
}

impl ErrorResponse {
    /// The content type of [`ErrorResponse::body`].
    pub const CONTENT_TYPE: &'static str = "application/json";
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_errors() -> Vec<(AuthError, i32, u16)> {
        vec![
            (AuthError::MissingApiKey, 2, 401),
            (AuthError::UnknownApiKey, 2, 401),
            (AuthError::BadInput("x".into()), 4, 400),
            (AuthError::Malformed(Malformed::Missing), 5, 401),
            (AuthError::AnonymousNotAllowed, 5, 401),
            (AuthError::NotAllowed("no"), 17, 403),
            (AuthError::Expired, 40, 401),
            (AuthError::Revoked, 40, 401),
            (AuthError::NotYetValid, 41, 401),
            (AuthError::IssuedInFuture, 42, 401),
            (AuthError::BadSignature, 43, 401),
            (AuthError::AlgNotAllowed, 43, 401),
            (AuthError::RateLimited, 9, 429),
            (AuthError::StoreUnavailable, -1, 503),
        ]
    }

    #[test]
    fn every_error_maps_to_the_contract_code_and_status() {
        for (error, code, status) in all_errors() {
            assert_eq!(error.code(), code, "{error:?}");
            assert_eq!(error.status().as_u16(), status, "{error:?}");
        }
    }

    #[test]
    fn body_is_the_stream_error_object_with_matching_status() {
        for (error, code, status) in all_errors() {
            let response = error.response();
            let body: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
            assert_eq!(body["code"], code);
            assert_eq!(body["StatusCode"], status);
            assert_eq!(body["message"], error.to_string());
            assert_eq!(body["more_info"], MORE_INFO_URL);
            assert_eq!(body["details"], serde_json::json!([]));
            assert!(body["duration"].is_string());
            let frame: serde_json::Value = serde_json::from_slice(&response.ws_frame).unwrap();
            assert_eq!(frame["error"], body);
        }
    }

    #[test]
    fn expired_message_matches_stream() {
        assert_eq!(
            AuthError::Expired.to_string(),
            "JWTAuth error: token is expired (exp)"
        );
    }
}
