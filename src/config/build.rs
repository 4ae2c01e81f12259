//! From the file as written to a validated [`ConfigSnapshot`]: defaults, ranges and
//! formats, one function per section so that each rule sits next to its section, and
//! per app the [`Keyring`](crate::token::Keyring) built once at load. Every refusal
//! goes through the [`Locator`], so it names the file, `line:column` and the key.

use super::locate::Locator;
use super::schema::{
    RawApp, RawAuth, RawConfig, RawLimits, RawLog, RawRevocation, RawServer, RawUpstream,
    StringOrList,
};
use super::{
    App, AuthSettings, ConfigError, ConfigSnapshot, Engine, LimitsSettings, LogFormat, LogSettings,
    PublicPaths, RevocationSettings, ServerSettings, StoreErrorPolicy, StoreKind, TrustedProxies,
    UpstreamSettings, content_hash,
};
use crate::time::{Cutoff, now_unix, parse_stream_time};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

/// Every section but `[[apps]]`, validated, in a snapshot with no app yet.
pub(super) fn build_settings(
    raw: &RawConfig,
    at: &Locator,
    base_dir: &Path,
    text: &str,
) -> Result<ConfigSnapshot, ConfigError> {
    Ok(ConfigSnapshot {
        source: at.file().to_path_buf(),
        content_hash: content_hash(text),
        loaded_at: SystemTime::now(),
        server: server(&raw.server, at, base_dir)?,
        upstream: upstream(&raw.upstream, at)?,
        auth: auth(&raw.auth, at)?,
        revocation: revocation(&raw.revocation, at, base_dir)?,
        log: log(&raw.log, at)?,
        limits: limits(&raw.limits, at)?,
        apps: HashMap::default(),
        app_order: Vec::new(),
    })
}

/// The whole file: the settings, then at least one app, api_keys unique.
pub(super) fn build(
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
        let api_key = app
            .api_key
            .clone()
            .ok_or_else(|| at.error(&format!("apps[{i}]"), "missing api_key"))?;
        if api_key.trim().is_empty() {
            return Err(at.error(&format!("apps[{i}].api_key"), "must not be empty"));
        }
        if let Some(first) = first_seen.get(&api_key) {
            let first_line = at.position(&format!("apps[{first}].api_key")).0;
            return Err(at.error(
                &format!("apps[{i}].api_key"),
                &format!("duplicate api_key {api_key:?} (first defined at line {first_line})"),
            ));
        }
        first_seen.insert(api_key.clone(), i);
        snapshot.insert_app(build_app(i, &api_key, &app, at, base_dir, env)?);
    }
    Ok(snapshot)
}

fn server(
    server: &RawServer,
    at: &Locator,
    base_dir: &Path,
) -> Result<ServerSettings, ConfigError> {
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
    let max_header_bytes = server.max_header_bytes.unwrap_or(65_536);
    // Pingora's own hard cap on a request head is 1 MiB - 1 (`MAX_HEADER_SIZE`).
    if !(1_024..=1_048_575).contains(&max_header_bytes) {
        return Err(at.error(
            "server.max_header_bytes",
            "must be between 1024 and 1048575",
        ));
    }
    let engine = match server.engine.as_deref() {
        Some("filter") => Engine::Filter,
        None | Some("forward") => Engine::Forward,
        Some(_) => {
            return Err(at.error("server.engine", "must be \"filter\" or \"forward\""));
        }
    };
    Ok(ServerSettings {
        engine,
        listen,
        admin_listen,
        threads,
        work_stealing: server.work_stealing.unwrap_or(false),
        grace_period: Duration::from_secs(server.grace_period_seconds.unwrap_or(30)),
        header_timeout: positive_ms(
            at,
            server.header_timeout_ms,
            10_000,
            "server.header_timeout_ms",
        )?,
        client_body_timeout: positive_ms(
            at,
            server.client_body_timeout_ms,
            60_000,
            "server.client_body_timeout_ms",
        )?,
        max_header_bytes: max_header_bytes as usize,
        tls: match &server.tls {
            Some(tls) => Some(super::tls::build_tls(tls, at, base_dir)?),
            None => None,
        },
    })
}

/// `[limits]` (contract §6 rule 7): off unless `failed_auth_per_minute` is set.
fn limits(limits: &RawLimits, at: &Locator) -> Result<LimitsSettings, ConfigError> {
    let failed_auth_per_minute = match limits.failed_auth_per_minute {
        None => None,
        Some(n @ 1..=100_000) => Some(n),
        Some(_) => {
            return Err(at.error(
                "limits.failed_auth_per_minute",
                "must be between 1 and 100000 (leave it out to turn the limit off)",
            ));
        }
    };
    let mut trusted = Vec::new();
    for (i, entry) in limits.trusted_proxies.iter().flatten().enumerate() {
        let net = TrustedProxies::parse_entry(entry)
            .map_err(|m| at.error(&format!("limits.trusted_proxies[{i}]"), &m))?;
        trusted.push(net);
    }
    Ok(LimitsSettings {
        failed_auth_per_minute,
        trusted_proxies: TrustedProxies::new(trusted),
    })
}

fn log(log: &RawLog, at: &Locator) -> Result<LogSettings, ConfigError> {
    let format = match log.format.as_deref().unwrap_or("text") {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            return Err(at.error(
                "log.format",
                &format!("unknown format {other:?}: \"text\" or \"json\""),
            ));
        }
    };
    Ok(LogSettings {
        format,
        user_ids: log.user_ids.unwrap_or(true),
    })
}

fn upstream(upstream: &RawUpstream, at: &Locator) -> Result<UpstreamSettings, ConfigError> {
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
    Ok(UpstreamSettings {
        addresses,
        tls: upstream.tls.unwrap_or(false),
        sni: upstream.sni.clone().filter(|s| !s.is_empty()),
        verify_cert: upstream.verify_cert.unwrap_or(true),
        forward_identity: upstream.forward_identity.unwrap_or(false),
        connect_timeout: positive_ms(
            at,
            upstream.connect_timeout_ms,
            2_000,
            "upstream.connect_timeout_ms",
        )?,
        read_timeout: positive_ms(
            at,
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
    })
}

fn auth(auth: &RawAuth, at: &Locator) -> Result<AuthSettings, ConfigError> {
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
    Ok(AuthSettings {
        leeway_seconds,
        max_token_bytes,
        public_paths: PublicPaths::new(public_paths),
    })
}

fn revocation(
    revocation: &RawRevocation,
    at: &Locator,
    base_dir: &Path,
) -> Result<RevocationSettings, ConfigError> {
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
    Ok(RevocationSettings {
        store,
        path: base_dir.join(path),
        redis_url,
        cache_ttl: Duration::from_secs(cache_ttl_seconds),
        cache_capacity,
        on_store_error,
        store_timeout: positive_ms(
            at,
            revocation.store_timeout_ms,
            250,
            "revocation.store_timeout_ms",
        )?,
        redis: super::redis::build_redis_settings(revocation, at, base_dir)?,
    })
}

/// One `[[apps]]` entry (its api_key already checked): its secrets from every source,
/// its keyring, its flags and its app-wide cutoff.
fn build_app(
    i: usize,
    api_key: &str,
    app: &RawApp,
    at: &Locator,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<App, ConfigError> {
    let secrets = app_secrets(i, app, at, base_dir, env)?;
    let key = format!("apps[{i}].revoke_tokens_issued_before");
    let revoke_tokens_issued_before = match &app.revoke_tokens_issued_before {
        None => None,
        Some(text) => {
            let at_time = parse_stream_time(text).map_err(|m| at.error(&key, &m.to_string()))?;
            if at_time.timestamp() > now_unix() + 300 {
                return Err(at.error(&key, "is more than 5 minutes in the future"));
            }
            Some(Cutoff::from_datetime(at_time))
        }
    };
    let mut compiled = App::new(api_key, secrets);
    compiled.disable_auth_checks = app.disable_auth_checks;
    compiled.allow_anonymous = app.allow_anonymous;
    compiled.revoke_tokens_issued_before = revoke_tokens_issued_before;
    Ok(compiled)
}

/// An app's secrets in rotation order: `secrets`, then `secret_env`, then
/// `secret_file` (one a line, `#` comments skipped); none may be empty.
fn app_secrets(
    i: usize,
    app: &RawApp,
    at: &Locator,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<String>, ConfigError> {
    let key_of = |field: &str| format!("apps[{i}].{field}");
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
    Ok(secrets)
}

fn positive_ms(
    at: &Locator,
    value: Option<u64>,
    default: u64,
    key: &str,
) -> Result<Duration, ConfigError> {
    match value.unwrap_or(default) {
        0 => Err(at.error(key, "must be greater than 0")),
        ms => Ok(Duration::from_millis(ms)),
    }
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

#[cfg(test)]
mod tests {
    use crate::config::ConfigSnapshot;
    use crate::config::tests::{VALID, invalid};

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
    fn the_engine_is_forward_unless_the_filter_is_asked_for() {
        let config = crate::config::tests::parse(VALID).unwrap();
        assert_eq!(config.server.engine, crate::config::Engine::Forward);
        let listen = "listen = \"127.0.0.1:8080\"";
        let filter = VALID.replace(listen, &format!("{listen}\nengine = \"filter\""));
        let config = crate::config::tests::parse(&filter).unwrap();
        assert_eq!(config.server.engine, crate::config::Engine::Filter);
        let forward = VALID.replace(listen, &format!("{listen}\nengine = \"forward\""));
        let config = crate::config::tests::parse(&forward).unwrap();
        assert_eq!(config.server.engine, crate::config::Engine::Forward);
        let unknown = VALID.replace(listen, &format!("{listen}\nengine = \"hyper\""));
        let (line, _, key, _) = invalid(&unknown);
        assert_eq!((key.as_str(), line), ("server.engine", 4));
    }

    #[test]
    fn limits_and_head_bounds_are_read_with_defaults_and_located_errors() {
        let config = crate::config::tests::parse(VALID).unwrap();
        assert_eq!(config.limits.failed_auth_per_minute, None);
        assert!(config.limits.trusted_proxies.is_empty());
        assert_eq!(config.server.header_timeout.as_millis(), 10_000);
        assert_eq!(config.server.client_body_timeout.as_millis(), 60_000);
        assert_eq!(config.server.max_header_bytes, 65_536);

        let with = |extra: &str| {
            VALID.replace(
                "[revocation]",
                &format!("[limits]\n{extra}\n\n[revocation]"),
            )
        };
        let text = with(
            "failed_auth_per_minute = 20\ntrusted_proxies = [\"10.0.0.0/8\", \" ::1 \", \"192.168.1.7\"]",
        );
        let config = crate::config::tests::parse(&text).unwrap();
        assert_eq!(config.limits.failed_auth_per_minute, Some(20));
        for trusted in ["10.200.0.1", "::1", "192.168.1.7", "::ffff:10.0.0.1"] {
            assert!(
                config
                    .limits
                    .trusted_proxies
                    .contains(trusted.parse().unwrap()),
                "{trusted}"
            );
        }
        assert!(
            !config
                .limits
                .trusted_proxies
                .contains("192.168.1.8".parse().unwrap())
        );

        for (extra, key, line) in [
            (
                "trusted_proxies = [\"10.0.0.0/8\",\n  \"10.0.0.0/33\"]",
                "limits.trusted_proxies[1]",
                14,
            ),
            (
                "trusted_proxies = [\"proxy.internal\"]",
                "limits.trusted_proxies[0]",
                13,
            ),
            (
                "failed_auth_per_minute = 0",
                "limits.failed_auth_per_minute",
                13,
            ),
        ] {
            let (got_line, _, got_key, message) = invalid(&with(extra));
            assert_eq!(
                (got_key.as_str(), got_line),
                (key, line),
                "{extra}: {message}"
            );
        }
        let in_server = |extra: &str| {
            VALID.replace(
                "listen = \"127.0.0.1:8080\"",
                &format!("listen = \"127.0.0.1:8080\"\n{extra}"),
            )
        };
        for (extra, key) in [
            ("max_header_bytes = 100", "server.max_header_bytes"),
            ("header_timeout_ms = 0", "server.header_timeout_ms"),
            (
                "client_body_timeout_ms = 0",
                "server.client_body_timeout_ms",
            ),
        ] {
            let (line, _, got_key, message) = invalid(&in_server(extra));
            assert_eq!((got_key.as_str(), line), (key, 4), "{extra}: {message}");
        }
        let text = in_server("client_body_timeout_ms = 2500");
        let config = crate::config::tests::parse(&text).unwrap();
        assert_eq!(config.server.client_body_timeout.as_millis(), 2500);
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
