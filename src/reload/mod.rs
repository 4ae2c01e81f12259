//! The live config: an `ArcSwap` of the current [`ConfigSnapshot`]. Requests `load()`
//! it once and finish on the snapshot they started with; a reload `store()`s a new one
//! only after it validated whole.
//!
//! A reload re-reads the file the handle was loaded from, validates all of it, keeps the
//! running value of every setting that needs a restart (and reports it), and swaps the
//! result in. A failed reload changes nothing but the status: the last good config keeps
//! serving, whole.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use chatgate::reload::{ConfigHandle, ConfigWatcher};
//!
//! let config = ConfigHandle::from_file("config.toml")?;
//! // Follows edits, renames, ConfigMap symlink flips; stops when `watcher` is dropped.
//! let watcher = ConfigWatcher::new(config.clone())?.spawn();
//! let _sighup = chatgate::reload::spawn_sighup_reloader(config.clone())?;
//! println!("{:?}", config.status());
//! watcher.stop().await;
//! # Ok(()) }
//! ```

mod watcher;

pub use watcher::{
    BackgroundTask, ConfigWatcher, DEFAULT_MAX_DELAY, DEFAULT_QUIET, WatchError, reload_on_sighup,
    run_reloaders, spawn_sighup_reloader,
};

use crate::config::{ConfigError, ConfigSnapshot, content_hash};
use arc_swap::ArcSwap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;
use tokio::sync::watch;

/// A cheap, cloneable handle to the current config.
#[derive(Clone)]
pub struct ConfigHandle {
    shared: Arc<Shared>,
}

struct Shared {
    current: ArcSwap<ConfigSnapshot>,
    path: Option<PathBuf>,
    /// Held for a whole reload (read, validate, swap), so that the watcher and SIGHUP
    /// cannot interleave and swap an older file's snapshot over a newer one.
    reloading: Mutex<()>,
    /// Separate from `reloading` so `status()` never waits for a file read; the swap
    /// itself happens under this lock, so a status's version always matches its snapshot.
    state: Mutex<State>,
    versions: watch::Sender<u64>,
}

struct State {
    version: u64,
    reloads_ok: u64,
    reloads_failed: u64,
    last_error: Option<ReloadFailure>,
    restart_required: Vec<&'static str>,
}

/// Why the most recent reload failed, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadFailure {
    /// The located error, `file:line:col: key: message`.
    pub message: String,
    /// When the reload was attempted.
    pub at: SystemTime,
}

/// What a successful [`ConfigHandle::reload`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReloadOutcome {
    /// A new snapshot is live.
    Applied {
        /// Its version.
        version: u64,
        /// Its content hash.
        content_hash: String,
        /// Settings the file changes but that keep their running value until a restart.
        restart_required: Vec<&'static str>,
    },
    /// The file has the running config's content hash: nothing was swapped.
    Unchanged {
        /// The running version.
        version: u64,
    },
}

/// The config's state, for the admin listener's `/config` and for `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigStatus {
    /// Starts at 1 and grows by one with every swap.
    pub version: u64,
    /// Short SHA-256 of the running file's bytes.
    pub content_hash: String,
    /// When the running snapshot was built.
    pub loaded_at: SystemTime,
    /// The file it was loaded from.
    pub source: PathBuf,
    /// The error of the latest reload attempt; cleared once a later attempt finds a
    /// valid file (applied or unchanged).
    pub last_error: Option<ReloadFailure>,
    /// Reloads that swapped in a new snapshot.
    pub reloads_ok: u64,
    /// Reloads that failed and kept the running config.
    pub reloads_failed: u64,
    /// Settings whose new value in the file waits for a restart (the running value
    /// stays in force), e.g. `server.listen`.
    pub restart_required: Vec<&'static str>,
}

impl ConfigStatus {
    /// The status as JSON, times in RFC 3339.
    pub fn to_json(&self) -> serde_json::Value {
        let rfc3339 = |at: SystemTime| {
            chrono::DateTime::<chrono::Utc>::from(at)
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        };
        serde_json::json!({
            "version": self.version,
            "content_hash": self.content_hash,
            "loaded_at": rfc3339(self.loaded_at),
            "source": self.source.display().to_string(),
            "last_error": self.last_error.as_ref().map(|e| serde_json::json!({
                "message": e.message,
                "at": rfc3339(e.at),
            })),
            "reloads_ok": self.reloads_ok,
            "reloads_failed": self.reloads_failed,
            "restart_required": self.restart_required,
        })
    }
}

// === impl ConfigHandle ===

impl ConfigHandle {
    /// A handle starting at `snapshot`, version 1. It reloads from `snapshot.source`
    /// when that is set (snapshots from [`ConfigSnapshot::load`]).
    pub fn new(snapshot: ConfigSnapshot) -> Self {
        let path = (!snapshot.source.as_os_str().is_empty()).then(|| snapshot.source.clone());
        ConfigHandle {
            shared: Arc::new(Shared {
                current: ArcSwap::from_pointee(snapshot),
                path,
                reloading: Mutex::new(()),
                state: Mutex::new(State {
                    version: 1,
                    reloads_ok: 0,
                    reloads_failed: 0,
                    last_error: None,
                    restart_required: Vec::new(),
                }),
                versions: watch::channel(1).0,
            }),
        }
    }

    /// Loads and validates `path`; [`ConfigHandle::reload`] re-reads the same path.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        Ok(Self::new(ConfigSnapshot::load(path)?))
    }

    /// The current snapshot, for use within one synchronous step.
    pub fn load(&self) -> arc_swap::Guard<Arc<ConfigSnapshot>> {
        self.shared.current.load()
    }

    /// The current snapshot, to hold across `.await`.
    pub fn load_full(&self) -> Arc<ConfigSnapshot> {
        self.shared.current.load_full()
    }

    /// The file reloads read, if the config came from one.
    pub fn path(&self) -> Option<&Path> {
        self.shared.path.as_deref()
    }

    /// The running version (1 at start).
    pub fn version(&self) -> u64 {
        lock(&self.shared.state).version
    }

    /// Swaps in an already validated snapshot as given (all of it, restart-only settings
    /// included: it is for configs built in code) and notifies subscribers.
    pub fn store(&self, snapshot: ConfigSnapshot) {
        let version = {
            let mut state = lock(&self.shared.state);
            state.version += 1;
            self.shared.current.store(Arc::new(snapshot));
            state.version
        };
        self.shared.versions.send_replace(version);
    }

    /// The version, changed after every swap: for code that must follow the config
    /// (e.g. [`crate::revocation::RevocationCache::follow_config`]).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.versions.subscribe()
    }

    /// Re-reads and validates the whole file and swaps it in if valid. A file with the
    /// running content hash is a no-op. On error the running config stays, and the error
    /// is logged, counted and kept in [`ConfigHandle::status`].
    ///
    /// Blocking (file I/O): from async code call it in `spawn_blocking`, or use
    /// [`ConfigHandle::reload_async`].
    pub fn reload(&self) -> Result<ReloadOutcome, ConfigError> {
        self.reload_with(false)
    }

    /// [`ConfigHandle::reload`] even when the file is unchanged, so that `secret_file`
    /// contents are read again (what SIGHUP does).
    pub fn force_reload(&self) -> Result<ReloadOutcome, ConfigError> {
        self.reload_with(true)
    }

    /// [`ConfigHandle::reload`] on tokio's blocking pool.
    pub async fn reload_async(&self) -> Result<ReloadOutcome, ConfigError> {
        let handle = self.clone();
        match tokio::task::spawn_blocking(move || handle.reload()).await {
            Ok(result) => result,
            // reload() does not panic on any input; if it ever did, propagate it.
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        }
    }

    /// Version, hash, last error and counters.
    pub fn status(&self) -> ConfigStatus {
        let state = lock(&self.shared.state);
        let snapshot = self.load_full();
        ConfigStatus {
            version: state.version,
            content_hash: snapshot.content_hash.clone(),
            loaded_at: snapshot.loaded_at,
            source: snapshot.source.clone(),
            last_error: state.last_error.clone(),
            reloads_ok: state.reloads_ok,
            reloads_failed: state.reloads_failed,
            restart_required: state.restart_required.clone(),
        }
    }

    /// A reference that does not keep the config (or its subscribers' channel) alive.
    pub(crate) fn downgrade(&self) -> WeakConfigHandle {
        WeakConfigHandle(Arc::downgrade(&self.shared))
    }

    fn reload_with(&self, force: bool) -> Result<ReloadOutcome, ConfigError> {
        let _one_at_a_time = lock(&self.shared.reloading);
        let result = self.read_and_swap(force);
        match &result {
            Ok(ReloadOutcome::Applied {
                version,
                content_hash,
                restart_required,
            }) => {
                if restart_required.is_empty() {
                    tracing::info!(target: "chatgate::reload", version, %content_hash, "config reloaded");
                } else {
                    tracing::warn!(
                        target: "chatgate::reload",
                        version,
                        %content_hash,
                        restart_required = ?restart_required,
                        "config reloaded; some changed settings need a restart and keep their running value"
                    );
                }
            }
            Ok(ReloadOutcome::Unchanged { version }) => {
                tracing::debug!(target: "chatgate::reload", version, "config file unchanged");
            }
            Err(error) => {
                let mut state = lock(&self.shared.state);
                state.reloads_failed += 1;
                state.last_error = Some(ReloadFailure {
                    message: error.to_string(),
                    at: SystemTime::now(),
                });
                tracing::error!(
                    target: "chatgate::reload",
                    %error,
                    running_version = state.version,
                    "config reload failed; the running config stays"
                );
            }
        }
        result
    }

    fn read_and_swap(&self, force: bool) -> Result<ReloadOutcome, ConfigError> {
        let Some(path) = self.shared.path.as_deref() else {
            return Err(ConfigError::Io {
                file: PathBuf::new(),
                message: "this config was not loaded from a file, there is nothing to reload"
                    .into(),
            });
        };
        // Read once and validate exactly these bytes: reading again to hash could see a
        // different (e.g. half-written) file than the one validated.
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Io {
            file: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let running = self.load_full();
        if !force && content_hash(&text) == running.content_hash {
            let mut state = lock(&self.shared.state);
            state.last_error = None;
            return Ok(ReloadOutcome::Unchanged {
                version: state.version,
            });
        }
        let mut next = ConfigSnapshot::parse(&text, path)?;
        let restart_required = running.restart_required_changes(&next);
        keep_restart_only_settings(&running, &mut next);
        let content_hash = next.content_hash.clone();
        let version = {
            let mut state = lock(&self.shared.state);
            state.version += 1;
            state.reloads_ok += 1;
            state.last_error = None;
            state.restart_required = restart_required.clone();
            self.shared.current.store(Arc::new(next));
            state.version
        };
        self.shared.versions.send_replace(version);
        Ok(ReloadOutcome::Applied {
            version,
            content_hash,
            restart_required,
        })
    }
}

/// A [`ConfigHandle`] that does not keep it alive.
#[derive(Clone)]
pub(crate) struct WeakConfigHandle(std::sync::Weak<Shared>);

impl WeakConfigHandle {
    pub(crate) fn upgrade(&self) -> Option<ConfigHandle> {
        self.0.upgrade().map(|shared| ConfigHandle { shared })
    }
}

/// Carries over the running value of everything
/// [`ConfigSnapshot::restart_required_changes`] reports, so that the live snapshot
/// always describes what the process really does.
fn keep_restart_only_settings(running: &ConfigSnapshot, next: &mut ConfigSnapshot) {
    next.server.listen = running.server.listen;
    next.server.admin_listen = running.server.admin_listen;
    next.server.threads = running.server.threads;
    next.server.work_stealing = running.server.work_stealing;
    if running.server.tls.is_some() != next.server.tls.is_some() {
        next.server.tls = running.server.tls.clone();
    }
    next.revocation.store = running.revocation.store;
    next.revocation.path = running.revocation.path.clone();
    next.revocation.redis_url = running.revocation.redis_url.clone();
    next.revocation.redis = running.revocation.redis.clone();
    next.upstream.tls = running.upstream.tls;
    next.upstream.demo = running.upstream.demo;
}

/// The data behind these locks stays consistent even if a holder panicked (every
/// update is a few plain assignments), so poisoning is ignored.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl std::fmt::Debug for ConfigHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigHandle")
            .field("path", &self.shared.path)
            .field("version", &self.version())
            .field("content_hash", &self.load().content_hash)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StoreKind;

    fn config(secrets: &str, listen: &str) -> String {
        format!(
            "[server]\nlisten = \"{listen}\"\n\n[revocation]\nstore = \"memory\"\ncache_ttl_seconds = 30\n\n[[apps]]\napi_key = \"k\"\nsecrets = [{secrets}]\n"
        )
    }

    fn handle_on(text: &str) -> (tempfile::TempDir, PathBuf, ConfigHandle) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        let handle = ConfigHandle::from_file(&path).unwrap();
        (dir, path, handle)
    }

    #[test]
    fn a_valid_edit_is_swapped_in_with_a_new_version_and_subscribers_see_it() {
        let (_dir, path, handle) = handle_on(&config("\"a\"", "127.0.0.1:8080"));
        let mut versions = handle.subscribe();
        assert_eq!(*versions.borrow_and_update(), 1);
        std::fs::write(&path, config("\"a\", \"b\"", "127.0.0.1:8080")).unwrap();
        let outcome = handle.reload().unwrap();
        assert!(
            matches!(outcome, ReloadOutcome::Applied { version: 2, ref restart_required, .. } if restart_required.is_empty())
        );
        assert_eq!(handle.load().app("k").unwrap().secret_count(), 2);
        assert!(versions.has_changed().unwrap());
        assert_eq!(*versions.borrow_and_update(), 2);
        let status = handle.status();
        assert_eq!((status.version, status.reloads_ok), (2, 1));
        assert_eq!(status.source, path);
    }

    #[test]
    fn an_unchanged_file_is_a_no_op_unless_forced() {
        let (_dir, _path, handle) = handle_on(&config("\"a\"", "127.0.0.1:8080"));
        let before = handle.load_full();
        assert_eq!(
            handle.reload().unwrap(),
            ReloadOutcome::Unchanged { version: 1 }
        );
        assert!(Arc::ptr_eq(&before, &handle.load_full()));
        assert_eq!(handle.status().reloads_ok, 0);
        assert!(matches!(
            handle.force_reload().unwrap(),
            ReloadOutcome::Applied { version: 2, .. }
        ));
        assert!(!Arc::ptr_eq(&before, &handle.load_full()));
    }

    #[test]
    fn a_failed_reload_keeps_the_snapshot_and_reports_the_located_error_until_fixed() {
        let good = config("\"a\"", "127.0.0.1:8080");
        let (_dir, path, handle) = handle_on(&good);
        let before = handle.load_full();
        std::fs::write(&path, good.replace("[\"a\"]", "[\"\"]")).unwrap();
        let error = handle.reload().unwrap_err();
        assert_eq!(error.key(), Some("apps[0].secrets[0]"));
        assert!(Arc::ptr_eq(&before, &handle.load_full()));
        let status = handle.status();
        assert_eq!((status.version, status.reloads_failed), (1, 1));
        let failure = status.last_error.unwrap();
        assert!(
            failure
                .message
                .starts_with(&format!("{}:10:", path.display())),
            "{}",
            failure.message
        );
        assert!(failure.message.contains("apps[0].secrets[0]"));
        // restoring the running content clears the error without a swap
        std::fs::write(&path, &good).unwrap();
        assert_eq!(
            handle.reload().unwrap(),
            ReloadOutcome::Unchanged { version: 1 }
        );
        assert_eq!(handle.status().last_error, None);
        assert_eq!(handle.status().reloads_failed, 1);
    }

    #[test]
    fn restart_only_settings_keep_their_running_value_and_are_listed() {
        let (_dir, path, handle) = handle_on(&config("\"a\"", "127.0.0.1:8080"));
        let text = config("\"b\"", "127.0.0.1:8181")
            .replace("store = \"memory\"", "store = \"embedded\"")
            .replace("[server]\n", "[server]\nthreads = 2\n");
        std::fs::write(&path, text).unwrap();
        let ReloadOutcome::Applied {
            restart_required, ..
        } = handle.reload().unwrap()
        else {
            panic!("not applied")
        };
        assert_eq!(
            restart_required,
            ["server.listen", "server.threads", "revocation.store"]
        );
        let running = handle.load();
        assert_eq!(running.server.listen.port(), 8080);
        assert_eq!(running.server.threads, 1);
        assert_eq!(running.revocation.store, StoreKind::Memory);
        // the live part of the same edit is applied
        assert_eq!(running.app("k").unwrap().signing_secret(), "b");
        assert_eq!(handle.status().restart_required, restart_required);
        drop(running);
        // every restart-only setting at once: none may leak into the live snapshot
        let before = handle.load_full();
        let text = config("\"b\"", "127.0.0.1:8282")
            .replace(
                "[server]\n",
                "[server]\nadmin_listen = \"off\"\nthreads = 3\nwork_stealing = true\n",
            )
            .replace(
                "store = \"memory\"",
                "store = \"redis\"\npath = \"other.db\"\nredis_url = \"redis://10.0.0.1\"",
            )
            + "\n[upstream]\ntls = true\ndemo = true\n";
        std::fs::write(&path, text).unwrap();
        let ReloadOutcome::Applied {
            restart_required, ..
        } = handle.reload().unwrap()
        else {
            panic!("not applied")
        };
        assert_eq!(
            restart_required,
            [
                "server.listen",
                "server.admin_listen",
                "server.threads",
                "server.work_stealing",
                "revocation.store",
                "upstream.tls"
            ]
        );
        assert!(before.restart_required_changes(&handle.load()).is_empty());
        // reverting the restart-only changes empties the list
        std::fs::write(&path, config("\"b\"", "127.0.0.1:8080")).unwrap();
        handle.reload().unwrap();
        assert!(handle.status().restart_required.is_empty());
    }

    #[test]
    fn a_handle_built_in_code_has_nothing_to_reload() {
        let handle = ConfigHandle::new(ConfigSnapshot::with_apps(vec![]));
        assert_eq!(handle.path(), None);
        assert!(handle.reload().is_err());
        assert_eq!(handle.status().reloads_failed, 1);
        handle.store(ConfigSnapshot::with_apps(vec![]));
        assert_eq!(handle.version(), 2);
    }

    #[test]
    fn status_json_has_every_field_with_rfc3339_times() {
        let (_dir, path, handle) = handle_on(&config("\"a\"", "127.0.0.1:8080"));
        std::fs::write(&path, "not toml [").unwrap();
        handle.reload().unwrap_err();
        let json = handle.status().to_json();
        assert_eq!(json["version"], 1);
        assert_eq!(json["reloads_failed"], 1);
        assert_eq!(json["content_hash"].as_str().unwrap().len(), 16);
        assert!(json["loaded_at"].as_str().unwrap().ends_with('Z'));
        assert!(json["last_error"]["at"].as_str().unwrap().ends_with('Z'));
        assert!(
            json["last_error"]["message"]
                .as_str()
                .unwrap()
                .contains("config.toml:1:")
        );
        assert_eq!(json["restart_required"], serde_json::json!([]));
    }
}
