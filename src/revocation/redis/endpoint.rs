//! How the store reaches the Redis primary: one fixed address (`redis_url`), or the
//! primary the Sentinels name (`sentinels`, `sentinel_master`); TLS for `rediss://`
//! (rustls: the system's roots, or `redis_ca_file` alone); the password from the URL,
//! `redis_password_env` or `redis_password_file`.
//!
//! The password is read here, when the store connects, and kept only inside the redis
//! client: the config snapshot never holds it, so no `Debug`, log line or `/config`
//! can show it.

use super::{CONNECT_TIMEOUT, unavailable};
use crate::config::{RevocationSettings, redact_url};
use crate::revocation::StoreError;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{ConnectionAddr, IntoConnectionInfo, TlsCertificates, TlsMode};
use std::time::Duration;

/// Everything [`super::RedisStore`] needs to connect. Its `Debug` shows no password.
#[derive(Clone)]
pub struct RedisOptions {
    /// `redis://[user[:password]@]host:port[/db]` or `rediss://...` (TLS). With
    /// sentinels, only its scheme, user, password and db are used.
    pub url: String,
    /// `host:port` of the Sentinels; empty for a fixed address.
    pub sentinels: Vec<String>,
    /// The name the Sentinels monitor the primary under.
    pub sentinel_master: Option<String>,
    /// PEM CA certificate(s) trusted instead of the system roots.
    pub ca_pem: Option<Vec<u8>>,
    /// The password, when not in the URL.
    pub password: Option<String>,
    /// Replicas a write must reach before it is acknowledged; `None`: 1 when the
    /// primary has replicas (or Sentinels are used), else 0.
    pub min_replicas_acked: Option<u32>,
    /// `[revocation] store_timeout_ms`: `WAIT` gives up a little before it.
    pub store_timeout: Duration,
}

impl std::fmt::Debug for RedisOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisOptions")
            .field("url", &redact_url(&self.url))
            .field("sentinels", &self.sentinels)
            .field("sentinel_master", &self.sentinel_master)
            .field("ca_pem", &self.ca_pem.as_ref().map(|_| "set"))
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("min_replicas_acked", &self.min_replicas_acked)
            .field("store_timeout", &self.store_timeout)
            .finish()
    }
}

impl RedisOptions {
    /// A fixed address, no extra credentials, replica acks decided from the primary.
    pub fn new(url: &str) -> Self {
        RedisOptions {
            url: url.to_owned(),
            sentinels: Vec::new(),
            sentinel_master: None,
            ca_pem: None,
            password: None,
            min_replicas_acked: None,
            store_timeout: Duration::from_millis(250),
        }
    }

    /// What `[revocation]` says, reading the password and CA files and the password's
    /// environment variable now.
    pub fn from_settings(settings: &RevocationSettings) -> Result<Self, StoreError> {
        let redis = &settings.redis;
        let password = match (&redis.password_env, &redis.password_file) {
            (Some(name), _) => Some(std::env::var(name).map_err(|_| {
                unavailable(format!(
                    "redis_password_env: environment variable {name} is not set"
                ))
            })?),
            (None, Some(file)) => {
                let text = std::fs::read_to_string(file).map_err(|e| {
                    unavailable(format!(
                        "redis_password_file: cannot read {}: {e}",
                        file.display()
                    ))
                })?;
                Some(text.lines().next().unwrap_or("").trim().to_owned())
            }
            (None, None) => None,
        };
        if password.as_deref() == Some("") {
            return Err(unavailable("the redis password is empty"));
        }
        let ca_pem = match &redis.ca_file {
            Some(file) => Some(std::fs::read(file).map_err(|e| {
                unavailable(format!(
                    "redis_ca_file: cannot read {}: {e}",
                    file.display()
                ))
            })?),
            None => None,
        };
        Ok(RedisOptions {
            url: settings.redis_url.clone(),
            sentinels: redis.sentinels.clone(),
            sentinel_master: redis.sentinel_master.clone(),
            ca_pem,
            password,
            min_replicas_acked: redis.min_replicas_acked,
            store_timeout: settings.store_timeout,
        })
    }

    fn tls(&self) -> bool {
        self.url.starts_with("rediss://")
    }

    /// What `/config` shows: where, how, never the password.
    pub(super) fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "url": if self.sentinels.is_empty() { Some(redact_url(&self.url)) } else { None },
            "sentinels": self.sentinels,
            "sentinel_master": self.sentinel_master,
            "tls": self.tls(),
            "ca": match (self.tls(), self.ca_pem.is_some()) {
                (false, _) => None,
                (true, true) => Some("redis_ca_file"),
                (true, false) => Some("system roots"),
            },
        })
    }
}

/// Where the primary is found.
pub(super) enum Endpoint {
    /// One address.
    Direct(redis::Client),
    /// Asked of the Sentinels at each (re)connect. The lock serialises lookups (the
    /// client caches its sentinel connections and needs `&mut`); only background
    /// reconnects take it, never a request.
    Sentinel(tokio::sync::Mutex<SentinelClient>),
}

fn client_error(error: redis::RedisError) -> StoreError {
    unavailable(format!("invalid redis settings: {error}"))
}

impl Endpoint {
    pub(super) fn new(options: &RedisOptions) -> Result<Self, StoreError> {
        if options.ca_pem.is_some() && !options.tls() {
            return Err(unavailable(
                "redis_ca_file is set but redis_url is not rediss:// (TLS)",
            ));
        }
        let info = options
            .url
            .as_str()
            .into_connection_info()
            .map_err(client_error)?;
        let mut redis_info = info.redis_settings().clone();
        if let Some(password) = &options.password {
            if redis_info.password().is_some() {
                return Err(unavailable(
                    "the redis password is both in redis_url and in redis_password_env/_file",
                ));
            }
            redis_info = redis_info.set_password(password);
        }
        let certificates = options.ca_pem.as_ref().map(|pem| TlsCertificates {
            client_tls: None,
            root_cert: Some(pem.clone()),
        });
        if options.sentinels.is_empty() {
            let info = info.set_redis_settings(redis_info);
            let client = match certificates {
                Some(certificates) => redis::Client::build_with_tls(info, certificates),
                None => redis::Client::open(info),
            }
            .map_err(client_error)?;
            return Ok(Endpoint::Direct(client));
        }
        let tls = options.tls();
        let sentinels = options
            .sentinels
            .iter()
            .map(|address| {
                let (host, port) = address
                    .rsplit_once(':')
                    .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
                    .ok_or_else(|| unavailable(format!("sentinel {address:?} is not host:port")))?;
                Ok(if tls {
                    ConnectionAddr::TcpTls {
                        host,
                        port,
                        insecure: false,
                        tls_params: None,
                    }
                } else {
                    ConnectionAddr::Tcp(host, port)
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let master = options
            .sentinel_master
            .as_deref()
            .ok_or_else(|| unavailable("sentinels are set but sentinel_master is not"))?;
        let mut builder = SentinelClientBuilder::new(sentinels, master, SentinelServerType::Master)
            .map_err(client_error)?
            .set_client_to_redis_db(redis_info.db());
        if let Some(user) = redis_info.username() {
            builder = builder.set_client_to_redis_username(user);
        }
        if let Some(password) = redis_info.password() {
            builder = builder.set_client_to_redis_password(password);
        }
        if tls {
            // Sentinels of a TLS deployment speak TLS too, under the same CA.
            builder = builder
                .set_client_to_redis_tls_mode(TlsMode::Secure)
                .set_client_to_sentinel_tls_mode(TlsMode::Secure);
            if let Some(certificates) = certificates {
                builder = builder
                    .set_client_to_redis_certificates(certificates.clone())
                    .set_client_to_sentinel_certificates(certificates);
            }
        }
        Ok(Endpoint::Sentinel(tokio::sync::Mutex::new(
            builder.build().map_err(client_error)?,
        )))
    }

    pub(super) fn uses_sentinels(&self) -> bool {
        matches!(self, Endpoint::Sentinel(_))
    }

    /// A client for the current primary, within [`CONNECT_TIMEOUT`]. With Sentinels,
    /// the redis crate asks them in turn and checks that the node they name says
    /// `ROLE` master.
    pub(super) async fn primary(&self) -> Result<redis::Client, StoreError> {
        match self {
            Endpoint::Direct(client) => Ok(client.clone()),
            Endpoint::Sentinel(sentinel) => {
                let lookup = async { sentinel.lock().await.async_get_client().await };
                match tokio::time::timeout(CONNECT_TIMEOUT, lookup).await {
                    Ok(result) => result.map_err(|e| unavailable(format!("sentinel: {e}"))),
                    Err(_) => Err(unavailable(format!(
                        "sentinels named no reachable primary within {CONNECT_TIMEOUT:?}"
                    ))),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_never_show_the_password() {
        let mut options = RedisOptions::new("rediss://gate:hunter2@redis.internal:6380/0");
        options.password = None;
        let shown = format!("{options:?} {}", options.describe());
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("gate:***@redis.internal:6380"), "{shown}");
        let mut options = RedisOptions::new("redis://127.0.0.1:6379");
        options.password = Some("from-the-env".into());
        assert!(!format!("{options:?}").contains("from-the-env"));
    }

    fn settings(redis: crate::config::RedisSettings) -> RevocationSettings {
        let mut settings = crate::config::ConfigSnapshot::with_apps(vec![])
            .revocation
            .clone();
        settings.redis = redis;
        settings
    }

    #[test]
    fn the_password_is_read_from_the_environment_or_the_first_line_of_a_file() {
        // PATH is always set; a test cannot set a variable (`set_var` is unsafe).
        let from_env = RedisOptions::from_settings(&settings(crate::config::RedisSettings {
            password_env: Some("PATH".into()),
            ..Default::default()
        }))
        .unwrap();
        assert_eq!(from_env.password, std::env::var("PATH").ok());
        let unset = RedisOptions::from_settings(&settings(crate::config::RedisSettings {
            password_env: Some("CHATGATE_TEST_SURELY_UNSET_15".into()),
            ..Default::default()
        }))
        .unwrap_err();
        assert!(unset.to_string().contains("CHATGATE_TEST_SURELY_UNSET_15"));

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "  s3cret \nignored\n").unwrap();
        let from_file = RedisOptions::from_settings(&settings(crate::config::RedisSettings {
            password_file: Some(file.clone()),
            ..Default::default()
        }))
        .unwrap();
        assert_eq!(from_file.password.as_deref(), Some("s3cret"));
        std::fs::write(&file, "\n").unwrap();
        let empty = RedisOptions::from_settings(&settings(crate::config::RedisSettings {
            password_file: Some(file),
            ..Default::default()
        }));
        assert!(empty.is_err());
    }

    #[test]
    fn a_password_given_twice_or_a_ca_without_tls_is_refused() {
        let mut options = RedisOptions::new("redis://:inurl@127.0.0.1:6379");
        options.password = Some("elsewhere".into());
        assert!(Endpoint::new(&options).is_err());
        let mut options = RedisOptions::new("redis://127.0.0.1:6379");
        options.ca_pem = Some(b"-----BEGIN CERTIFICATE-----".to_vec());
        assert!(Endpoint::new(&options).is_err());
        let mut options = RedisOptions::new("redis://127.0.0.1:6379");
        options.sentinels = vec!["127.0.0.1:26379".into()];
        options.sentinel_master = Some("mymaster".into());
        assert!(Endpoint::new(&options).unwrap().uses_sentinels());
    }
}
