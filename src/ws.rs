//! WebSocket wire format, as much as chatgate needs (contract §4): the handshake's
//! accept key, unmasked server frames, and frame boundaries in a proxied stream. The
//! Stream way to refuse a WebSocket (101, one text frame `{"error":{...}}`, close 1000)
//! is assembled from these in [`crate::error::Rejection`], the one place that builds
//! it for both adapters; the live-session close (4000) uses [`close_frame`].

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

/// Going away (server shutdown, idle): what the edge proxy sends both sides when it
/// ends a relayed session for a reason other than the token.
pub const CLOSE_GOING_AWAY: u16 = 1001;

/// One close frame as a client sends it (masked with `key`, RFC 6455 §5.3): what a
/// proxy writes towards the server side of a WebSocket it ends.
pub fn masked_close_frame(code: u16, reason: &str, key: [u8; 4]) -> Bytes {
    let unmasked = close_frame(code, reason);
    // A close frame's payload is at most 125 bytes: its header is always two bytes.
    let mut out = BytesMut::with_capacity(unmasked.len() + 4);
    out.put_u8(unmasked[0]);
    out.put_u8(unmasked[1] | 0x80);
    out.put_slice(&key);
    out.extend(
        unmasked[2..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ key[i % 4]),
    );
    out.freeze()
}

/// The bytes after a refusing 101: the error frame (`{"error":{...}}`), then a normal
/// close.
pub fn rejection_frames(error_frame: &[u8]) -> Bytes {
    let text = text_frame(error_frame);
    let close = close_frame(CLOSE_NORMAL, "");
    let mut out = BytesMut::with_capacity(text.len() + close.len());
    out.put_slice(&text);
    out.put_slice(&close);
    out.freeze()
}

/// Follows the frame boundaries of one direction of a proxied WebSocket, chunk by
/// chunk, so that a proxy can cut the byte stream between frames: a frame injected in
/// the middle of another would corrupt the connection. Reads only frame headers (never
/// payloads), so it works with any extension, masked or not.
#[derive(Debug, Default, Clone)]
pub struct FrameBoundaries {
    header: [u8; 14],
    header_len: usize,
    payload_left: u64,
}

impl FrameBoundaries {
    /// Whether the bytes followed so far end exactly between two frames.
    pub fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.payload_left == 0
    }

    /// Follows `bytes` through.
    pub fn advance(&mut self, bytes: &[u8]) {
        self.consume(bytes, false);
    }

    /// Follows `bytes` up to the end of the frame in progress and returns how many
    /// bytes that took (`Some(0)` at a boundary); `None` when that frame goes on past
    /// `bytes`, which were all followed.
    pub fn finish_frame(&mut self, bytes: &[u8]) -> Option<usize> {
        if self.at_boundary() {
            return Some(0);
        }
        let used = self.consume(bytes, true);
        self.at_boundary().then_some(used)
    }

    /// Consumes bytes; with `stop_at_boundary`, stops at the first frame end.
    fn consume(&mut self, bytes: &[u8], stop_at_boundary: bool) -> usize {
        let mut used = 0;
        loop {
            if self.payload_left > 0 {
                let rest = (bytes.len() - used) as u64;
                let take = self.payload_left.min(rest);
                used += take as usize;
                self.payload_left -= take;
                if self.payload_left > 0 || stop_at_boundary {
                    return used;
                }
            }
            if used == bytes.len() {
                return used;
            }
            self.header[self.header_len] = bytes[used];
            self.header_len += 1;
            used += 1;
            if self.header_len >= 2 && self.header_len == header_size(&self.header) {
                self.payload_left = payload_len(&self.header[..self.header_len]);
                self.header_len = 0;
                if self.payload_left == 0 && stop_at_boundary {
                    return used;
                }
            }
        }
    }
}

/// The size of a frame header, from its first two bytes.
fn header_size(header: &[u8; 14]) -> usize {
    let extended = match header[1] & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if header[1] & 0x80 != 0 { 4 } else { 0 };
    2 + extended + mask
}

/// The payload length a complete frame header announces.
fn payload_len(header: &[u8]) -> u64 {
    match header[1] & 0x7f {
        126 => u64::from(u16::from_be_bytes([header[2], header[3]])),
        127 => u64::from_be_bytes(header[2..10].try_into().expect("eight length bytes")),
        len => u64::from(len),
    }
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
    fn a_masked_close_unmasks_to_the_plain_one() {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        let masked = masked_close_frame(1001, "going away", key);
        let plain = close_frame(1001, "going away");
        assert_eq!(masked[0], plain[0]);
        assert_eq!(masked[1], plain[1] | 0x80);
        assert_eq!(&masked[2..6], &key);
        let unmasked: Vec<u8> = masked[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ key[i % 4])
            .collect();
        assert_eq!(&unmasked[..], &plain[2..]);
        let mut tracker = FrameBoundaries::default();
        tracker.advance(&masked[..3]);
        assert!(!tracker.at_boundary());
        assert_eq!(tracker.finish_frame(&masked[3..]), Some(masked.len() - 3));
    }

    #[test]
    fn rejection_is_the_error_frame_then_a_normal_close() {
        let response = AuthError::Expired.response();
        let bytes = rejection_frames(&response.ws_frame);
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

    fn frames(sizes: &[usize]) -> Vec<Vec<u8>> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let mut frame = text_frame(&vec![b'a' + (i % 26) as u8; n]).to_vec();
                if i % 3 == 1 {
                    // a masked frame, as clients send: mask bit and four key bytes
                    frame[1] |= 0x80;
                    let at = match n {
                        0..=125 => 2,
                        126..=0xFFFF => 4,
                        _ => 10,
                    };
                    frame.splice(at..at, [1, 2, 3, 4]);
                }
                frame
            })
            .collect()
    }

    /// Follows `stream[..cut]` in chunks of `chunk`, then asks for the end of the frame
    /// in progress, also in chunks: where does the tracker say to cut?
    fn cut_point(stream: &[u8], cut: usize, chunk: usize) -> usize {
        let mut tracker = FrameBoundaries::default();
        for piece in stream[..cut].chunks(chunk) {
            tracker.advance(piece);
        }
        let mut offset = cut;
        for piece in stream[cut..].chunks(chunk) {
            match tracker.finish_frame(piece) {
                Some(used) => return offset + used,
                None => offset += piece.len(),
            }
        }
        assert!(tracker.at_boundary(), "the stream ends with a whole frame");
        offset
    }

    proptest::proptest! {
        #[test]
        fn the_cut_is_the_first_frame_end_at_or_after_any_point(
            sizes in proptest::collection::vec(
                proptest::prop_oneof![0usize..130, 0usize..70_000],
                1..6,
            ),
            chunk in 1usize..2_000,
            cut_at in 0.0f64..1.0,
        ) {
            let frames = frames(&sizes);
            let stream = frames.concat();
            let mut boundaries = vec![0];
            for frame in &frames {
                boundaries.push(boundaries.last().unwrap() + frame.len());
            }
            let cut = ((stream.len() as f64) * cut_at) as usize;
            let expected = *boundaries.iter().find(|&&b| b >= cut).unwrap();
            proptest::prop_assert_eq!(cut_point(&stream, cut, chunk), expected);
        }
    }

    #[test]
    fn a_boundary_is_reported_at_once_and_after_a_whole_frame() {
        let mut tracker = FrameBoundaries::default();
        assert_eq!(tracker.finish_frame(b"anything"), Some(0));
        let frame = text_frame(b"hello");
        tracker.advance(&frame[..3]);
        assert!(!tracker.at_boundary());
        assert_eq!(tracker.finish_frame(&frame[3..5]), None);
        assert_eq!(tracker.finish_frame(&frame[5..]), Some(2));
        assert!(tracker.at_boundary());
        // an empty frame (a ping, say) whose header was split: it ends with its header
        let empty = text_frame(b"");
        tracker.advance(&empty[..1]);
        let mut rest = empty[1..].to_vec();
        rest.extend_from_slice(&frame);
        assert_eq!(tracker.finish_frame(&rest), Some(1));
    }
}
