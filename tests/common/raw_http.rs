//! Raw HTTP/1.1 over a `TcpStream`, for tests that must send what an HTTP client
//! library would normalise or refuse (repeated or odd-cased headers, dot segments,
//! pipelining, dribbled heads) and read the answer byte for byte: request builders and
//! one answer reader that tells an HTTP response, a refused WebSocket (101, the error
//! frame, the close code), an opened one, a close and silence apart.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// === raw requests ===

/// `Sec-WebSocket-Key` of every upgrade sent here (RFC 6455's example nonce).
pub const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// A request head (and body) written byte for byte as given.
pub fn raw(method: &str, target: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut out = format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    out.push_str(body);
    out.into_bytes()
}

pub fn get(target: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    raw("GET", target, headers, "")
}

/// A WebSocket upgrade of `target` with extra headers.
pub fn upgrade(target: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    upgrade_with_connection(target, "Upgrade", headers)
}

/// A WebSocket upgrade whose own `Connection` header is `connection`.
pub fn upgrade_with_connection(
    target: &str,
    connection: &str,
    headers: &[(&str, &str)],
) -> Vec<u8> {
    let mut all = vec![
        ("Upgrade", "websocket"),
        ("Connection", connection),
        ("Sec-WebSocket-Key", WS_KEY),
        ("Sec-WebSocket-Version", "13"),
    ];
    all.extend_from_slice(headers);
    get(target, &all)
}

// === raw answers ===

/// What the server answered to one raw request.
pub enum Answer {
    /// An HTTP response other than 101.
    Http {
        status: u16,
        head: String,
        /// Lossy text, so a failure message shows it.
        body: String,
    },
    /// 101, a first text frame `{"error":{..}}`, then (maybe) a close frame's code.
    WsRefused {
        error: serde_json::Value,
        close: Option<u16>,
    },
    /// 101 and a first frame that is not an error: the upstream's greeting.
    WsOpen { first_frame: String },
    /// The connection ended before a whole answer.
    Closed,
    /// Nothing (or nothing whole) arrived within the wait and the connection is open.
    Silent,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Answer::Http { status, body, .. } => write!(f, "HTTP {status} {body:.300}"),
            Answer::WsRefused { error, close } => {
                write!(f, "WS rejection {error} then close {close:?}")
            }
            Answer::WsOpen { first_frame } => write!(f, "WS open, first frame {first_frame:.200}"),
            Answer::Closed => f.write_str("closed without an answer"),
            Answer::Silent => f.write_str("no answer on an open connection"),
        }
    }
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        match self {
            Answer::Http { body, .. } => serde_json::from_str(body).unwrap_or_default(),
            _ => serde_json::Value::Null,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            Answer::Http { status, .. } => Some(*status),
            Answer::WsRefused { .. } | Answer::WsOpen { .. } => Some(101),
            Answer::Closed | Answer::Silent => None,
        }
    }
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads more bytes into `buffer`; `false` once the connection has ended.
pub async fn fill(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 8192];
    match stream.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buffer.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

/// One server WebSocket frame: `(opcode, payload)`, consumed from `buffer`.
pub async fn read_frame(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<(u8, Vec<u8>)> {
    loop {
        if buffer.len() >= 2 {
            let opcode = buffer[0] & 0x0f;
            let (length, at) = match buffer[1] & 0x7f {
                126 if buffer.len() >= 4 => {
                    (u16::from_be_bytes([buffer[2], buffer[3]]) as usize, 4)
                }
                127 if buffer.len() >= 10 => (
                    u64::from_be_bytes(buffer[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                126 | 127 => (usize::MAX, 0),
                n => (n as usize, 2),
            };
            if length != usize::MAX && buffer.len() >= at + length {
                let payload = buffer[at..at + length].to_vec();
                buffer.drain(..at + length);
                return Some((opcode, payload));
            }
        }
        if !fill(stream, buffer).await {
            return None;
        }
    }
}

/// Reads one answer; `Silent` if it is not whole within `wait`.
pub async fn read_answer(stream: &mut TcpStream, buffer: &mut Vec<u8>, wait: Duration) -> Answer {
    match tokio::time::timeout(wait, read_answer_unbounded(stream, buffer)).await {
        Ok(answer) => answer,
        Err(_) => Answer::Silent,
    }
}

pub async fn read_answer_unbounded(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Answer {
    let head_end = loop {
        if let Some(end) = find(buffer, b"\r\n\r\n") {
            break end + 4;
        }
        if !fill(stream, buffer).await {
            return Answer::Closed;
        }
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).to_string();
    buffer.drain(..head_end);
    let status: u16 = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    if status == 101 {
        let Some((opcode, payload)) = read_frame(stream, buffer).await else {
            return Answer::Closed;
        };
        let text = String::from_utf8_lossy(&payload).to_string();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        if opcode == 1 && json.get("error").is_some() {
            let close = match read_frame(stream, buffer).await {
                Some((8, payload)) if payload.len() >= 2 => {
                    Some(u16::from_be_bytes([payload[0], payload[1]]))
                }
                _ => None,
            };
            return Answer::WsRefused {
                error: json["error"].clone(),
                close,
            };
        }
        return Answer::WsOpen { first_frame: text };
    }
    let lower = head.to_ascii_lowercase();
    let length: usize = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buffer.len() < length {
        if !fill(stream, buffer).await {
            return Answer::Closed;
        }
    }
    let body: Vec<u8> = buffer.drain(..length).collect();
    let body = String::from_utf8_lossy(&body).into_owned();
    Answer::Http { status, head, body }
}

/// Sends `request` on a new connection to `address` and reads one answer (at most
/// `wait`). A refused write fails the test: callers that expect the server to close
/// early write themselves and use [`read_answer`].
pub async fn exchange(address: SocketAddr, request: &[u8], wait: Duration) -> Answer {
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut buffer = Vec::new();
    read_answer(&mut stream, &mut buffer, wait).await
}
