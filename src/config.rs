//! The TOML file ops write, validated whole and compiled into an immutable
//! [`ConfigSnapshot`] (HMAC keys built once, not per request).
//!
//! Every error names the file, `line:column` and the key, e.g.
//! `config.toml:14:1: apps[1].api_key: duplicate api_key "demo-key" (first defined at line 9)`.

use crate::time::{Cutoff, now_unix, parse_stream_time};
use crate::token::HmacKey;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

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

// === raw, as written ===

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    upstream: RawUpstream,
    #[serde(default)]
    auth: RawAuth,
    #[serde(default)]
    revocation: RawRevocation,
    #[serde(default)]
    apps: Vec<RawApp>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    admin_listen: Option<String>,
    threads: Option<usize>,
    work_stealing: Option<bool>,
    grace_period_seconds: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    addresses: Option<Vec<String>>,
    tls: Option<bool>,
    sni: Option<String>,
    verify_cert: Option<bool>,
    forward_identity: Option<bool>,
    connect_timeout_ms: Option<u64>,
    read_timeout_ms: Option<u64>,
    websocket_idle_timeout_seconds: Option<u64>,
    demo: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    leeway_seconds: Option<i64>,
    max_token_bytes: Option<usize>,
    public_paths: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRevocation {
    store: Option<String>,
    path: Option<String>,
    redis_url: Option<String>,
    cache_ttl_seconds: Option<u64>,
    cache_capacity: Option<u64>,
    on_store_error: Option<String>,
    store_timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApp {
    api_key: Option<String>,
    #[serde(default)]
    secrets: Vec<String>,
    secret_env: Option<StringOrList>,
    secret_file: Option<String>,
    #[serde(default)]
    disable_auth_checks: bool,
    #[serde(default)]
    allow_anonymous: bool,
    revoke_tokens_issued_before: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StringOrList {
    One(String),
    Many(Vec<String>),
}

// === validated ===

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
#[derive(Debug, Clone, PartialEq, Eq)]
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
}

/// One `[[apps]]` entry, with its HMAC keys prebuilt.
pub struct App {
    /// The app's public API key (`api_key` query parameter).
    pub api_key: Arc<str>,
    keys: Vec<HmacKey>,
    secrets: Vec<String>,
    /// Accept developer tokens (signature `devtoken`).
    pub disable_auth_checks: bool,
    /// Accept `stream-auth-type: anonymous` without a token.
    pub allow_anonymous: bool,
    /// App-wide cutoff from the config file.
    pub revoke_tokens_issued_before: Option<Cutoff>,
    verified: crate::token::VerifiedTokens,
}

impl App {
    /// Builds an app from its secrets (first = the one new tokens are signed with).
    pub fn new(api_key: &str, secrets: Vec<String>) -> Self {
        App {
            api_key: Arc::from(api_key),
            keys: secrets.iter().map(|s| HmacKey::new(s.as_bytes())).collect(),
            secrets,
            disable_auth_checks: false,
            allow_anonymous: false,
            revoke_tokens_issued_before: None,
            verified: crate::token::VerifiedTokens::default(),
        }
    }

    /// Tokens this app already verified (part of the snapshot: a reload starts afresh).
    pub fn verified_tokens(&self) -> &crate::token::VerifiedTokens {
        &self.verified
    }

    /// The prebuilt keys, in rotation order.
    pub fn keys(&self) -> &[HmacKey] {
        &self.keys
    }

    /// The secret new tokens are signed with (the first listed).
    pub fn signing_secret(&self) -> &str {
        &self.secrets[0]
    }

    /// The number of secrets accepted.
    pub fn secret_count(&self) -> usize {
        self.secrets.len()
    }
}

impl std::fmt::Debug for App {
    // Secrets never reach logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("api_key", &self.api_key)
            .field(
                "secrets",
                &format_args!("[{} redacted]", self.secrets.len()),
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

    /// Settings that differ from `newer` but only take effect after a restart.
    pub fn restart_required_changes(&self, newer: &ConfigSnapshot) -> Vec<&'static str> {
        let mut changed = Vec::new();
        if self.server.listen != newer.server.listen {
            changed.push("server.listen");
        }
        if self.server.admin_listen != newer.server.admin_listen {
            changed.push("server.admin_listen");
        }
        if self.server.threads != newer.server.threads {
            changed.push("server.threads");
        }
        if self.server.work_stealing != newer.server.work_stealing {
            changed.push("server.work_stealing");
        }
        if self.revocation.store != newer.revocation.store
            || self.revocation.path != newer.revocation.path
            || self.revocation.redis_url != newer.revocation.redis_url
        {
            changed.push("revocation.store");
        }
        if self.upstream.tls != newer.upstream.tls || self.upstream.demo != newer.upstream.demo {
            changed.push("upstream.tls");
        }
        changed
    }
}

fn build_settings(
    raw: &RawConfig,
    at: &Locator,
    base_dir: &Path,
    text: &str,
) -> Result<ConfigSnapshot, ConfigError> {
    let server = &raw.server;
    let listen = parse_socket_addr(
        server.listen.as_deref().unwrap_or("127.0.0.1:8080"),
        at,
        "server.listen",
    )?;
    let admin_listen = match server.admin_listen.as_deref() {
        Some("") | Some("off") => None,
        other => Some(parse_socket_addr(
            other.unwrap_or("127.0.0.1:9090"),
            at,
            "server.admin_listen",
        )?),
    };
    let threads = server.threads.unwrap_or(1);
    if threads == 0 || threads > 1024 {
        return Err(at.error("server.threads", "must be between 1 and 1024"));
    }

    let upstream = &raw.upstream;
    let addresses = upstream
        .addresses
        .clone()
        .unwrap_or_else(|| vec!["127.0.0.1:3030".to_owned()]);
    if addresses.is_empty() {
        return Err(at.error(
            "upstream.addresses",
            "needs at least one upstream address (\"host:port\")",
        ));
    }
    for (i, address) in addresses.iter().enumerate() {
        validate_host_port(address)
            .map_err(|m| at.error(&format!("upstream.addresses[{i}]"), &m))?;
    }
    let positive_ms = |value: Option<u64>, default: u64, key: &str| {
        let ms = value.unwrap_or(default);
        if ms == 0 {
            Err(at.error(key, "must be greater than 0"))
        } else {
            Ok(Duration::from_millis(ms))
        }
    };

    let auth = &raw.auth;
    let leeway_seconds = auth.leeway_seconds.unwrap_or(5);
    if !(0..=86_400).contains(&leeway_seconds) {
        return Err(at.error("auth.leeway_seconds", "must be between 0 and 86400"));
    }
    let max_token_bytes = auth.max_token_bytes.unwrap_or(4096);
    if !(64..=65_536).contains(&max_token_bytes) {
        return Err(at.error("auth.max_token_bytes", "must be between 64 and 65536"));
    }
    let public_paths = auth
        .public_paths
        .clone()
        .unwrap_or_else(|| vec!["/healthz".to_owned()]);
    for (i, path) in public_paths.iter().enumerate() {
        if !path.starts_with('/') {
            return Err(at.error(
                &format!("auth.public_paths[{i}]"),
                &format!("{path:?} must start with '/'"),
            ));
        }
        if path.trim_end_matches('*').contains('*') {
            return Err(at.error(
                &format!("auth.public_paths[{i}]"),
                "'*' is only allowed at the end, as a prefix match",
            ));
        }
    }

    let revocation = &raw.revocation;
    let store = match revocation.store.as_deref().unwrap_or("embedded") {
        "memory" => StoreKind::Memory,
        "embedded" => StoreKind::Embedded,
        "redis" => StoreKind::Redis,
        other => {
            return Err(at.error(
                "revocation.store",
                &format!("unknown store {other:?}: expected \"memory\", \"embedded\" or \"redis\""),
            ));
        }
    };
    let on_store_error = match revocation.on_store_error.as_deref().unwrap_or("deny") {
        "deny" => StoreErrorPolicy::Deny,
        "allow" => StoreErrorPolicy::Allow,
        other => {
            return Err(at.error(
                "revocation.on_store_error",
                &format!("unknown policy {other:?}: expected \"deny\" or \"allow\""),
            ));
        }
    };
    let redis_url = revocation
        .redis_url
        .clone()
        .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned());
    if !(redis_url.starts_with("redis://")
        || redis_url.starts_with("rediss://")
        || redis_url.starts_with("redis+unix://")
        || redis_url.starts_with("unix://"))
    {
        return Err(at.error(
            "revocation.redis_url",
            "must be a redis:// (or rediss://, unix://) URL",
        ));
    }
    let path = revocation
        .path
        .clone()
        .unwrap_or_else(|| "chatgate-revocations.db".to_owned());
    if path.is_empty() {
        return Err(at.error("revocation.path", "must not be empty"));
    }
    let cache_ttl_seconds = revocation.cache_ttl_seconds.unwrap_or(60);
    if cache_ttl_seconds == 0 {
        return Err(at.error("revocation.cache_ttl_seconds", "must be greater than 0"));
    }
    let cache_capacity = revocation.cache_capacity.unwrap_or(1_000_000);
    if cache_capacity == 0 {
        return Err(at.error("revocation.cache_capacity", "must be greater than 0"));
    }

    Ok(ConfigSnapshot {
        source: at.file.clone(),
        content_hash: content_hash(text),
        loaded_at: SystemTime::now(),
        server: ServerSettings {
            listen,
            admin_listen,
            threads,
            work_stealing: server.work_stealing.unwrap_or(false),
            grace_period: Duration::from_secs(server.grace_period_seconds.unwrap_or(30)),
        },
        upstream: UpstreamSettings {
            addresses,
            tls: upstream.tls.unwrap_or(false),
            sni: upstream.sni.clone().filter(|s| !s.is_empty()),
            verify_cert: upstream.verify_cert.unwrap_or(true),
            forward_identity: upstream.forward_identity.unwrap_or(false),
            connect_timeout: positive_ms(
                upstream.connect_timeout_ms,
                2_000,
                "upstream.connect_timeout_ms",
            )?,
            read_timeout: positive_ms(
                upstream.read_timeout_ms,
                30_000,
                "upstream.read_timeout_ms",
            )?,
            websocket_idle_timeout: Duration::from_secs(
                upstream
                    .websocket_idle_timeout_seconds
                    .unwrap_or(3_600)
                    .max(1),
            ),
            demo: upstream.demo.unwrap_or(false),
        },
        auth: AuthSettings {
            leeway_seconds,
            max_token_bytes,
            public_paths: PublicPaths::new(public_paths),
        },
        revocation: RevocationSettings {
            store,
            path: base_dir.join(path),
            redis_url,
            cache_ttl: Duration::from_secs(cache_ttl_seconds),
            cache_capacity,
            on_store_error,
            store_timeout: positive_ms(
                revocation.store_timeout_ms,
                250,
                "revocation.store_timeout_ms",
            )?,
        },
        apps: HashMap::default(),
        app_order: Vec::new(),
    })
}

fn build(
    raw: RawConfig,
    at: &Locator,
    base_dir: &Path,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ConfigSnapshot, ConfigError> {
    let mut snapshot = build_settings(&raw, at, base_dir, text)?;
    if raw.apps.is_empty() {
        return Err(at.error(
            "apps",
            "no [[apps]] configured: add at least one with api_key and secrets",
        ));
    }
    let mut first_seen: HashMap<String, usize> = HashMap::new();
    for (i, app) in raw.apps.into_iter().enumerate() {
        let key_of = |field: &str| format!("apps[{i}].{field}");
        let api_key = app
            .api_key
            .clone()
            .ok_or_else(|| at.error(&format!("apps[{i}]"), "missing api_key"))?;
        if api_key.trim().is_empty() {
            return Err(at.error(&key_of("api_key"), "must not be empty"));
        }
        if let Some(first) = first_seen.get(&api_key) {
            let first_line = at.position(&format!("apps[{first}].api_key")).0;
            return Err(at.error(
                &key_of("api_key"),
                &format!("duplicate api_key {api_key:?} (first defined at line {first_line})"),
            ));
        }
        first_seen.insert(api_key.clone(), i);

        let mut secrets = Vec::new();
        for (j, secret) in app.secrets.iter().enumerate() {
            if secret.is_empty() {
                return Err(at.error(&format!("apps[{i}].secrets[{j}]"), "secret is empty"));
            }
            secrets.push(secret.clone());
        }
        if let Some(env_names) = &app.secret_env {
            let names = match env_names {
                StringOrList::One(name) => vec![name.clone()],
                StringOrList::Many(names) => names.clone(),
            };
            for name in names {
                match env(&name) {
                    Some(value) if !value.is_empty() => secrets.push(value),
                    Some(_) => {
                        return Err(at.error(
                            &key_of("secret_env"),
                            &format!("environment variable {name} is empty"),
                        ));
                    }
                    None => {
                        return Err(at.error(
                            &key_of("secret_env"),
                            &format!("environment variable {name} is not set"),
                        ));
                    }
                }
            }
        }
        if let Some(file) = &app.secret_file {
            let file_path = base_dir.join(file);
            let content = std::fs::read_to_string(&file_path).map_err(|e| {
                at.error(
                    &key_of("secret_file"),
                    &format!("cannot read {}: {e}", file_path.display()),
                )
            })?;
            let before = secrets.len();
            secrets.extend(
                content
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_owned),
            );
            if secrets.len() == before {
                return Err(at.error(
                    &key_of("secret_file"),
                    &format!("{} holds no secret", file_path.display()),
                ));
            }
        }
        if secrets.is_empty() {
            return Err(at.error(
                &format!("apps[{i}]"),
                "no secret: set secrets = [\"...\"], secret_env = \"VAR\" or secret_file = \"path\"",
            ));
        }
        let revoke_tokens_issued_before = match &app.revoke_tokens_issued_before {
            None => None,
            Some(text) => {
                let at_time = parse_stream_time(text).map_err(|m| {
                    at.error(&key_of("revoke_tokens_issued_before"), &m.to_string())
                })?;
                if at_time.timestamp() > now_unix() + 300 {
                    return Err(at.error(
                        &key_of("revoke_tokens_issued_before"),
                        "is more than 5 minutes in the future",
                    ));
                }
                Some(Cutoff::from_datetime(at_time))
            }
        };
        let mut compiled = App::new(&api_key, secrets);
        compiled.disable_auth_checks = app.disable_auth_checks;
        compiled.allow_anonymous = app.allow_anonymous;
        compiled.revoke_tokens_issued_before = revoke_tokens_issued_before;
        snapshot.insert_app(compiled);
    }
    Ok(snapshot)
}

fn parse_socket_addr(text: &str, at: &Locator, key: &str) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|_| {
        at.error(
            key,
            &format!("{text:?} is not an address: expected \"ip:port\" like \"127.0.0.1:8080\""),
        )
    })
}

fn validate_host_port(address: &str) -> Result<(), String> {
    if address.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let bad = || format!("{address:?} is not an address: expected \"host:port\"");
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if host_ok && port.parse::<u16>().is_ok_and(|p| p != 0) {
        Ok(())
    } else {
        Err(bad())
    }
}

pub(crate) fn content_hash(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

// === locating keys in the source ===

/// Maps dotted key paths to `line:column` and back, using toml_edit's spans.
struct Locator<'a> {
    text: &'a str,
    file: PathBuf,
    document: Option<toml_edit::Document<&'a str>>,
}

#[derive(Clone, Copy)]
enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

fn split_path(path: &str) -> Vec<Segment<'_>> {
    let mut segments = Vec::new();
    for part in path.split('.') {
        let (name, rest) = part.split_once('[').unwrap_or((part, ""));
        if !name.is_empty() {
            segments.push(Segment::Key(name));
        }
        for index in rest.split('[') {
            if let Ok(i) = index.trim_end_matches(']').parse() {
                segments.push(Segment::Index(i));
            }
        }
    }
    segments
}

impl<'a> Locator<'a> {
    fn new(text: &'a str, file: &Path) -> Self {
        Locator {
            text,
            file: file.to_path_buf(),
            document: toml_edit::Document::parse(text).ok(),
        }
    }

    fn error(&self, key: &str, message: &str) -> ConfigError {
        let (line, column) = self.position(key);
        ConfigError::Invalid {
            file: self.file.clone(),
            line,
            column,
            key: key.to_owned(),
            message: message.to_owned(),
        }
    }

    /// Where a key is written; its nearest written parent when it is missing.
    fn position(&self, key: &str) -> (usize, usize) {
        let offset = self.span_of(key).map(|s| s.start).unwrap_or(0);
        self.line_col(offset)
    }

    fn span_of(&self, key: &str) -> Option<Range<usize>> {
        let document = self.document.as_ref()?;
        let mut node = Node::Table(document.as_table());
        let mut best = None;
        for segment in split_path(key) {
            let next = match (node, segment) {
                (Node::Table(t), Segment::Key(name)) => {
                    best = t.key(name).and_then(|k| k.span()).or(best);
                    t.get(name).map(Node::from_item)
                }
                (Node::Value(toml_edit::Value::InlineTable(t)), Segment::Key(name)) => {
                    best = t.key(name).and_then(|k| k.span()).or(best);
                    t.get(name).map(Node::Value)
                }
                (Node::Tables(tables), Segment::Index(i)) => tables.get(i).map(Node::Table),
                (Node::Value(toml_edit::Value::Array(values)), Segment::Index(i)) => {
                    values.get(i).map(Node::Value)
                }
                _ => None,
            };
            let Some(next) = next else { break };
            // Values inside arrays have no key of their own: their own span is the anchor.
            match (next, segment) {
                (Node::Value(v), Segment::Index(_)) => best = v.span().or(best),
                (Node::Table(t), Segment::Index(_)) => best = t.span().or(best),
                _ => {}
            }
            node = next;
        }
        best
    }

    fn line_col(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        (line, column)
    }

    /// The dotted path of the deepest key whose key or value covers `offset`.
    fn key_at(&self, offset: usize) -> Option<String> {
        key_in_table(self.document.as_ref()?.as_table(), offset, "")
    }

    fn toml_error(&self, error: &toml::de::Error) -> ConfigError {
        let offset = error.span().map(|s| s.start).unwrap_or(0);
        let (line, column) = self.line_col(offset);
        let key = self
            .key_at(offset)
            .or_else(|| quoted_field(error.message()))
            .unwrap_or_else(|| "(document)".to_owned());
        ConfigError::Invalid {
            file: self.file.clone(),
            line,
            column,
            key,
            message: error.message().trim().to_owned(),
        }
    }
}

#[derive(Clone, Copy)]
enum Node<'d> {
    Table(&'d toml_edit::Table),
    Tables(&'d toml_edit::ArrayOfTables),
    Value(&'d toml_edit::Value),
    None,
}

impl<'d> Node<'d> {
    fn from_item(item: &'d toml_edit::Item) -> Self {
        match item {
            toml_edit::Item::Table(t) => Node::Table(t),
            toml_edit::Item::ArrayOfTables(t) => Node::Tables(t),
            toml_edit::Item::Value(v) => Node::Value(v),
            toml_edit::Item::None => Node::None,
        }
    }
}

fn join_key(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_owned()
    } else {
        format!("{parent}.{name}")
    }
}

fn covers(span: Option<Range<usize>>, offset: usize) -> bool {
    span.is_some_and(|s| s.contains(&offset))
}

/// Depth-first: a table's own span covers only its header, so every child is searched.
fn key_in_table(table: &toml_edit::Table, offset: usize, parent: &str) -> Option<String> {
    for (name, item) in table.iter() {
        let path = join_key(parent, name);
        if covers(table.key(name).and_then(|k| k.span()), offset) {
            return Some(path);
        }
        let found = match item {
            toml_edit::Item::Table(t) => key_in_table(t, offset, &path)
                .or_else(|| covers(t.span(), offset).then(|| path.clone())),
            toml_edit::Item::ArrayOfTables(tables) => {
                tables.iter().enumerate().find_map(|(i, t)| {
                    let indexed = format!("{path}[{i}]");
                    key_in_table(t, offset, &indexed)
                        .or_else(|| covers(t.span(), offset).then_some(indexed))
                })
            }
            toml_edit::Item::Value(value) => key_in_value(value, offset, &path),
            toml_edit::Item::None => None,
        };
        if found.is_some() {
            return found;
        }
    }
    None
}

fn key_in_value(value: &toml_edit::Value, offset: usize, path: &str) -> Option<String> {
    match value {
        toml_edit::Value::Array(values) => values
            .iter()
            .enumerate()
            .find_map(|(i, v)| key_in_value(v, offset, &format!("{path}[{i}]")))
            .or_else(|| covers(value.span(), offset).then(|| path.to_owned())),
        toml_edit::Value::InlineTable(t) => t
            .iter()
            .find_map(|(name, v)| key_in_value(v, offset, &join_key(path, name)))
            .or_else(|| covers(value.span(), offset).then(|| path.to_owned())),
        _ => covers(value.span(), offset).then(|| path.to_owned()),
    }
}

fn quoted_field(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let end = start + message[start..].find('`')?;
    Some(message[start..end].to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = r#"
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

    fn parse(text: &str) -> Result<ConfigSnapshot, ConfigError> {
        ConfigSnapshot::parse(text, Path::new("chatgate.toml"))
    }

    fn invalid(text: &str) -> (usize, usize, String, String) {
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
        assert_eq!(app.keys().len(), 2);
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
    fn unknown_keys_are_rejected_with_their_line_and_name() {
        let text = VALID.replace("leeway_seconds = 5", "leeway_seconds = 5\nleway = 3");
        let (line, _, key, message) = invalid(&text);
        assert_eq!(line, 10);
        assert_eq!(key, "auth.leway");
        assert!(message.contains("unknown field"), "{message}");
    }

    #[test]
    fn duplicate_api_keys_point_at_the_second_one() {
        let text = VALID.replace("api_key = \"other\"", "api_key = \"demo-key\"");
        let (line, column, key, message) = invalid(&text);
        assert_eq!((line, column), (21, 1));
        assert_eq!(key, "apps[1].api_key");
        assert!(message.contains("line 16"), "{message}");
    }

    #[test]
    fn empty_and_missing_secrets_are_errors() {
        let text = VALID.replace("secrets = [\"s\"]", "secrets = [\"\"]");
        let (line, _, key, _) = invalid(&text);
        assert_eq!((line, key.as_str()), (22, "apps[1].secrets[0]"));

        let text = VALID.replace("secrets = [\"s\"]\n", "");
        let (line, _, key, message) = invalid(&text);
        assert_eq!((line, key.as_str()), (20, "apps[1]"));
        assert!(message.contains("no secret"));
    }

    #[test]
    fn bad_times_addresses_and_stores_are_errors_naming_the_key() {
        let cases = [
            (
                VALID.replace("2026-01-01T00:00:00Z", "soon"),
                "apps[1].revoke_tokens_issued_before",
                23,
            ),
            (
                VALID.replace("\"127.0.0.1:3030\"", "\"nowhere\""),
                "upstream.addresses[0]",
                6,
            ),
            (
                VALID.replace("listen = \"127.0.0.1:8080\"", "listen = \"localhost\""),
                "server.listen",
                3,
            ),
            (
                VALID.replace("store = \"memory\"", "store = \"etcd\""),
                "revocation.store",
                13,
            ),
        ];
        for (text, expected_key, expected_line) in cases {
            let (line, _, key, _) = invalid(&text);
            assert_eq!(key, expected_key);
            assert_eq!(line, expected_line, "{expected_key}");
        }
    }

    #[test]
    fn a_wrong_type_names_the_key() {
        let text = VALID.replace("leeway_seconds = 5", "leeway_seconds = \"5\"");
        let (line, _, key, _) = invalid(&text);
        assert_eq!((line, key.as_str()), (9, "auth.leeway_seconds"));
    }

    #[test]
    fn a_truncated_file_is_an_error_not_a_partial_config() {
        let cut = &VALID[..VALID.find("secrets = [\"new").unwrap() + 12];
        assert!(parse(cut).is_err());
        let cut = &VALID[..VALID.find("[[apps]]").unwrap()];
        let (_, _, key, _) = invalid(cut);
        assert_eq!(key, "apps");
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

    #[test]
    fn secrets_from_env_and_file_are_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret.txt"), "# rotated\nfile-secret\n").unwrap();
        let env = |name: &str| (name == "CHATGATE_SECRET").then(|| "env-secret".to_owned());
        let text = "[[apps]]\napi_key = \"k\"\nsecret_env = \"CHATGATE_SECRET\"\nsecret_file = \"secret.txt\"\n";
        let config =
            ConfigSnapshot::parse_with_env(text, &dir.path().join("c.toml"), &env).unwrap();
        assert_eq!(config.app("k").unwrap().secret_count(), 2);
        assert_eq!(config.app("k").unwrap().signing_secret(), "env-secret");

        let text = "[[apps]]\napi_key = \"k\"\nsecret_env = \"CHATGATE_TEST_UNSET_VAR_9\"\n";
        let err = ConfigSnapshot::parse(text, &dir.path().join("c.toml")).unwrap_err();
        assert!(
            err.to_string()
                .contains("CHATGATE_TEST_UNSET_VAR_9 is not set"),
            "{err}"
        );
    }
}
