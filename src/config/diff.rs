//! Reload diffing: which settings of a new snapshot only take effect after a restart
//! (listeners, threads, the revocation store, upstream TLS), so that the reloader can
//! say so instead of silently running with the old ones.

use super::ConfigSnapshot;

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
}
