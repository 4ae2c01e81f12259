//! The one rejection (contract §4): what a refused request gets on the wire, built once
//! from an [`AuthError`] and the request's upgrade headers, as linkerd's
//! `errors/respond.rs` builds one synthetic response per error. Adapters only copy a
//! [`Rejection`] out to their transport (a tower `Response`, a Pingora session); none of
//! them writes an error body or a 101 handshake of its own, so the layer and the proxy
//! cannot drift apart.

use super::{AuthError, ErrorResponse};
use crate::request::RequestParts;
use crate::ws;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};

/// A refusal ready for the wire: a status line, its headers, and the bytes after them.
///
/// - Over HTTP: the error's status, `Content-Type: application/json`, `Content-Length`,
///   and Stream's error object as the body.
/// - On a WebSocket upgrade with a `Sec-WebSocket-Key`: `101 Switching Protocols` with
///   the handshake headers, then (on the upgraded connection) the text frame
///   `{"error":{...}}` and a close 1000. A bare 401 would make SDKs retry forever
///   without refreshing their token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Rejection {
    /// The refusal `request` gets: the WebSocket one for an upgrade that sent a
    /// `Sec-WebSocket-Key`, the HTTP one otherwise.
    pub fn new(error: &AuthError, request: &RequestParts<'_>) -> Self {
        match request.headers.get(header::SEC_WEBSOCKET_KEY) {
            Some(key) if request.is_websocket_upgrade() => Self::websocket(error, key.as_bytes()),
            _ => Self::http(error),
        }
    }

    /// The HTTP refusal: status, JSON content type and length, Stream's error object.
    pub fn http(error: &AuthError) -> Self {
        let ErrorResponse { status, body, .. } = error.response();
        let mut headers = HeaderMap::with_capacity(2);
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(ErrorResponse::CONTENT_TYPE),
        );
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        Rejection {
            status,
            headers,
            body,
        }
    }

    /// The WebSocket refusal for a client that sent `client_key` as its
    /// `Sec-WebSocket-Key`: a completed handshake, then the error frame and a close 1000.
    pub fn websocket(error: &AuthError, client_key: &[u8]) -> Self {
        let accept = HeaderValue::try_from(ws::accept_key(client_key))
            .expect("base64 is a valid header value");
        let mut headers = HeaderMap::with_capacity(3);
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        Rejection {
            status: StatusCode::SWITCHING_PROTOCOLS,
            headers,
            body: ws::rejection_frames(&error.response().ws_frame),
        }
    }

    /// The same HTTP refusal with `Connection: close`, for a connection left in a state
    /// that cannot serve another request (a failed proxy attempt). A WebSocket refusal
    /// is left as it is: its connection is upgraded, never reused for HTTP.
    pub fn closing(mut self) -> Self {
        if !self.is_upgrade() {
            self.headers
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        self
    }

    /// The status line: the error's status, or 101 for a WebSocket refusal.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The response headers, to copy out as they are.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// What follows the head: the HTTP body, or for a 101 the bytes to write on the
    /// upgraded connection (the error frame and the close frame).
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// Whether this is the WebSocket refusal: the connection is upgraded, not kept for
    /// further HTTP requests.
    pub fn is_upgrade(&self) -> bool {
        self.status == StatusCode::SWITCHING_PROTOCOLS
    }

    /// The response head (status and headers) as an `http::Response` with no body, and
    /// the bytes that follow it.
    pub fn into_head(self) -> (http::Response<()>, Bytes) {
        let mut head = http::Response::new(());
        *head.status_mut() = self.status;
        *head.headers_mut() = self.headers;
        (head, self.body)
    }
}

/// The HTTP refusal as a response. For a WebSocket refusal the frames are not part of an
/// HTTP body: take them with [`Rejection::into_head`] and write them after the upgrade.
impl From<Rejection> for http::Response<Bytes> {
    fn from(rejection: Rejection) -> Self {
        let (head, body) = rejection.into_head();
        let body = if head.status() == StatusCode::SWITCHING_PROTOCOLS {
            Bytes::new()
        } else {
            body
        };
        head.map(|()| body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Malformed;
    use http::Method;

    fn parts(headers: &[(&'static str, &'static str)]) -> (Method, http::Uri, HeaderMap) {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, HeaderValue::from_static(value));
        }
        (Method::GET, "/connect?api_key=k".parse().unwrap(), map)
    }

    fn rejection_for(headers: &[(&'static str, &'static str)]) -> Rejection {
        let (method, uri, headers) = parts(headers);
        Rejection::new(
            &AuthError::Expired,
            &RequestParts {
                method: &method,
                uri: &uri,
                headers: &headers,
                peer: None,
            },
        )
    }

    #[test]
    fn an_http_refusal_is_the_json_error_with_its_status_and_length() {
        let error = AuthError::Malformed(Malformed::Missing);
        let rejection = Rejection::http(&error);
        assert_eq!(rejection.status(), StatusCode::UNAUTHORIZED);
        assert!(!rejection.is_upgrade());
        assert_eq!(
            rejection.headers()[header::CONTENT_TYPE],
            ErrorResponse::CONTENT_TYPE
        );
        assert_eq!(
            rejection.headers()[header::CONTENT_LENGTH],
            rejection.body().len().to_string().as_str()
        );
        assert_eq!(rejection.body(), &error.response().body);
        let response = http::Response::<Bytes>::from(rejection.clone());
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(response.body(), rejection.body());
        let closing = rejection.clone().closing();
        assert_eq!(closing.headers()[header::CONNECTION], "close");
        assert_eq!(closing.body(), rejection.body());
    }

    #[test]
    fn an_upgrade_with_a_key_is_refused_with_101_the_error_frame_and_a_normal_close() {
        let rejection = rejection_for(&[
            ("upgrade", "websocket"),
            ("connection", "Upgrade"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ]);
        assert!(rejection.is_upgrade());
        assert_eq!(rejection.status(), StatusCode::SWITCHING_PROTOCOLS);
        let headers = rejection.headers();
        assert_eq!(headers[header::UPGRADE], "websocket");
        assert_eq!(headers[header::CONNECTION], "Upgrade");
        // RFC 6455's example key and accept value
        assert_eq!(
            headers[header::SEC_WEBSOCKET_ACCEPT],
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        let frame = AuthError::Expired.response().ws_frame;
        let expected = [
            &ws::text_frame(&frame)[..],
            &ws::close_frame(ws::CLOSE_NORMAL, "")[..],
        ]
        .concat();
        assert_eq!(&rejection.body()[..], &expected[..]);
        // the frames never become an HTTP body
        let response = http::Response::<Bytes>::from(rejection);
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert!(response.body().is_empty());
    }

    #[test]
    fn an_upgrade_without_a_key_and_a_key_without_an_upgrade_are_http() {
        for headers in [
            &[("upgrade", "websocket"), ("connection", "Upgrade")][..],
            &[("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")][..],
        ] {
            let rejection = rejection_for(headers);
            assert_eq!(
                rejection,
                Rejection::http(&AuthError::Expired),
                "{headers:?}"
            );
        }
    }
}
