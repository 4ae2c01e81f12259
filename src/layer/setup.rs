//! One-call setup for tower users: [`ChatAuthLayer::from_config_file`] does what an
//! embedder otherwise wires by hand (contract §5's revocation store and cache, and the
//! config's hot reload): open the store `[revocation]` names, build the cache, start
//! the config file watcher, the SIGHUP reloader, the store's cross-instance
//! invalidation and the cache's settings follower, then build the gate.
//!
//! The background tasks belong to the layer: an abort-on-drop guard sits in the
//! layer's shared state, which every clone of the layer and every service it built
//! holds, so they end when the last of those is dropped. Nothing outlives the router
//! it serves, and a test or a program that builds several layers does not accumulate
//! watchers. Every way setup can fail is a [`SetupError`] variant.

use super::ChatAuthLayer;
use crate::config::ConfigError;
use crate::gate::Gate;
use crate::reload::{
    BackgroundTask, ConfigHandle, ConfigWatcher, WatchError, spawn_sighup_reloader,
};
use crate::revocation::{RevocationCache, StoreError, open_store};
use std::path::Path;
use tokio::task::AbortHandle;

/// Why [`ChatAuthLayer::from_config_file`] could not build a layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    /// The config file could not be read or is invalid (the message says where).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The revocation store `[revocation]` names did not open.
    #[error("revocation store: {0}")]
    Store(#[from] StoreError),
    /// The config file's directory cannot be watched for changes.
    #[error(transparent)]
    Watch(#[from] WatchError),
    /// The SIGHUP handler could not be installed.
    #[error("cannot install the SIGHUP reload handler: {0}")]
    Sighup(std::io::Error),
}

/// The layer's background tasks, ended when the last holder drops this guard.
#[derive(Debug, Default)]
pub(super) struct Background {
    /// Aborted on drop.
    tasks: Vec<AbortHandle>,
    /// The reloaders, which stop themselves when their guard drops.
    reloaders: Vec<BackgroundTask>,
}

impl Background {
    fn adopt(&mut self, task: tokio::task::JoinHandle<()>) {
        self.tasks.push(task.abort_handle());
    }

    /// The tasks' handles, for tests that check they end.
    #[cfg(test)]
    pub(super) fn handles(&self) -> Vec<AbortHandle> {
        let reloaders = self.reloaders.iter().map(BackgroundTask::abort_handle);
        self.tasks.iter().cloned().chain(reloaders).collect()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

// === impl ChatAuthLayer ===

impl ChatAuthLayer {
    /// A layer over the config file at `path`, hot-reloaded, with its revocation store
    /// open and followed. Needs a tokio runtime; the background tasks it starts (file
    /// watcher, SIGHUP reloader, store invalidation, cache settings) end when the last
    /// clone of the layer, and of the services it built, is dropped.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), chatgate::layer::SetupError> {
    /// let layer = chatgate::ChatAuthLayer::from_config_file("config.toml").await?;
    /// // router.layer(layer)
    /// # let _ = layer;
    /// # Ok(()) }
    /// ```
    ///
    /// SIGHUP reloads the config (secret files included), as it does for `chatgate
    /// serve`; tokio keeps its SIGHUP handler installed for the life of the process.
    pub async fn from_config_file(path: impl AsRef<Path>) -> Result<Self, SetupError> {
        let config = ConfigHandle::from_file(path)?;
        let mut background = Background::default();
        // Created before the store opens, so an edit made meanwhile is not missed.
        let watcher = ConfigWatcher::new(config.clone())?;
        let layer = Self::with_background(config.clone(), &mut background).await?;
        background.reloaders.push(watcher.spawn());
        let sighup = spawn_sighup_reloader(config).map_err(SetupError::Sighup)?;
        background.reloaders.push(sighup);
        Ok(layer.owning(background))
    }

    /// A layer over a live `config` (reloaded by whoever holds it, or never) with the
    /// store `[revocation]` names open and followed: what
    /// [`ChatAuthLayer::from_config_file`] does without watching a file.
    pub async fn from_config(config: ConfigHandle) -> Result<Self, SetupError> {
        let mut background = Background::default();
        let layer = Self::with_background(config, &mut background).await?;
        Ok(layer.owning(background))
    }

    async fn with_background(
        config: ConfigHandle,
        background: &mut Background,
    ) -> Result<Self, SetupError> {
        let settings = config.load().revocation.clone();
        let cache = RevocationCache::new(open_store(&settings).await?, &settings);
        background.adopt(cache.spawn_invalidation());
        background.adopt(cache.follow_config(&config));
        Ok(ChatAuthLayer::new(Gate::new(config, cache)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::TokenBuilder;
    use crate::{Decision, RequestParts};
    use http::Request;
    use std::time::Duration;

    fn config_file(dir: &Path, api_key: &str) -> std::path::PathBuf {
        let path = dir.join("chatgate.toml");
        std::fs::write(
            &path,
            format!(
                "[revocation]\nstore = \"memory\"\n\n[[apps]]\napi_key = \"{api_key}\"\nsecrets = [\"s\"]\n"
            ),
        )
        .unwrap();
        path
    }

    async fn decide(layer: &ChatAuthLayer, api_key: &str) -> Result<Decision, crate::AuthError> {
        let request = Request::get(format!("/x?api_key={api_key}"))
            .header("authorization", TokenBuilder::user("u").sign("s"))
            .body(())
            .unwrap();
        let (parts, ()) = request.into_parts();
        layer.gate().check(RequestParts::from(&parts)).await
    }

    async fn within(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if done() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        done()
    }

    #[tokio::test]
    async fn one_call_serves_the_file_and_follows_its_edits() {
        let dir = tempfile::tempdir().unwrap();
        let path = config_file(dir.path(), "first");
        let layer = ChatAuthLayer::from_config_file(&path).await.unwrap();
        assert!(matches!(
            decide(&layer, "first").await,
            Ok(Decision::Allow(_))
        ));

        config_file(dir.path(), "second");
        let reloaded = within(Duration::from_secs(10), || {
            layer.gate().config().version() > 1
        });
        assert!(reloaded.await, "the edit was not picked up");
        assert!(matches!(
            decide(&layer, "second").await,
            Ok(Decision::Allow(_))
        ));
        assert_eq!(
            decide(&layer, "first").await,
            Err(crate::AuthError::UnknownApiKey)
        );
    }

    #[tokio::test]
    async fn the_background_tasks_end_with_the_last_clone_of_the_layer() {
        use tower::Layer as _;
        let dir = tempfile::tempdir().unwrap();
        let layer = ChatAuthLayer::from_config_file(config_file(dir.path(), "k"))
            .await
            .unwrap();
        let tasks = layer.background().expect("owned tasks").handles();
        assert_eq!(tasks.len(), 4, "watcher, SIGHUP, invalidation, settings");
        let service = layer.clone().layer(());
        drop(layer);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            tasks.iter().all(|t| !t.is_finished()),
            "a service still holds the layer's state"
        );
        drop(service);
        let ended = within(Duration::from_secs(5), || {
            tasks.iter().all(AbortHandle::is_finished)
        });
        assert!(ended.await, "a background task outlived the layer");
    }

    #[tokio::test]
    async fn setup_errors_are_typed() {
        let dir = tempfile::tempdir().unwrap();
        let missing = ChatAuthLayer::from_config_file(dir.path().join("absent.toml")).await;
        assert!(matches!(
            missing,
            Err(SetupError::Config(ConfigError::Io { .. }))
        ));

        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "[[apps]]\napi_key = \"k\"\n").unwrap();
        let invalid = ChatAuthLayer::from_config_file(&path).await;
        assert!(matches!(
            invalid,
            Err(SetupError::Config(ConfigError::Invalid { .. }))
        ));

        // A store that cannot open: the embedded store's file under a plain file.
        let blocker = dir.path().join("blocker");
        std::fs::write(&blocker, "").unwrap();
        let path = dir.path().join("store.toml");
        std::fs::write(
            &path,
            "[revocation]\nstore = \"embedded\"\npath = \"blocker/revocations.db\"\n\n[[apps]]\napi_key = \"k\"\nsecrets = [\"s\"]\n",
        )
        .unwrap();
        let store = ChatAuthLayer::from_config_file(&path).await;
        assert!(matches!(store, Err(SetupError::Store(_))), "{store:?}");
    }
}
