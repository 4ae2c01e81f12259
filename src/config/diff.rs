//! Reload diffing: which settings of a new snapshot only take effect after a restart
//! (listeners, threads, the revocation store, upstream TLS), so that the reloader can
//! say so instead of silently running with the old ones; what a reload would change
//! at all (`chatgate config check running.toml new.toml`); and the warnings a valid
//! file still deserves (weak or demo secrets).

use super::{App, ConfigSnapshot};

/// The secret of the shipped `config.toml`: a config using it is a quickstart left
/// running.
pub const DEMO_SECRET: &str = "demo-secret-change-me";
/// Shortest secret not warned about: HS256 keys want at least 32 random bytes
/// (RFC 7518 §3.2); Stream's own secrets are 64 characters.
pub const MIN_SECRET_BYTES: usize = 32;

impl ConfigSnapshot {
    /// What a valid config should still not do, each naming its key: the
    /// `[server.tls]` certificate when it expired or expires within 30 days, the demo secret, secrets
    /// shorter than [`MIN_SECRET_BYTES`]. Secrets are never quoted.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if let Some(tls) = &self.server.tls {
            warnings.extend(tls.expiry_warning(crate::time::now_unix()));
        }
        for (i, app) in self.apps().enumerate() {
            for (j, secret) in app.keyring().secrets().iter().enumerate() {
                let key = format!("apps[{i}].secrets[{j}] (api_key {:?})", &*app.api_key);
                if secret == DEMO_SECRET {
                    warnings.push(format!(
                        "{key}: the demo secret of the shipped config.toml: anyone can sign tokens with it; replace it"
                    ));
                } else if secret.len() < MIN_SECRET_BYTES {
                    warnings.push(format!(
                        "{key}: {} bytes; use at least {MIN_SECRET_BYTES} random bytes",
                        secret.len()
                    ));
                }
            }
        }
        warnings
    }

    /// What replacing this config with `newer` changes, one line per setting or app,
    /// settings that need a restart marked so. Secrets are reported as changed, never
    /// shown.
    pub fn changes_to(&self, newer: &ConfigSnapshot) -> Vec<String> {
        let restart = self.restart_required_changes(newer);
        let mut changes = Vec::new();
        let mut section = |name: &str, differs: bool| {
            if differs {
                let needs_restart = restart.iter().any(|key| key.starts_with(name));
                changes.push(if needs_restart {
                    format!(
                        "[{name}] changed (restart needed for: {})",
                        restart
                            .iter()
                            .filter(|key| key.starts_with(name))
                            .copied()
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                } else {
                    format!("[{name}] changed")
                });
            }
        };
        section("server", self.server != newer.server);
        section("upstream", self.upstream != newer.upstream);
        section("auth", self.auth != newer.auth);
        section("revocation", self.revocation != newer.revocation);
        section("log", self.log != newer.log);
        for app in self.apps() {
            match newer.app(&app.api_key) {
                None => changes.push(format!("app {:?} removed", &*app.api_key)),
                Some(next) => {
                    let what = app_changes(app, next);
                    if !what.is_empty() {
                        changes.push(format!(
                            "app {:?}: {} changed",
                            &*app.api_key,
                            what.join(", ")
                        ));
                    }
                }
            }
        }
        for app in newer.apps() {
            if self.app(&app.api_key).is_none() {
                changes.push(format!("app {:?} added", &*app.api_key));
            }
        }
        changes
    }
}

impl ConfigSnapshot {
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
        // The listener is plain TCP or TLS from the start; the certificate is reloadable.
        if self.server.tls.is_some() != newer.server.tls.is_some() {
            changed.push("server.tls");
        }
        if self.revocation.store != newer.revocation.store
            || self.revocation.path != newer.revocation.path
            || self.revocation.redis_url != newer.revocation.redis_url
            || self.revocation.redis != newer.revocation.redis
        {
            changed.push("revocation.store");
        }
        if self.upstream.tls != newer.upstream.tls || self.upstream.demo != newer.upstream.demo {
            changed.push("upstream.tls");
        }
        if self.log.format != newer.log.format {
            changed.push("log.format");
        }
        changed
    }
}

fn app_changes(old: &App, new: &App) -> Vec<&'static str> {
    let mut what = Vec::new();
    if old.keyring().secrets() != new.keyring().secrets() {
        what.push("secrets");
    }
    if old.disable_auth_checks != new.disable_auth_checks {
        what.push("disable_auth_checks");
    }
    if old.allow_anonymous != new.allow_anonymous {
        what.push("allow_anonymous");
    }
    if old.revoke_tokens_issued_before != new.revoke_tokens_issued_before {
        what.push("revoke_tokens_issued_before");
    }
    what
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StoreKind;

    #[test]
    fn only_settings_read_at_startup_are_reported() {
        let running = ConfigSnapshot::with_apps(vec![]);
        let mut newer = ConfigSnapshot::with_apps(vec![]);
        newer.auth.leeway_seconds = 0;
        newer.revocation.cache_capacity = 7;
        assert!(running.restart_required_changes(&newer).is_empty());
        newer.server.threads = 2;
        newer.revocation.store = StoreKind::Redis;
        newer.upstream.demo = true;
        assert_eq!(
            running.restart_required_changes(&newer),
            ["server.threads", "revocation.store", "upstream.tls"]
        );
    }

    #[test]
    fn the_demo_secret_and_short_secrets_are_warned_about_without_quoting_them() {
        let config = ConfigSnapshot::with_apps(vec![
            App::new("demo", vec![DEMO_SECRET.into()]),
            App::new("short", vec!["x".repeat(64), "tiny-secret".into()]),
            App::new("fine", vec!["y".repeat(MIN_SECRET_BYTES)]),
        ]);
        let warnings = config.warnings();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].starts_with("apps[0].secrets[0]") && warnings[0].contains("demo"));
        assert!(warnings[1].starts_with("apps[1].secrets[1]") && warnings[1].contains("11 bytes"));
        assert!(!warnings.concat().contains("tiny-secret"));
        assert!(!warnings.concat().contains(DEMO_SECRET));
    }

    #[test]
    fn a_reload_lists_changed_sections_and_apps_with_restarts_marked() {
        let running = ConfigSnapshot::with_apps(vec![
            App::new("kept", vec!["a".into()]),
            App::new("gone", vec!["b".into()]),
        ]);
        let mut newer = ConfigSnapshot::with_apps(vec![
            App::new("kept", vec!["rotated".into(), "a".into()]),
            App::new("new", vec!["c".into()]),
        ]);
        assert_eq!(running.changes_to(&running).len(), 0);
        newer.server.threads = 4;
        newer.auth.leeway_seconds = 1;
        assert_eq!(
            running.changes_to(&newer),
            [
                "[server] changed (restart needed for: server.threads)",
                "[auth] changed",
                "app \"kept\": secrets changed",
                "app \"gone\" removed",
                "app \"new\" added",
            ]
        );
    }
}
