//! The transport-neutral view of a request (contract §1, §4): method, URI and headers,
//! borrowed from whichever adapter received it. `http::request::Parts` (tower) and
//! Pingora's `RequestHeader` (which derefs to `Parts`) both provide it. A module of its
//! own, below both the decision (`gate`) and the refusal (`error`), so that neither
//! has to import the other to read a request.

use http::{HeaderMap, Method, Uri, header};

/// The parts of a request the gate reads. `http::request::Parts` (tower) and Pingora's
/// `RequestHeader` both provide them.
#[derive(Debug, Clone, Copy)]
pub struct RequestParts<'a> {
    /// Method.
    pub method: &'a Method,
    /// Path and query.
    pub uri: &'a Uri,
    /// Headers.
    pub headers: &'a HeaderMap,
}

impl<'a> From<&'a http::request::Parts> for RequestParts<'a> {
    fn from(parts: &'a http::request::Parts) -> Self {
        RequestParts {
            method: &parts.method,
            uri: &parts.uri,
            headers: &parts.headers,
        }
    }
}

impl<'a> RequestParts<'a> {
    /// Whether this is a WebSocket upgrade request.
    pub fn is_websocket_upgrade(&self) -> bool {
        self.headers
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
    }
}
