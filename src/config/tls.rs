//! `[server.tls]`: the certificate and key the proxy presents to clients.
//!
//! The files are read and checked when the config is built, on start and on every
//! reload, so that a missing, unreadable or unparsable file, or a key that does not
//! belong to the certificate, is a config error naming the key like any other: a
//! reload that finds one keeps the last good config, certificate included, instead of
//! swapping in a pair no handshake could use. The parsed pair lives in the snapshot,
//! so the proxy's handshake callback (`proxy::tls`) takes whatever the live snapshot
//! holds: a reload is a certificate rotation, and connections already open keep the
//! session they negotiated.
//!
//! Parsing and the key check use OpenSSL, which only builds with the `proxy` feature
//! (the one that serves TLS); without it the files must still be readable PEM with a
//! certificate and a private key block.

use super::ConfigError;
use super::locate::Locator;
use super::schema::RawTls;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `[server.tls]`: serve clients over TLS with this certificate chain and key.
/// Turning TLS on or off needs a restart; new files (or new contents at the same
/// paths, read again on SIGHUP) are picked up by a reload.
#[derive(Clone)]
pub struct TlsSettings {
    /// The PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// The PEM private key of the leaf certificate.
    pub key_file: PathBuf,
    /// SHA-256 of both files' bytes: what tells a reload the pair changed.
    fingerprint: [u8; 32],
    /// The leaf's `notAfter`, in Unix seconds (known with the `proxy` feature).
    not_after: Option<i64>,
    #[cfg(feature = "proxy")]
    pair: Arc<CertifiedKey>,
    #[cfg(not(feature = "proxy"))]
    _pair: Arc<()>,
}

/// A certificate chain and the private key of its leaf, parsed once per config load.
#[cfg(feature = "proxy")]
pub struct CertifiedKey {
    /// The leaf certificate.
    pub leaf: pingora::tls::x509::X509,
    /// The intermediates sent after the leaf, in file order.
    pub chain: Vec<pingora::tls::x509::X509>,
    /// The leaf's private key.
    pub key: pingora::tls::pkey::PKey<pingora::tls::pkey::Private>,
}

impl TlsSettings {
    /// The parsed certificate chain and key.
    #[cfg(feature = "proxy")]
    pub fn certified_key(&self) -> &Arc<CertifiedKey> {
        &self.pair
    }

    /// When the leaf certificate expires, in Unix seconds (`None` without the `proxy`
    /// feature, which parses certificates).
    pub fn not_after(&self) -> Option<i64> {
        self.not_after
    }

    /// What the admin listener's `/config` shows: the files, their fingerprint and the
    /// expiry, never the key.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "cert_file": self.cert_file.display().to_string(),
            "key_file": self.key_file.display().to_string(),
            "fingerprint": self.fingerprint(),
            "not_after": self.not_after.and_then(rfc3339),
        })
    }

    /// A warning when the certificate has expired or expires within
    /// `EXPIRY_WARNING_DAYS` of `now` (Unix seconds).
    pub fn expiry_warning(&self, now: i64) -> Option<String> {
        let not_after = self.not_after?;
        let at = rfc3339(not_after).unwrap_or_else(|| not_after.to_string());
        if not_after <= now {
            Some(format!(
                "server.tls.cert_file: {} expired at {at}; clients will refuse it",
                self.cert_file.display()
            ))
        } else if not_after - now < EXPIRY_WARNING_DAYS * 86_400 {
            Some(format!(
                "server.tls.cert_file: {} expires at {at} (in {} days)",
                self.cert_file.display(),
                (not_after - now) / 86_400
            ))
        } else {
            None
        }
    }

    /// Short hex of the files' SHA-256, for logs and `/config`.
    pub fn fingerprint(&self) -> String {
        self.fingerprint[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

impl PartialEq for TlsSettings {
    fn eq(&self, other: &Self) -> bool {
        self.cert_file == other.cert_file
            && self.key_file == other.key_file
            && self.fingerprint == other.fingerprint
    }
}

impl Eq for TlsSettings {}

impl std::fmt::Debug for TlsSettings {
    // The key's bytes never reach logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

/// A certificate closer than this to its expiry is warned about (start, `config check`).
pub const EXPIRY_WARNING_DAYS: i64 = 30;

fn rfc3339(unix: i64) -> Option<String> {
    chrono::DateTime::from_timestamp(unix, 0)
        .map(|at| at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

/// Reads and checks `[server.tls]`; relative paths are relative to the config file.
pub(super) fn build_tls(
    raw: &RawTls,
    at: &Locator,
    base_dir: &Path,
) -> Result<TlsSettings, ConfigError> {
    let path_of = |value: &Option<String>, key: &str| match value.as_deref() {
        Some("") => Err(at.error(key, "must not be empty")),
        Some(file) => Ok(base_dir.join(file)),
        None => Err(at.error(
            "server.tls",
            &format!(
                "missing {}: [server.tls] needs cert_file and key_file (PEM)",
                key.rsplit('.').next().unwrap_or(key)
            ),
        )),
    };
    let cert_file = path_of(&raw.cert_file, "server.tls.cert_file")?;
    let key_file = path_of(&raw.key_file, "server.tls.key_file")?;
    let read = |path: &Path, key: &str| {
        std::fs::read(path)
            .map_err(|e| at.error(key, &format!("cannot read {}: {e}", path.display())))
    };
    let cert_pem = read(&cert_file, "server.tls.cert_file")?;
    let key_pem = read(&key_file, "server.tls.key_file")?;
    let mut digest = Sha256::new();
    digest.update(&cert_pem);
    digest.update(&key_pem);
    let fingerprint = digest.finalize().into();
    #[cfg(feature = "proxy")]
    let pair = Arc::new(parse_pair(&cert_pem, &key_pem, &cert_file, &key_file, at)?);
    #[cfg(feature = "proxy")]
    let not_after = unix_time(pair.leaf.not_after());
    #[cfg(not(feature = "proxy"))]
    let not_after = None;
    #[cfg(not(feature = "proxy"))]
    let _pair = {
        check_pem_blocks(&cert_pem, &key_pem, &cert_file, &key_file, at)?;
        Arc::new(())
    };
    Ok(TlsSettings {
        cert_file,
        key_file,
        fingerprint,
        not_after,
        #[cfg(feature = "proxy")]
        pair,
        #[cfg(not(feature = "proxy"))]
        _pair,
    })
}

/// Parses the chain and the key and checks that the key is the leaf's.
#[cfg(feature = "proxy")]
fn parse_pair(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_file: &Path,
    key_file: &Path,
    at: &Locator,
) -> Result<CertifiedKey, ConfigError> {
    use pingora::tls::pkey::PKey;
    use pingora::tls::x509::X509;

    let mut certificates = X509::stack_from_pem(cert_pem)
        .map_err(|e| {
            at.error(
                "server.tls.cert_file",
                &format!(
                    "{} is not a PEM certificate chain: {e}",
                    cert_file.display()
                ),
            )
        })?
        .into_iter();
    let Some(leaf) = certificates.next() else {
        return Err(at.error(
            "server.tls.cert_file",
            &format!("{} holds no PEM certificate", cert_file.display()),
        ));
    };
    let key = PKey::private_key_from_pem(key_pem).map_err(|e| {
        at.error(
            "server.tls.key_file",
            &format!("{} is not a PEM private key: {e}", key_file.display()),
        )
    })?;
    let matches = leaf
        .public_key()
        .map(|public| public.public_eq(&key))
        .unwrap_or(false);
    if !matches {
        return Err(at.error(
            "server.tls.key_file",
            &format!(
                "{} is not the private key of the certificate in {}",
                key_file.display(),
                cert_file.display()
            ),
        ));
    }
    Ok(CertifiedKey {
        leaf,
        chain: certificates.collect(),
        key,
    })
}

/// An ASN.1 time as Unix seconds.
#[cfg(feature = "proxy")]
fn unix_time(time: &openssl::asn1::Asn1TimeRef) -> Option<i64> {
    let epoch = openssl::asn1::Asn1Time::from_unix(0).ok()?;
    let diff = epoch.diff(time).ok()?;
    Some(i64::from(diff.days) * 86_400 + i64::from(diff.secs))
}

/// Without OpenSSL: the files must at least hold the PEM blocks the proxy would parse.
#[cfg(not(feature = "proxy"))]
fn check_pem_blocks(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_file: &Path,
    key_file: &Path,
    at: &Locator,
) -> Result<(), ConfigError> {
    let holds = |bytes: &[u8], marker: &str| String::from_utf8_lossy(bytes).contains(marker);
    if !holds(cert_pem, "-----BEGIN CERTIFICATE-----") {
        return Err(at.error(
            "server.tls.cert_file",
            &format!("{} holds no PEM certificate", cert_file.display()),
        ));
    }
    if !holds(key_pem, "PRIVATE KEY-----") {
        return Err(at.error(
            "server.tls.key_file",
            &format!("{} holds no PEM private key", key_file.display()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::{ConfigError, ConfigSnapshot};
    use crate::reload::{ConfigHandle, ReloadOutcome};
    use std::path::Path;

    /// A self-signed certificate for `localhost` and its key, as PEM.
    fn pair() -> (String, String) {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        (made.cert.pem(), made.signing_key.serialize_pem())
    }

    fn config_text(tls: &str) -> String {
        format!(
            "[server]\nlisten = \"127.0.0.1:8443\"\n\n{tls}\n[revocation]\nstore = \"memory\"\n\n[[apps]]\napi_key = \"k\"\nsecrets = [\"s\"]\n"
        )
    }

    const TLS: &str = "[server.tls]\ncert_file = \"cert.pem\"\nkey_file = \"key.pem\"\n";

    fn write_pair(dir: &Path, (cert, key): &(String, String)) {
        std::fs::write(dir.join("cert.pem"), cert).unwrap();
        std::fs::write(dir.join("key.pem"), key).unwrap();
    }

    fn invalid(dir: &Path, text: &str) -> (usize, String, String) {
        match ConfigSnapshot::parse(text, &dir.join("c.toml")).unwrap_err() {
            ConfigError::Invalid {
                line, key, message, ..
            } => (line, key, message),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_pair_is_read_relative_to_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        write_pair(dir.path(), &pair());
        let config = ConfigSnapshot::parse(&config_text(TLS), &dir.path().join("c.toml")).unwrap();
        let tls = config.server.tls.as_ref().expect("[server.tls] is read");
        assert_eq!(tls.cert_file, dir.path().join("cert.pem"));
        assert_eq!(tls.key_file, dir.path().join("key.pem"));
        assert_eq!(tls.fingerprint().len(), 16);
        assert!(!format!("{tls:?}").contains("PRIVATE"));
        #[cfg(feature = "proxy")]
        {
            assert!(tls.certified_key().chain.is_empty());
            // rcgen's default validity ends in 4096.
            let not_after = tls.not_after().unwrap();
            assert_eq!(tls.to_json()["not_after"], "4096-01-01T00:00:00Z");
            assert_eq!(tls.expiry_warning(0), None);
            let soon = tls.expiry_warning(not_after - 86_400 * 3).unwrap();
            assert!(
                soon.contains("in 2 days") || soon.contains("in 3 days"),
                "{soon}"
            );
            let past = tls.expiry_warning(not_after + 1).unwrap();
            assert!(
                past.starts_with("server.tls.cert_file: ") && past.contains("expired"),
                "{past}"
            );
        }
        let plain = ConfigSnapshot::parse(&config_text(""), &dir.path().join("c.toml")).unwrap();
        assert!(plain.server.tls.is_none());
    }

    #[test]
    fn missing_and_unreadable_files_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        write_pair(dir.path(), &pair());
        let (line, key, message) = invalid(
            dir.path(),
            &config_text("[server.tls]\ncert_file = \"cert.pem\"\n"),
        );
        assert_eq!((line, key.as_str()), (4, "server.tls"), "{message}");
        assert!(message.contains("missing key_file"), "{message}");

        let (line, key, message) = invalid(
            dir.path(),
            &config_text("[server.tls]\ncert_file = \"nowhere.pem\"\nkey_file = \"key.pem\"\n"),
        );
        assert_eq!((line, key.as_str()), (5, "server.tls.cert_file"));
        assert!(
            message.contains("cannot read") && message.contains("nowhere.pem"),
            "{message}"
        );

        let (_, key, _) = invalid(
            dir.path(),
            &config_text(
                "[server.tls]\ncert_file = \"cert.pem\"\nkey_file = \"key.pem\"\ncert = 1\n",
            ),
        );
        assert_eq!(key, "server.tls.cert");
    }

    #[test]
    fn a_file_that_is_not_the_expected_pem_names_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pair();
        write_pair(dir.path(), &(key.clone(), key.clone()));
        let (line, name, message) = invalid(dir.path(), &config_text(TLS));
        assert_eq!(
            (line, name.as_str()),
            (5, "server.tls.cert_file"),
            "{message}"
        );
        write_pair(dir.path(), &(cert.clone(), cert.clone()));
        let (line, name, message) = invalid(dir.path(), &config_text(TLS));
        assert_eq!(
            (line, name.as_str()),
            (6, "server.tls.key_file"),
            "{message}"
        );
    }

    #[cfg(feature = "proxy")]
    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, _) = pair();
        let (_, other_key) = pair();
        write_pair(dir.path(), &(cert, other_key));
        let (line, key, message) = invalid(dir.path(), &config_text(TLS));
        assert_eq!((line, key.as_str()), (6, "server.tls.key_file"));
        assert!(
            message.contains("is not the private key of the certificate"),
            "{message}"
        );
    }

    #[cfg(feature = "proxy")]
    #[test]
    fn a_reload_rotates_a_good_pair_and_keeps_the_last_good_one_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        let first = pair();
        write_pair(dir.path(), &first);
        std::fs::write(&path, config_text(TLS)).unwrap();
        let handle = ConfigHandle::from_file(&path).unwrap();
        let serial = |handle: &ConfigHandle| {
            let config = handle.load();
            let leaf = &config.server.tls.as_ref().unwrap().certified_key().leaf;
            leaf.to_der().unwrap()
        };
        let running = serial(&handle);

        // A half-done rotation (new key, old certificate) fails and changes nothing.
        let second = pair();
        std::fs::write(dir.path().join("key.pem"), &second.1).unwrap();
        let error = handle.force_reload().unwrap_err();
        assert_eq!(error.key(), Some("server.tls.key_file"));
        assert_eq!(serial(&handle), running);
        assert_eq!(handle.status().reloads_failed, 1);

        // The whole pair: the next snapshot carries it, without a restart.
        write_pair(dir.path(), &second);
        let outcome = handle.force_reload().unwrap();
        assert!(
            matches!(outcome, ReloadOutcome::Applied { ref restart_required, .. } if restart_required.is_empty()),
            "{outcome:?}"
        );
        assert_ne!(serial(&handle), running);

        // Turning TLS off needs a restart: the running listener keeps its certificate.
        std::fs::write(&path, config_text("")).unwrap();
        let outcome = handle.reload().unwrap();
        assert!(
            matches!(outcome, ReloadOutcome::Applied { ref restart_required, .. } if restart_required == &["server.tls"]),
            "{outcome:?}"
        );
        assert!(handle.load().server.tls.is_some());
    }
}
