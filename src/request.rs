//! The transport-neutral view of a request (contract §1, §4): method, URI and headers,
//! borrowed from whichever adapter received it. `http::request::Parts` (tower) and
//! Pingora's `RequestHeader` (which derefs to `Parts`) both provide it. A module of its
//! own, below both the decision (`gate`) and the refusal (`error`), so that neither
//! has to import the other to read a request.

use http::{HeaderMap, Method, Uri, header};
use std::net::IpAddr;

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
    /// The address of the connection's peer (the client, or a proxy in front of
    /// chatgate): what failed authentications are counted against (contract §6 rule
    /// 7). `None` when the transport does not say; such requests are never limited.
    pub peer: Option<IpAddr>,
}

impl<'a> From<&'a http::request::Parts> for RequestParts<'a> {
    /// The peer comes from the request's extensions: a `std::net::SocketAddr`, or
    /// axum's `ConnectInfo<SocketAddr>` (`into_make_service_with_connect_info`).
    fn from(parts: &'a http::request::Parts) -> Self {
        RequestParts {
            method: &parts.method,
            uri: &parts.uri,
            headers: &parts.headers,
            peer: peer_from_extensions(&parts.extensions),
        }
    }
}

fn peer_from_extensions(extensions: &http::Extensions) -> Option<IpAddr> {
    if let Some(address) = extensions.get::<std::net::SocketAddr>() {
        return Some(address.ip());
    }
    #[cfg(feature = "axum")]
    if let Some(info) = extensions.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>() {
        return Some(info.0.ip());
    }
    None
}

impl<'a> RequestParts<'a> {
    /// The same parts with the connection's peer address.
    pub fn with_peer(mut self, peer: Option<IpAddr>) -> Self {
        self.peer = peer;
        self
    }

    /// Whether this is a WebSocket upgrade request.
    pub fn is_websocket_upgrade(&self) -> bool {
        self.headers
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
    }
}
