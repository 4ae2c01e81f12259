//! The access log: one line per proxied request at info, target `chatgate::access`,
//! written from Pingora's `ProxyHttp::logging` hook, which runs once per request
//! whatever ended it (forwarded, refused, upstream failure, client gone).
//!
//! Fields: `method`, `path`, `status`, `code` (the Stream error code of a refusal or
//! an upstream failure), `app`, `auth` (the verified kind), `user` (unless `[log]
//! user_ids = false`), `latency_ms` (from the request head to the end of the
//! response), `upstream_ms` (from picking the upstream to its response head) and
//! `client`. The line is a `tracing` event, so the binary's subscriber decides text or
//! JSON (`[log] format`).
//!
//! Contract §6.8, no credential in any log: the path is logged without its query
//! (WebSocket clients put their token there), no header is logged, and the user id
//! comes from the verified identity, never from the request. The fields are built here
//! and nowhere else, so that rule has one place to hold.

use crate::config::ConfigSnapshot;
use crate::gate::Identity;
use pingora::protocols::l4::socket::SocketAddr;
use pingora::proxy::Session;
use std::time::{Duration, Instant};

/// Target of the access log's events (`RUST_LOG=chatgate::access=off` silences it).
pub const TARGET: &str = "chatgate::access";

/// What the access log needs to know about one request, filled in as it goes.
#[derive(Debug, Clone)]
pub struct AccessRecord {
    /// When the request head had been read (the context's creation).
    pub started: Instant,
    /// When the first upstream peer was picked.
    pub upstream_started: Option<Instant>,
    /// From picking the upstream to its response head.
    pub upstream_time: Option<Duration>,
    /// Stream error code of a refusal or upstream failure.
    pub code: Option<i32>,
    /// App of a refused request (a configured api_key or `unknown`); allowed requests
    /// take theirs from the identity.
    pub refused_app: Option<String>,
    /// The status of a response written after the request ended: the `101` of an
    /// upgrade relayed by the proxy's relay.
    pub relayed_status: Option<u16>,
}

impl Default for AccessRecord {
    fn default() -> Self {
        Self::started_at(Instant::now())
    }
}

impl AccessRecord {
    /// A record of a request whose head had been read at `started`.
    pub fn started_at(started: Instant) -> Self {
        AccessRecord {
            started,
            upstream_started: None,
            upstream_time: None,
            code: None,
            refused_app: None,
            relayed_status: None,
        }
    }

    /// The upstream peer is being picked; a retry keeps the first attempt's start.
    pub fn upstream_picked(&mut self) {
        self.upstream_started.get_or_insert_with(Instant::now);
    }

    /// The upstream's response head arrived.
    pub fn upstream_answered(&mut self) {
        if self.upstream_time.is_none() {
            self.upstream_time = self.upstream_started.map(|started| started.elapsed());
        }
    }

    /// Whether the access log would write a line: when it would not (`RUST_LOG` drops
    /// `chatgate::access`), nothing of the line is built, not even the client's address.
    pub fn enabled() -> bool {
        tracing::enabled!(target: TARGET, tracing::Level::INFO)
    }

    /// Writes the line for the finished request.
    pub fn emit(&self, session: &Session, identity: Option<&Identity>, config: &ConfigSnapshot) {
        if !Self::enabled() {
            return;
        }
        let status = session
            .response_written()
            .map(|response| response.status.as_u16())
            .or(self.relayed_status);
        self.emit_parts(
            session.req_header(),
            status,
            session.client_addr(),
            identity,
            config,
        );
    }

    /// Writes the line from the request's parts (the forward engine's session is not
    /// a `pingora::proxy::Session`).
    pub(crate) fn emit_parts(
        &self,
        request: &pingora::http::RequestHeader,
        status: Option<u16>,
        client: Option<&SocketAddr>,
        identity: Option<&Identity>,
        config: &ConfigSnapshot,
    ) {
        if !Self::enabled() {
            return;
        }
        let app: Option<&str> = identity
            .map(|identity| &*identity.app)
            .or(self.refused_app.as_deref());
        let user = if config.log.user_ids {
            identity.and_then(Identity::user_id)
        } else {
            None
        };
        // Formatted on the stack: the line is written per request, and the address is
        // the one field that needs formatting before it is a `str`.
        let mut address = ClientText::default();
        let client = client.and_then(|client| address.format(client));
        tracing::info!(
            target: TARGET,
            method = request.method.as_str(),
            path = request.uri.path(),
            status,
            code = self.code,
            app,
            auth = identity.map(|identity| identity.kind.as_str()),
            user,
            latency_ms = millis(self.started.elapsed()),
            upstream_ms = self.upstream_time.map(millis),
            client,
            "request"
        );
    }
}

/// A client address as text without a heap allocation when it fits (any IP address and
/// port does; a long Unix socket path takes the heap).
struct ClientText {
    /// An IPv6 address with a scope id and a port is at most 58 bytes.
    buffer: [u8; 64],
    heap: String,
}

impl Default for ClientText {
    fn default() -> Self {
        ClientText {
            buffer: [0; 64],
            heap: String::new(),
        }
    }
}

impl ClientText {
    fn format(&mut self, address: &SocketAddr) -> Option<&str> {
        use std::io::Write as _;
        let mut cursor = std::io::Cursor::new(&mut self.buffer[..]);
        if write!(cursor, "{address}").is_ok() {
            let length = usize::try_from(cursor.position()).ok()?;
            return std::str::from_utf8(&self.buffer[..length]).ok();
        }
        self.heap = address.to_string();
        Some(&self.heap)
    }
}

/// Milliseconds with microsecond resolution: enough for a gate that decides in
/// microseconds, short enough to read.
fn millis(duration: Duration) -> f64 {
    (duration.as_micros() as f64) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_addresses_are_written_whole_on_the_stack_or_the_heap() {
        let v4: SocketAddr = "127.0.0.1:50412"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into();
        let v6: SocketAddr = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into();
        for address in [&v4, &v6] {
            let mut text = ClientText::default();
            assert_eq!(text.format(address), Some(address.to_string().as_str()));
            assert!(text.heap.is_empty(), "{address} went to the heap");
        }
        let path = format!("/tmp/{}.sock", "x".repeat(90));
        let unix = SocketAddr::Unix(std::os::unix::net::SocketAddr::from_pathname(&path).unwrap());
        let mut text = ClientText::default();
        assert_eq!(text.format(&unix), Some(unix.to_string().as_str()));
        assert!(text.format(&unix).unwrap().contains(&path));
    }

    #[test]
    fn durations_are_milliseconds_to_the_microsecond() {
        assert_eq!(millis(Duration::from_micros(1_234_567)), 1234.567);
        assert_eq!(millis(Duration::from_nanos(999)), 0.0);
    }

    #[test]
    fn the_upstream_time_runs_from_the_first_pick_to_the_first_answer() {
        let mut record = AccessRecord::default();
        assert_eq!(record.upstream_time, None);
        record.upstream_answered();
        assert_eq!(record.upstream_time, None, "no upstream was picked");
        record.upstream_picked();
        let first = record.upstream_started;
        std::thread::sleep(Duration::from_millis(2));
        record.upstream_picked();
        assert_eq!(
            record.upstream_started, first,
            "a retry keeps the first start"
        );
        record.upstream_answered();
        let time = record.upstream_time.unwrap();
        assert!(time >= Duration::from_millis(2), "{time:?}");
        record.upstream_answered();
        assert_eq!(record.upstream_time, Some(time));
    }
}
