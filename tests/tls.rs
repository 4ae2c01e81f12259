//! TLS for clients (`[server.tls]`), end to end on 127.0.0.1: the `chatgate` binary
//! with a config file and certificates made by rcgen, in front of the recording
//! upstream; clients are hyper (HTTP/1.1 and HTTP/2) and tokio-tungstenite
//! over rustls, so the proxy's OpenSSL is checked against another TLS stack.

#[path = "common/proxy_harness.rs"]
mod harness;

use bytes::Bytes;
use futures_util::StreamExt;
use harness::{Behaviour, KEY, STEP, TestUpstream, user_token};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

const H2: &[u8] = b"h2";
const H1: &[u8] = b"http/1.1";

/// A test CA and the leaf certificates it signs for `localhost`.
struct Authority {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

/// A leaf certificate and its key, as PEM and as the DER a client is shown.
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

impl Authority {
    fn new() -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "chatgate test CA");
        let key = rcgen::KeyPair::generate().unwrap();
        Authority {
            issuer: rcgen::CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    fn leaf(&self) -> Leaf {
        let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    fn client(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(self.issuer.der().to_vec()))
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        // Every connection is a full handshake, which is what shows the certificate
        // (a resumed session keeps the one it was first given).
        config.resumption = rustls::client::Resumption::disabled();
        Arc::new(config)
    }
}

/// Writes a file whole under a temporary name, then renames it over `path`, as a
/// certificate deployment would.
fn replace(path: &Path, contents: &str) {
    let staged = path.with_extension("new");
    std::fs::write(&staged, contents).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

/// `chatgate serve` on a config file with `[server.tls]` next to its certificate
/// files, killed on drop. Reloads are what an operator does: replace the files, then
/// SIGHUP.
struct TlsProxy {
    listen: SocketAddr,
    admin: SocketAddr,
    dir: tempfile::TempDir,
    authority: Authority,
    client: Arc<rustls::ClientConfig>,
    child: std::process::Child,
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl TlsProxy {
    async fn start(upstream: &TestUpstream, server_extra: &str) -> (Self, Leaf) {
        let dir = tempfile::tempdir().unwrap();
        let authority = Authority::new();
        let leaf = authority.leaf();
        std::fs::write(dir.path().join("cert.pem"), &leaf.cert_pem).unwrap();
        std::fs::write(dir.path().join("key.pem"), &leaf.key_pem).unwrap();
        let listen = SocketAddr::from(([127, 0, 0, 1], harness::free_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], harness::free_port()));
        let text = format!(
            "[server]\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\nthreads = 1\ngrace_period_seconds = 1\n{server_extra}\n\n\
             [server.tls]\ncert_file = \"cert.pem\"\nkey_file = \"key.pem\"\n\n\
             [upstream]\naddresses = [\"{}\"]\nforward_identity = true\n\n\
             [revocation]\nstore = \"memory\"\n\n\
             [[apps]]\napi_key = \"{KEY}\"\nsecrets = [\"{}\"]\n",
            upstream.address,
            harness::SECRET,
        );
        let path = dir.path().join("chatgate.toml");
        std::fs::write(&path, harness::with_test_engine(&text)).unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_chatgate"))
            .args(["serve", "--config"])
            .arg(&path)
            .arg("--upgrade-sock")
            .arg(dir.path().join("upgrade.sock"))
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("the chatgate binary runs");
        let client = authority.client();
        let mut proxy = TlsProxy {
            listen,
            admin,
            dir,
            authority,
            client,
            child,
        };
        let started = Instant::now();
        while TcpStream::connect(listen).await.is_err() || TcpStream::connect(admin).await.is_err()
        {
            if let Some(status) = proxy.child.try_wait().unwrap() {
                panic!("chatgate exited ({status}) before listening");
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "the TLS listener never opened"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (proxy, leaf)
    }

    /// The admin listener's `/config` (version, reload counters, last error).
    async fn status(&self) -> serde_json::Value {
        reqwest::get(format!("http://{}/config", self.admin))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// SIGHUP, then waits for the reload it starts to be counted; returns the status.
    async fn reload(&self) -> serde_json::Value {
        let attempts = |status: &serde_json::Value| {
            status["reloads_ok"].as_u64().unwrap() + status["reloads_failed"].as_u64().unwrap()
        };
        let before = attempts(&self.status().await);
        let sent = std::process::Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let started = Instant::now();
        loop {
            let status = self.status().await;
            if attempts(&status) > before {
                return status;
            }
            assert!(started.elapsed() < STEP, "SIGHUP started no reload");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A TLS connection offering `alpn`, verified against the test CA.
    async fn connect(&self, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
        let mut config = (*self.client).clone();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let tcp = TcpStream::connect(self.listen).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        tokio::time::timeout(
            STEP,
            TlsConnector::from(Arc::new(config)).connect(name, tcp),
        )
        .await
        .expect("handshake in time")
        .expect("handshake")
    }

    /// An HTTP client connection: HTTP/2 if `h2`, else HTTP/1.1 (ALPN says which was
    /// agreed, and the test checks it), with the certificate the server presented.
    async fn open(&self, h2: bool) -> Client {
        let stream = self.connect(if h2 { &[H2, H1] } else { &[H1] }).await;
        let (_, session) = stream.get_ref();
        let agreed = session.alpn_protocol().map(<[u8]>::to_vec);
        let certificate = session.peer_certificates().unwrap()[0].to_vec();
        assert_eq!(agreed.as_deref(), Some(if h2 { H2 } else { H1 }));
        let io = TokioIo::new(stream);
        let sender = if h2 {
            let (sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .unwrap();
            tokio::spawn(connection);
            Sender::H2(sender)
        } else {
            let (sender, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(connection);
            Sender::H1(sender)
        };
        Client {
            sender,
            certificate,
            authority: format!("localhost:{}", self.listen.port()),
        }
    }
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

struct Client {
    sender: Sender,
    certificate: Vec<u8>,
    authority: String,
}

/// A response, read whole.
struct Answer {
    status: u16,
    body: serde_json::Value,
}

impl Client {
    /// Sends `GET target` with `headers`; on HTTP/1.1 with `Host`, on HTTP/2 with the
    /// `:authority` of an absolute URI (as browsers and SDKs do).
    async fn get(&mut self, target: &str, headers: &[(&str, &str)]) -> Result<Answer, String> {
        let h2 = matches!(self.sender, Sender::H2(_));
        let mut request = hyper::Request::builder().method("GET");
        request = if h2 {
            request.uri(format!("https://{}{target}", self.authority))
        } else {
            request.uri(target).header("host", &self.authority)
        };
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Empty::<Bytes>::new()).unwrap();
        let sent = async {
            let response = match &mut self.sender {
                Sender::H1(sender) => {
                    sender.ready().await.map_err(|e| e.to_string())?;
                    sender.send_request(request).await
                }
                Sender::H2(sender) => {
                    sender.ready().await.map_err(|e| e.to_string())?;
                    sender.send_request(request).await
                }
            }
            .map_err(|e| format!("{e:?}"))?;
            let status = response.status().as_u16();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
            Ok(Answer { status, body })
        };
        tokio::time::timeout(STEP, sent)
            .await
            .map_err(|_| "no answer in time".to_owned())?
    }
}

fn channels() -> String {
    format!("/channels?api_key={KEY}")
}

fn token_headers(token: &str) -> [(&str, &str); 2] {
    [("authorization", token), ("stream-auth-type", "jwt")]
}

#[tokio::test]
async fn https_on_http1_and_h2_forwards_a_valid_token_with_its_identity_and_refuses_in_json() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let (proxy, leaf) = TlsProxy::start(&upstream, "").await;
    let token = user_token("alice");
    for h2 in [false, true] {
        let mut client = proxy.open(h2).await;
        assert_eq!(client.certificate, leaf.der);
        let allowed = client
            .get(&channels(), &token_headers(&token))
            .await
            .unwrap();
        assert_eq!(allowed.status, 200, "h2 {h2}: {:?}", allowed.body);
        assert_eq!(allowed.body["user"], "alice", "h2 {h2}");
        assert_eq!(allowed.body["target"], channels(), "h2 {h2}");

        let refused = client.get(&channels(), &[]).await.unwrap();
        assert_eq!(refused.status, 401, "h2 {h2}");
        assert_eq!(refused.body["code"], 5, "h2 {h2}: {:?}", refused.body);
        assert!(refused.body["message"].is_string());
        assert_eq!(refused.body["StatusCode"], 401);

        // The refusal kept the connection: the next request on it is served.
        let again = client
            .get(&channels(), &token_headers(&token))
            .await
            .unwrap();
        assert_eq!(again.status, 200, "h2 {h2}");
    }
    let requests = upstream.requests();
    assert_eq!(requests.len(), 4, "refusals never reach the upstream");
    let host = format!("localhost:{}", proxy.listen.port());
    for request in &requests {
        assert_eq!(request.header_values("host"), std::slice::from_ref(&host));
        assert_eq!(request.header_values("x-chatgate-user-id"), ["alice"]);
    }
}

#[tokio::test]
async fn h2_requests_meet_the_same_section_6_rules_as_http1() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let (proxy, _) = TlsProxy::start(&upstream, "max_header_bytes = 8192").await;
    let token = user_token("alice");
    let mut client = proxy.open(true).await;

    // Rule 3: the path is judged and forwarded in normal form, query as sent.
    let target = format!("/public/../channels/./x//y?api_key={KEY}&limit=1");
    let answer = client.get(&target, &token_headers(&token)).await.unwrap();
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(
        answer.body["target"],
        format!("/channels/x/y?api_key={KEY}&limit=1")
    );

    // Rule 2: a client-sent identity header never reaches the upstream.
    let mut forged = token_headers(&token).to_vec();
    forged.push(("x-chatgate-user-id", "mallory"));
    forged.push(("x_chatgate_auth", "server"));
    let answer = client.get(&channels(), &forged).await.unwrap();
    assert_eq!(answer.body["user"], "alice");

    // Rule 1: one credential (header names are lower case on HTTP/2).
    let other = user_token("bob");
    let mut twice = token_headers(&token).to_vec();
    twice.push(("authorization", &other));
    let answer = client.get(&channels(), &twice).await.unwrap();
    assert_eq!(
        (answer.status, answer.body["code"].clone()),
        (400, 4.into())
    );

    // A Host naming another authority than :authority is refused by Pingora's HTTP/2
    // server with a bare 400 (no contract JSON): pingora-core 0.9.1 answers it inside
    // `v2::server::HttpSession::from_h2_conn`, the only public way to accept an h2
    // stream, before any hook or `ServerApp` of ours sees the request.
    let mut elsewhere = token_headers(&token).to_vec();
    elsewhere.push(("host", "internal.example"));
    let answer = client.get(&channels(), &elsewhere).await.unwrap();
    assert_eq!(answer.status, 400);

    // Rule 6: the header list is bounded by max_header_bytes (8 KiB here, where
    // Pingora's own HTTP/2 default would take 64 KiB).
    let padding = "p".repeat(16 * 1024);
    let mut large = token_headers(&token).to_vec();
    large.push(("x-padding", &padding));
    let oversized = proxy.open(true).await.get(&channels(), &large).await;
    assert!(
        oversized
            .as_ref()
            .map_or(true, |answer| answer.status == 431),
        "{:?}",
        oversized.map(|a| (a.status, a.body))
    );

    let targets: Vec<String> = upstream.requests().into_iter().map(|r| r.target).collect();
    assert_eq!(
        targets.len(),
        2,
        "only the two allowed requests: {targets:?}"
    );
    for request in upstream.requests() {
        assert_eq!(request.header_values("x-chatgate-user-id"), ["alice"]);
        assert!(request.header_values("x-chatgate-auth") == ["user"]);
        assert!(request.header_values("x_chatgate_auth").is_empty());
    }
}

/// An HTTP/2 frame's header: length, type, flags, stream id.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    out.extend([kind, flags]);
    out.extend(stream.to_be_bytes());
    out.extend(payload);
    out
}

/// HPACK "literal header field without indexing, new name", lengths under 127.
fn literal(name: &str, value: &str) -> Vec<u8> {
    let mut out = vec![0x00, name.len() as u8];
    out.extend(name.as_bytes());
    out.push(value.len() as u8);
    out.extend(value.as_bytes());
    out
}

/// Sends one GET over raw HTTP/2 frames (a client library would refuse to send a
/// connection-specific header) and returns the type of the first frame the server
/// sends on stream 1: 0x1 HEADERS (answered) or 0x3 RST_STREAM (refused), or 0x7 for
/// a GOAWAY.
async fn raw_h2_get(proxy: &TlsProxy, extra: &[(&str, &str)]) -> u8 {
    let mut stream = proxy.connect(&[H2]).await;
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "GET"),
        (":scheme", "https"),
        (":path", "/channels?api_key=key"),
        (":authority", "localhost"),
        ("stream-auth-type", "anonymous"),
    ]
    .iter()
    .chain(extra)
    {
        block.extend(literal(name, value));
    }
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    // END_STREAM | END_HEADERS
    out.extend(frame(0x1, 0x5, 1, &block));
    stream.write_all(&out).await.unwrap();
    let read = async {
        // Bounded by the server: each round reads one frame, and the outer timeout.
        loop {
            let mut head = [0u8; 9];
            stream.read_exact(&mut head).await.unwrap();
            let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let (kind, flags) = (head[3], head[4]);
            let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let mut payload = vec![0u8; length];
            stream.read_exact(&mut payload).await.unwrap();
            if kind == 0x4 && flags & 0x1 == 0 {
                stream.write_all(&frame(0x4, 0x1, 0, &[])).await.unwrap();
            }
            if (id == 1 && (kind == 0x1 || kind == 0x3)) || kind == 0x7 {
                return kind;
            }
        }
    };
    tokio::time::timeout(STEP, read).await.expect("an answer")
}

#[tokio::test]
async fn connection_specific_headers_are_refused_on_h2_before_the_gate() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let (proxy, _) = TlsProxy::start(&upstream, "").await;
    // The raw client is sound: a plain request is answered (a 401: no app allows
    // anonymous users here).
    assert_eq!(raw_h2_get(&proxy, &[]).await, 0x1);
    for header in [
        ("connection", "x-chatgate-user-id"),
        ("upgrade", "websocket"),
        ("transfer-encoding", "chunked"),
        ("keep-alive", "timeout=5"),
        ("te", "gzip"),
    ] {
        let kind = raw_h2_get(&proxy, &[header]).await;
        assert!(
            kind == 0x3 || kind == 0x7,
            "{header:?} answered: frame {kind}"
        );
    }
    assert!(upstream.requests().is_empty());
}

#[tokio::test]
async fn a_websocket_over_tls_upgrades_on_http1() {
    use tokio_tungstenite::tungstenite::Message;
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let (proxy, _) = TlsProxy::start(&upstream, "").await;
    let token = user_token("alice");
    let json = r#"{"user_id":"alice","user_details":{"id":"alice"}}"#;
    let url = format!(
        "wss://localhost:{}/connect?api_key={KEY}&authorization={token}&stream-auth-type=jwt&json={}",
        proxy.listen.port(),
        percent_encoding::utf8_percent_encode(json, percent_encoding::NON_ALPHANUMERIC)
    );
    let stream = proxy.connect(&[H1]).await;
    let (mut socket, response) =
        tokio::time::timeout(STEP, tokio_tungstenite::client_async(url.as_str(), stream))
            .await
            .unwrap()
            .unwrap();
    assert_eq!(response.status().as_u16(), 101);
    let greeting = tokio::time::timeout(STEP, socket.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let greeting: serde_json::Value = serde_json::from_str(greeting.to_text().unwrap()).unwrap();
    assert_eq!(greeting["me"]["id"], "alice");
    futures_util::SinkExt::send(&mut socket, Message::Text("hi".into()))
        .await
        .unwrap();
    let echo = tokio::time::timeout(STEP, socket.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echo.to_text().unwrap(), "echo:hi");

    // A refused upgrade over TLS is Stream's WebSocket rejection: 101, an error frame.
    let bad = format!(
        "wss://localhost:{}/connect?api_key={KEY}&authorization=not-a-token&stream-auth-type=jwt&json={}",
        proxy.listen.port(),
        percent_encoding::utf8_percent_encode(json, percent_encoding::NON_ALPHANUMERIC)
    );
    let stream = proxy.connect(&[H1]).await;
    let (mut refused, _) = tokio_tungstenite::client_async(bad.as_str(), stream)
        .await
        .unwrap();
    let error = tokio::time::timeout(STEP, refused.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let error: serde_json::Value = serde_json::from_str(error.to_text().unwrap()).unwrap();
    assert!(error["error"]["code"].is_number(), "{error}");
    assert_eq!(upstream.requests().len(), 1);
}

/// Contract §4 over TLS: an idle WebSocket on an HTTPS listener is relayed like a
/// plain one, so a revocation (made over TLS too) closes it with 4000 within a second.
#[tokio::test]
async fn an_idle_websocket_over_tls_is_closed_with_4000_within_a_second_of_a_revocation() {
    use tokio_tungstenite::tungstenite::Message;
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let (proxy, _) = TlsProxy::start(&upstream, "").await;
    let token = chatgate::TokenBuilder::user("alice")
        .issued_at(chatgate::time::now_unix() - 10)
        .sign(harness::SECRET);
    let json = r#"{"user_id":"alice","user_details":{"id":"alice"}}"#;
    let url = format!(
        "wss://localhost:{}/connect?api_key={KEY}&authorization={token}&stream-auth-type=jwt&json={}",
        proxy.listen.port(),
        percent_encoding::utf8_percent_encode(json, percent_encoding::NON_ALPHANUMERIC)
    );
    let stream = proxy.connect(&[H1]).await;
    let (mut socket, _) =
        tokio::time::timeout(STEP, tokio_tungstenite::client_async(url.as_str(), stream))
            .await
            .unwrap()
            .unwrap();
    // The greeting, then nothing: the session is idle.
    tokio::time::timeout(STEP, socket.next()).await.unwrap();

    let body = format!(
        r#"{{"users":[{{"id":"alice","set":{{"revoke_tokens_issued_before":{}}}}}]}}"#,
        chatgate::time::now_unix()
    );
    let mut https = proxy.connect(&[H1]).await;
    let request = format!(
        "PATCH /users?api_key={KEY} HTTP/1.1\r\nHost: localhost\r\nAuthorization: {}\r\n\
         stream-auth-type: jwt\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        harness::server_token(),
        body.len()
    );
    https.write_all(request.as_bytes()).await.unwrap();
    let mut status = [0u8; 12];
    tokio::time::timeout(STEP, https.read_exact(&mut status))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&status, b"HTTP/1.1 200");
    let answered = Instant::now();

    let close = tokio::time::timeout(STEP, async {
        // Bounded by the proxy closing the socket.
        while let Some(message) = socket.next().await {
            if let Ok(Message::Close(frame)) = message {
                return frame;
            }
        }
        None
    })
    .await
    .unwrap()
    .expect("a close frame");
    assert!(
        answered.elapsed() <= Duration::from_secs(1),
        "closed {:?} after the revocation's answer",
        answered.elapsed()
    );
    assert_eq!(u16::from(close.code), 4000);
    assert_eq!(close.reason.as_str(), "token revoked");
}

/// One request on each connection kept open across the swap.
async fn kept_round(h1: &mut Client, h2: &mut Client, token: &str, tally: &Tally) {
    for client in [h1, h2] {
        match client.get(&channels(), &token_headers(token)).await {
            Ok(answer) if answer.status == 200 => tally.ok.fetch_add(1, Ordering::SeqCst),
            other => {
                eprintln!("kept-alive request failed: {:?}", other.map(|a| a.status));
                tally.failed.fetch_add(1, Ordering::SeqCst)
            }
        };
    }
}

/// What the load saw.
#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    failed: AtomicUsize,
    /// New connections whose handshake started after the reload returned, and of
    /// those, how many were shown the new certificate.
    after: AtomicUsize,
    after_new_certificate: AtomicUsize,
    /// New connections shown the old certificate before the reload.
    before_old_certificate: AtomicUsize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_swap_under_load_fails_no_request_and_keeps_open_connections() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let (proxy, first) = TlsProxy::start(&upstream, "").await;
    let proxy = Arc::new(proxy);
    let second = proxy.authority.leaf();
    let token = user_token("alice");

    // Open before the swap, used throughout and after it.
    let mut kept_h1 = proxy.open(false).await;
    let mut kept_h2 = proxy.open(true).await;
    assert_eq!(kept_h1.certificate, first.der);
    assert_eq!(kept_h2.certificate, first.der);

    let tally = Arc::new(Tally::default());
    let reloaded = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    // Load: new connections (alternately HTTP/1.1 and HTTP/2), one request each.
    let mut load = Vec::new();
    for worker in 0..2 {
        let (proxy, tally, reloaded, done, token) = (
            proxy.clone(),
            tally.clone(),
            reloaded.clone(),
            done.clone(),
            token.clone(),
        );
        let (first, second) = (first.der.clone(), second.der.clone());
        load.push(tokio::spawn(async move {
            // Bounded: at most 2000 rounds, and the test stops it earlier.
            for round in 0..2000 {
                if done.load(Ordering::SeqCst) {
                    break;
                }
                let after = reloaded.load(Ordering::SeqCst);
                let mut client = proxy.open((round + worker) % 2 == 0).await;
                if after {
                    tally.after.fetch_add(1, Ordering::SeqCst);
                    if client.certificate == second {
                        tally.after_new_certificate.fetch_add(1, Ordering::SeqCst);
                    }
                } else if client.certificate == first {
                    tally.before_old_certificate.fetch_add(1, Ordering::SeqCst);
                }
                match client.get(&channels(), &token_headers(&token)).await {
                    Ok(answer) if answer.status == 200 => tally.ok.fetch_add(1, Ordering::SeqCst),
                    _ => tally.failed.fetch_add(1, Ordering::SeqCst),
                };
            }
        }));
    }
    let wait_for = |tally: &Arc<Tally>, count: usize| {
        let tally = tally.clone();
        async move {
            let started = Instant::now();
            while tally.ok.load(Ordering::SeqCst) < count {
                assert!(started.elapsed() < Duration::from_secs(60), "load stalled");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    for _ in 0..5 {
        kept_round(&mut kept_h1, &mut kept_h2, &token, &tally).await;
    }
    wait_for(&tally, 150).await;

    // A half-done deployment (the new key next to the old certificate) fails the
    // reload; handshakes go on with the running pair.
    replace(&proxy.file("key.pem"), &second.key_pem);
    let failed = proxy.reload().await;
    assert_eq!(failed["reloads_failed"], 1);
    let message = failed["last_error"]["message"].as_str().unwrap();
    assert!(message.contains("server.tls.key_file"), "{message}");
    assert_eq!(proxy.open(false).await.certificate, first.der);
    kept_round(&mut kept_h1, &mut kept_h2, &token, &tally).await;

    // The whole new pair, then the reload SIGHUP would do.
    replace(&proxy.file("cert.pem"), &second.cert_pem);
    let applied = proxy.reload().await;
    assert_eq!(applied["reloads_ok"], 1, "{applied}");
    assert!(applied["last_error"].is_null(), "{applied}");
    // /config names the pair new handshakes get.
    assert_ne!(applied["tls"]["fingerprint"], failed["tls"]["fingerprint"]);
    assert_eq!(applied["tls"]["not_after"], "4096-01-01T00:00:00Z");
    reloaded.store(true, Ordering::SeqCst);
    let at_reload = tally.ok.load(Ordering::SeqCst);
    for _ in 0..5 {
        kept_round(&mut kept_h1, &mut kept_h2, &token, &tally).await;
    }
    wait_for(&tally, at_reload + 150).await;
    done.store(true, Ordering::SeqCst);
    for worker in load {
        worker.await.unwrap();
    }

    let (ok, failed) = (
        tally.ok.load(Ordering::SeqCst),
        tally.failed.load(Ordering::SeqCst),
    );
    eprintln!(
        "certificate swap: {ok} requests, {failed} failed; {} new connections after the swap",
        tally.after.load(Ordering::SeqCst)
    );
    assert_eq!(failed, 0, "{ok} requests succeeded");
    let after = tally.after.load(Ordering::SeqCst);
    assert!(after >= 10, "{after} connections after the swap");
    assert_eq!(tally.after_new_certificate.load(Ordering::SeqCst), after);
    assert!(tally.before_old_certificate.load(Ordering::SeqCst) >= 10);
    // The connections opened before the swap are the same ones, still on the old
    // certificate, and still served.
    assert_eq!(kept_h1.certificate, first.der);
    assert_eq!(kept_h2.certificate, first.der);
    assert_eq!(
        kept_h2
            .get(&channels(), &token_headers(&token))
            .await
            .unwrap()
            .status,
        200
    );
}

#[tokio::test]
async fn chatgate_revoke_reaches_a_tls_proxy_that_presents_the_configured_certificate() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let (proxy, _) = TlsProxy::start(&upstream, "").await;
    let token = chatgate::TokenBuilder::user("alice")
        .issued_at(chatgate::time::now_unix() - 60)
        .sign(harness::SECRET);
    let mut client = proxy.open(false).await;
    let allowed = client
        .get(&channels(), &token_headers(&token))
        .await
        .unwrap();
    assert_eq!(allowed.status, 200);

    let revoke = |config: PathBuf| async move {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_chatgate"))
                .args(["revoke", "user", "alice", "--api-key", KEY, "--config"])
                .arg(config)
                .output()
                .unwrap()
        })
        .await
        .unwrap()
    };
    let output = revoke(proxy.file("chatgate.toml")).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("through the running proxy"), "{stdout}");
    let refused = client
        .get(&channels(), &token_headers(&token))
        .await
        .unwrap();
    assert_eq!(
        (refused.status, refused.body["code"].clone()),
        (401, 40.into())
    );

    // A certificate file the proxy does not present (not reloaded yet) is not trusted.
    let other = proxy.authority.leaf();
    replace(&proxy.file("cert.pem"), &other.cert_pem);
    replace(&proxy.file("key.pem"), &other.key_pem);
    let output = revoke(proxy.file("chatgate.toml")).await;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!output.status.success(), "{said}");
    assert!(said.contains("is not the one in"), "{said}");
}
