//! Live sessions at the edge (contract §4): the proxy relays admitted WebSocket sessions
//! itself, so it can end one the moment its token does, idle or not.
//!
//! How a session gets here: [`super::EdgeProxy`]'s `request_filter` makes the upgrade
//! handshake with the upstream itself (a plain upstream connected directly, a TLS one
//! through pingora-core's `TransportConnector`, and Pingora's HTTP/1 client session,
//! the same request head Pingora would have sent: hop-by-hop headers removed as
//! Pingora does, then the identity headers of
//! [`super::ChatAuthFilter::upstream_request_filter`]). On a `101` it leaves the
//! upstream connection in the client connection's [`Handoff`] slot and ends the request
//! without writing anything, with keep-alive on, so that Pingora hands the client
//! connection back to [`super::head::HeadLimitedApp`]'s loop, which finds the slot filled
//! and spawns [`relay`] as the session's own task. Any other answer from the upstream
//! is copied to the client as an HTTP response.
//!
//! What an idle session holds is kept to the two sockets, the relay's state and its
//! registration (issue 13: at most HAProxy's memory per idle session). [`relay`]
//! copies bytes both ways with a stack buffer per poll: an idle session holds no buffer
//! at all, only bytes a peer has not taken yet are copied to the heap, and that copy
//! goes once they are written. Pingora's connection task ends at the hand-off (its
//! future is sized for the whole HTTP state machine), the client's
//! [`super::head::HeadGuard`] and its write buffer are dropped ([`super::head::unguard`]),
//! and a plain upstream is kept as the bare socket ([`relay_upstream`]) rather than
//! Pingora's boxed stream and socket digest. It follows the frame boundaries of both
//! directions (headers only) and wakes on the first of: traffic, the session's
//! [`Registration`] (a revocation of that user or app), its expiry timer, its idle
//! timer, or the end of a drain ([`RelayHub::go_away`]). On revocation or expiry the
//! client gets close `4000` (`token revoked` / `token expired`) right after the frame
//! the upstream is sending, if any, and the upstream gets a masked close `1001` at a
//! boundary of what the client sent; then both connections are shut down.
//!
//! Alternatives considered: letting Pingora tunnel the upgrade (its `ProxyHttp` has no
//! hook to write to a tunnel from outside, cloudflare/pingora#571, so the close rode on
//! the next bytes: an idle client was never cut, and its tunnel held about 235 KB per
//! session in buffers and tasks); shutting the sockets down from outside (no close
//! frame, so the SDK sees 1006 and cannot tell a revocation from a network failure,
//! and a frame in flight would be cut in half); relaying inside `request_filter`
//! through the `Session`'s body API (keeps Pingora's whole per-request state and its
//! 64 KiB body buffers alive for the session's life).

use super::metrics::{ProxyMetrics, SessionEndReason, UNKNOWN_APP};
use crate::error::AuthError;
use crate::gate::{Gate, Identity};
use crate::session::{LiveSession, Registration, Wake, wait};
use crate::ws::{CLOSE_GOING_AWAY, FrameBoundaries, close_frame, masked_close_frame};
use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt as _;
use http::StatusCode;
use pingora::protocols::Stream;
use pingora::protocols::http::v1::client::HttpSession as UpstreamSession;
use pingora::time::fast_timeout::fast_timeout;
use std::future::{Future, poll_fn};
use std::hash::BuildHasher;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

/// Bytes read per poll, on the stack: nothing is allocated for an idle session.
const READ_CHUNK: usize = 8 * 1024;
/// Reads per poll before yielding to other tasks.
const READS_PER_POLL: usize = 16;
/// How long the frame in progress may take to complete before the close is injected;
/// past it the connections are cut without a close frame (the contract's bound is 1 s).
const FINISH_FRAME_WITHIN: Duration = Duration::from_millis(500);
/// How long the peers get to answer the close (and to finish a half-closed session)
/// before their connections are dropped.
///
/// This bound and [`FINISH_FRAME_WITHIN`] are kept on Pingora's timer wheel
/// (`fast_timeout`), not tokio's: a tokio timer earlier than every other one in the
/// runtime (as these are, against the sessions' idle and expiry timers) wakes its I/O
/// driver with an eventfd `write` when set, which strace counted on every session end.
const LINGER: Duration = Duration::from_secs(1);

/// The upstream connection of a relayed session: the bare socket for a plain upstream
/// (see `EdgeProxy::connect_websocket`), Pingora's stream over TLS (or any other stream
/// Pingora made). tokio-util's `Either` forwards the I/O to whichever side it holds.
pub(crate) type RelayUpstream = tokio_util::either::Either<tokio::net::TcpStream, Stream>;

/// A plain upstream socket lent to Pingora's HTTP/1 client session for the upgrade
/// handshake (as a [`Stream`]) and taken back after it ([`relay_upstream`]):
/// the session then keeps the bare socket, with no copy of it and no second
/// registration with the reactor. Pingora's own stream type offers no way to take its
/// socket out.
#[derive(Debug)]
pub(crate) struct PlainUpstream(pub(crate) tokio::net::TcpStream);

impl AsyncRead for PlainUpstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for PlainUpstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

#[async_trait::async_trait]
impl pingora::protocols::Shutdown for PlainUpstream {
    async fn shutdown(&mut self) {
        let _ = AsyncWriteExt::shutdown(&mut self.0).await;
    }
}

impl pingora::protocols::UniqueID for PlainUpstream {
    fn id(&self) -> pingora::protocols::UniqueIDType {
        use std::os::fd::AsRawFd;
        self.0.as_raw_fd()
    }
}

impl pingora::protocols::Ssl for PlainUpstream {}

impl pingora::protocols::GetTimingDigest for PlainUpstream {
    fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
        Vec::new()
    }
}

impl pingora::protocols::GetProxyDigest for PlainUpstream {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        None
    }
}

impl pingora::protocols::GetSocketDigest for PlainUpstream {
    fn get_socket_digest(&self) -> Option<Arc<pingora::protocols::SocketDigest>> {
        None
    }
}

#[async_trait::async_trait]
impl pingora::protocols::Peek for PlainUpstream {}

/// The relay's side of the upstream stream the handshake was made on: the bare socket
/// when it is a [`PlainUpstream`].
pub(crate) fn relay_upstream(stream: Stream) -> RelayUpstream {
    use tokio_util::either::Either;
    if !stream.as_any().is::<PlainUpstream>() {
        return Either::Right(stream);
    }
    match stream.into_any().downcast::<PlainUpstream>() {
        Ok(plain) => Either::Left(plain.0),
        // `is` said it is one.
        Err(_) => unreachable!("a PlainUpstream that does not downcast"),
    }
}

/// An upgrade's upstream connection, just opened.
pub(crate) struct UpstreamConnection {
    stream: Stream,
    /// Whether the request head already went out with the connect ([`connect_plain`]).
    head_sent: bool,
}

/// Opens the upstream connection of a WebSocket (both engines) and, where it can, sends
/// the upgrade's request `head` on it at once: a TLS upstream through Pingora's
/// connector (the head is then [`upgrade_handshake`]'s to write); a plain one here
/// (within the peer's connect timeout, with `TCP_NODELAY` as the connector sets), as a
/// [`PlainUpstream`] that the relay takes the socket back from after the `101`
/// ([`relay_upstream`]): an idle session then holds the socket only, not Pingora's
/// boxed stream and socket digest (about 0.9 KB).
pub(crate) async fn connect_upstream(
    connector: &pingora::connectors::TransportConnector,
    peer: &pingora::upstreams::peer::HttpPeer,
    head: &[u8],
) -> pingora::Result<UpstreamConnection> {
    use pingora::OrErr as _;
    use pingora::upstreams::peer::Peer as _;
    let address = match peer.address() {
        pingora::protocols::l4::socket::SocketAddr::Inet(address) if !peer.tls() => *address,
        _ => {
            return Ok(UpstreamConnection {
                stream: connector.new_stream(peer).await?,
                head_sent: false,
            });
        }
    };
    let connect = connect_plain(address, head);
    let socket = match peer.options.connection_timeout {
        // Pingora's timer wheel (see `forward::upgrade`): no driver wake-up per connect.
        Some(limit) => fast_timeout(limit, connect).await.or_err(
            pingora::ErrorType::ConnectTimedout,
            "connecting to the upstream",
        )?,
        None => connect.await,
    }
    .or_err(
        pingora::ErrorType::ConnectError,
        "connecting to the upstream",
    )?;
    Ok(UpstreamConnection {
        stream: Box::new(PlainUpstream(socket)),
        head_sent: true,
    })
}

/// Connects a plain TCP socket to an upgrade's upstream and sends the request `head`,
/// as HAProxy's `tcp_connect_server` does:
/// - the head is sent right after `connect` returns, without waiting for the socket
///   to be reported writable: on a near upstream (loopback, the same host) the TCP
///   handshake is complete by then, which saves a turn of the event loop and the
///   `SO_ERROR` read that waiting costs. Otherwise the send would block: the connect is
///   awaited as usual and the head written after it;
/// - `TCP_QUICKACK` is off until the head is sent, so the last ACK of the TCP handshake
///   leaves with the head instead of in a segment of its own (on loopback the
///   upstream's receive path of that segment runs in this process). It is turned back
///   on after the head: leaving it off would delay the ACK of the upstream's `101` by
///   up to the delayed-ACK timer, and an upstream without `TCP_NODELAY` would hold its
///   first frame until then (Nagle).
async fn connect_plain(
    address: std::net::SocketAddr,
    head: &[u8],
) -> std::io::Result<tokio::net::TcpStream> {
    use std::io::Write as _;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(address),
        socket2::Type::STREAM.nonblocking(),
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    #[cfg(target_os = "linux")]
    socket.set_tcp_quickack(false)?;
    match socket.connect(&address.into()) {
        Ok(()) => {}
        Err(error) if error.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(error) => return Err(error),
    }
    let socket = std::net::TcpStream::from(socket);
    // `std`'s write is a `send` with `MSG_NOSIGNAL`: a reset upstream is an error here,
    // never a SIGPIPE.
    let sent = match (&socket).write(head) {
        Ok(sent) => sent,
        Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => 0,
        Err(error) => return Err(error),
    };
    let mut socket = tokio::net::TcpStream::from_std(socket)?;
    if sent < head.len() {
        if sent == 0 {
            // Still connecting: a refused or failed connect is reported here, before
            // anything is written, so the caller can try the next peer.
            socket.writable().await?;
            if let Some(error) = socket.take_error()? {
                return Err(error);
            }
        }
        socket.write_all(&head[sent..]).await?;
    }
    #[cfg(target_os = "linux")]
    socket2::SockRef::from(&socket).set_tcp_quickack(true)?;
    Ok(socket)
}

/// What an upstream answered an upgrade request with.
pub(crate) enum UpgradeReply {
    /// `101 Switching Protocols`: the connection, and its head as it arrived followed
    /// by any bytes read behind it (early frames), for the client.
    Switched {
        /// The upstream connection, past the head.
        upstream: Stream,
        /// The `101` head and whatever arrived with it.
        head_and_early: Bytes,
    },
    /// Any other answer: its head, and Pingora's HTTP/1 client session that read it
    /// (its framing and checks), to copy the body from.
    Other {
        /// The answer's head.
        response: Box<pingora::http::ResponseHeader>,
        /// The session to read the answer's body from.
        reply: Box<UpstreamSession>,
    },
}

/// How far a head is read here before Pingora's reader takes over (a `101` head is a
/// few hundred bytes).
const SWITCH_HEAD_WITHIN: usize = 8 * 1024;
/// Headers parsed here; a `101` with more goes to Pingora's reader.
const SWITCH_HEADERS: usize = 32;

/// Sends an upgrade request's head (`wire`, serialised) in one write and reads the
/// answer's head, for both engines, within `read_timeout`: the handshake is an HTTP
/// exchange, which the HTTP read timeout bounds (not the WebSocket idle timeout the
/// peer carries). A failure is the contract's error for the client:
/// [`AuthError::UpstreamTimeout`] past the timeout, [`AuthError::UpstreamUnavailable`]
/// otherwise.
///
/// The timeout runs on Pingora's timer wheel, not tokio's: a tokio timer that becomes
/// the runtime's earliest wakes its I/O driver through an eventfd `write` (about 0.3
/// per handshake under load, each a syscall and a spurious `epoll_wait` return),
/// while this one touches the wheel's own thread only when it fires.
pub(crate) async fn upgrade_handshake(
    connection: UpstreamConnection,
    peer: &pingora::upstreams::peer::HttpPeer,
    wire: &[u8],
    read_timeout: Duration,
) -> Result<UpgradeReply, AuthError> {
    let UpstreamConnection { stream, head_sent } = connection;
    let wire = if head_sent { &[][..] } else { wire };
    match fast_timeout(read_timeout, exchange_upgrade(stream, peer, wire)).await {
        Ok(Ok(reply)) => Ok(reply),
        Ok(Err(error)) => {
            tracing::debug!(target: "chatgate::proxy", %error, "WebSocket handshake with the upstream failed");
            Err(AuthError::UpstreamUnavailable)
        }
        Err(_) => Err(AuthError::UpstreamTimeout),
    }
}

/// [`upgrade_handshake`] without its timeout.
///
/// A `101` is parsed here into a buffer of its own size. Pingora's client would set
/// up a 64 KiB body buffer behind any head (`init_body_reader`): under a stream of
/// handshakes mimalloc frees that block's page and faults a fresh one back in, which
/// `perf` put at about 7% of the proxy's CPU per handshake (a 2 MiB huge page zeroed
/// per fault). Any other answer, an unparsable head or one longer than
/// [`SWITCH_HEAD_WITHIN`] goes to Pingora's reader with the bytes already read put
/// back in front, so refusals keep its framing and checks.
async fn exchange_upgrade(
    mut stream: Stream,
    peer: &pingora::upstreams::peer::HttpPeer,
    wire: &[u8],
) -> pingora::Result<UpgradeReply> {
    use pingora::OrErr as _;
    if !wire.is_empty() {
        stream.write_all(wire).await.or_err(
            pingora::ErrorType::WriteError,
            "writing the upgrade request",
        )?;
        stream.flush().await.or_err(
            pingora::ErrorType::WriteError,
            "writing the upgrade request",
        )?;
    }
    let mut read = BytesMut::with_capacity(1024);
    loop {
        let got = stream
            .read_buf(&mut read)
            .await
            .or_err(pingora::ErrorType::ReadError, "reading the upgrade answer")?;
        if got == 0 {
            break;
        }
        let mut headers = [httparse::EMPTY_HEADER; SWITCH_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&read) {
            Ok(httparse::Status::Complete(_)) if response.code == Some(101) => {
                // The relay writes the head as it arrived: nothing here rebuilds it.
                return Ok(UpgradeReply::Switched {
                    upstream: stream,
                    head_and_early: read.freeze(),
                });
            }
            Ok(httparse::Status::Partial) if read.len() < SWITCH_HEAD_WITHIN => {
                if read.capacity() == read.len() {
                    read.reserve(1024);
                }
            }
            _ => break,
        }
    }
    let rewound = Box::new(Rewound {
        before: read.freeze(),
        inner: stream,
    });
    let mut reply = Box::new(UpstreamSession::new_with_options(rewound, peer));
    reply.read_response().await?;
    let Some(response) = reply.resp_header() else {
        return pingora::Error::e_explain(
            pingora::ErrorType::InvalidHTTPHeader,
            "no head read from the upgrade answer",
        );
    };
    if response.status != StatusCode::SWITCHING_PROTOCOLS {
        let response = Box::new(response.clone());
        return Ok(UpgradeReply::Other { response, reply });
    }
    // A 101 this parser left to Pingora's (more headers, a longer head, a form only it
    // accepts): the same hand-off, from its buffers.
    let mut head_and_early = BytesMut::from(&reply.get_headers_raw_bytes()[..]);
    // Frames read with the head; a read that would wait is not made (the relay reads on).
    if let Some(Ok(Some(early))) = reply.read_body_bytes().now_or_never() {
        head_and_early.extend_from_slice(&early);
    }
    Ok(UpgradeReply::Switched {
        upstream: reply.into_inner(),
        head_and_early: head_and_early.freeze(),
    })
}

/// An upstream stream with the bytes already read from it put back in front, for
/// Pingora's HTTP/1 client to read an answer from its start.
#[derive(Debug)]
struct Rewound {
    before: Bytes,
    inner: Stream,
}

impl AsyncRead for Rewound {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.before.is_empty() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let taken = this.before.len().min(buf.remaining());
        buf.put_slice(&this.before.split_to(taken));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Rewound {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[async_trait::async_trait]
impl pingora::protocols::Shutdown for Rewound {
    async fn shutdown(&mut self) {
        pingora::protocols::Shutdown::shutdown(&mut *self.inner).await;
    }
}

super::head::delegate_stream_info!(Rewound);

#[async_trait::async_trait]
impl pingora::protocols::Peek for Rewound {}

/// Everything a relay needs once the upgrade is made.
pub(crate) struct Upgraded {
    /// The upstream connection, past its `101`.
    pub(crate) upstream: RelayUpstream,
    /// The upstream's `101` head as it arrived, then any bytes read after it.
    pub(crate) to_client: Bytes,
    /// What the client sent right behind its upgrade request (set by the hand-off).
    pub(crate) to_upstream: Bytes,
    /// The token watch (`None` for identities nothing can end).
    pub(crate) live: Option<LiveSession>,
    /// The metrics label of the session's app.
    pub(crate) app: Arc<str>,
    /// `[upstream] websocket_idle_timeout`.
    pub(crate) idle_timeout: Duration,
    /// The proxy's sessions.
    pub(crate) hub: Arc<RelayHub>,
    /// Keeps a drain waiting between the request's end and the relay's start.
    pub(crate) pending: RequestGuard,
}

impl Upgraded {
    /// The session an upstream's `101` begins, for either engine: the `101` head as it
    /// arrived and any frames read with it ([`UpgradeReply::Switched`]) go to the client
    /// first, and the token watch is kept only for identities something can end (a
    /// user's token or an `exp`).
    pub(crate) fn after_switch(
        upstream: Stream,
        head_and_early: Bytes,
        identity: Option<Identity>,
        gate: &Gate,
        hub: &Arc<RelayHub>,
        idle_timeout: Duration,
        to_upstream: Bytes,
    ) -> Box<Self> {
        let app: Arc<str> = identity
            .as_ref()
            .map_or_else(|| Arc::from(UNKNOWN_APP), |identity| identity.app.clone());
        let live = identity
            .filter(|identity| identity.user_id.is_some() || identity.expires_at.is_some())
            .map(|identity| LiveSession::new(gate.clone(), identity));
        Box::new(Upgraded {
            upstream: relay_upstream(upstream),
            to_client: head_and_early,
            to_upstream,
            live,
            app,
            idle_timeout,
            hub: hub.clone(),
            pending: hub.request(),
        })
    }
}

/// Per client connection: where `request_filter` leaves an upgraded session for the
/// connection's loop in [`super::head::HeadLimitedApp`], which spawns its relay.
#[derive(Default)]
pub struct Handoff(Mutex<Option<Box<Upgraded>>>);

impl Handoff {
    pub(crate) fn put(&self, upgraded: Box<Upgraded>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(upgraded);
    }

    pub(crate) fn take(&self) -> Option<Box<Upgraded>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl std::fmt::Debug for Handoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Handoff")
    }
}

/// The proxy's relayed sessions: how many are open, and the drain's end.
#[derive(Debug)]
pub struct RelayHub {
    metrics: Arc<ProxyMetrics>,
    open: AtomicUsize,
    /// Requests being handled (HTTP or handshakes), so a drain knows when nothing is left.
    requests: AtomicUsize,
    idle: Notify,
    going_away: AtomicBool,
    going_away_notify: Notify,
    masks: AtomicU64,
}

impl RelayHub {
    /// A hub recording into `metrics`.
    pub fn new(metrics: Arc<ProxyMetrics>) -> Self {
        RelayHub {
            metrics,
            open: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
            idle: Notify::new(),
            going_away: AtomicBool::new(false),
            going_away_notify: Notify::new(),
            masks: AtomicU64::new(0),
        }
    }

    /// Relayed sessions open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Requests and sessions in progress.
    pub fn busy(&self) -> usize {
        self.open() + self.requests.load(Ordering::Acquire)
    }

    /// Resolves once no request or session is in progress.
    pub async fn until_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.busy() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Ends every open session with close 1001 (the end of a drain); sessions
    /// handed over later end at once.
    pub fn go_away(&self) {
        self.going_away.store(true, Ordering::Release);
        self.going_away_notify.notify_waiters();
    }

    async fn gone_away(&self) {
        loop {
            let notified = self.going_away_notify.notified();
            if self.going_away.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    /// Counts a request in progress until the guard drops.
    pub(crate) fn request(self: &Arc<Self>) -> RequestGuard {
        self.requests.fetch_add(1, Ordering::AcqRel);
        RequestGuard(self.clone())
    }

    fn done(&self) {
        if self.busy() == 0 {
            self.idle.notify_waiters();
        }
    }

    /// A masking key for a client-side frame (RFC 6455 §10.3 asks for unpredictable
    /// keys): std's randomly keyed SipHash over a counter.
    fn mask(&self) -> [u8; 4] {
        let n = self.masks.fetch_add(1, Ordering::Relaxed);
        let hash = std::collections::hash_map::RandomState::new().hash_one(n);
        (hash as u32).to_be_bytes()
    }
}

/// A request in progress (see [`RelayHub::request`]).
#[derive(Debug)]
pub(crate) struct RequestGuard(Arc<RelayHub>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.requests.fetch_sub(1, Ordering::AcqRel);
        self.0.done();
    }
}

/// One open session in the hub and the metrics, until dropped.
struct Open<'a> {
    hub: &'a RelayHub,
    app: &'a str,
}

impl<'a> Open<'a> {
    fn new(hub: &'a RelayHub, app: &'a str) -> Self {
        hub.open.fetch_add(1, Ordering::AcqRel);
        hub.metrics.session_opened(app);
        Open { hub, app }
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.hub.open.fetch_sub(1, Ordering::AcqRel);
        self.hub.metrics.session_closed(self.app);
        self.hub.done();
    }
}

/// Relays an upgraded session between `client` and the upstream until either side
/// ends it, the token does, or the drain does; resolves to why it ended.
///
/// The future is meant to be spawned as the session's own task: the `Upgraded` box
/// and the client connection's [`super::head::HeadGuard`] are gone before it is
/// built, so an idle session keeps only the two connections, its timers and its
/// registration (the connection task that made the upgrade, with Pingora's HTTP state
/// machine in it, ends instead of waiting for the session).
pub(crate) fn relay(
    client: Stream,
    upgraded: Box<Upgraded>,
) -> impl Future<Output = SessionEndReason> + Send + 'static {
    let Upgraded {
        upstream,
        to_client,
        to_upstream,
        live,
        app,
        idle_timeout,
        hub,
        pending,
    } = *upgraded;
    let (client, unflushed) = super::head::unguard(client);
    let metrics = hub.metrics.clone();
    let session = async move {
        let _open = Open::new(&hub, &app);
        drop(pending);
        let mut pump = Pump::new(client, upstream);
        let reason = run(
            &mut pump,
            [unflushed, to_client, to_upstream],
            live.as_ref(),
            idle_timeout,
            &hub,
        )
        .await;
        hub.metrics.session_ended(reason);
        tracing::debug!(target: "chatgate::proxy", app = &*app, reason = reason.as_str(), "relayed WebSocket ended");
        reason
    };
    async move {
        // Every run of the task is counted, so that what a revocation wakes is
        // observable (`chatgate_websocket_session_runs_total`): its user's sessions,
        // not the idle others.
        let mut session = std::pin::pin!(session);
        poll_fn(|cx| {
            metrics.session_ran();
            session.as_mut().poll(cx)
        })
        .await
    }
}

async fn run(
    pump: &mut Pump,
    [unflushed, to_client, to_upstream]: [Bytes; 3],
    live: Option<&LiveSession>,
    idle_timeout: Duration,
    hub: &RelayHub,
) -> SessionEndReason {
    // The 101 and whatever the upstream sent with it (after anything written to the
    // client before the hand-off and still in its buffer: nothing, in practice).
    if pump.client.write_all(&unflushed).await.is_err()
        || pump.client.write_all(&to_client).await.is_err()
        || pump.client.flush().await.is_err()
    {
        return SessionEndReason::Client;
    }
    pump.down.frames.advance(&to_client[head_len(&to_client)..]);
    drop(to_client);
    if !to_upstream.is_empty() {
        if pump.upstream.write_all(&to_upstream).await.is_err()
            || pump.upstream.flush().await.is_err()
        {
            return SessionEndReason::Upstream;
        }
        pump.up.frames.advance(&to_upstream);
    }

    let registration: Option<Registration> = live.and_then(|live| {
        let identity = live.identity();
        live.gate().sessions().register(
            &identity.app,
            identity.user_id.as_ref(),
            identity.issued_at,
        )
    });
    // A cutoff stored between the admission and the registration would be missed.
    // The rare paths (store lookups, the ending) are boxed when taken, so the state an
    // idle session keeps is only the main loop's.
    if let (Some(live), Some(_)) = (live, registration.as_ref())
        && Box::pin(live.revoked_now()).await
    {
        return Box::pin(end(pump, SessionEndReason::Revoked, hub)).await;
    }
    let expiry = live
        .filter(|live| live.identity().expires_at.is_some())
        .map(LiveSession::expiry_deadline);
    let expire = tokio::time::sleep_until(expiry.unwrap_or_else(far_future));
    tokio::pin!(expire);
    let idle = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle);

    loop {
        let event = tokio::select! {
            biased;
            wake = wait(registration.as_ref()) => Event::Wake(wake),
            () = hub.gone_away() => Event::Shutdown,
            () = &mut expire, if expiry.is_some() => Event::Expired,
            () = &mut idle => Event::Idle,
            ended = poll_fn(|cx| pump.poll_relay(cx)) => Event::Io(ended),
        };
        let reason = match event {
            Event::Io(reason) => return Box::pin(linger(pump, reason)).await,
            Event::Wake(Wake::Revoked) => SessionEndReason::Revoked,
            Event::Wake(Wake::Recheck) => match live {
                Some(live) if Box::pin(live.revoked_now()).await => SessionEndReason::Revoked,
                _ => continue,
            },
            Event::Expired => SessionEndReason::Expired,
            Event::Shutdown => SessionEndReason::Shutdown,
            Event::Idle => {
                let quiet_since = pump.last_activity;
                if quiet_since.elapsed() < idle_timeout {
                    idle.as_mut().reset(quiet_since + idle_timeout);
                    continue;
                }
                SessionEndReason::Idle
            }
        };
        return Box::pin(end(pump, reason, hub)).await;
    }
}

enum Event {
    Io(SessionEndReason),
    Wake(Wake),
    Expired,
    Shutdown,
    Idle,
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(365 * 24 * 3600)
}

/// The length of the HTTP head at the start of `bytes` (through the empty line).
fn head_len(bytes: &[u8]) -> usize {
    memchr::memmem::find(bytes, b"\r\n\r\n").map_or(bytes.len(), |at| at + 4)
}

/// Ends the session for `reason`: the upstream's frame in progress is completed (within
/// [`FINISH_FRAME_WITHIN`]), the client gets its close frame, the upstream a masked
/// 1001 if what the client sent ends at a frame boundary; then both are shut down.
async fn end(pump: &mut Pump, reason: SessionEndReason, hub: &RelayHub) -> SessionEndReason {
    let (code, text) = match reason {
        SessionEndReason::Revoked => (crate::ws::CLOSE_TOKEN_INVALIDATED, "token revoked"),
        SessionEndReason::Expired => (crate::ws::CLOSE_TOKEN_INVALIDATED, "token expired"),
        SessionEndReason::Shutdown => (CLOSE_GOING_AWAY, "going away"),
        _ => (CLOSE_GOING_AWAY, "idle timeout"),
    };
    // Nothing more from the client goes upstream; the upstream's frame in progress is
    // let through to its end so the close does not land inside it.
    pump.up.stopped = true;
    pump.down.finishing = true;
    // Between frames already: nothing more comes through.
    pump.down.stopped = pump.down.frames.at_boundary();
    let finished = fast_timeout(FINISH_FRAME_WITHIN, poll_fn(|cx| pump.poll_finish(cx))).await;
    let client_ok = matches!(finished, Ok(Ok(())));
    if client_ok && pump.down.frames.at_boundary() {
        let close = close_frame(code, text);
        let _ = fast_timeout(FINISH_FRAME_WITHIN, async {
            pump.client.write_all(&close).await?;
            pump.client.flush().await
        })
        .await;
    }
    if pump.up.frames.at_boundary() && pump.up.pending.is_none() {
        let close = masked_close_frame(CLOSE_GOING_AWAY, "going away", hub.mask());
        let _ = fast_timeout(FINISH_FRAME_WITHIN, async {
            pump.upstream.write_all(&close).await?;
            pump.upstream.flush().await
        })
        .await;
    }
    tracing::info!(target: "chatgate::proxy", code, reason = text, "closed a relayed WebSocket");
    shut_both(pump).await;
    reason
}

/// After one side ended: the other direction gets [`LINGER`] to finish, then both
/// connections are shut down.
async fn linger(pump: &mut Pump, reason: SessionEndReason) -> SessionEndReason {
    let _ = fast_timeout(LINGER, poll_fn(|cx| pump.poll_both_done(cx))).await;
    shut_both(pump).await;
    reason
}

/// Shuts down both write sides, then reads and discards what the peers still send
/// (their close replies) until both have closed or [`LINGER`] passes: closing a
/// socket with unread bytes would reset it, and a reset may discard the close frame
/// before the peer reads it.
///
/// A side the relay already shut (after its reader ended) is not shut again, and a
/// peer that already closed is not read again: after an ordinary close, where both
/// directions ended, that leaves nothing to do (strace counted two failed `shutdown`s
/// and two empty reads per session before).
async fn shut_both(pump: &mut Pump) {
    if !(pump.down.shut && pump.up.shut) {
        let _ = fast_timeout(LINGER, async {
            if !pump.down.shut {
                let _ = pump.client.shutdown().await;
            }
            if !pump.up.shut {
                let _ = pump.upstream.shutdown().await;
            }
        })
        .await;
    }
    if !(pump.up.eof && pump.down.eof) {
        let _ = fast_timeout(LINGER, poll_fn(|cx| pump.poll_discard(cx))).await;
    }
}

/// One direction of the relay.
struct Direction {
    /// Where the bytes come from.
    from: Side,
    /// Bytes read but not yet taken by the writer (heap, only while it lasts).
    pending: Option<BytesMut>,
    /// Written but not flushed.
    dirty: bool,
    /// The reader has ended.
    eof: bool,
    /// The writer has been shut down after the reader ended.
    shut: bool,
    /// Reads stopped (the session is ending).
    stopped: bool,
    /// Forward only up to the end of the frame in progress, then stop.
    finishing: bool,
    frames: FrameBoundaries,
}

impl Direction {
    fn new(from: Side) -> Self {
        Direction {
            from,
            pending: None,
            dirty: false,
            eof: false,
            shut: false,
            stopped: false,
            finishing: false,
            frames: FrameBoundaries::default(),
        }
    }
}

struct Pump {
    client: Stream,
    upstream: RelayUpstream,
    /// Upstream to client.
    down: Direction,
    /// Client to upstream.
    up: Direction,
    last_activity: Instant,
}

#[derive(Clone, Copy)]
enum Side {
    Client,
    Upstream,
}

impl Side {
    fn reason(self) -> SessionEndReason {
        match self {
            Side::Client => SessionEndReason::Client,
            Side::Upstream => SessionEndReason::Upstream,
        }
    }
}

impl Pump {
    fn new(client: Stream, upstream: RelayUpstream) -> Self {
        Pump {
            client,
            upstream,
            down: Direction::new(Side::Upstream),
            up: Direction::new(Side::Client),
            last_activity: Instant::now(),
        }
    }

    /// One step each way, upstream to client first; also says whether any byte moved.
    fn transfer_both(&mut self, cx: &mut Context<'_>) -> (Step, Step, bool) {
        let mut active = false;
        let down = transfer(
            cx,
            &mut self.upstream,
            &mut self.client,
            &mut self.down,
            &mut active,
        );
        let up = transfer(
            cx,
            &mut self.client,
            &mut self.upstream,
            &mut self.up,
            &mut active,
        );
        (down, up, active)
    }

    /// Relays both ways; ready when a side has closed or failed (the reason names it).
    fn poll_relay(&mut self, cx: &mut Context<'_>) -> Poll<SessionEndReason> {
        let (down_state, up_state, active) = self.transfer_both(cx);
        if active {
            self.last_activity = Instant::now();
        }
        match (down_state, up_state) {
            (Poll::Ready(Err(side)), _) | (_, Poll::Ready(Err(side))) => Poll::Ready(side.reason()),
            (Poll::Ready(Ok(())), _) => Poll::Ready(SessionEndReason::Upstream),
            (_, Poll::Ready(Ok(()))) => Poll::Ready(SessionEndReason::Client),
            _ => Poll::Pending,
        }
    }

    /// Ready once both directions have ended (or one failed).
    fn poll_both_done(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let (down, up, _) = self.transfer_both(cx);
        match (down, up) {
            (Poll::Ready(Err(_)), _) | (_, Poll::Ready(Err(_))) => Poll::Ready(()),
            (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => Poll::Ready(()),
            _ => Poll::Pending,
        }
    }

    /// Ready once the upstream's frame in progress has reached the client and what
    /// was read from the client has reached the upstream; `Err` if the client failed.
    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ()>> {
        // Already-read client bytes still go up (they are whole frames or the start of
        // one, which the upstream would otherwise see cut); nothing new is read.
        let (down, up, _) = self.transfer_both(cx);
        if let Poll::Ready(Err(Side::Client)) = down {
            return Poll::Ready(Err(()));
        }
        let down_done = matches!(down, Poll::Ready(_))
            || (self.down.stopped && self.down.pending.is_none() && !self.down.dirty);
        let up_done = matches!(up, Poll::Ready(_)) || (self.up.pending.is_none() && !self.up.dirty);
        if down_done && up_done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }

    /// Reads and drops whatever either peer still sends; ready when both have closed.
    fn poll_discard(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let client = if self.up.eof {
            Poll::Ready(())
        } else {
            discard(cx, &mut self.client)
        };
        let upstream = if self.down.eof {
            Poll::Ready(())
        } else {
            discard(cx, &mut self.upstream)
        };
        if client.is_ready() && upstream.is_ready() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// One direction's state after a [`transfer`]: ready once it ended (`Err` names the
/// side that failed).
type Step = Poll<Result<(), Side>>;

/// Reads until end of stream or error, dropping the bytes.
fn discard(cx: &mut Context<'_>, stream: &mut (impl AsyncRead + Unpin)) -> Poll<()> {
    for _ in 0..READS_PER_POLL {
        let mut buf = [0u8; 1024];
        let mut read = ReadBuf::new(&mut buf);
        match Pin::new(&mut *stream).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) if !read.filled().is_empty() => {}
            Poll::Ready(_) => return Poll::Ready(()),
            Poll::Pending => return Poll::Pending,
        }
    }
    cx.waker().wake_by_ref();
    Poll::Pending
}

/// Moves bytes from `from` to `to` through `dir`. Ready(Ok) once `from` has ended and
/// `to` was shut down after everything read; Ready(Err(side)) when a side fails;
/// Pending otherwise (wakers registered on whatever it waits for).
fn transfer(
    cx: &mut Context<'_>,
    from: &mut (impl AsyncRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
    dir: &mut Direction,
    active: &mut bool,
) -> Poll<Result<(), Side>> {
    let from_side = dir.from;
    let to_side = match from_side {
        Side::Client => Side::Upstream,
        Side::Upstream => Side::Client,
    };
    for _ in 0..READS_PER_POLL {
        if let Some(pending) = dir.pending.as_mut() {
            while !pending.is_empty() {
                match Pin::new(&mut *to).poll_write(cx, pending) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Err(to_side)),
                    Poll::Ready(Ok(n)) => pending.advance(n),
                    Poll::Pending => return Poll::Pending,
                }
            }
            dir.pending = None;
            dir.dirty = true;
        }
        if dir.dirty {
            match Pin::new(&mut *to).poll_flush(cx) {
                Poll::Ready(Ok(())) => dir.dirty = false,
                Poll::Ready(Err(_)) => return Poll::Ready(Err(to_side)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if dir.eof {
            if !dir.shut {
                match Pin::new(&mut *to).poll_shutdown(cx) {
                    Poll::Ready(_) => dir.shut = true,
                    Poll::Pending => return Poll::Pending,
                }
            }
            return Poll::Ready(Ok(()));
        }
        if dir.stopped {
            return Poll::Pending;
        }
        let mut buf = [0u8; READ_CHUNK];
        let mut read = ReadBuf::new(&mut buf);
        match Pin::new(&mut *from).poll_read(cx, &mut read) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(_)) => return Poll::Ready(Err(from_side)),
            Poll::Ready(Ok(())) => {}
        }
        let mut data = read.filled();
        if data.is_empty() {
            dir.eof = true;
            continue;
        }
        *active = true;
        if dir.finishing {
            if let Some(frame_end) = dir.frames.finish_frame(data) {
                // The frame in progress ends here: what follows it is not forwarded.
                data = &data[..frame_end];
                dir.stopped = true;
            }
        } else {
            dir.frames.advance(data);
        }
        let mut written = 0;
        while written < data.len() {
            match Pin::new(&mut *to).poll_write(cx, &data[written..]) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Err(to_side)),
                Poll::Ready(Ok(n)) => written += n,
                Poll::Pending => break,
            }
        }
        if written < data.len() {
            dir.pending = Some(BytesMut::from(&data[written..]));
        }
        dir.dirty = true;
    }
    // Still more to read: let other tasks run, then come back.
    cx.waker().wake_by_ref();
    Poll::Pending
}

impl std::fmt::Debug for Upgraded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upgraded")
            .field("app", &self.app)
            .finish_non_exhaustive()
    }
}

/// Most names a client may list in `Connection` (pingora-proxy's
/// `MAX_CONNECTION_NOMINATIONS`: the tenth fails).
const MAX_CONNECTION_NOMINATIONS: usize = 10;

/// Removes from an upgrade request what must not cross the proxy, exactly as
/// pingora-proxy 0.9.1 does before every request it forwards (its default
/// `HttpUpstreamRequestPolicy`, in the crate-private `sanitize_h1_upstream_request` of
/// `proxy_common.rs`), so that a relayed upgrade reaches the upstream as a tunnelled
/// one would: the headers the client names in `Connection` (fewer than ten valid
/// tokens, none of `host` and `x-forwarded-{for,host,proto}`), the standard hop-by-hop
/// headers, then `Connection: Upgrade` and `Upgrade: websocket` set again. Run it
/// before the identity headers are added (contract §6 rule 2).
pub(crate) fn strip_hop_by_hop(
    request: &mut pingora::http::RequestHeader,
) -> Result<(), &'static str> {
    use http::{HeaderValue, header};
    let mut nominated = Vec::new();
    for token in request
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|value| value.as_bytes().split(|byte| *byte == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|token| !token.is_empty())
    {
        if nominated.len() + 1 >= MAX_CONNECTION_NOMINATIONS {
            return Err("too many Connection header nominations");
        }
        if token.starts_with(b":") || !token.iter().all(|&byte| is_tchar(byte)) {
            return Err("invalid token nominated by the Connection header");
        }
        let name = http::HeaderName::from_bytes(token)
            .map_err(|_| "invalid token nominated by the Connection header")?;
        if matches!(
            name.as_str(),
            "host" | "x-forwarded-for" | "x-forwarded-host" | "x-forwarded-proto"
        ) {
            return Err("protected header cannot be nominated by the Connection header");
        }
        nominated.push(name);
    }
    // By name, not by string: a string is parsed into a header name at each lookup, and
    // most of these headers are absent (checked first, as a removal also edits
    // Pingora's map of header-name cases).
    for name in nominated.iter().chain(&HOP_BY_HOP) {
        if request.headers.contains_key(name) {
            request.remove_header(name);
        }
    }
    request
        .insert_header(header::CONNECTION, HeaderValue::from_static("Upgrade"))
        .map_err(|_| "header")?;
    request
        .insert_header(header::UPGRADE, HeaderValue::from_static("websocket"))
        .map_err(|_| "header")?;
    Ok(())
}

/// The hop-by-hop headers an upgrade request loses before it is forwarded (with those
/// its `Connection` header names), as Pingora's `sanitize_h1_upstream_request`.
const HOP_BY_HOP: [http::HeaderName; 10] = [
    http::HeaderName::from_static("keep-alive"),
    http::HeaderName::from_static("proxy-connection"),
    http::header::PROXY_AUTHENTICATE,
    http::header::PROXY_AUTHORIZATION,
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
    http::header::CONNECTION,
    http::header::UPGRADE,
    http::HeaderName::from_static("http2-settings"),
];

/// RFC 9110 §5.6.2 `tchar`.
fn is_tchar(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::http::RequestHeader;

    fn upgrade_request(connection: &str) -> RequestHeader {
        let mut request = RequestHeader::build("GET", b"/connect?api_key=k", None).unwrap();
        request.insert_header("host", "example").unwrap();
        request.insert_header("connection", connection).unwrap();
        request.insert_header("upgrade", "WebSocket").unwrap();
        request.insert_header("keep-alive", "timeout=5").unwrap();
        request.insert_header("x-nominated", "1").unwrap();
        request.insert_header("sec-websocket-key", "k").unwrap();
        request
    }

    #[test]
    fn hop_by_hop_and_nominated_headers_are_removed_and_the_upgrade_set_again() {
        let mut request = upgrade_request("Upgrade, X-Nominated");
        strip_hop_by_hop(&mut request).unwrap();
        let headers = &request.headers;
        assert!(headers.get("x-nominated").is_none());
        assert!(headers.get("keep-alive").is_none());
        assert_eq!(headers.get("connection").unwrap(), "Upgrade");
        assert_eq!(headers.get("upgrade").unwrap(), "websocket");
        assert_eq!(headers.get("sec-websocket-key").unwrap(), "k");
        assert_eq!(headers.get("host").unwrap(), "example");
    }

    #[test]
    fn protected_malformed_or_too_many_nominations_are_refused() {
        for connection in [
            "Upgrade, Host",
            "Upgrade, X-Forwarded-For",
            "Upgrade, \"x-nominated\"",
            "a, b, c, d, e, f, g, h, i, j",
        ] {
            let mut request = upgrade_request(connection);
            assert!(strip_hop_by_hop(&mut request).is_err(), "{connection}");
        }
        // Nine names are allowed, as in Pingora.
        let mut request = upgrade_request("a, b, c, d, e, f, g, h, upgrade");
        assert!(strip_hop_by_hop(&mut request).is_ok());
    }

    #[test]
    fn the_head_length_covers_the_blank_line_only() {
        let bytes = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x02hi";
        assert_eq!(&bytes[head_len(bytes)..], b"\x81\x02hi");
    }

    /// What the test upstream does once it has sent its parts.
    #[derive(Clone, Copy)]
    enum Then {
        /// Keeps the connection open until the client closes it.
        Wait,
        /// Closes the connection.
        Close,
    }

    /// An upstream on loopback that reads one request head, then sends `parts` with a
    /// pause between them (so the answer arrives in several reads), then does `then`.
    async fn upstream_answering(parts: Vec<Vec<u8>>, then: Then) -> std::net::SocketAddr {
        use tokio::io::AsyncReadExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            socket.set_nodelay(true).unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if socket.read(&mut byte).await.unwrap() == 0 {
                    return;
                }
                head.push(byte[0]);
            }
            for part in parts {
                socket.write_all(&part).await.unwrap();
                socket.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if let Then::Wait = then {
                let mut rest = Vec::new();
                let _ = socket.read_to_end(&mut rest).await;
            }
        });
        address
    }

    async fn handshake_within(
        parts: Vec<Vec<u8>>,
        then: Then,
        read_timeout: Duration,
    ) -> Result<UpgradeReply, AuthError> {
        let address = upstream_answering(parts, then).await;
        let socket = tokio::net::TcpStream::connect(address).await.unwrap();
        let peer = pingora::upstreams::peer::HttpPeer::new(address, false, String::new());
        let wire = b"GET /connect HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
        let connection = UpstreamConnection {
            stream: Box::new(PlainUpstream(socket)),
            head_sent: false,
        };
        upgrade_handshake(connection, &peer, wire, read_timeout).await
    }

    async fn handshake_with(parts: Vec<Vec<u8>>) -> Result<UpgradeReply, AuthError> {
        handshake_within(parts, Then::Wait, Duration::from_secs(10)).await
    }

    const SWITCH: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
    const EARLY_FRAME: &[u8] = b"\x81\x05hello";

    fn switched(reply: Result<UpgradeReply, AuthError>) -> (Stream, Bytes) {
        match reply {
            Ok(UpgradeReply::Switched {
                upstream,
                head_and_early,
            }) => (upstream, head_and_early),
            Ok(UpgradeReply::Other { response, .. }) => panic!("a refusal: {response:?}"),
            Err(error) => panic!("an error: {error}"),
        }
    }

    #[tokio::test]
    async fn a_101_with_a_frame_behind_it_is_handed_over_byte_for_byte() {
        let sent = [SWITCH, EARLY_FRAME].concat();
        let (_, head_and_early) = switched(handshake_with(vec![sent.clone()]).await);
        assert_eq!(&head_and_early[..], &sent[..]);
    }

    #[tokio::test]
    async fn a_101_arriving_in_pieces_is_read_whole() {
        // Split inside the status line, inside a header and between the CR and LF of
        // the empty line.
        let cuts = [5, 40, SWITCH.len() - 1];
        let mut parts = Vec::new();
        let mut from = 0;
        for cut in cuts {
            parts.push(SWITCH[from..cut].to_vec());
            from = cut;
        }
        parts.push(SWITCH[from..].to_vec());
        let (_, head_and_early) = switched(handshake_with(parts).await);
        assert_eq!(&head_and_early[..], SWITCH);
    }

    #[tokio::test]
    async fn a_101_this_parser_leaves_to_pingoras_is_still_handed_over() {
        // More headers than SWITCH_HEADERS, then a head longer than SWITCH_HEAD_WITHIN.
        let many: String = (0..SWITCH_HEADERS + 8)
            .map(|i| format!("X-Extra-{i}: {i}\r\n"))
            .collect();
        let long = format!("X-Long: {}\r\n", "a".repeat(SWITCH_HEAD_WITHIN + 100));
        for extra in [many, long] {
            let head = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{extra}\r\n"
            );
            let sent = [head.as_bytes(), EARLY_FRAME].concat();
            let (_, head_and_early) = switched(handshake_with(vec![sent.clone()]).await);
            assert_eq!(&head_and_early[..], &sent[..]);
        }
    }

    #[tokio::test]
    async fn other_answers_are_read_by_pingora_from_their_first_byte() {
        let refusal = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 7\r\n\r\nrefused".to_vec();
        // Whole, and cut inside the head (the part already read is put back).
        for parts in [
            vec![refusal.clone()],
            vec![refusal[..10].to_vec(), refusal[10..].to_vec()],
        ] {
            let Ok(UpgradeReply::Other {
                response,
                mut reply,
            }) = handshake_with(parts).await
            else {
                panic!("a 403 is not a switch");
            };
            assert_eq!(response.status, StatusCode::FORBIDDEN);
            let body = reply.read_body_bytes().await.unwrap().unwrap();
            assert_eq!(&body[..], b"refused");
        }
    }

    #[tokio::test]
    async fn no_answer_or_a_broken_one_is_the_upstream_unavailable() {
        for parts in [
            vec![],
            vec![b"HTTP/1.1 101 Switching".to_vec()],
            vec![b"SSH-2.0-OpenSSH\r\n\r\n".to_vec()],
        ] {
            // The upstream closes after its parts; the head never completes or never
            // parses. That is an unavailable upstream, not a timeout.
            let reply = handshake_within(parts, Then::Close, Duration::from_secs(10)).await;
            assert!(
                matches!(reply, Err(AuthError::UpstreamUnavailable)),
                "no switch and no answer to copy"
            );
        }
    }

    const HEAD: &[u8] =
        b"GET /connect HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";

    /// What an accepted upstream connection received, up to its blank line.
    fn received_head(stream: &mut std::net::TcpStream) -> Vec<u8> {
        use std::io::Read as _;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut received = Vec::new();
        let mut chunk = [0u8; 512];
        while !received.ends_with(b"\r\n\r\n") {
            let read = stream.read(&mut chunk).unwrap();
            assert!(read > 0, "closed after {received:?}");
            received.extend_from_slice(&chunk[..read]);
        }
        received
    }

    #[tokio::test]
    async fn a_near_upstream_gets_the_head_with_the_connect_and_quick_acks_after_it() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let socket = connect_plain(listener.local_addr().unwrap(), HEAD)
            .await
            .unwrap();
        let (mut accepted, _) = listener.accept().unwrap();
        assert_eq!(received_head(&mut accepted), HEAD);
        let options = socket2::SockRef::from(&socket);
        assert!(options.tcp_nodelay().unwrap());
        // Sent this soon after the handshake, the head puts the socket in the kernel's
        // delayed-ACK ("pingpong") mode unless quick ACKs are turned back on.
        #[cfg(target_os = "linux")]
        assert!(options.tcp_quickack().unwrap());
    }

    #[tokio::test]
    async fn a_refused_connect_fails_before_anything_is_sent() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        let error = connect_plain(address, HEAD).await.unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::ConnectionRefused);
    }

    #[tokio::test]
    async fn a_connect_still_in_progress_gets_the_head_once_it_completes() {
        // A listener whose accept queue is full drops new SYNs: the connect is still in
        // progress when the head would be sent, until the kernel sends the SYN again
        // (after about a second) to a queue with room.
        let listener = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .unwrap();
        let loopback: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
        listener.bind(&loopback.into()).unwrap();
        listener.listen(0).unwrap();
        let listener = std::net::TcpListener::from(listener);
        let address = listener.local_addr().unwrap();
        let filler = std::net::TcpStream::connect(address).unwrap();
        let connecting = tokio::spawn(connect_plain(address, HEAD));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !connecting.is_finished(),
            "the connect completed at once: this test needs its SYN dropped"
        );
        let (first, _) = listener.accept().unwrap();
        let socket = tokio::time::timeout(Duration::from_secs(10), connecting)
            .await
            .expect("the SYN is sent again within seconds")
            .unwrap()
            .unwrap();
        let (mut second, _) = listener.accept().unwrap();
        assert_eq!(received_head(&mut second), HEAD);
        drop((filler, first, socket));
    }

    #[tokio::test]
    async fn an_answer_that_does_not_come_within_the_read_timeout_is_the_upstream_timeout() {
        // Half a head, then nothing, on a connection kept open.
        let half = vec![b"HTTP/1.1 101 Switching".to_vec()];
        let reply = handshake_within(half, Then::Wait, Duration::from_millis(200)).await;
        assert!(matches!(reply, Err(AuthError::UpstreamTimeout)));
    }
}
