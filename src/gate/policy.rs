//! What an embedder narrows or widens on top of the config (contract §1, §5): the apps
//! this gate serves, an override of the apps' `allow_anonymous`, and extra public
//! paths. It is part of the decision, applied by [`Gate`](super::Gate) itself, so the
//! tower layer and the Pingora filter refuse the same requests the same way
//! (tower-http's "the middleware only asks"): an adapter given a policy has no rules of
//! its own after the gate has decided.
//!
//! Each rule combines the config's key with the policy's override here, in one place,
//! so the config file can say everything a policy says. `chatgate serve` has no policy
//! of its own (its gate's is the default): its TOML says it.
//!
//! | layer option / `Policy` | `chatgate serve`'s TOML |
//! |---|---|
//! | `.only_apps(["k"])` | the `[[apps]]` list: the proxy serves exactly the apps its file lists |
//! | `.allow_anonymous(b)` | `allow_anonymous = b` on each `[[apps]]` entry |
//! | `.public_path("/p/*")` | `[auth] public_paths = ["/healthz", "/p/*"]` |

use crate::config::{App, AuthSettings, PublicPaths};
use std::sync::Arc;

/// The embedder's rules on top of the config. The default changes nothing.
///
/// ```
/// use chatgate::gate::Policy;
///
/// let policy = Policy::new()
///     .only_apps(["chat-key"])
///     .allow_anonymous(false)
///     .public_path("/static/*");
/// # let _ = policy;
/// ```
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Policy {
    public_entries: Vec<String>,
    public_paths: PublicPaths,
    apps: Option<Vec<Arc<str>>>,
    anonymous: Option<bool>,
}

impl Policy {
    /// A policy that changes nothing: the config alone decides.
    pub fn new() -> Self {
        Policy::default()
    }

    /// Serves `path` without auth, in addition to the config's `[auth] public_paths`.
    /// A trailing `*` makes it a prefix (`/static/*`).
    pub fn public_path(mut self, path: impl Into<String>) -> Self {
        self.public_entries.push(path.into());
        self.public_paths = PublicPaths::new(self.public_entries.iter().cloned());
        self
    }

    /// Serves only these apps (api_keys): the config's other apps are answered as
    /// unknown (code 2), whatever their token. Useful when one config serves several
    /// services.
    pub fn only_apps<I, K>(mut self, api_keys: I) -> Self
    where
        I: IntoIterator<Item = K>,
        K: AsRef<str>,
    {
        self.apps = Some(
            api_keys
                .into_iter()
                .map(|k| Arc::from(k.as_ref()))
                .collect(),
        );
        self
    }

    /// Overrides the apps' `allow_anonymous`: `false` refuses anonymous users (code 5)
    /// even where the config allows them, `true` admits them for every app. The
    /// revocation endpoints stay closed to them (code 17).
    pub fn allow_anonymous(mut self, allow: bool) -> Self {
        self.anonymous = Some(allow);
        self
    }

    /// Whether `path` needs no auth: one of the config's `[auth] public_paths` or of
    /// this policy's extra ones.
    pub(crate) fn is_public(&self, auth: &AuthSettings, path: &str) -> bool {
        auth.public_paths.contains(path) || self.public_paths.contains(path)
    }

    /// Whether this gate serves `app` at all: a config app, unless the policy narrows
    /// the list.
    pub(crate) fn serves(&self, app: &App) -> bool {
        self.apps
            .as_ref()
            .is_none_or(|apps| apps.contains(&app.api_key))
    }

    /// Whether `app` admits anonymous users, after the override.
    pub(crate) fn admits_anonymous(&self, app: &App) -> bool {
        self.anonymous.unwrap_or(app.allow_anonymous)
    }
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("public_paths", &self.public_entries)
            .field("apps", &self.apps)
            .field("anonymous", &self.anonymous)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(key: &str, allow_anonymous: bool) -> App {
        let mut app = App::new(key, vec!["s".into()]);
        app.allow_anonymous = allow_anonymous;
        app
    }

    /// `[auth]` with no public path, so only the policy's count.
    fn no_public_paths() -> AuthSettings {
        let mut auth = crate::config::ConfigSnapshot::with_apps(vec![]).auth;
        auth.public_paths = PublicPaths::default();
        auth
    }

    #[test]
    fn the_default_policy_leaves_the_config_in_charge() {
        let policy = Policy::new();
        assert!(policy.serves(&app("any", false)));
        assert!(!policy.admits_anonymous(&app("k", false)));
        assert!(policy.admits_anonymous(&app("k", true)));
        assert!(!policy.is_public(&no_public_paths(), "/healthz"));
        let config = crate::config::ConfigSnapshot::with_apps(vec![]);
        assert!(policy.is_public(&config.auth, "/healthz"));
    }

    #[test]
    fn each_rule_narrows_or_widens_only_what_it_names() {
        let policy = Policy::new()
            .only_apps(["a"])
            .public_path("/static/*")
            .public_path("/metrics");
        assert!(policy.serves(&app("a", false)));
        assert!(!policy.serves(&app("b", false)));
        let auth = no_public_paths();
        assert!(policy.is_public(&auth, "/static/app.js"));
        assert!(policy.is_public(&auth, "/metrics"));
        assert!(!policy.is_public(&auth, "/metrics/x"));
        assert!(
            policy
                .clone()
                .allow_anonymous(true)
                .admits_anonymous(&app("a", false))
        );
        assert!(
            !policy
                .allow_anonymous(false)
                .admits_anonymous(&app("a", true))
        );
    }
}
