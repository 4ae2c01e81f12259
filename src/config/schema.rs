//! The config file as written: the `serde` types of `chatgate.toml`, one per table,
//! each refusing unknown keys so that a typo is an error with a location rather than
//! a silently ignored setting. Validation and defaults are in `build`.

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) server: RawServer,
    #[serde(default)]
    pub(super) upstream: RawUpstream,
    #[serde(default)]
    pub(super) auth: RawAuth,
    #[serde(default)]
    pub(super) revocation: RawRevocation,
    #[serde(default)]
    pub(super) log: RawLog,
    #[serde(default)]
    pub(super) limits: RawLimits,
    #[serde(default)]
    pub(super) apps: Vec<RawApp>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) listen: Option<String>,
    pub(super) admin_listen: Option<String>,
    pub(super) threads: Option<usize>,
    pub(super) work_stealing: Option<bool>,
    pub(super) grace_period_seconds: Option<u64>,
    pub(super) header_timeout_ms: Option<u64>,
    pub(super) client_body_timeout_ms: Option<u64>,
    pub(super) max_header_bytes: Option<u64>,
    pub(super) engine: Option<String>,
    pub(super) tls: Option<RawTls>,
}

/// `[server.tls]`: see `tls::build_tls`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) cert_file: Option<String>,
    pub(super) key_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    pub(super) addresses: Option<Vec<String>>,
    pub(super) tls: Option<bool>,
    pub(super) sni: Option<String>,
    pub(super) verify_cert: Option<bool>,
    pub(super) forward_identity: Option<bool>,
    pub(super) connect_timeout_ms: Option<u64>,
    pub(super) read_timeout_ms: Option<u64>,
    pub(super) websocket_idle_timeout_seconds: Option<u64>,
    pub(super) demo: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    pub(super) leeway_seconds: Option<i64>,
    pub(super) max_token_bytes: Option<usize>,
    pub(super) public_paths: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRevocation {
    pub(super) store: Option<String>,
    pub(super) path: Option<String>,
    pub(super) redis_url: Option<String>,
    pub(super) cache_ttl_seconds: Option<u64>,
    pub(super) cache_capacity: Option<u64>,
    pub(super) on_store_error: Option<String>,
    pub(super) store_timeout_ms: Option<u64>,
    // Redis in production (issue 15): see `RedisSettings`.
    pub(super) sentinels: Option<Vec<String>>,
    pub(super) sentinel_master: Option<String>,
    pub(super) redis_ca_file: Option<String>,
    pub(super) redis_password_env: Option<String>,
    pub(super) redis_password_file: Option<String>,
    pub(super) min_replicas_acked: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) failed_auth_per_minute: Option<u32>,
    pub(super) trusted_proxies: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub(super) format: Option<String>,
    pub(super) user_ids: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawApp {
    pub(super) api_key: Option<String>,
    #[serde(default)]
    pub(super) secrets: Vec<String>,
    pub(super) secret_env: Option<StringOrList>,
    pub(super) secret_file: Option<String>,
    #[serde(default)]
    pub(super) disable_auth_checks: bool,
    #[serde(default)]
    pub(super) allow_anonymous: bool,
    pub(super) revoke_tokens_issued_before: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum StringOrList {
    One(String),
    Many(Vec<String>),
}
