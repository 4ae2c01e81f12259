//! Shared by the proxy test binaries: a recording test upstream and the `chatgate`
//! binary started on loopback with a temporary config.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const KEY: &str = "key";
pub const SECRET: &str = "secret";
/// An app that accepts developer tokens and anonymous users.
pub const DEV_KEY: &str = "devkey";
pub const DEV_SECRET: &str = "devsecret";
/// A second tenant, with its own secret (written only when [`ProxyOptions::second_app`]).
pub const KEY_B: &str = "key-b";
pub const SECRET_B: &str = "b-secret-7f3c9e21d4";

/// Longest any single network step may take in a test.
pub const STEP: Duration = Duration::from_secs(10);

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub target: String,
    /// Lower-case names; a repeated header keeps its last value (see [`Recorded::raw_head`]).
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
    /// The request head exactly as it arrived, request line to the blank line.
    pub raw_head: Vec<u8>,
}

impl Recorded {
    /// Every `(name, value)` header line of the raw head, names as sent, in order.
    pub fn header_lines(&self) -> Vec<(String, String)> {
        String::from_utf8_lossy(&self.raw_head)
            .split("\r\n")
            .skip(1)
            .filter(|line| !line.is_empty())
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.to_owned(), value.trim().to_owned()))
            .collect()
    }

    /// Every value sent under `name` (compared case-insensitively), in order.
    pub fn header_values(&self, name: &str) -> Vec<String> {
        self.header_lines()
            .into_iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
            .collect()
    }
}

/// How the test upstream behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Answer HTTP with a JSON echo; accept WebSockets at once, greet, then echo.
    Echo,
    /// Accept connections and read, but never answer.
    Silent,
    /// Answer HTTP like `Echo`, but only after [`SLOW_ANSWER`].
    Slow,
    /// Read the request, then close the connection without a byte of answer: what a
    /// client sees of an upstream process killed while it works on the request.
    CloseBeforeAnswer,
    /// Read the request, then reset the connection (RST) without answering.
    ResetBeforeAnswer,
    /// Send the head and half of a [`FAULT_BODY_LEN`] body, then reset (RST).
    ResetMidBody,
    /// Send the head and half of a [`FAULT_BODY_LEN`] body, then close (FIN).
    CloseMidBody,
    /// Send the head and half of a [`FAULT_BODY_LEN`] body, then say nothing more.
    StallMidBody,
}

/// The `content-length` the mid-body fault behaviours announce (and half of which they send).
pub const FAULT_BODY_LEN: usize = 64 * 1024;

/// How long a [`Behaviour::Slow`] upstream takes to answer.
pub const SLOW_ANSWER: Duration = Duration::from_millis(1500);

/// The forwarding engine the proxy tests run on (issue 16): always `filter` in the
/// `filter_engine` test binary (which includes the other proxy test binaries to run
/// them on the filter engine); elsewhere `CHATGATE_TEST_ENGINE` (`filter` or
/// `forward`) when set, else the binary's default (`None`).
pub fn test_engine() -> Option<String> {
    if env!("CARGO_CRATE_NAME") == "filter_engine" {
        return Some("filter".to_owned());
    }
    // Set but empty (`CHATGATE_TEST_ENGINE= cargo test`) means unset.
    std::env::var("CHATGATE_TEST_ENGINE")
        .ok()
        .filter(|engine| !engine.is_empty())
}

/// `config` (a whole config file's text, with a `[server]` table) set to run on
/// [`test_engine`]. Every test that writes a config for the `chatgate` binary passes it
/// through here, so one variable moves the whole proxy suite to the other engine.
pub fn with_test_engine(config: &str) -> String {
    let Some(engine) = test_engine() else {
        return config.to_owned();
    };
    assert!(
        config.starts_with("[server]\n") && !config.contains("\nengine ="),
        "a proxy test config starts with its [server] table and leaves the engine to the harness"
    );
    config.replacen(
        "[server]\n",
        &format!("[server]\nengine = \"{engine}\"\n"),
        1,
    )
}

/// A loopback upstream that records what reaches it.
pub struct TestUpstream {
    pub address: SocketAddr,
    pub seen: Arc<Mutex<Vec<Recorded>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestUpstream {
    pub async fn start(behaviour: Behaviour) -> Self {
        Self::start_at(behaviour, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// On `address` (e.g. the one a dropped upstream had, to bring it back).
    pub async fn start_at(behaviour: Behaviour, address: SocketAddr) -> Self {
        let listener = TcpListener::bind(address).await.unwrap();
        let address = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recorder = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let recorder = recorder.clone();
                tokio::spawn(async move {
                    let _ = connection(stream, recorder, behaviour).await;
                });
            }
        });
        TestUpstream {
            address,
            seen,
            task,
        }
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.seen.lock().unwrap().clone()
    }
}

/// Reads one request head (and a Content-Length body); `None` at a clean EOF.
async fn read_request(
    stream: &mut TcpStream,
    buffer: &mut Vec<u8>,
) -> std::io::Result<Option<Recorded>> {
    let head_end = loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        if buffer.len() > 64 * 1024 {
            return Err(std::io::Error::other("request head too large"));
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let method = first.next().unwrap_or("").to_owned();
    let target = first.next().unwrap_or("").to_owned();
    let mut headers = HashMap::new();
    for line in lines.filter(|l| !l.is_empty()) {
        if let Some((name, value)) = line.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
        }
    }
    let length: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buffer.len() < head_end + length {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::other("body cut short"));
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
    let body = buffer[head_end..head_end + length].to_vec();
    let raw_head = buffer[..head_end].to_vec();
    buffer.drain(..head_end + length);
    Ok(Some(Recorded {
        method,
        target,
        headers,
        body,
        raw_head,
    }))
}

async fn connection(
    mut stream: TcpStream,
    recorder: Arc<Mutex<Vec<Recorded>>>,
    behaviour: Behaviour,
) -> std::io::Result<()> {
    let mut buffer = Vec::new();
    // Bounded by the client: each iteration answers one request or ends.
    while let Some(request) = read_request(&mut stream, &mut buffer).await? {
        recorder.lock().unwrap().push(request.clone());
        if behaviour == Behaviour::Silent {
            // Hold the connection open without answering.
            tokio::time::sleep(Duration::from_secs(120)).await;
            return Ok(());
        }
        let upgrade = request
            .headers
            .get("upgrade")
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
        if upgrade {
            let key = request
                .headers
                .get("sec-websocket-key")
                .cloned()
                .unwrap_or_default();
            // Answer at once and greet before the client says anything: the fast
            // upstream that trips Pingora's upgrade handling if the empty request
            // body is not settled before the 101.
            let head = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                chatgate::ws::accept_key(key.as_bytes())
            );
            stream.write_all(head.as_bytes()).await?;
            stream
                .write_all(&chatgate::ws::text_frame(
                    health_check(&request.target).as_bytes(),
                ))
                .await?;
            return echo_websocket(stream).await;
        }
        match behaviour {
            Behaviour::Slow => tokio::time::sleep(SLOW_ANSWER).await,
            Behaviour::CloseBeforeAnswer => return Ok(()),
            Behaviour::ResetBeforeAnswer => {
                stream.set_zero_linger()?;
                return Ok(());
            }
            Behaviour::ResetMidBody | Behaviour::CloseMidBody | Behaviour::StallMidBody => {
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {FAULT_BODY_LEN}\r\n\r\n"
                );
                stream.write_all(head.as_bytes()).await?;
                stream.write_all(&[b'x'; FAULT_BODY_LEN / 2]).await?;
                stream.flush().await?;
                match behaviour {
                    Behaviour::ResetMidBody => stream.set_zero_linger()?,
                    Behaviour::StallMidBody => tokio::time::sleep(Duration::from_secs(120)).await,
                    _ => {}
                }
                return Ok(());
            }
            Behaviour::Echo | Behaviour::Silent => {}
        }
        let body = serde_json::json!({
            "method": request.method,
            "target": request.target,
            "user": request.headers.get("x-chatgate-user-id"),
            "body_len": request.body.len(),
        })
        .to_string();
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{}",
            body.len(),
            body
        );
        stream.write_all(response.as_bytes()).await?;
    }
    Ok(())
}

/// Stream's first frame on `/connect`: the SDKs wait for it (with a `connection_id`
/// and `me`) before `connectUser` resolves.
pub fn health_check(target: &str) -> String {
    let query = target.split_once('?').map_or("", |(_, q)| q);
    let user = form_urlencoded::parse(query.as_bytes())
        .find(|(name, _)| name == "json")
        .and_then(|(_, json)| serde_json::from_str::<serde_json::Value>(&json).ok())
        .and_then(|json| json["user_id"].as_str().map(str::to_owned));
    serde_json::json!({
        "type": "health.check",
        "connection_id": "test-connection",
        "cid": "*",
        "me": user.map(|id| serde_json::json!({"id": id})),
    })
    .to_string()
}

async fn echo_websocket(stream: TcpStream) -> std::io::Result<()> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::Role;
    let mut socket =
        tokio_tungstenite::WebSocketStream::from_raw_socket(stream, Role::Server, None).await;
    // Bounded by the client closing the socket.
    while let Some(Ok(message)) = socket.next().await {
        match message {
            // "later:<ms>:<text>": answer after a pause, so a test can change something
            // while the upstream has an answer on its way.
            Message::Text(text) if text.starts_with("later:") => {
                let (ms, rest) = text["later:".len()..].split_once(':').unwrap_or(("0", ""));
                tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
                let answer = Message::Text(format!("echo:{rest}").into());
                if socket.send(answer).await.is_err() {
                    break;
                }
            }
            Message::Text(text)
                if socket
                    .send(Message::Text(format!("echo:{text}").into()))
                    .await
                    .is_err() =>
            {
                break;
            }
            Message::Text(_) => {}
            Message::Close(_) => break,
            _ => {}
        }
    }
    Ok(())
}

/// A port that was free a moment ago.
pub use ports::free_port;

#[path = "../support/ports.rs"]
mod ports;

/// The `chatgate serve` process, killed on drop.
pub struct Proxy {
    pub address: SocketAddr,
    pub admin: SocketAddr,
    child: Child,
    config: tempfile::NamedTempFile,
    config_text: String,
    /// Where stdout and stderr go when [`ProxyOptions::capture_output`] is set.
    output: Option<tempfile::NamedTempFile>,
}

fn upgrade_sock_for(listen_port: u16) -> PathBuf {
    std::env::temp_dir().join(format!("chatgate-test-{listen_port}.sock"))
}

/// A chatgate started with `--upgrade`, killed on drop.
pub struct Successor(Child);

impl Successor {
    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        self.0.try_wait().unwrap().is_none()
    }
}

impl Drop for Successor {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Options of a test proxy's config.
#[derive(Debug, Clone, Default)]
pub struct ProxyOptions {
    pub upstreams: Vec<String>,
    pub forward_identity: bool,
    pub read_timeout_ms: Option<u64>,
    pub websocket_idle_timeout_seconds: Option<u64>,
    pub demo: bool,
    /// `(sni, verify_cert)`: connect to the upstream with TLS.
    pub tls: Option<(String, bool)>,
    /// `[auth] public_paths` (left out of the file when empty).
    pub public_paths: Vec<String>,
    /// `[server] header_timeout_ms`.
    pub header_timeout_ms: Option<u64>,
    /// `[server] max_header_bytes`.
    pub max_header_bytes: Option<u64>,
    /// `[server] client_body_timeout_ms`.
    pub client_body_timeout_ms: Option<u64>,
    /// `[limits] failed_auth_per_minute`.
    pub failed_auth_per_minute: Option<u32>,
    /// `[limits] trusted_proxies`; the `[limits]` section is written when this or
    /// `failed_auth_per_minute` is set.
    pub trusted_proxies: Vec<String>,
    /// A second app, [`KEY_B`] with [`SECRET_B`].
    pub second_app: bool,
    /// The lines of the `[revocation]` section (default `store = "memory"`).
    pub revocation: Option<String>,
    /// `RUST_LOG` of the proxy (default `warn`).
    pub rust_log: Option<String>,
    /// Write the proxy's stdout and stderr to a file ([`Proxy::output`]) instead of
    /// discarding stdout and sharing the test's stderr.
    pub capture_output: bool,
    /// `[server] grace_period_seconds` (default here: 3).
    pub grace_period_seconds: Option<u64>,
    /// `[auth] leeway_seconds` (default 5).
    pub leeway_seconds: Option<u64>,
}

impl Proxy {
    /// Sends SIGTERM (Pingora's graceful shutdown) and returns at once.
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// The Unix socket listening sockets are handed over on in an upgrade.
    pub fn upgrade_sock(&self) -> PathBuf {
        upgrade_sock_for(self.address.port())
    }

    /// Starts a second chatgate on the same config with `--upgrade`: it waits on
    /// [`Proxy::upgrade_sock`] for this one's listening sockets. Killed on drop.
    pub fn start_successor(&self) -> Successor {
        let child = Command::new(env!("CARGO_BIN_EXE_chatgate"))
            .args(["serve", "--upgrade", "--config"])
            .arg(self.config.path())
            .arg("--upgrade-sock")
            .arg(self.upgrade_sock())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the chatgate binary runs");
        Successor(child)
    }

    /// Sends SIGQUIT: hand the listening sockets to a successor, then drain.
    pub fn quit(&self) {
        self.signal("QUIT");
    }

    /// Waits (at most `limit`) for the process to exit.
    pub async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        for _ in 0..(limit.as_millis() / 50).max(1) {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("chatgate did not exit within {limit:?}");
    }

    pub async fn start(options: ProxyOptions) -> Self {
        let listen_port = free_port();
        let admin_port = free_port();
        let upstreams: Vec<String> = options
            .upstreams
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect();
        let mut server_extra = String::new();
        if let Some(ms) = options.header_timeout_ms {
            server_extra.push_str(&format!("header_timeout_ms = {ms}\n"));
        }
        if let Some(ms) = options.client_body_timeout_ms {
            server_extra.push_str(&format!("client_body_timeout_ms = {ms}\n"));
        }
        if let Some(bytes) = options.max_header_bytes {
            server_extra.push_str(&format!("max_header_bytes = {bytes}\n"));
        }
        let mut text = format!(
            "[server]\nlisten = \"127.0.0.1:{listen_port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\nthreads = 1\ngrace_period_seconds = {grace}\n{server_extra}\
             [upstream]\naddresses = [{}]\nforward_identity = {}\ndemo = {}\nconnect_timeout_ms = 1000\n",
            upstreams.join(", "),
            options.forward_identity,
            options.demo,
            grace = options.grace_period_seconds.unwrap_or(3),
        );
        if let Some(ms) = options.read_timeout_ms {
            text.push_str(&format!("read_timeout_ms = {ms}\n"));
        }
        if let Some((sni, verify_cert)) = &options.tls {
            text.push_str(&format!(
                "tls = true\nsni = \"{sni}\"\nverify_cert = {verify_cert}\n"
            ));
        }
        if let Some(s) = options.websocket_idle_timeout_seconds {
            text.push_str(&format!("websocket_idle_timeout_seconds = {s}\n"));
        }
        if !options.public_paths.is_empty() || options.leeway_seconds.is_some() {
            let paths: Vec<String> = options
                .public_paths
                .iter()
                .map(|p| format!("\"{p}\""))
                .collect();
            text.push_str(&format!("[auth]\npublic_paths = [{}]\n", paths.join(", ")));
            if let Some(leeway) = options.leeway_seconds {
                text.push_str(&format!("leeway_seconds = {leeway}\n"));
            }
        }
        if options.failed_auth_per_minute.is_some() || !options.trusted_proxies.is_empty() {
            text.push_str("[limits]\n");
            if let Some(n) = options.failed_auth_per_minute {
                text.push_str(&format!("failed_auth_per_minute = {n}\n"));
            }
            let proxies: Vec<String> = options
                .trusted_proxies
                .iter()
                .map(|p| format!("\"{p}\""))
                .collect();
            text.push_str(&format!("trusted_proxies = [{}]\n", proxies.join(", ")));
        }
        text.push_str(&format!(
            "[revocation]\n{}\n\
             [[apps]]\napi_key = \"{KEY}\"\nsecrets = [\"{SECRET}\"]\n\
             [[apps]]\napi_key = \"{DEV_KEY}\"\nsecrets = [\"{DEV_SECRET}\"]\ndisable_auth_checks = true\nallow_anonymous = true\n",
            options
                .revocation
                .as_deref()
                .unwrap_or("store = \"memory\"")
        ));
        if options.second_app {
            text.push_str(&format!(
                "[[apps]]\napi_key = \"{KEY_B}\"\nsecrets = [\"{SECRET_B}\"]\n"
            ));
        }
        let text = with_test_engine(&text);
        let mut config = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        config.write_all(text.as_bytes()).unwrap();
        config.flush().unwrap();
        let output = options
            .capture_output
            .then(|| tempfile::Builder::new().suffix(".log").tempfile().unwrap());
        // tracing's fmt layer writes to stdout and Pingora's own messages to stderr:
        // both go to the file, each handle appending so neither overwrites the other.
        let appender = |file: &tempfile::NamedTempFile| {
            std::fs::OpenOptions::new()
                .append(true)
                .open(file.path())
                .unwrap()
        };
        let (stdout, stderr) = match &output {
            Some(file) => (Stdio::from(appender(file)), Stdio::from(appender(file))),
            None => (Stdio::null(), Stdio::inherit()),
        };
        let child = Command::new(env!("CARGO_BIN_EXE_chatgate"))
            .args(["serve", "--config"])
            .arg(config.path())
            .arg("--upgrade-sock")
            .arg(upgrade_sock_for(listen_port))
            .env("RUST_LOG", options.rust_log.as_deref().unwrap_or("warn"))
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("the chatgate binary runs");
        let mut proxy = Proxy {
            address: SocketAddr::from(([127, 0, 0, 1], listen_port)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
            child,
            config,
            config_text: text,
            output,
        };
        proxy.wait_ready().await;
        proxy
    }

    /// Waits until both listeners accept (at most 15 s: a debug build starts slowly
    /// on a busy machine); a process that exits first (e.g. on a config it rejects)
    /// fails at once with its config.
    async fn wait_ready(&mut self) {
        for _ in 0..300 {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "chatgate exited ({status}) before listening; its config was:\n{}",
                    self.config_text
                );
            }
            if TcpStream::connect(self.address).await.is_ok()
                && TcpStream::connect(self.admin).await.is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("chatgate did not start listening on {}", self.address);
    }

    /// Everything the proxy wrote so far (needs [`ProxyOptions::capture_output`]).
    pub fn output(&self) -> String {
        let file = self
            .output
            .as_ref()
            .expect("start the proxy with capture_output");
        String::from_utf8_lossy(&std::fs::read(file.path()).unwrap()).into_owned()
    }

    /// Stops the process (SIGKILL) and waits for it, so its output is complete.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The process id (to sample its `/proc` entries).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The running config file.
    pub fn config_path(&self) -> &std::path::Path {
        self.config.path()
    }

    /// The config text as last written by [`Proxy::start`] or [`Proxy::append_config`].
    pub fn config_text(&self) -> &str {
        &self.config_text
    }

    /// Waits (at most `limit`) until `GET /config` on the admin listener satisfies
    /// `done`; returns that status, or panics with the last one seen.
    pub async fn wait_config_status(
        &self,
        limit: Duration,
        what: &str,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let client = reqwest::Client::new();
        let mut last = serde_json::Value::Null;
        for _ in 0..(limit.as_millis() / 50).max(1) {
            if let Ok(response) = client.get(self.admin_url("/config")).send().await
                && let Ok(status) = response.json::<serde_json::Value>().await
            {
                if done(&status) {
                    return status;
                }
                last = status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{what}: not within {limit:?}; last /config status: {last}");
    }

    /// Appends to the running config file (see [`Proxy::replace_config`]).
    pub fn append_config(&mut self, more: &str) {
        let text = format!("{}{more}", self.config_text);
        self.replace_config(text);
    }

    /// Replaces the running config file with `text` (write to a temp file, then rename
    /// over it, as the README advises).
    pub fn replace_config(&mut self, text: String) {
        self.config_text = text;
        let next = self.config.path().with_extension("next");
        std::fs::write(&next, &self.config_text).unwrap();
        std::fs::rename(&next, self.config.path()).unwrap();
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{path_and_query}", self.address)
    }

    pub fn ws_url(&self, path_and_query: &str) -> String {
        format!("ws://{}{path_and_query}", self.address)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }
}

/// A token for the main app.
pub fn user_token(user: &str) -> String {
    chatgate::TokenBuilder::user(user).sign(SECRET)
}

pub fn server_token() -> String {
    chatgate::TokenBuilder::server().sign(SECRET)
}

/// Runs `future`, failing the test if it takes longer than `limit` (a hang is a failure).
pub async fn within<T>(limit: Duration, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(limit, future)
        .await
        .unwrap_or_else(|_| panic!("test step did not finish within {limit:?}"))
}

/// Asserts that `body` is the contract's error object (§4) with this code and status,
/// and returns its message.
pub fn assert_stream_error(body: &serde_json::Value, code: i64, status: u16) -> String {
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["StatusCode"], status, "{body}");
    assert!(body["duration"].is_string(), "{body}");
    assert!(body["more_info"].is_string(), "{body}");
    let message = body["message"].as_str().unwrap_or_default().to_owned();
    assert!(!message.is_empty(), "{body}");
    message
}

/// `GET /channels` with `token` through the proxy: the status and the JSON body (if any).
pub async fn get_channels(
    client: &reqwest::Client,
    proxy: &Proxy,
    token: &str,
) -> (u16, serde_json::Value) {
    let response = client
        .get(proxy.url(&format!("/channels?api_key={}", KEY)))
        .header("authorization", token)
        .send()
        .await
        .expect("the proxy answers");
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(serde_json::Value::Null);
    (status, body)
}

/// `PATCH /users` through the proxy with a server token, revoking `users` with `cutoff`
/// (Unix seconds): the status and the JSON body.
pub async fn revoke(
    client: &reqwest::Client,
    proxy: &Proxy,
    users: &[String],
    cutoff: i64,
) -> (u16, serde_json::Value) {
    let at = chrono::DateTime::from_timestamp(cutoff, 0)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let body = serde_json::json!({
        "users": users
            .iter()
            .map(|id| serde_json::json!({"id": id, "set": {"revoke_tokens_issued_before": at}}))
            .collect::<Vec<_>>()
    });
    let response = client
        .patch(proxy.url(&format!("/users?api_key={}", KEY)))
        .header("authorization", server_token())
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("the proxy answers");
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(serde_json::Value::Null);
    (status, body)
}
