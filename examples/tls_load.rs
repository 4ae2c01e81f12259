//! The TLS load generator of `benches/tls_compare.sh` (issue 14's TLS comparison):
//! one client, rustls pinned to one cipher suite and one key-exchange group, so that
//! both proxies do the same cryptography whatever their defaults.
//!
//! ```text
//! tls_load cert DIR                      # DIR/ca.pem, cert.pem, key.pem, combined.pem
//! tls_load run ADDR CA MODE CONNECTIONS SECONDS PATH TOKEN
//! ```
//!
//! MODE is `full` (a full handshake per connection), `resumed` (TLS 1.3 resumption
//! from tickets, checked per connection; each connection loop keeps its own tickets)
//! or `keepalive` (requests on open connections). In the handshake modes every
//! connection sends one request with `Connection: close` and reads the answer, which
//! is also what delivers the tickets.
//! Prints one line: `ops=N failed=N resumed=N suite=... group=...`.

use rustls::pki_types::{CertificateDer, ServerName};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

#[derive(Default)]
struct Counts {
    ops: AtomicUsize,
    failed: AtomicUsize,
    resumed: AtomicUsize,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("cert") if args.len() == 2 => write_certificates(std::path::Path::new(&args[1])),
        Some("run") if args.len() == 8 => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(run(&args[1..]));
        }
        _ => {
            eprintln!(
                "usage: tls_load cert DIR | tls_load run ADDR CA MODE CONNECTIONS SECONDS PATH TOKEN"
            );
            std::process::exit(2);
        }
    }
}

/// A CA and an ECDSA P-256 leaf for `localhost` / 127.0.0.1, PEM; `combined.pem` is
/// HAProxy's form (certificate then key).
fn write_certificates(dir: &std::path::Path) {
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "chatgate bench CA");
    let issuer =
        rcgen::CertifiedIssuer::self_signed(ca, rcgen::KeyPair::generate().unwrap()).unwrap();
    let leaf_params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = leaf_params.signed_by(&key, &issuer).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("ca.pem"), issuer.pem()).unwrap();
    std::fs::write(dir.join("cert.pem"), leaf.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    std::fs::write(
        dir.join("combined.pem"),
        format!("{}{}", leaf.pem(), key.serialize_pem()),
    )
    .unwrap();
}

fn client_config(ca_file: &str, resumption: bool) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read_to_string(ca_file).unwrap();
    let der = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<String>();
    use base64::Engine as _;
    let der = base64::engine::general_purpose::STANDARD
        .decode(der)
        .unwrap();
    roots.add(CertificateDer::from(der)).unwrap();
    let base = rustls::crypto::ring::default_provider();
    let provider = rustls::crypto::CryptoProvider {
        cipher_suites: vec![rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256],
        kx_groups: vec![rustls::crypto::ring::kx_group::X25519],
        ..base
    };
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    if !resumption {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Arc::new(config)
}

async fn run(args: &[String]) {
    let address: std::net::SocketAddr = args[0].parse().unwrap();
    let mode = args[2].clone();
    let connections: usize = args[3].parse().unwrap();
    let seconds: u64 = args[4].parse().unwrap();
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: localhost\r\nAuthorization: {}\r\nstream-auth-type: jwt\r\n{}\r\n",
        args[5],
        args[6],
        if mode == "keepalive" {
            ""
        } else {
            "Connection: close\r\n"
        }
    );
    let config = client_config(&args[1], mode == "resumed");
    let counts = Arc::new(Counts::default());
    let negotiated = Arc::new(std::sync::Mutex::new(String::new()));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..connections {
        // Each connection loop resumes from the tickets of its own previous connection:
        // with one store shared by all loops (rustls keeps at most 8 TLS 1.3 tickets a
        // server, and OpenSSL sends one ticket after a resumption), how many handshakes
        // resume depended on how the server interleaved the loops, not on what it can do.
        let mut own = (*config).clone();
        if mode == "resumed" {
            own.resumption = rustls::client::Resumption::in_memory_sessions(4);
        }
        let (connector, counts, negotiated, request, mode) = (
            TlsConnector::from(Arc::new(own)),
            counts.clone(),
            negotiated.clone(),
            request.clone(),
            mode.clone(),
        );
        tasks.push(tokio::spawn(async move {
            // Bounded by the deadline: every round takes at least one network exchange.
            while Instant::now() < deadline {
                let Ok(tcp) = TcpStream::connect(address).await else {
                    counts.failed.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let name = ServerName::try_from("localhost").unwrap();
                let Ok(mut stream) = connector.connect(name, tcp).await else {
                    counts.failed.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                {
                    let (_, session) = stream.get_ref();
                    if session.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                        counts.resumed.fetch_add(1, Ordering::Relaxed);
                    }
                    let mut shown = negotiated.lock().unwrap();
                    if shown.is_empty() {
                        *shown = format!(
                            "suite={:?} group={:?}",
                            session.negotiated_cipher_suite().map(|s| s.suite()),
                            session.negotiated_key_exchange_group().map(|g| g.name())
                        );
                    }
                }
                if mode == "keepalive" {
                    let mut buffer = Vec::with_capacity(4096);
                    while Instant::now() < deadline {
                        match exchange(&mut stream, &request, &mut buffer).await {
                            Ok(()) => counts.ops.fetch_add(1, Ordering::Relaxed),
                            Err(_) => {
                                counts.failed.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                        };
                    }
                } else {
                    let mut answer = Vec::with_capacity(1024);
                    let done = async {
                        stream.write_all(request.as_bytes()).await?;
                        stream.read_to_end(&mut answer).await
                    };
                    match done.await {
                        Ok(_) if answer.starts_with(b"HTTP/1.1 200") => {
                            counts.ops.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            counts.failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    println!(
        "ops={} failed={} resumed={} {}",
        counts.ops.load(Ordering::Relaxed),
        counts.failed.load(Ordering::Relaxed),
        counts.resumed.load(Ordering::Relaxed),
        negotiated.lock().unwrap()
    );
}

/// One request and its `Content-Length` answer on a kept-alive connection.
async fn exchange<S>(stream: &mut S, request: &str, buffer: &mut Vec<u8>) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream.write_all(request.as_bytes()).await?;
    buffer.clear();
    let mut chunk = [0u8; 4096];
    // Bounded by the answer's size: each read adds bytes or fails.
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::other("closed"));
        }
        buffer.extend_from_slice(&chunk[..n]);
        let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buffer[..end]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") {
            return Err(std::io::Error::other("not 200"));
        }
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| std::io::Error::other("no content-length"))?;
        if buffer.len() >= end + 4 + length {
            return Ok(());
        }
    }
}
