//! The forward engine's shared idle-upstream pool (`src/proxy/upstream_pool.rs`), end
//! to end: the `chatgate` binary on loopback in front of an upstream that counts the
//! connections it accepts and sees closed. Client connections here send one request
//! each with `Connection: close` and read to EOF, so each one is a new client
//! connection that ends before the next begins.
//!
//! The pool is the forward engine's (the filter engine uses Pingora's, keyed and sized
//! its own way), so this binary is not in `tests/filter_engine.rs`, and under
//! `CHATGATE_TEST_ENGINE=filter` its tests say so and pass without running.

#[path = "common/proxy_harness.rs"]
mod harness;

use harness::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Idle connections kept a peer: `IDLE_PER_PEER`, Pingora's default pool size.
const CAP: usize = 128;

fn on_forward() -> bool {
    if test_engine().as_deref() == Some("filter") {
        eprintln!("the idle-upstream pool is the forward engine's: not run on the filter engine");
        return false;
    }
    true
}

/// How the counting upstream treats a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Keep-alive: answer every request.
    KeepAlive,
    /// Answer, then close the connection once it has been idle this long (Node's HTTP
    /// server does so after 5 s), without saying so in the response.
    IdleClose(Duration),
    /// Answer a connection's first request; read its second and close without a byte
    /// of answer: an upstream closing a connection just as a pooled request arrives.
    DropSecond,
    /// Answer nothing until this many requests are in flight at once.
    Gather(usize),
}

/// Connections count from their first request: the proxy's readiness probe connects
/// every second and closes without a byte (`src/proxy/upstream_health.rs`).
#[derive(Default)]
struct Counts {
    accepted: AtomicUsize,
    closed: AtomicUsize,
    requests: std::sync::Mutex<Vec<(usize, String)>>,
}

/// A loopback HTTP/1.1 upstream (plain or TLS) that counts accepted and closed
/// connections and records `(connection, method)` of every request it reads.
struct CountingUpstream {
    address: std::net::SocketAddr,
    counts: Arc<Counts>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CountingUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CountingUpstream {
    async fn start(mode: Mode, tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let counts = Arc::new(Counts::default());
        let barrier = match mode {
            Mode::Gather(n) => Some(Arc::new(tokio::sync::Barrier::new(n))),
            _ => None,
        };
        let shared = counts.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (counts, barrier, tls) = (shared.clone(), barrier.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                serve(stream, mode, &counts, barrier).await;
                            }
                        }
                        None => serve(stream, mode, &counts, barrier).await,
                    }
                });
            }
        });
        CountingUpstream {
            address,
            counts,
            task,
        }
    }

    fn accepted(&self) -> usize {
        self.counts.accepted.load(Ordering::SeqCst)
    }

    fn open(&self) -> usize {
        self.accepted() - self.counts.closed.load(Ordering::SeqCst)
    }

    fn requests(&self) -> Vec<(usize, String)> {
        self.counts.requests.lock().unwrap().clone()
    }

    /// Waits (at most 5 s) until `open()` is `n`.
    async fn wait_open(&self, n: usize) {
        for _ in 0..100 {
            if self.open() == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{} upstream connections open, not {n}", self.open());
    }
}

/// Serves one connection until the proxy closes it or `mode` ends it.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    mode: Mode,
    counts: &Counts,
    barrier: Option<Arc<tokio::sync::Barrier>>,
) {
    let mut buffer = Vec::new();
    let Ok(Some(first)) = read_head(&mut stream, &mut buffer).await else {
        return;
    };
    let id = counts.accepted.fetch_add(1, Ordering::SeqCst);
    serve_requests(stream, buffer, first, id, mode, counts, barrier).await;
    counts.closed.fetch_add(1, Ordering::SeqCst);
}

async fn serve_requests<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    mut buffer: Vec<u8>,
    first: String,
    id: usize,
    mode: Mode,
    counts: &Counts,
    barrier: Option<Arc<tokio::sync::Barrier>>,
) {
    let mut first = Some(first);
    // Bounded by the proxy: each round reads one request or ends.
    for served in 0.. {
        let wait = match mode {
            Mode::IdleClose(idle) if served > 0 => idle,
            _ => Duration::from_secs(60),
        };
        let method = match first.take() {
            Some(method) => method,
            None => match tokio::time::timeout(wait, read_head(&mut stream, &mut buffer)).await {
                Ok(Ok(Some(method))) => method,
                _ => return,
            },
        };
        counts.requests.lock().unwrap().push((id, method));
        if mode == Mode::DropSecond && served == 1 {
            return;
        }
        if let Some(barrier) = &barrier {
            barrier.wait().await;
        }
        let body = format!("{{\"connection\":{id}}}");
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        if stream.write_all(response.as_bytes()).await.is_err() || stream.flush().await.is_err() {
            return;
        }
    }
}

/// Reads a request head and its `content-length` body; the method, or `None` at EOF.
async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    buffer: &mut Vec<u8>,
) -> std::io::Result<Option<String>> {
    let end = loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buffer.len() > 64 * 1024 {
            return Ok(None);
        }
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buffer[..end]).to_ascii_lowercase();
    let length: usize = head
        .split("\r\n")
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buffer.len() < end + length {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
    let method = head.split(' ').next().unwrap_or("").to_ascii_uppercase();
    buffer.drain(..end + length);
    Ok(Some(method))
}

async fn proxy_in_front_of(upstream: &CountingUpstream, tls: bool) -> Proxy {
    Proxy::start(ProxyOptions {
        upstreams: vec![upstream.address.to_string()],
        tls: tls.then(|| ("localhost".to_owned(), false)),
        ..ProxyOptions::default()
    })
    .await
}

/// One request on a new client connection (`Connection: close`, read to EOF): the
/// status and the body.
async fn once(proxy: &Proxy, method: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(proxy.address).await.unwrap();
    let body = if method == "GET" { "" } else { "{}" };
    let request = format!(
        "{method} /channels?api_key={KEY} HTTP/1.1\r\nhost: localhost\r\nauthorization: {}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        user_token("alice"),
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

#[tokio::test]
async fn sequential_client_connections_reach_the_upstream_over_one_connection() {
    if !on_forward() {
        return;
    }
    let upstream = CountingUpstream::start(Mode::KeepAlive, None).await;
    let proxy = proxy_in_front_of(&upstream, false).await;
    within(Duration::from_secs(60), async {
        for round in 0..20 {
            let method = if round % 2 == 0 { "GET" } else { "POST" };
            let (status, body) = once(&proxy, method).await;
            assert_eq!(
                (status, body.as_str()),
                (200, "{\"connection\":0}"),
                "{round}"
            );
        }
    })
    .await;
    assert_eq!(upstream.accepted(), 1);
    assert_eq!(upstream.requests().len(), 20);
}

/// With no traffic at all, an idle upstream connection is closed once it has been idle
/// past the pool's timeout (4 s) by the engine's sweep (every 1 s), not kept open until
/// a request comes: the counting upstream itself would keep it for 60 s.
#[tokio::test]
async fn an_idle_upstream_connection_is_closed_after_its_timeout_without_traffic() {
    if !on_forward() {
        return;
    }
    let upstream = CountingUpstream::start(Mode::KeepAlive, None).await;
    let proxy = proxy_in_front_of(&upstream, false).await;
    within(Duration::from_secs(30), async {
        for _ in 0..3 {
            assert_eq!(once(&proxy, "GET").await.0, 200);
        }
    })
    .await;
    assert_eq!((upstream.accepted(), upstream.open()), (1, 1));
    // Bounded: 12 s is the timeout and a sweep with room for a busy machine.
    let mut waited = Duration::ZERO;
    while upstream.open() != 0 {
        assert!(
            waited < Duration::from_secs(12),
            "the idle upstream connection is still open after {waited:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += Duration::from_millis(100);
    }
    // Not before its timeout: closed by the sweep, not by the end of the client's
    // connection (the pool keeps what it is given).
    assert!(waited >= Duration::from_secs(3), "closed after {waited:?}");
}

#[tokio::test]
async fn a_tls_upstream_connection_is_pooled_the_same_way() {
    if !on_forward() {
        return;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let key =
        rustls::pki_types::PrivateKeyDer::try_from(certified.signing_key.serialize_der()).unwrap();
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let upstream = CountingUpstream::start(Mode::KeepAlive, Some(acceptor)).await;
    let proxy = proxy_in_front_of(&upstream, true).await;
    within(Duration::from_secs(60), async {
        for round in 0..10 {
            let (status, body) = once(&proxy, "GET").await;
            assert_eq!(
                (status, body.as_str()),
                (200, "{\"connection\":0}"),
                "{round}"
            );
        }
    })
    .await;
    assert_eq!(upstream.accepted(), 1);
}

#[tokio::test]
async fn an_upstream_that_closes_idle_connections_fails_no_request() {
    if !on_forward() {
        return;
    }
    let upstream = CountingUpstream::start(Mode::IdleClose(Duration::from_millis(150)), None).await;
    let proxy = proxy_in_front_of(&upstream, false).await;
    within(Duration::from_secs(60), async {
        for round in 0..3 {
            // Two client connections at once after the other share the upstream's
            // connection; after the pause the upstream has closed it, and the proxy
            // sees that when it takes the connection, before it sends anything.
            for method in ["GET", "POST"] {
                let (status, body) = once(&proxy, method).await;
                assert_eq!(status, 200, "round {round} {method}: {body}");
                assert_eq!(body, format!("{{\"connection\":{round}}}"), "{method}");
            }
            upstream.wait_open(0).await;
        }
    })
    .await;
    assert_eq!(upstream.accepted(), 3);
    // Nothing was sent on a closed connection, so nothing was sent twice.
    let methods: Vec<String> = upstream.requests().into_iter().map(|(_, m)| m).collect();
    assert_eq!(methods, ["GET", "POST", "GET", "POST", "GET", "POST"]);
}

#[tokio::test]
async fn a_pooled_connection_closed_under_a_request_resends_a_get_and_never_a_post() {
    if !on_forward() {
        return;
    }
    let upstream = CountingUpstream::start(Mode::DropSecond, None).await;
    let proxy = proxy_in_front_of(&upstream, false).await;
    within(Duration::from_secs(60), async {
        assert_eq!(once(&proxy, "GET").await.0, 200);
        // The pooled connection looks open when taken; the upstream drops the GET
        // unanswered: it is resent once on a fresh connection.
        let (status, body) = once(&proxy, "GET").await;
        assert_eq!((status, body.as_str()), (200, "{\"connection\":1}"));
        // The same for a POST: it may have been acted on, so it is not resent; the
        // client hears the contract's 502.
        let (status, body) = once(&proxy, "POST").await;
        assert_eq!(status, 502, "{body}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_stream_error(&body, -1, 502);
        // The connection it failed on is not pooled: the next POST gets a new one.
        let (status, body) = once(&proxy, "POST").await;
        assert_eq!((status, body.as_str()), (200, "{\"connection\":2}"));
    })
    .await;
    assert_eq!(
        upstream.requests(),
        [
            (0, "GET".to_owned()),
            (0, "GET".to_owned()),
            (1, "GET".to_owned()),
            (1, "POST".to_owned()),
            (2, "POST".to_owned()),
        ]
    );
}

#[tokio::test]
async fn a_reload_that_changes_upstream_stops_reuse_of_the_old_connections() {
    if !on_forward() {
        return;
    }
    let upstream = CountingUpstream::start(Mode::KeepAlive, None).await;
    let mut proxy = proxy_in_front_of(&upstream, false).await;
    within(Duration::from_secs(60), async {
        for _ in 0..3 {
            assert_eq!(once(&proxy, "GET").await.0, 200);
        }
        assert_eq!(upstream.accepted(), 1);
        // Same address, another [upstream] setting: a new peer set.
        let text = proxy
            .config_text()
            .replace("connect_timeout_ms = 1000", "connect_timeout_ms = 1500");
        assert_ne!(text, proxy.config_text());
        proxy.replace_config(text);
        proxy
            .wait_config_status(Duration::from_secs(20), "the reload", |status| {
                status["version"] == 2
            })
            .await;
        for _ in 0..3 {
            let (status, body) = once(&proxy, "GET").await;
            assert_eq!((status, body.as_str()), (200, "{\"connection\":1}"));
        }
        // The old set's idle connection was closed, not kept.
        upstream.wait_open(1).await;
    })
    .await;
    assert_eq!(upstream.accepted(), 2);
}

#[tokio::test]
async fn the_pool_keeps_at_most_its_cap_of_idle_connections() {
    if !on_forward() {
        return;
    }
    let wave = CAP + 2;
    let upstream = CountingUpstream::start(Mode::Gather(wave), None).await;
    let proxy = proxy_in_front_of(&upstream, false).await;
    let proxy = Arc::new(proxy);
    let run_wave = || {
        let proxy = proxy.clone();
        async move {
            let clients: Vec<_> = (0..wave)
                .map(|_| {
                    let proxy = proxy.clone();
                    tokio::spawn(async move { once(&proxy, "GET").await.0 })
                })
                .collect();
            for client in clients {
                assert_eq!(client.await.unwrap(), 200);
            }
        }
    };
    within(Duration::from_secs(60), async {
        // `wave` requests in flight at once: as many upstream connections.
        run_wave().await;
        assert_eq!(upstream.accepted(), wave);
        // Back in the pool: all but the cap are closed.
        upstream.wait_open(CAP).await;
        // The next wave takes the cap's connections and opens the rest.
        run_wave().await;
        assert_eq!(upstream.accepted(), wave + (wave - CAP));
        upstream.wait_open(CAP).await;
    })
    .await;
}

/// The peer index a request picks is of the peer set it holds: before, the first request
/// after a reload that added addresses could pick an index of the new set and use it on
/// the old one, past its end.
#[tokio::test]
async fn the_first_requests_after_a_reload_that_adds_addresses_are_answered() {
    if !on_forward() {
        return;
    }
    let upstreams = [
        CountingUpstream::start(Mode::KeepAlive, None).await,
        CountingUpstream::start(Mode::KeepAlive, None).await,
        CountingUpstream::start(Mode::KeepAlive, None).await,
    ];
    let mut proxy = proxy_in_front_of(&upstreams[0], false).await;
    within(Duration::from_secs(60), async {
        assert_eq!(once(&proxy, "GET").await.0, 200);
        let old = format!("addresses = [\"{}\"]", upstreams[0].address);
        let all: Vec<String> = upstreams
            .iter()
            .map(|u| format!("\"{}\"", u.address))
            .collect();
        let text = proxy
            .config_text()
            .replace(&old, &format!("addresses = [{}]", all.join(", ")));
        assert_ne!(text, proxy.config_text());
        proxy.replace_config(text);
        proxy
            .wait_config_status(Duration::from_secs(20), "the reload", |status| {
                status["version"] == 2
            })
            .await;
        for round in 0..6 {
            let (status, body) = once(&proxy, "GET").await;
            assert_eq!(status, 200, "{round}: {body}");
        }
    })
    .await;
    // Round robin over the new set: every address served some of them.
    for upstream in &upstreams {
        assert!(!upstream.requests().is_empty());
    }
}
