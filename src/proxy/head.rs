//! Contract §6 rule 6: slow or huge request heads do not hold resources.
//!
//! Pingora reads a request head before any `ProxyHttp` hook runs, and bounds it only
//! loosely: in pingora-core 0.9.1 `HttpSession::read_request`
//! (`protocols/http/v1/server.rs`) waits for each read with the keep-alive timeout
//! (60 s, set by the `ServerApp` impl for every `HttpServerApp` in `apps/mod.rs`), so a
//! client sending one byte a minute is never cut off, and it stops a head only past
//! `MAX_HEADER_SIZE` (1 MiB - 1, a private constant), answering 400. Neither
//! `HttpServerOptions` nor `ServerConf` nor any hook (`early_request_filter` runs after
//! the head is read) sets either bound.
//!
//! So the bound is built on Pingora's public API, one layer down, with the smallest
//! piece that sees the bytes before Pingora does:
//! - [`HeadLimitedApp`] is the listening service's `ServerApp`. It runs the same
//!   HTTP/1 keep-alive loop as Pingora's own `ServerApp` for an `HttpServerApp` (new
//!   session, keep-alive 60 s unless shutting down, `keepalive_request_limit`, then
//!   `process_new_http` until the connection is not reusable), with each connection's
//!   `Stream` wrapped in a [`HeadGuard`], and marks the start of every request's head.
//! - [`HeadGuard`] passes reads through; while a head is being read it counts the head's
//!   bytes (finding its end, the first empty line, itself) and, from the head's first
//!   byte, polls a timer next to the read. Past `[server] max_header_bytes` it answers
//!   431, past `[server] header_timeout_ms` 408 (each a complete response with
//!   `Connection: close`, written if the socket takes it at once), and fails the read,
//!   which makes Pingora drop the connection and with it every buffer it holds.
//! - [`head_read`], called from `early_request_filter`, ends the head phase: the hook
//!   runs as soon as Pingora has parsed a head, including one that arrived whole in
//!   bytes read with the previous request (pipelining), which the guard never sees.
//!
//! An idle keep-alive connection is left to Pingora's own idle timeout: the clock
//! starts at the head's first byte. A head that began inside bytes read with the
//! previous request is timed and counted from the first byte read after it, so such a
//! head may exceed the limit by what was read ahead (Pingora reads at most its body
//! buffer ahead) before the 1 MiB cap applies. The common request, whose head arrives
//! in one read, costs one scan for its end (memchr) and no timer.
//!
//! The same loop relays WebSocket sessions (contract §4, see the proxy's `relay` module): when
//! the application handed an upgraded session over during a request (`hand_off`),
//! the connection Pingora gives back is relayed (in a task of its own, without the
//! guard: see `unguard`) instead of serving another request. The guard keeps the
//! bytes read behind a `GET` head (a client's frames sent before the 101) for that
//! hand-off.
//!
//! Only HTTP/1 is handled here: chatgate serves HTTP/2 only over TLS (ALPN `h2`, no
//! h2c), and such a connection goes to Pingora's own HTTP/2 loop, where the h2
//! server's `max_header_list_size` (from `[server] max_header_bytes`, see
//! `tls::h2_options`) bounds a head's size, and Pingora's 60 s TLS handshake timeout
//! and the 60 s HTTP/2 idle timeout (`tls::server_options`: a stream exists only once
//! its head is whole) its time.

use super::relay::{self, Handoff};
use crate::reload::ConfigHandle;
use async_trait::async_trait;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{ALPN, Peek, Shutdown, Stream};
use pingora::server::ShutdownWatch;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Implements Pingora's connection-information traits (`UniqueID`, `Ssl` and the
/// timing, proxy and socket digests) for a wrapper of a [`Stream`] in its `inner`
/// field by asking the wrapped stream: the wrappers here ([`HeadGuard`],
/// `relay::Rewound`) change how bytes move, not what the connection is.
macro_rules! delegate_stream_info {
    ($wrapper:ty) => {
        impl pingora::protocols::UniqueID for $wrapper {
            fn id(&self) -> pingora::protocols::UniqueIDType {
                pingora::protocols::UniqueID::id(&*self.inner)
            }
        }

        impl pingora::protocols::Ssl for $wrapper {
            fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
                pingora::protocols::Ssl::get_ssl(&*self.inner)
            }

            fn get_ssl_digest(&self) -> Option<std::sync::Arc<pingora::protocols::tls::SslDigest>> {
                pingora::protocols::Ssl::get_ssl_digest(&*self.inner)
            }

            fn selected_alpn_proto(&self) -> Option<pingora::protocols::ALPN> {
                pingora::protocols::Ssl::selected_alpn_proto(&*self.inner)
            }
        }

        impl pingora::protocols::GetTimingDigest for $wrapper {
            fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
                pingora::protocols::GetTimingDigest::get_timing_digest(&*self.inner)
            }

            fn get_read_pending_time(&self) -> std::time::Duration {
                pingora::protocols::GetTimingDigest::get_read_pending_time(&*self.inner)
            }

            fn get_write_pending_time(&self) -> std::time::Duration {
                pingora::protocols::GetTimingDigest::get_write_pending_time(&*self.inner)
            }
        }

        impl pingora::protocols::GetProxyDigest for $wrapper {
            fn get_proxy_digest(
                &self,
            ) -> Option<std::sync::Arc<pingora::protocols::raw_connect::ProxyDigest>> {
                pingora::protocols::GetProxyDigest::get_proxy_digest(&*self.inner)
            }

            fn set_proxy_digest(&mut self, digest: pingora::protocols::raw_connect::ProxyDigest) {
                pingora::protocols::GetProxyDigest::set_proxy_digest(&mut *self.inner, digest)
            }
        }

        impl pingora::protocols::GetSocketDigest for $wrapper {
            fn get_socket_digest(
                &self,
            ) -> Option<std::sync::Arc<pingora::protocols::SocketDigest>> {
                pingora::protocols::GetSocketDigest::get_socket_digest(&*self.inner)
            }

            fn set_socket_digest(&mut self, socket_digest: pingora::protocols::SocketDigest) {
                pingora::protocols::GetSocketDigest::set_socket_digest(
                    &mut *self.inner,
                    socket_digest,
                )
            }
        }
    };
}
pub(crate) use delegate_stream_info;

/// Pingora's keep-alive for a new connection (`apps/mod.rs`): kept so a connection
/// behaves exactly as it would without the guard.
const KEEPALIVE_SECONDS: u64 = 60;

/// The answer to a head that took too long.
const TIMED_OUT: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
/// The answer to a head that is too large.
const TOO_LARGE: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// Between heads: reads pass through untouched.
const PASS: u8 = 0;
/// A new head starts with the next read: the guard resets its count and clock.
const ARMED: u8 = 1;
/// A head is being read.
const HEAD: u8 = 2;

/// A Pingora HTTP application (e.g. `HttpProxy`) behind the head limits of
/// `[server] header_timeout_ms` and `[server] max_header_bytes`, read from the live
/// config for each new connection. The application's `early_request_filter` must call
/// [`head_read`].
pub struct HeadLimitedApp<A> {
    app: Arc<A>,
    config: ConfigHandle,
}

impl<A> HeadLimitedApp<A> {
    /// Wraps `app`.
    pub fn new(app: A, config: ConfigHandle) -> Self {
        HeadLimitedApp {
            app: Arc::new(app),
            config,
        }
    }
}

impl<A> HeadLimitedApp<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    /// Serves `session` (a new connection's first request, possibly handed over by the
    /// forward engine with its head as a pipelined prefix) and the connection's later
    /// requests; relays the connection instead once a request has handed an upgraded
    /// WebSocket over. `conn` is what the connection's [`HeadGuard`] shares.
    pub(crate) async fn serve(
        &self,
        mut session: ServerSession,
        conn: &Connection,
        shutdown: &ShutdownWatch,
    ) {
        session.set_keepalive_reuses_remaining(
            self.app
                .server_options()
                .and_then(|options| options.keepalive_request_limit),
        );
        let mut reused = self.app.process_new_http(session, shutdown).await;
        // Bounded by the client: each round serves one request or ends the connection.
        while let Some((stream, settings)) = reused.map(|r| r.consume()) {
            if let Some(upgraded) = conn.handoff.take() {
                // The request was a WebSocket upgrade the application made itself: the
                // connection is now a relayed session, in a task of its own, and this
                // one (Pingora's connection task, sized for its HTTP state machine)
                // ends instead of idling as long as the session does.
                tokio::spawn(relay::relay(stream, upgraded));
                return;
            }
            next_request(conn);
            let mut session = ServerSession::new_http1(stream);
            if let Some(settings) = settings {
                settings.apply_to_session(&mut session);
            }
            reused = self.app.process_new_http(session, shutdown).await;
        }
    }
}

/// Wraps a new connection's stream in a [`HeadGuard`] with the live config's limits;
/// the returned [`Connection`] is what [`next_request`] and [`end_head`] move.
pub(crate) fn guard(stream: Stream, config: &ConfigHandle) -> (Stream, Arc<Connection>) {
    let (timeout, max_bytes) = {
        let config = config.load();
        (config.server.header_timeout, config.server.max_header_bytes)
    };
    let conn = Arc::new(Connection {
        phase: AtomicU8::new(ARMED),
        request: AtomicU32::new(0),
        handoff: Handoff::default(),
    });
    let guarded: Stream = Box::new(HeadGuard::new(stream, conn.clone(), timeout, max_bytes));
    (guarded, conn)
}

/// The connection's next read starts a new request's head (a connection's first
/// request needs no call: [`guard`] starts it so).
pub(crate) fn next_request(conn: &Connection) {
    conn.request.fetch_add(1, Ordering::Relaxed);
    conn.phase.store(ARMED, Ordering::Relaxed);
}

/// The current head has been read: what follows is body.
pub(crate) fn end_head(conn: &Connection) {
    conn.phase.store(PASS, Ordering::Relaxed);
}

/// Pingora's keep-alive for a new connection, for the forward engine's own loop.
pub(crate) const KEEPALIVE: u64 = KEEPALIVE_SECONDS;

#[async_trait]
impl<A> ServerApp for HeadLimitedApp<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // HTTP/2 (TLS with ALPN `h2`): Pingora's own loop, whose HTTP/2 settings bound
        // the header list (see `tls::h2_options`).
        if stream.selected_alpn_proto() == Some(ALPN::H2) {
            return self.app.process_new(stream, shutdown).await;
        }
        let (guarded, conn) = guard(stream, &self.config);
        let mut session = ServerSession::new_http1(guarded);
        // As Pingora's own loop does for a new HTTP/1 connection.
        if *shutdown.borrow() {
            session.set_keepalive(None);
        } else {
            session.set_keepalive(Some(KEEPALIVE_SECONDS));
        }
        self.serve(session, &conn, shutdown).await;
        None
    }

    async fn cleanup(&self) {
        self.app.http_cleanup().await;
    }
}

/// Ends the head phase of the connection under `session` (call it from
/// `ProxyHttp::early_request_filter`): the head has been read, what follows is body.
pub fn head_read(session: &pingora::proxy::Session) {
    if let Some(stream) = session.as_downstream().stream()
        && let Some(guard) = (**stream).as_any().downcast_ref::<HeadGuard>()
    {
        guard.conn.phase.store(PASS, Ordering::Relaxed);
    }
}

/// Leaves an upgraded WebSocket session for the connection's loop to relay once the
/// request ends; gives it back when the connection under `session` is not one of
/// [`HeadLimitedApp`]'s (nothing would pick it up).
pub(crate) fn hand_off(
    session: &pingora::proxy::Session,
    mut upgraded: Box<relay::Upgraded>,
) -> Result<(), Box<relay::Upgraded>> {
    match session
        .as_downstream()
        .stream()
        .and_then(|stream| (**stream).as_any().downcast_ref::<HeadGuard>())
    {
        Some(guard) => {
            upgraded.to_upstream = guard.bytes_after_head();
            guard.conn.handoff.put(upgraded);
            Ok(())
        }
        None => Err(upgraded),
    }
}

/// Bytes the client sent right behind the current request's head (a WebSocket
/// client's frames sent before the 101), when `stream` is a [`HeadGuard`]: the HTTP
/// session read them with the head and keeps them as the next request's start, but they
/// belong to the upgraded session.
pub(crate) fn bytes_after_head(stream: &Stream) -> bytes::Bytes {
    (**stream)
        .as_any()
        .downcast_ref::<HeadGuard>()
        .map(HeadGuard::bytes_after_head)
        .unwrap_or_default()
}

/// Whether the connection under `session` can take a [`hand_off`].
pub(crate) fn can_hand_off(session: &pingora::proxy::Session) -> bool {
    session
        .as_downstream()
        .stream()
        .is_some_and(|stream| (**stream).as_any().is::<HeadGuard>())
}

/// The connection under a [`HeadGuard`], once it is relayed: the guard (its head
/// state, its timer and its write buffer) is dropped, and what it still held unsent
/// comes back with the connection. Any other stream is returned as it is.
pub(crate) fn unguard(stream: Stream) -> (Stream, bytes::Bytes) {
    if !stream.as_any().is::<HeadGuard>() {
        return (stream, bytes::Bytes::new());
    }
    match stream.into_any().downcast::<HeadGuard>() {
        Ok(guard) => {
            let HeadGuard {
                inner,
                mut out,
                out_sent,
                ..
            } = *guard;
            out.drain(..out_sent);
            (inner, bytes::Bytes::from(out))
        }
        // `is` said it is one.
        Err(_) => unreachable!("a HeadGuard that does not downcast"),
    }
}

/// What a connection's loop shares with the requests on it.
#[derive(Debug)]
pub(crate) struct Connection {
    /// [`PASS`], [`ARMED`] or [`HEAD`].
    phase: AtomicU8,
    /// Counts the requests served on the connection (tags [`HeadGuard::after_head`]).
    request: AtomicU32,
    handoff: Handoff,
}

/// A client connection whose request heads are bounded in time and size.
#[derive(Debug)]
pub struct HeadGuard {
    inner: Stream,
    conn: Arc<Connection>,
    timeout: Duration,
    max_bytes: usize,
    /// Bytes of the current head so far.
    seen: usize,
    end: EndOfHead,
    /// Set from the first byte of a head that did not arrive in one read.
    deadline: Option<Pin<Box<Sleep>>>,
    timing: bool,
    /// The head being read is a `GET` (the only method a WebSocket upgrade uses).
    get: bool,
    /// Bytes read in the same read as the end of a `GET` head, tagged with the request
    /// they followed: what a client sent right behind an upgrade request.
    after_head: Option<(u32, bytes::Bytes)>,
    /// Coalesce writes here (see [`WRITE_BUFFER`]); off over TLS, whose L4 stream keeps
    /// Pingora's own write buffer.
    buffer_writes: bool,
    /// Written but not yet passed on; no capacity until the first buffered write.
    out: Vec<u8>,
    /// How much of `out` the inner stream has taken.
    out_sent: usize,
}

/// The write buffer of a plain client connection, in [`HeadGuard`] rather than under
/// it: the same size and the same coalescing as Pingora's L4 write buffer
/// (`DEFAULT_L4_WRITE_BUFFER_SIZE`, a tokio `BufWriter`), which the plain listener
/// leaves out, so that a connection handed to the relay drops it with the guard
/// ([`unguard`]) instead of holding it for the session's life (the relay writes each
/// chunk once and flushes it at once: a buffer would only copy).
const WRITE_BUFFER: usize = pingora::protocols::l4::stream::DEFAULT_L4_WRITE_BUFFER_SIZE;

impl HeadGuard {
    fn new(inner: Stream, conn: Arc<Connection>, timeout: Duration, max_bytes: usize) -> Self {
        // A TLS stream is written through OpenSSL over Pingora's buffered L4 stream.
        let buffer_writes = inner.get_ssl().is_none();
        HeadGuard {
            inner,
            conn,
            timeout,
            max_bytes,
            seen: 0,
            end: EndOfHead::default(),
            deadline: None,
            timing: false,
            get: false,
            after_head: None,
            buffer_writes,
            out: Vec::new(),
            out_sent: 0,
        }
    }

    /// What the client sent in the read that ended the current request's `GET` head.
    fn bytes_after_head(&self) -> bytes::Bytes {
        match &self.after_head {
            Some((request, bytes)) if *request == self.conn.request.load(Ordering::Relaxed) => {
                bytes.clone()
            }
            _ => bytes::Bytes::new(),
        }
    }

    /// Passes the buffered writes on; ready once all are taken.
    fn poll_send_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_sent < self.out.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &self.out[self.out_sent..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "failed to write the buffered data",
                    )));
                }
                Poll::Ready(Ok(n)) => self.out_sent += n,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.out.clear();
        self.out_sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Writes `answer` if the socket takes it at once, then fails the read.
    fn refuse(&mut self, cx: &mut Context<'_>, answer: &[u8], error: io::Error) -> io::Error {
        self.conn.phase.store(PASS, Ordering::Relaxed);
        let inner = Pin::new(&mut self.inner);
        if let Poll::Ready(Ok(n)) = inner.poll_write(cx, answer)
            && n == answer.len()
        {
            let _ = Pin::new(&mut self.inner).poll_flush(cx);
        }
        error
    }
}

impl AsyncRead for HeadGuard {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.conn.phase.load(Ordering::Relaxed) {
            PASS => return Pin::new(&mut this.inner).poll_read(cx, buf),
            ARMED => {
                this.seen = 0;
                this.end = EndOfHead::default();
                this.timing = false;
                this.conn.phase.store(HEAD, Ordering::Relaxed);
            }
            _ => {}
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let chunk = &buf.filled()[before..];
                if chunk.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                let (head_bytes, complete) = match this.end.feed(chunk) {
                    Some(end) => (end, true),
                    None => (chunk.len(), false),
                };
                if this.seen == 0 {
                    this.get = chunk.starts_with(b"GET ");
                }
                this.seen += head_bytes;
                if this.seen > this.max_bytes {
                    let error = io::Error::new(
                        io::ErrorKind::InvalidData,
                        "request head larger than [server] max_header_bytes",
                    );
                    return Poll::Ready(Err(this.refuse(cx, TOO_LARGE, error)));
                }
                if complete {
                    this.conn.phase.store(PASS, Ordering::Relaxed);
                    if this.get && head_bytes < chunk.len() {
                        let request = this.conn.request.load(Ordering::Relaxed);
                        this.after_head =
                            Some((request, bytes::Bytes::copy_from_slice(&chunk[head_bytes..])));
                    }
                } else if !this.timing {
                    // The head's first byte arrived in this read: its clock starts now.
                    this.timing = true;
                    let deadline = Instant::now() + this.timeout;
                    match &mut this.deadline {
                        Some(sleep) => sleep.as_mut().reset(deadline),
                        None => this.deadline = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                if this.timing
                    && let Some(sleep) = &mut this.deadline
                    && sleep.as_mut().poll(cx).is_ready()
                {
                    let error = io::Error::new(
                        io::ErrorKind::TimedOut,
                        "request head not complete within [server] header_timeout_ms",
                    );
                    return Poll::Ready(Err(this.refuse(cx, TIMED_OUT, error)));
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

use std::future::Future as _;

// Coalescing as tokio's `BufWriter` does (what Pingora's L4 write buffer is): a write
// that does not fit behind what is buffered sends the buffer first; one at least as
// large as the buffer goes straight through; flush and shutdown send the buffer first.
impl AsyncWrite for HeadGuard {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if !this.buffer_writes {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        if this.out.len() + buf.len() > WRITE_BUFFER {
            ready!(this.poll_send_out(cx))?;
        }
        if buf.len() >= WRITE_BUFFER {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        this.out.reserve_exact(WRITE_BUFFER - this.out.len());
        this.out.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if !this.buffer_writes {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        let total = bufs.iter().map(|buf| buf.len()).sum::<usize>();
        if this.out.len() + total > WRITE_BUFFER {
            ready!(this.poll_send_out(cx))?;
        }
        if total >= WRITE_BUFFER {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        this.out.reserve_exact(WRITE_BUFFER - this.out.len());
        for buf in bufs {
            this.out.extend_from_slice(buf);
        }
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        self.buffer_writes || self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_out(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_out(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for HeadGuard {
    async fn shutdown(&mut self) {
        // What is buffered goes first, as Pingora's L4 stream flushes its own buffer.
        if std::future::poll_fn(|cx| self.poll_send_out(cx))
            .await
            .is_err()
        {
            return;
        }
        self.inner.shutdown().await
    }
}

delegate_stream_info!(HeadGuard);

#[async_trait]
impl Peek for HeadGuard {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

/// Finds the end of a request head across reads: the first empty line after the
/// request line (lines end in LF or CRLF, as httparse reads them; empty lines before
/// the request line are skipped, as httparse does).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum EndOfHead {
    /// Before the request line.
    #[default]
    Start,
    /// Inside a line.
    Line,
    /// Just after a line's LF.
    LineEnd,
    /// After a line's LF and a CR.
    LineEndCr,
}

impl EndOfHead {
    /// Consumes `chunk`; `Some(n)` when the head ends after its first `n` bytes.
    fn feed(&mut self, chunk: &[u8]) -> Option<usize> {
        let mut at = 0;
        while at < chunk.len() {
            match self {
                EndOfHead::Start => match chunk[at] {
                    b'\r' | b'\n' => at += 1,
                    _ => *self = EndOfHead::Line,
                },
                EndOfHead::Line => match memchr::memchr(b'\n', &chunk[at..]) {
                    Some(lf) => {
                        at += lf + 1;
                        *self = EndOfHead::LineEnd;
                    }
                    None => return None,
                },
                EndOfHead::LineEnd => match chunk[at] {
                    b'\n' => return Some(at + 1),
                    b'\r' => {
                        at += 1;
                        *self = EndOfHead::LineEndCr;
                    }
                    _ => *self = EndOfHead::Line,
                },
                EndOfHead::LineEndCr => match chunk[at] {
                    b'\n' => return Some(at + 1),
                    _ => *self = EndOfHead::Line,
                },
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end_in(pieces: &[&[u8]]) -> Option<usize> {
        let mut end = EndOfHead::default();
        let mut offset = 0;
        for piece in pieces {
            if let Some(n) = end.feed(piece) {
                return Some(offset + n);
            }
            offset += piece.len();
        }
        None
    }

    fn sent(stream: &dyn pingora::protocols::IO) -> Vec<u8> {
        let cursor = stream.as_any().downcast_ref::<std::io::Cursor<Vec<u8>>>();
        cursor.expect("a cursor").get_ref().clone()
    }

    #[tokio::test]
    async fn writes_are_coalesced_until_a_flush_and_unguard_returns_what_was_not_sent() {
        use tokio::io::AsyncWriteExt;
        let conn = Arc::new(Connection {
            phase: AtomicU8::new(PASS),
            request: AtomicU32::new(0),
            handoff: Handoff::default(),
        });
        let inner: Stream = Box::new(std::io::Cursor::new(Vec::<u8>::new()));
        let mut guard = HeadGuard::new(inner, conn, Duration::from_secs(1), 1024);
        guard.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        guard.write_all(b"body").await.unwrap();
        assert!(sent(&*guard.inner).is_empty(), "sent before the flush");
        guard.flush().await.unwrap();
        assert_eq!(sent(&*guard.inner), b"HTTP/1.1 200 OK\r\n\r\nbody");
        // A write that does not fit sends what is buffered first; one as large as the
        // buffer goes straight through.
        guard.write_all(b"x").await.unwrap();
        let large = vec![7u8; WRITE_BUFFER];
        guard.write_all(&large).await.unwrap();
        let mut expected = b"HTTP/1.1 200 OK\r\n\r\nbodyx".to_vec();
        expected.extend_from_slice(&large);
        assert_eq!(sent(&*guard.inner), expected);
        guard.write_all(b"tail").await.unwrap();
        let (inner, unflushed) = unguard(Box::new(guard));
        assert_eq!(&unflushed[..], b"tail");
        assert_eq!(sent(&*inner), expected);
        // Not a guard: returned as it is.
        let (inner, unflushed) = unguard(inner);
        assert!(unflushed.is_empty());
        assert_eq!(sent(&*inner), expected);
    }

    #[test]
    fn the_end_of_a_head_is_found_in_any_split() {
        let head = b"GET /x HTTP/1.1\r\nHost: a\r\nX-Pad: b\r\n\r\nBODY";
        let expected = head.len() - 4;
        for split in 0..head.len() {
            let (a, b) = head.split_at(split);
            assert_eq!(end_in(&[a, b]), Some(expected), "split at {split}");
        }
        let bytes: Vec<&[u8]> = head.chunks(1).collect();
        assert_eq!(end_in(&bytes), Some(expected));
    }

    #[test]
    fn bare_lf_heads_leading_empty_lines_and_partial_heads() {
        assert_eq!(end_in(&[b"GET / HTTP/1.1\nHost: a\n\n"]), Some(24));
        assert_eq!(end_in(&[b"\r\n\r\nGET / HTTP/1.1\r\n\r\n"]), Some(22));
        assert_eq!(end_in(&[b"\r\n\r\n"]), None);
        assert_eq!(end_in(&[b"GET / HTTP/1.1\r\nX: a\r\n"]), None);
        assert_eq!(
            end_in(&[b"GET / HTTP/1.1\r\nX: a\r\n\rY: b\r\n\r\n"]),
            Some(31)
        );
    }
}
