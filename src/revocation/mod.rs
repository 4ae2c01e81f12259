//! Revocation cutoffs ("revoke tokens issued before T", contract §3): the store trait,
//! its backends, the cache the request path reads, and the parsing of the `PATCH`
//! bodies that change them.
//!
//! The request path only ever talks to [`RevocationCache`]; a cache hit does no I/O
//! and holds no lock across `.await`.

mod cache;
#[cfg(feature = "embedded")]
pub mod embedded;
mod memory;
#[cfg(feature = "redis")]
pub mod redis;
pub mod sessions;
mod update;

pub use cache::{CacheStats, RevocationCache};
pub use memory::MemoryStore;
pub use update::{MAX_USERS_PER_UPDATE, parse_app_update, parse_users_update};

use crate::time::Cutoff;
use std::sync::Arc;
use tokio::sync::broadcast;

/// A store could not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend failed (connection refused, I/O error, ...).
    #[error("revocation store unavailable: {0}")]
    Unavailable(String),
    /// The backend did not answer within `[revocation] store_timeout_ms`.
    #[error("revocation store timed out")]
    Timeout,
}

/// One user's new cutoff; `None` clears it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserCutoffChange {
    /// The user.
    pub user_id: String,
    /// Revoke tokens issued before this, or clear.
    pub cutoff: Option<Cutoff>,
}

/// A change seen by a store: the cache invalidates on it, live sessions may close on it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RevocationEvent {
    /// A user's cutoff changed.
    User {
        /// The app.
        app: Arc<str>,
        /// The user.
        user: Arc<str>,
        /// The new cutoff.
        cutoff: Option<Cutoff>,
    },
    /// An app-wide cutoff changed.
    App {
        /// The app.
        app: Arc<str>,
        /// The new cutoff.
        cutoff: Option<Cutoff>,
    },
    /// Events may have been missed (reconnect, lag): forget everything cached.
    Resync,
}

/// Where cutoffs live. Writes are durable when they return `Ok` (as durable as the
/// backend is), and every write is announced on [`RevocationStore::subscribe`].
#[async_trait::async_trait]
pub trait RevocationStore: Send + Sync + 'static {
    /// A user's cutoff.
    async fn user_cutoff(&self, app: &str, user: &str) -> Result<Option<Cutoff>, StoreError>;
    /// Sets or clears the cutoffs of up to 100 users at once, all or nothing.
    async fn set_user_cutoffs(
        &self,
        app: &str,
        changes: &[UserCutoffChange],
    ) -> Result<(), StoreError>;
    /// The app-wide cutoff set through the API (the config file's is separate).
    async fn app_cutoff(&self, app: &str) -> Result<Option<Cutoff>, StoreError>;
    /// Sets or clears the app-wide cutoff.
    async fn set_app_cutoff(&self, app: &str, cutoff: Option<Cutoff>) -> Result<(), StoreError>;
    /// Changes made through this store or, for shared backends, by other instances.
    fn subscribe(&self) -> broadcast::Receiver<RevocationEvent>;
    /// Whether the backend answers (readiness).
    async fn ping(&self) -> Result<(), StoreError>;
    /// What an operator should fix about the backend (logged at start by the backend,
    /// shown in `/config` and `/metrics`).
    fn warnings(&self) -> Vec<StoreWarning> {
        Vec::new()
    }
    /// How the backend is reached and what it said about itself, for `/config`.
    /// Never a secret.
    fn report(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

/// A problem with the store's setup that does not stop it working.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreWarning {
    /// A stable label (the `/metrics` label value), e.g. `redis_persists_nothing`.
    pub kind: &'static str,
    /// What is wrong and what to do.
    pub message: String,
}

/// Opens the store `[revocation]` names.
pub async fn open_store(
    settings: &crate::config::RevocationSettings,
) -> Result<Arc<dyn RevocationStore>, StoreError> {
    use crate::config::StoreKind;
    match settings.store {
        StoreKind::Memory => Ok(Arc::new(MemoryStore::new())),
        #[cfg(feature = "embedded")]
        StoreKind::Embedded => Ok(Arc::new(embedded::EmbeddedStore::open(&settings.path)?)),
        #[cfg(not(feature = "embedded"))]
        StoreKind::Embedded => Err(StoreError::Unavailable(
            "this build has no embedded store: enable the `embedded` feature".into(),
        )),
        // Boxed: the redis client's Sentinel and TLS connection futures nest so deeply
        // that every async caller of open_store overflowed rustc's layout query depth.
        // Opening happens once, so the allocation costs nothing that matters.
        #[cfg(feature = "redis")]
        StoreKind::Redis => Ok(Arc::new(
            Box::pin(redis::RedisStore::from_settings(settings)).await?,
        )),
        #[cfg(not(feature = "redis"))]
        StoreKind::Redis => Err(StoreError::Unavailable(
            "this build has no redis store: enable the `redis` feature".into(),
        )),
    }
}
