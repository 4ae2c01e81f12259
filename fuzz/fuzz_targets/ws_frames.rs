//! WebSocket frame boundaries (`chatgate::ws`): the tracker a proxy uses to cut a
//! relayed byte stream only between frames, and the frames chatgate writes itself.
//!
//! The first input byte chooses the mode and seeds the chunking; the rest is a byte
//! stream (tracker mode) or a payload (writer mode).
//!
//! Invariants:
//! - tracker: however the stream is cut into chunks, and whether each chunk goes
//!   through `advance` or `finish_frame` (then `advance` for the rest, as a relay
//!   does), `at_boundary` is true exactly at the frame ends a whole-stream reference
//!   parser finds, and `finish_frame` stops exactly at the next one (or consumes the
//!   chunk when there is none in it); never a panic, whatever the lengths announced;
//! - writer: `text_frame`, `close_frame` and `rejection_frames` produce frames the
//!   reference parser reads back whole (FIN set, unmasked, the right opcode and
//!   payload; a close reason cut to 123 bytes on a character boundary) and that the
//!   tracker ends at a boundary; `accept_key` is 28 characters of base64.
#![no_main]

use chatgate::ws::{self, FrameBoundaries};
use libfuzzer_sys::fuzz_target;

/// One complete frame: where it ends, its first byte, whether masked, its payload range.
#[derive(Debug)]
struct Frame {
    end: u128,
    first: u8,
    masked: bool,
    payload: std::ops::Range<u128>,
}

/// Reads whole frames from the start of `stream`, as RFC 6455 §5.2 lays them out.
fn reference_frames(stream: &[u8]) -> Vec<Frame> {
    let mut frames = Vec::new();
    let n = stream.len() as u128;
    let mut at = 0usize;
    loop {
        let Some(&[first, second]) = stream
            .get(at..at + 2)
            .map(|s| <&[u8; 2]>::try_from(s).unwrap())
        else {
            return frames;
        };
        let extended = match second & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let masked = second & 0x80 != 0;
        let header = 2 + extended + if masked { 4 } else { 0 };
        let Some(head) = stream.get(at..at + header) else {
            return frames;
        };
        let len: u128 = match extended {
            2 => u128::from(u16::from_be_bytes([head[2], head[3]])),
            8 => u128::from(u64::from_be_bytes(head[2..10].try_into().unwrap())),
            _ => u128::from(second & 0x7f),
        };
        let start = at as u128 + header as u128;
        let end = start + len;
        if end > n {
            return frames;
        }
        frames.push(Frame {
            end,
            first,
            masked,
            payload: start..end,
        });
        at = end as usize;
    }
}

/// A small deterministic generator for chunk lengths and modes.
struct Lcg(u32);

impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self.0.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        self.0 >> 16
    }
}

fn track(seed: u8, stream: &[u8]) {
    let ends: Vec<u128> = reference_frames(stream).iter().map(|f| f.end).collect();
    let is_end = |offset: u128| offset == 0 || ends.binary_search(&offset).is_ok();
    let mut tracker = FrameBoundaries::default();
    let mut rng = Lcg(u32::from(seed));
    let mut offset = 0usize;
    // Bounded: every round moves at least one byte on.
    while offset < stream.len() {
        let max = [1, 2, 3, 7, 16, 64, 1024][rng.next() as usize % 7];
        let len = 1 + rng.next() as usize % max;
        let chunk = &stream[offset..(offset + len).min(stream.len())];
        if rng.next() % 2 == 0 {
            tracker.advance(chunk);
        } else {
            let was_at_boundary = tracker.at_boundary();
            match tracker.finish_frame(chunk) {
                Some(used) => {
                    assert!(used <= chunk.len());
                    let stop = (offset + used) as u128;
                    assert!(
                        is_end(stop),
                        "finish_frame stopped at {stop}, not a frame end"
                    );
                    assert_eq!(used == 0, was_at_boundary);
                    // No frame end was skipped on the way.
                    assert!(!ends.iter().any(|e| *e > offset as u128 && *e < stop));
                    assert!(tracker.at_boundary());
                    tracker.advance(&chunk[used..]);
                }
                None => {
                    let last = (offset + chunk.len()) as u128;
                    assert!(
                        !ends.iter().any(|e| *e > offset as u128 && *e <= last),
                        "finish_frame passed a frame end"
                    );
                    assert!(!tracker.at_boundary());
                }
            }
        }
        offset += chunk.len();
        assert_eq!(
            tracker.at_boundary(),
            is_end(offset as u128),
            "at offset {offset} (frame ends {ends:?})"
        );
    }
}

fn read_one(bytes: &[u8], opcode: u8) -> Vec<u8> {
    let frames = reference_frames(bytes);
    let frame = &frames[0];
    assert_eq!(frame.first, 0x80 | opcode, "FIN and opcode");
    assert!(!frame.masked, "server frames are not masked");
    let mut tracker = FrameBoundaries::default();
    tracker.advance(&bytes[..frame.end as usize]);
    assert!(tracker.at_boundary());
    bytes[frame.payload.start as usize..frame.payload.end as usize].to_vec()
}

fn write(seed: u8, payload: &[u8]) {
    let text = ws::text_frame(payload);
    assert_eq!(reference_frames(&text).len(), 1);
    assert_eq!(read_one(&text, 0x1), payload);

    let code = u16::from(seed) << 8 | u16::from(payload.first().copied().unwrap_or(0));
    let reason = String::from_utf8_lossy(payload);
    let close = ws::close_frame(code, &reason);
    assert_eq!(reference_frames(&close).len(), 1);
    let body = read_one(&close, 0x8);
    assert!(
        body.len() <= 125,
        "a control frame payload is at most 125 bytes"
    );
    assert_eq!(u16::from_be_bytes([body[0], body[1]]), code);
    let kept = std::str::from_utf8(&body[2..]).expect("the reason is cut on a char boundary");
    assert!(reason.starts_with(kept));
    assert!(
        kept.len() == reason.len() || kept.len() > 123 - 4,
        "cut more than needed"
    );

    let both = ws::rejection_frames(payload);
    let frames = reference_frames(&both);
    assert_eq!(frames.len(), 2);
    assert_eq!(frames[1].end as usize, both.len());
    assert_eq!(read_one(&both, 0x1), payload);
    assert_eq!(read_one(&both[frames[0].end as usize..], 0x8), [0x03, 0xe8]);

    let accept = ws::accept_key(payload);
    assert_eq!(accept.len(), 28);
    assert!(
        accept
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b))
    );
}

fuzz_target!(|data: &[u8]| {
    let [mode, rest @ ..] = data else {
        return;
    };
    if mode & 0x80 == 0 {
        track(*mode, rest);
    } else {
        write(*mode, rest);
    }
});
