//! The Stream way to refuse a WebSocket (contract §4): complete the upgrade (101),
//! send one text frame `{"error":{...}}`, then close with 1000. A bare HTTP 401 makes
//! SDKs retry forever without refreshing their token. Both adapters write these bytes.

use crate::error::ErrorResponse;
use bytes::{BufMut, Bytes, BytesMut};
use sha1::{Digest, Sha1};

/// RFC 6455's GUID appended to `Sec-WebSocket-Key`.
const HANDSHAKE_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Normal closure: the JS SDK does not reconnect after it.
pub const CLOSE_NORMAL: u16 = 1000;
/// Close code for a live session whose token was revoked or expired: anything but 1000
/// makes SDKs reconnect, get the code-40 frame, and refresh their token.
pub const CLOSE_TOKEN_INVALIDATED: u16 = 4000;

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key`.
pub fn accept_key(client_key: &[u8]) -> String {
    let mut sha1 = Sha1::new();
    sha1.update(client_key);
    sha1.update(HANDSHAKE_GUID.as_bytes());
    base64_simd::STANDARD.encode_to_string(sha1.finalize())
}

fn frame_header(out: &mut BytesMut, opcode: u8, len: usize) {
    // FIN set, server frames are never masked.
    out.put_u8(0x80 | opcode);
    match len {
        0..=125 => out.put_u8(len as u8),
        126..=0xFFFF => {
            out.put_u8(126);
            out.put_u16(len as u16);
        }
        _ => {
            out.put_u8(127);
            out.put_u64(len as u64);
        }
    }
}

/// One unmasked text frame.
pub fn text_frame(payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 10);
    frame_header(&mut out, 0x1, payload.len());
    out.put_slice(payload);
    out.freeze()
}

/// One close frame with a status code and a short reason (at most 123 bytes are kept).
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let reason = &reason.as_bytes()[..cut];
    let mut out = BytesMut::with_capacity(reason.len() + 4);
    frame_header(&mut out, 0x8, reason.len() + 2);
    out.put_u16(code);
    out.put_slice(reason);
    out.freeze()
}

/// The bytes after the 101: the error frame, then a normal close.
pub fn rejection_frames(error: &ErrorResponse) -> Bytes {
    let text = text_frame(&error.ws_frame);
    let close = close_frame(CLOSE_NORMAL, "");
    let mut out = BytesMut::with_capacity(text.len() + close.len());
    out.put_slice(&text);
    out.put_slice(&close);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::AuthError;

    #[test]
    fn accept_key_matches_rfc_6455_example() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn frames_use_the_right_length_encoding() {
        assert_eq!(&text_frame(b"hi")[..], &[0x81, 2, b'h', b'i']);
        let medium = text_frame(&[b'a'; 300]);
        assert_eq!(&medium[..4], &[0x81, 126, 0x01, 0x2c]);
        let long = text_frame(&vec![b'a'; 70_000]);
        assert_eq!(long[1], 127);
        assert_eq!(&close_frame(1000, "")[..], &[0x88, 2, 0x03, 0xe8]);
    }

    #[test]
    fn rejection_is_the_error_frame_then_a_normal_close() {
        let response = AuthError::Expired.response();
        let bytes = rejection_frames(&response);
        let text_len = response.ws_frame.len();
        assert_eq!(bytes[0], 0x81);
        let (header, rest) = if text_len < 126 {
            (2, &bytes[2..])
        } else {
            (4, &bytes[4..])
        };
        assert_eq!(&rest[..text_len], &response.ws_frame[..]);
        assert_eq!(&bytes[header + text_len..], &close_frame(1000, "")[..]);
    }
}
