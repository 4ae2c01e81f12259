//! The TOML file ops write, validated whole and compiled into an immutable
//! [`ConfigSnapshot`]: each app's [`Keyring`] (HMAC keys built once, not per request)
//! and, from `[auth]` and the app, its [`TokenRules`] (contract §2's leeway and
//! developer tokens). `config` uses `token`, never the reverse.
//!
//! By concern: `schema` is the file as written, `build` validates it section by
//! section, `locate` turns an error into a place, `diff` tells a reload what needs a
//! restart (and `config check` what a reload would change and which secrets are weak). Every error names the file, `line:column` and the key, e.g.
//! `config.toml:14:1: apps[1].api_key: duplicate api_key "demo-key" (first defined at line 9)`.

mod build;
mod diff;

pub use diff::{DEMO_SECRET, MIN_SECRET_BYTES};
mod locate;
mod redis;
mod schema;
mod tls;

use crate::time::Cutoff;
use crate::token::{Keyring, TokenRules};
use build::{build, build_settings};
use locate::Locator;
pub use redis::{RedisSettings, redact_url};
use schema::RawConfig;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
#[cfg(feature = "proxy")]
pub use tls::CertifiedKey;
pub use tls::TlsSettings;

/// A config that could not be loaded. The message always says where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read config: {message}")]
    Io {
        /// The config file.
        file: PathBuf,
        /// The OS error.
        message: String,
    },
    /// The file was read but is not a valid config.
    #[error("{file}:{line}:{column}: {key}: {message}")]
    Invalid {
        /// The config file.
        file: PathBuf,
        /// 1-based line of the offending key or value.
        line: usize,
        /// 1-based column.
        column: usize,
        /// Dotted path of the key, e.g. `apps[1].secrets`.
        key: String,
        /// What is wrong and what is expected.
        message: String,
    },
}

impl ConfigError {
    /// The dotted key path, when the error is about a key.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            ConfigError::Io { .. } => None,
        }
    }
}

/// `[server]`: what the proxy listens on. Changing these needs a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    /// Client-facing listen address.
    pub listen: SocketAddr,
    /// Admin listener (`/healthz`, `/readyz`, `/metrics`, `/config`); `None` disables it.
    pub admin_listen: Option<SocketAddr>,
    /// Proxy worker threads.
    pub threads: usize,
    /// Tokio work stealing between proxy threads (off measured faster on 2 cores).
    pub work_stealing: bool,
    /// How long in-flight requests get to finish after SIGTERM.
    pub grace_period: Duration,
    /// Longest a request head may take to arrive, from its first byte (contract §6
    /// rule 6). Read per connection, so a reload applies to new connections.
    pub header_timeout: Duration,
    /// Longest pause between two reads of a client's request body (Pingora's 60 s
    /// default, the same on both engines); past it the request ends. Read per request.
    pub client_body_timeout: Duration,
    /// Largest request head (request line and headers) accepted (contract §6 rule 6).
    pub max_header_bytes: usize,
    /// `[server.tls]`: serve clients over TLS (HTTP/2 and HTTP/1.1 by ALPN). Turning it
    /// on or off needs a restart; the certificate itself is reloaded.
    pub tls: Option<TlsSettings>,
    /// Which forwarding engine serves the listener.
    pub engine: Engine,
}

/// `[server] engine`: how the proxy forwards a request once the gate let it through.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Engine {
    /// Pingora's `ProxyHttp` pipeline with [`crate::proxy::ChatAuthFilter`]: what a user
    /// who embeds chatgate in their own Pingora proxy runs, and what serves WebSocket
    /// upgrades and HTTP/2 for both engines.
    Filter,
    /// chatgate's own keep-alive loop on pingora-core (the default since issue 16's
    /// measurement: fewer CPU per request than the filter): each client connection owns
    /// one upstream connection. WebSocket upgrades and HTTP/2 go to the filter engine.
    #[default]
    Forward,
}

/// `[limits]`: failed-authentication rate limiting (contract §6 rule 7). Reloadable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LimitsSettings {
    /// Refusals with codes 2, 5, 17, 40-43 one client address may cause per minute
    /// before its requests are answered 429 (code 9); `None` turns the limit off.
    pub failed_auth_per_minute: Option<u32>,
    /// Peers whose `X-Forwarded-For` names the client.
    pub trusted_proxies: TrustedProxies,
}

/// Peer addresses (single addresses or CIDR blocks) whose `X-Forwarded-For` is believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<ipnet::IpNet>);

impl TrustedProxies {
    /// A set of networks; a single address is a /32 (or /128).
    pub fn new(networks: Vec<ipnet::IpNet>) -> Self {
        TrustedProxies(networks)
    }

    /// Parses one config entry: `"10.0.0.0/8"`, `"127.0.0.1"`, `"::1"`, `"fd00::/8"`.
    pub fn parse_entry(entry: &str) -> Result<ipnet::IpNet, String> {
        let text = entry.trim();
        if let Ok(net) = text.parse::<ipnet::IpNet>() {
            return Ok(net.trunc());
        }
        text.parse::<std::net::IpAddr>()
            .map(ipnet::IpNet::from)
            .map_err(|_| {
                format!(
                    "{entry:?} is not an IP address or CIDR block: expected e.g. \"10.0.0.0/8\", \"127.0.0.1\" or \"::1\""
                )
            })
    }

    /// Whether `address` is a trusted proxy (an IPv4-mapped IPv6 address counts as
    /// its IPv4 address).
    pub fn contains(&self, address: std::net::IpAddr) -> bool {
        let address = address.to_canonical();
        self.0.iter().any(|net| net.contains(&address))
    }

    /// Whether no proxy is trusted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// `[log]`: the access log (`chatgate::access`) and the log format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    /// Text or JSON lines. Read once at start: a reload cannot change it.
    pub format: LogFormat,
    /// Put the verified user id in the access log (`false` for privacy-sensitive
    /// deployments: the line keeps app and auth kind).
    pub user_ids: bool,
}

/// `[log] format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (ANSI colour only on a terminal).
    Text,
    /// One JSON object a line, for log shippers.
    Json,
}

/// `[upstream]`: where allowed requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSettings {
    /// `host:port` of each upstream, used round robin.
    pub addresses: Vec<String>,
    /// Connect to the upstream with TLS.
    pub tls: bool,
    /// SNI / Host for TLS (defaults to the address's host).
    pub sni: Option<String>,
    /// Verify the upstream's certificate.
    pub verify_cert: bool,
    /// Send `x-chatgate-user-id` / `x-chatgate-auth` to the upstream.
    pub forward_identity: bool,
    /// Upstream connect timeout.
    pub connect_timeout: Duration,
    /// Upstream read timeout for plain HTTP requests.
    pub read_timeout: Duration,
    /// Idle timeout of a proxied WebSocket (either direction).
    pub websocket_idle_timeout: Duration,
    /// Start chatgate's built-in demo chat API on the first upstream address (quickstart only).
    pub demo: bool,
}

/// `[auth]`: token checks shared by every app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthSettings {
    /// Allowed clock skew for `exp`, `nbf` and `iat`.
    pub leeway_seconds: i64,
    /// Longest token accepted (code 5 beyond).
    pub max_token_bytes: usize,
    /// Paths served without auth.
    pub public_paths: PublicPaths,
}

/// Paths that need no token: exact paths, or prefixes written with a trailing `*`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublicPaths {
    exact: Vec<String>,
    prefixes: Vec<String>,
}

impl PublicPaths {
    /// Builds the set from config entries (`/healthz`, `/public/*`).
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(paths: I) -> Self {
        let mut set = PublicPaths::default();
        for path in paths {
            let path = path.into();
            match path.strip_suffix('*') {
                Some(prefix) => set.prefixes.push(prefix.to_owned()),
                None => set.exact.push(path),
            }
        }
        set
    }

    /// Whether a request path needs no auth.
    pub fn contains(&self, path: &str) -> bool {
        self.exact.iter().any(|p| p == path) || self.prefixes.iter().any(|p| path.starts_with(p))
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.prefixes.is_empty()
    }
}

/// Which revocation store backs the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreKind {
    /// In process memory (tests, single process, nothing survives a restart).
    Memory,
    /// A crash-safe database file (the default).
    Embedded,
    /// Redis, shared by several instances.
    Redis,
}

/// What to do with a cache miss while the store cannot answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreErrorPolicy {
    /// Answer 503 (the default: a revoked token must not get through because Redis blinked).
    Deny,
    /// Let the token through on its signature and times alone.
    Allow,
}

/// `[revocation]`.
#[derive(Clone, PartialEq, Eq)]
pub struct RevocationSettings {
    /// The backend.
    pub store: StoreKind,
    /// Database file of the embedded store.
    pub path: PathBuf,
    /// Redis URL of the redis store.
    pub redis_url: String,
    /// How long a cached cutoff (or "none") is trusted without an event.
    pub cache_ttl: Duration,
    /// Most cutoffs cached.
    pub cache_capacity: u64,
    /// Cache-miss behaviour while the store is down.
    pub on_store_error: StoreErrorPolicy,
    /// Longest wait for the store on a cache miss.
    pub store_timeout: Duration,
    /// How the redis store reaches, authenticates to and trusts Redis.
    pub redis: RedisSettings,
}

impl std::fmt::Debug for RevocationSettings {
    // `redis_url` may hold a password: logs get the redacted form.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RevocationSettings")
            .field("store", &self.store)
            .field("path", &self.path)
            .field("redis_url", &redact_url(&self.redis_url))
            .field("cache_ttl", &self.cache_ttl)
            .field("cache_capacity", &self.cache_capacity)
            .field("on_store_error", &self.on_store_error)
            .field("store_timeout", &self.store_timeout)
            .field("redis", &self.redis)
            .finish()
    }
}

/// One `[[apps]]` entry, with its [`Keyring`] (HMAC keys prebuilt, verified tokens).
pub struct App {
    /// The app's public API key (`api_key` query parameter).
    pub api_key: Arc<str>,
    keyring: Keyring,
    /// Accept developer tokens (signature `devtoken`).
    pub disable_auth_checks: bool,
    /// Accept `stream-auth-type: anonymous` without a token.
    pub allow_anonymous: bool,
    /// App-wide cutoff from the config file.
    pub revoke_tokens_issued_before: Option<Cutoff>,
}

impl App {
    /// Builds an app from its secrets (first = the one new tokens are signed with).
    pub fn new(api_key: &str, secrets: Vec<String>) -> Self {
        App {
            api_key: Arc::from(api_key),
            keyring: Keyring::new(secrets),
            disable_auth_checks: false,
            allow_anonymous: false,
            revoke_tokens_issued_before: None,
        }
    }

    /// The app's secrets and the tokens they verified (part of the snapshot: a reload
    /// starts afresh).
    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// What this app's tokens must satisfy: `[auth]`'s leeway and size limit, and the
    /// app's own `disable_auth_checks`. Derived on each use (three words), so that the
    /// public settings stay the one place each value is written.
    pub fn token_rules(&self, auth: &AuthSettings) -> TokenRules {
        TokenRules {
            leeway_seconds: auth.leeway_seconds,
            max_token_bytes: auth.max_token_bytes,
            developer_tokens: self.disable_auth_checks,
        }
    }

    /// The secret new tokens are signed with (the first listed).
    pub fn signing_secret(&self) -> &str {
        self.keyring.signing_secret()
    }

    /// The number of secrets accepted.
    pub fn secret_count(&self) -> usize {
        self.keyring.secret_count()
    }
}

impl std::fmt::Debug for App {
    // Secrets never reach logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("api_key", &self.api_key)
            .field(
                "secrets",
                &format_args!("[{} redacted]", self.keyring.secret_count()),
            )
            .field("disable_auth_checks", &self.disable_auth_checks)
            .field("allow_anonymous", &self.allow_anonymous)
            .field(
                "revoke_tokens_issued_before",
                &self.revoke_tokens_issued_before,
            )
            .finish()
    }
}

/// A whole validated config. Immutable: a reload builds a new one and swaps it in.
#[derive(Debug)]
pub struct ConfigSnapshot {
    /// The file it came from (empty for configs built in code).
    pub source: PathBuf,
    /// Short SHA-256 of the file's bytes.
    pub content_hash: String,
    /// When it was built.
    pub loaded_at: SystemTime,
    /// `[server]`.
    pub server: ServerSettings,
    /// `[upstream]`.
    pub upstream: UpstreamSettings,
    /// `[auth]`.
    pub auth: AuthSettings,
    /// `[revocation]`.
    pub revocation: RevocationSettings,
    /// `[log]`.
    pub log: LogSettings,
    /// `[limits]`.
    pub limits: LimitsSettings,
    // foldhash: the table is fixed at load, so a caller's keys cannot flood it, and
    // the lookup is on every request.
    apps: HashMap<Arc<str>, Arc<App>, foldhash::fast::RandomState>,
    app_order: Vec<Arc<str>>,
}

impl ConfigSnapshot {
    /// Reads, validates and compiles a config file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Io {
            file: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::parse(&text, path)
    }

    /// Validates and compiles config text; `path` names the file in errors and anchors
    /// relative paths (`secret_file`, `[revocation] path`).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        Self::parse_with_env(text, path, &|name| std::env::var(name).ok())
    }

    /// [`ConfigSnapshot::parse`] reading `secret_env` variables through `env`.
    pub fn parse_with_env(
        text: &str,
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let locator = Locator::new(text, path);
        let raw: RawConfig = toml::from_str(text).map_err(|e| locator.toml_error(&e))?;
        let base_dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        build(raw, &locator, base_dir, text, env)
    }

    /// A config with defaults for everything and the given apps (for code and tests).
    pub fn with_apps(apps: Vec<App>) -> Self {
        let raw = RawConfig::default();
        let locator = Locator::new("", Path::new(""));
        let mut snapshot =
            build_settings(&raw, &locator, Path::new("."), "").expect("defaults are valid");
        for app in apps {
            snapshot.insert_app(app);
        }
        snapshot
    }

    fn insert_app(&mut self, app: App) {
        let key = app.api_key.clone();
        self.app_order.push(key.clone());
        self.apps.insert(key, Arc::new(app));
    }

    /// Replaces `[auth]` (for configs built in code).
    pub fn with_auth(mut self, auth: AuthSettings) -> Self {
        self.auth = auth;
        self
    }

    /// Replaces `[revocation]` (for configs built in code).
    pub fn with_revocation(mut self, revocation: RevocationSettings) -> Self {
        self.revocation = revocation;
        self
    }

    /// The app with this api_key.
    pub fn app(&self, api_key: &str) -> Option<&Arc<App>> {
        self.apps.get(api_key)
    }

    /// Apps in file order.
    pub fn apps(&self) -> impl Iterator<Item = &Arc<App>> {
        self.app_order.iter().map(|k| &self.apps[k])
    }
}

/// Short SHA-256 of a config file's text: what `/config` shows and what a reload
/// compares to skip an unchanged file.
pub(crate) fn content_hash(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
pub(super) mod tests {
    //! Shared by the tests of the submodules: a valid file and the located error.
    use super::*;

    pub(crate) const VALID: &str = r#"
[server]
listen = "127.0.0.1:8080"

[upstream]
addresses = ["127.0.0.1:3030"]

[auth]
leeway_seconds = 5
public_paths = ["/healthz", "/public/*"]

[revocation]
store = "memory"

[[apps]]
api_key = "demo-key"
secrets = ["new-secret", "old-secret"]
disable_auth_checks = true

[[apps]]
api_key = "other"
secrets = ["s"]
revoke_tokens_issued_before = "2026-01-01T00:00:00Z"
"#;

    pub(crate) fn parse(text: &str) -> Result<ConfigSnapshot, ConfigError> {
        ConfigSnapshot::parse(text, Path::new("chatgate.toml"))
    }

    pub(crate) fn invalid(text: &str) -> (usize, usize, String, String) {
        match parse(text).unwrap_err() {
            ConfigError::Invalid {
                line,
                column,
                key,
                message,
                ..
            } => (line, column, key, message),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_valid_file_compiles_with_keys_and_defaults() {
        let config = parse(VALID).unwrap();
        let app = config.app("demo-key").unwrap();
        assert_eq!(app.keyring().secret_count(), 2);
        assert!(app.disable_auth_checks);
        assert_eq!(config.revocation.store, StoreKind::Memory);
        assert_eq!(config.revocation.on_store_error, StoreErrorPolicy::Deny);
        assert!(config.auth.public_paths.contains("/healthz"));
        assert!(config.auth.public_paths.contains("/public/x"));
        assert!(!config.auth.public_paths.contains("/healthzz"));
        assert_eq!(
            config
                .app("other")
                .unwrap()
                .revoke_tokens_issued_before
                .unwrap()
                .unix_seconds(),
            1_767_225_600
        );
        assert_eq!(config.apps().count(), 2);
        assert_eq!(config.content_hash.len(), 16);
    }

    #[test]
    fn error_display_names_file_line_column_and_key() {
        let text = VALID.replace("store = \"memory\"", "store = \"etcd\"");
        let shown = parse(&text).unwrap_err().to_string();
        assert!(
            shown.starts_with("chatgate.toml:13:1: revocation.store: unknown store"),
            "{shown}"
        );
    }
}
