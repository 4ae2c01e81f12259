//! The `[revocation]` keys of the redis store in production (issue 15): TLS, credentials,
//! Sentinel and replica acknowledgements, checked whole at load with located errors.
//! No key holds a secret: the password is read from its variable or file when the store
//! connects, and a password inside `redis_url` is shown only through [`redact_url`].

use super::ConfigError;
use super::locate::Locator;
use super::schema::RawRevocation;
use std::path::{Path, PathBuf};

/// The `[revocation]` keys of the redis store beyond `redis_url`. None of them holds a
/// secret: the password is read from `password_env` / `password_file` when the store
/// connects, so it is never part of a config snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedisSettings {
    /// `sentinels`: `host:port` of Redis Sentinels; when set, they name the primary
    /// (`sentinel_master`) and the host in `redis_url` is not used.
    pub sentinels: Vec<String>,
    /// `sentinel_master`: the name the sentinels monitor the primary under.
    pub sentinel_master: Option<String>,
    /// `redis_ca_file`: PEM CA(s) trusted for `rediss://` instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// `redis_password_env`: environment variable holding the password.
    pub password_env: Option<String>,
    /// `redis_password_file`: file holding the password (first line, trimmed).
    pub password_file: Option<PathBuf>,
    /// `min_replicas_acked`: replicas that must hold a revocation before it is
    /// answered 2xx. `None`: 1 when the primary has replicas, else 0.
    pub min_replicas_acked: Option<u32>,
}

/// `url` with the password of its user-info replaced by `***` (for logs, `/config`, the CLI).
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    let user_info = &rest[..at];
    let user = match user_info.split_once(':') {
        Some((user, _password)) => format!("{user}:***"),
        // `redis://x@host`: a lone user-info is a user name, but is often a password
        // pasted in the wrong place; hiding a user name costs nothing.
        None if !user_info.is_empty() => "***".to_owned(),
        None => String::new(),
    };
    format!("{scheme}://{user}{}", &rest[at..])
}

pub(super) fn build_redis_settings(
    revocation: &RawRevocation,
    at: &Locator,
    base_dir: &Path,
) -> Result<RedisSettings, ConfigError> {
    let sentinels = revocation.sentinels.clone().unwrap_or_default();
    for (i, sentinel) in sentinels.iter().enumerate() {
        let valid = sentinel.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !valid {
            return Err(at.error(
                &format!("revocation.sentinels[{i}]"),
                &format!("{sentinel:?} must be host:port"),
            ));
        }
    }
    let sentinel_master = revocation.sentinel_master.clone();
    match (&sentinel_master, sentinels.is_empty()) {
        (Some(name), false) if !name.is_empty() => {}
        (None, true) => {}
        (_, false) => {
            return Err(at.error(
                "revocation.sentinel_master",
                "sentinels are set: name the monitored primary (sentinel_master = \"mymaster\")",
            ));
        }
        (Some(_), true) => {
            return Err(at.error(
                "revocation.sentinel_master",
                "needs sentinels = [\"host:port\", ...]",
            ));
        }
    }
    if revocation.redis_password_env.is_some() && revocation.redis_password_file.is_some() {
        return Err(at.error(
            "revocation.redis_password_file",
            "set redis_password_env or redis_password_file, not both",
        ));
    }
    if revocation.redis_password_env.as_deref() == Some("") {
        return Err(at.error("revocation.redis_password_env", "must not be empty"));
    }
    let non_empty_path = |value: &Option<String>, key: &str| match value.as_deref() {
        Some("") => Err(at.error(key, "must not be empty")),
        Some(path) => Ok(Some(base_dir.join(path))),
        None => Ok(None),
    };
    Ok(RedisSettings {
        sentinels,
        sentinel_master,
        ca_file: non_empty_path(&revocation.redis_ca_file, "revocation.redis_ca_file")?,
        password_env: revocation.redis_password_env.clone(),
        password_file: non_empty_path(
            &revocation.redis_password_file,
            "revocation.redis_password_file",
        )?,
        min_replicas_acked: revocation.min_replicas_acked,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigSnapshot;

    fn parse(revocation: &str) -> Result<ConfigSnapshot, ConfigError> {
        let text = format!(
            "[revocation]\nstore = \"redis\"\n{revocation}\n[[apps]]\napi_key = \"k\"\nsecrets = [\"s\"]\n"
        );
        ConfigSnapshot::parse_with_env(&text, Path::new("/etc/chatgate/chatgate.toml"), &|_| None)
    }

    #[test]
    fn redis_keys_are_read_and_checked() {
        let config = parse(
            "redis_url = \"rediss://gate@redis:6380\"\nsentinels = [\"10.0.0.1:26379\", \"s2:26379\"]\n\
             sentinel_master = \"mymaster\"\nredis_ca_file = \"ca.pem\"\n\
             redis_password_file = \"redis.pw\"\nmin_replicas_acked = 2",
        )
        .unwrap();
        let redis = &config.revocation.redis;
        assert_eq!(redis.sentinels, ["10.0.0.1:26379", "s2:26379"]);
        assert_eq!(redis.sentinel_master.as_deref(), Some("mymaster"));
        assert_eq!(
            redis.ca_file.as_deref(),
            Some(Path::new("/etc/chatgate/ca.pem"))
        );
        assert_eq!(
            redis.password_file.as_deref(),
            Some(Path::new("/etc/chatgate/redis.pw"))
        );
        assert_eq!(redis.min_replicas_acked, Some(2));
        assert_eq!(
            parse("").unwrap().revocation.redis,
            RedisSettings::default()
        );

        for (text, key) in [
            (
                "sentinels = [\"nohost\"]\nsentinel_master = \"m\"",
                "revocation.sentinels[0]",
            ),
            ("sentinels = [\"h:1\"]", "revocation.sentinel_master"),
            ("sentinel_master = \"m\"", "revocation.sentinel_master"),
            (
                "redis_password_env = \"A\"\nredis_password_file = \"f\"",
                "revocation.redis_password_file",
            ),
            ("redis_ca_file = \"\"", "revocation.redis_ca_file"),
        ] {
            let error = parse(text)
                .err()
                .unwrap_or_else(|| panic!("accepted: {text}"));
            assert_eq!(error.key(), Some(key), "{text}: {error}");
        }
    }

    #[test]
    fn passwords_in_urls_are_redacted() {
        assert_eq!(
            redact_url("rediss://gate:hunter2@redis:6380/0"),
            "rediss://gate:***@redis:6380/0"
        );
        assert_eq!(redact_url("redis://hunter2@redis"), "redis://***@redis");
        assert_eq!(redact_url("redis://:hunter2@redis"), "redis://:***@redis");
        assert_eq!(redact_url("redis://redis:6379/0"), "redis://redis:6379/0");
        assert_eq!(
            redact_url("unix:///run/redis.sock"),
            "unix:///run/redis.sock"
        );
        let config = parse("redis_url = \"redis://u:hunter2@redis\"").unwrap();
        assert!(!format!("{:?}", config.revocation).contains("hunter2"));
    }
}
