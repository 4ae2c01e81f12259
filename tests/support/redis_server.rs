//! Throwaway `redis-server` processes on free loopback ports, killed on drop: a plain
//! server, a TLS-only one, a replica, and Sentinels (`redis-server --sentinel`). Shared
//! by the Redis tests and the revocation bench (`#[path]`-included, so no extra crate).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `redis-server`; dropping it kills the process.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    _dir: tempfile::TempDir,
}

/// Whether `redis-server` can be run at all.
#[allow(dead_code)]
pub fn installed() -> bool {
    Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local addr")
        .port()
}

fn answers_ping(port: u16) -> bool {
    let Ok(mut stream) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
    else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut reply = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}

#[allow(dead_code)]
impl RedisServer {
    /// Starts a server on a free port. Panics, with what to install, when
    /// `redis-server` is missing: the Redis tests must not pass by skipping.
    pub fn start() -> Self {
        Self::start_retrying(Self::try_start)
    }

    /// Starts a server on `port` (to restart one in place).
    pub fn start_on(port: u16) -> Self {
        Self::try_start(port).unwrap_or_else(|e| panic!("could not start redis-server: {e}"))
    }

    fn try_start(port: u16) -> Result<Self, String> {
        Self::try_start_with(port, &[], Ready::Ping)
    }

    /// Starts a server on `port` with extra arguments (to bring a killed node back,
    /// e.g. as a replica of the new primary).
    pub fn start_on_with(port: u16, args: &[String]) -> Self {
        Self::try_start_with(port, args, Ready::Ping)
            .unwrap_or_else(|e| panic!("could not start redis-server: {e}"))
    }

    /// Starts a server on a free port with extra `redis-server` arguments (e.g.
    /// `["--replicaof", "127.0.0.1 6379"]`, `["--appendonly", "yes"]`).
    pub fn start_with(args: &[String]) -> Self {
        Self::start_retrying(|port| Self::try_start_with(port, args, Ready::Ping))
    }

    /// Starts a TLS-only server (`--port 0 --tls-port`) with `tls` (from
    /// [`TlsFiles`]) and extra arguments (ACL users...).
    pub fn start_tls(tls: &TlsFiles, args: &[String]) -> Self {
        Self::start_retrying(|port| {
            let mut all: Vec<String> = [
                "--tls-port",
                &port.to_string(),
                "--tls-cert-file",
                &tls.server_cert,
                "--tls-key-file",
                &tls.server_key,
                "--tls-ca-cert-file",
                &tls.ca_cert,
                "--tls-auth-clients",
                "no",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            all.extend(args.iter().cloned());
            Self::try_start_with(0, &all, Ready::Listening(port))
        })
    }

    /// Starts a Sentinel on a free port watching `primary_port` as `master`, with a
    /// quorum of `quorum` and a 1 s down-after.
    pub fn start_sentinel(master: &str, primary_port: u16, quorum: u32) -> Self {
        Self::start_sentinel_with(master, primary_port, quorum, None, "")
    }

    /// The same, TLS-only (`tls-port`, and TLS to the nodes it watches) when `tls` is
    /// set, with `extra` config lines (e.g. `sentinel auth-user`).
    pub fn start_sentinel_with(
        master: &str,
        primary_port: u16,
        quorum: u32,
        tls: Option<&TlsFiles>,
        extra: &str,
    ) -> Self {
        Self::start_retrying(|port| {
            let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
            // A Sentinel rewrites its config file, so it needs one of its own.
            let config = dir.path().join("sentinel.conf");
            let listen = match tls {
                None => format!("port {port}\n"),
                Some(tls) => format!(
                    "port 0\ntls-port {port}\ntls-replication yes\ntls-auth-clients no\n\
                     tls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\n",
                    tls.server_cert, tls.server_key, tls.ca_cert
                ),
            };
            std::fs::write(
                &config,
                format!(
                    "{listen}bind 127.0.0.1\ndir {dir}\n\
                     sentinel monitor {master} 127.0.0.1 {primary_port} {quorum}\n\
                     sentinel down-after-milliseconds {master} 1000\n\
                     sentinel failover-timeout {master} 10000\n\
                     sentinel parallel-syncs {master} 1\n{extra}",
                    dir = dir.path().display()
                ),
            )
            .map_err(|e| e.to_string())?;
            let child = spawn(Command::new("redis-server").arg(&config).arg("--sentinel"))?;
            let ready = match tls {
                None => Ready::Ping,
                Some(_) => Ready::Listening(port),
            };
            RedisServer {
                child: Some(child),
                port,
                _dir: dir,
            }
            .wait_ready(ready)
        })
    }

    fn start_retrying(mut start: impl FnMut(u16) -> Result<Self, String>) -> Self {
        // Another test may take the port between our probe and redis binding it.
        let mut last_error = String::new();
        for _ in 0..5 {
            match start(free_port()) {
                Ok(server) => return server,
                Err(error) => last_error = error,
            }
        }
        panic!("could not start redis-server: {last_error}");
    }

    fn try_start_with(port: u16, args: &[String], ready: Ready) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .args(args);
        let child = spawn(&mut command)?;
        let port = match ready {
            Ready::Listening(tls_port) => tls_port,
            Ready::Ping => port,
        };
        RedisServer {
            child: Some(child),
            port,
            _dir: dir,
        }
        .wait_ready(ready)
    }

    fn wait_ready(mut self, ready: Ready) -> Result<Self, String> {
        let port = self.port;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let up = match ready {
                Ready::Ping => answers_ping(port),
                Ready::Listening(port) => TcpStream::connect_timeout(
                    &([127, 0, 0, 1], port).into(),
                    Duration::from_millis(200),
                )
                .is_ok(),
            };
            if up {
                return Ok(self);
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!("redis-server on port {port} exited: {status}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "redis-server on port {port} did not get ready within 10 s"
        ))
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Sends a signal (`"STOP"`, `"CONT"`) with `kill(1)`, e.g. to make a replica lag.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .expect("kill(1)");
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// Kills it (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// How a started server is known to be up.
#[derive(Clone, Copy)]
enum Ready {
    /// Answers a plain-text PING.
    Ping,
    /// Accepts TCP connections on this (TLS) port.
    Listening(u16),
}

fn spawn(command: &mut Command) -> Result<Child, String> {
    match command.stdout(Stdio::null()).stderr(Stdio::null()).spawn() {
        Ok(child) => Ok(child),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "redis-server is not installed: these tests need a real Redis \
             (apt-get install redis-server redis-sentinel redis-tools; .ci/run installs them)"
        ),
        Err(e) => Err(format!("spawn redis-server: {e}")),
    }
}

/// A CA and a server certificate for 127.0.0.1 it signed, made with the `openssl` CLI
/// in a temporary directory.
#[allow(dead_code)]
pub struct TlsFiles {
    /// The CA certificate (PEM).
    pub ca_cert: String,
    /// The server's certificate (PEM), for IP 127.0.0.1.
    pub server_cert: String,
    /// The server's key (PEM).
    pub server_key: String,
    _dir: tempfile::TempDir,
}

#[allow(dead_code)]
impl TlsFiles {
    /// Generates them (a second or so).
    pub fn generate() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = |name: &str| dir.path().join(name).display().to_string();
        let (ca_key, ca_cert) = (path("ca.key"), path("ca.pem"));
        let (key, csr, cert, ext) = (
            path("server.key"),
            path("server.csr"),
            path("server.pem"),
            path("san.ext"),
        );
        std::fs::write(&ext, "subjectAltName=IP:127.0.0.1\n").unwrap();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .output()
                .expect("the openssl CLI (apt-get install openssl)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=chatgate test CA",
            "-keyout",
            &ca_key,
            "-out",
            &ca_cert,
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            &key,
            "-out",
            &csr,
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_cert,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &cert,
        ]);
        TlsFiles {
            ca_cert,
            server_cert: cert,
            server_key: key,
            _dir: dir,
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
