//! The live config: an `ArcSwap` of the current [`ConfigSnapshot`]. Requests `load()`
//! it once and finish on the snapshot they started with; a reload `store()`s a new one
//! only after it validated whole.

use crate::config::{ConfigError, ConfigSnapshot};
use arc_swap::ArcSwap;
use std::sync::Arc;

/// A cheap, cloneable handle to the current config.
#[derive(Clone)]
pub struct ConfigHandle {
    current: Arc<ArcSwap<ConfigSnapshot>>,
}

impl ConfigHandle {
    /// A handle starting at `snapshot`.
    pub fn new(snapshot: ConfigSnapshot) -> Self {
        ConfigHandle {
            current: Arc::new(ArcSwap::from_pointee(snapshot)),
        }
    }

    /// Loads and validates `path`.
    pub fn from_file(path: impl AsRef<std::path::Path>) -> Result<Self, ConfigError> {
        Ok(Self::new(ConfigSnapshot::load(path)?))
    }

    /// The current snapshot, for use within one synchronous step.
    pub fn load(&self) -> arc_swap::Guard<Arc<ConfigSnapshot>> {
        self.current.load()
    }

    /// The current snapshot, to hold across `.await`.
    pub fn load_full(&self) -> Arc<ConfigSnapshot> {
        self.current.load_full()
    }

    /// Swaps in an already validated snapshot.
    pub fn store(&self, snapshot: ConfigSnapshot) {
        self.current.store(Arc::new(snapshot));
    }
}

impl std::fmt::Debug for ConfigHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigHandle")
            .field("content_hash", &self.load().content_hash)
            .finish()
    }
}
