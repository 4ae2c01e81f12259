//! What triggers a reload: file system events (debounced) and SIGHUP.
//!
//! The watch is on the config file's parent directory, not on the file: an inode watch
//! is lost when an editor renames a temp file over the config, when Kubernetes flips the
//! `..data` symlink of a ConfigMap volume, or when the file is deleted and re-created.
//! Any change to the config's name, or to a `..`-prefixed entry (the ConfigMap atomic
//! writer's), triggers a reload, which re-resolves the path and compares content hashes,
//! so spurious events are no-ops.

use super::ConfigHandle;
use futures_util::FutureExt;
use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{Event, EventKind, RecursiveMode, Watcher};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Quiet period after the last event before reloading: long enough for a write in
/// several syscalls or a rename sequence to finish.
pub const DEFAULT_QUIET: Duration = Duration::from_millis(150);
/// Longest a reload waits for quiet and for a writer to close the file: a directory
/// written continuously must not starve reloads.
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(1);
/// Upper bound of [`ConfigWatcher::with_max_delay`].
const MAX_DELAY_LIMIT: Duration = Duration::from_secs(10);

/// Why a watcher could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WatchError {
    /// The config was not loaded from a file.
    #[error("this config was not loaded from a file, there is nothing to watch")]
    NoFile,
    /// The OS watch could not be set up.
    #[error("cannot watch {dir}: {source}")]
    Notify {
        /// The watched directory.
        dir: PathBuf,
        /// The notify error.
        source: notify::Error,
    },
}

/// Reloads the config when its file changes. Create it with [`ConfigWatcher::new`] (the
/// OS watch starts at once, so no change made after `new` returns is missed), then run it
/// with [`ConfigWatcher::run`] (a shutdown future, e.g. in a Pingora background service)
/// or [`ConfigWatcher::spawn`].
pub struct ConfigWatcher {
    handle: ConfigHandle,
    // Dropping it ends the OS watch and closes `wakeups`.
    _watcher: notify::RecommendedWatcher,
    wakeups: mpsc::Receiver<()>,
    writer: Arc<AtomicBool>,
    quiet: Duration,
    max_delay: Duration,
}

/// A spawned background task that stops when this guard is dropped or
/// [`BackgroundTask::stop`] is called.
#[derive(Debug)]
pub struct BackgroundTask {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

// === impl ConfigWatcher ===

impl ConfigWatcher {
    /// Watches the directory of `handle`'s file.
    pub fn new(handle: ConfigHandle) -> Result<Self, WatchError> {
        let path = handle.path().ok_or(WatchError::NoFile)?.to_path_buf();
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let watched = path.clone();
        // Capacity 1: one pending wake-up already means "reload soon"; more add nothing.
        let (wake, wakeups) = mpsc::channel(1);
        let writer = Arc::new(AtomicBool::new(false));
        let writing = writer.clone();
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<Event>| {
            let relevant = match &event {
                Ok(event) => {
                    if let Some(open) = writer_open_after(event, watched.file_name()) {
                        writing.store(open, Ordering::SeqCst);
                    }
                    is_relevant(event, &watched_names(&watched))
                }
                Err(error) => {
                    tracing::warn!(target: "chatgate::reload", %error, "file watch error; reloading to be safe");
                    true
                }
            };
            if relevant {
                let _ = wake.try_send(());
            }
        })
        .map_err(|source| WatchError::Notify {
            dir: dir.clone(),
            source,
        })?;
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(|source| WatchError::Notify {
                dir: dir.clone(),
                source,
            })?;
        tracing::info!(target: "chatgate::reload", dir = %dir.display(), file = %path.display(), "watching the config");
        Ok(ConfigWatcher {
            handle,
            _watcher: watcher,
            wakeups,
            writer,
            quiet: DEFAULT_QUIET,
            max_delay: DEFAULT_MAX_DELAY,
        })
    }

    /// Sets the quiet period (default [`DEFAULT_QUIET`]; at most the max delay).
    pub fn with_quiet_period(mut self, quiet: Duration) -> Self {
        self.quiet = quiet.min(self.max_delay);
        self
    }

    /// Sets how long a reload may wait for quiet and for an in-place writer to close the
    /// file (default [`DEFAULT_MAX_DELAY`]; at most 10 s).
    pub fn with_max_delay(mut self, max_delay: Duration) -> Self {
        self.max_delay = max_delay.min(MAX_DELAY_LIMIT);
        self.quiet = self.quiet.min(self.max_delay);
        self
    }

    /// Reloads after each burst of changes until `shutdown` completes.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => return,
                woke = self.wakeups.recv() => if woke.is_none() { return },
            }
            if !self.settle(&mut shutdown).await {
                return;
            }
            // Errors are logged and counted by reload itself.
            let _ = self.handle.reload_async().await;
        }
    }

    /// Runs the watcher as a tokio task.
    pub fn spawn(self) -> BackgroundTask {
        BackgroundTask::spawn(|stopped| self.run(stopped))
    }

    /// Waits until no event came for the quiet period and no one is writing the file in
    /// place (a half-written file is often valid TOML with apps missing), or until the
    /// max delay passed since the first event. False when shut down meanwhile.
    async fn settle(
        &mut self,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> bool {
        let latest = Instant::now() + self.max_delay;
        loop {
            let until = (Instant::now() + self.quiet).min(latest);
            tokio::select! {
                biased;
                () = shutdown.as_mut() => return false,
                () = tokio::time::sleep_until(until) => {
                    if !self.writer.load(Ordering::SeqCst) {
                        return true;
                    }
                    tracing::debug!(target: "chatgate::reload", "the config file is still open for writing; waiting");
                }
                woke = self.wakeups.recv() => if woke.is_none() { return false },
            }
            if Instant::now() >= latest {
                return true;
            }
        }
    }
}

impl std::fmt::Debug for ConfigWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigWatcher")
            .field("path", &self.handle.path())
            .field("quiet", &self.quiet)
            .field("max_delay", &self.max_delay)
            .finish()
    }
}

/// The directory entries whose changes can change what the config path resolves to:
/// its own name, and the first entry of a relative symlink target
/// (`config.toml -> current/config.toml`: flipping `current` changes the config).
/// Re-read on every event, as the link itself may have been replaced.
fn watched_names(path: &Path) -> Vec<OsString> {
    let mut names: Vec<OsString> = path.file_name().map(OsString::from).into_iter().collect();
    if let Ok(target) = std::fs::read_link(path)
        && let Some(std::path::Component::Normal(first)) = target.components().next()
        && !names.iter().any(|n| n == first)
    {
        names.push(first.to_owned());
    }
    names
}

/// Whether someone is writing the config file in place after `event`: from a data write
/// (not a create: `ln -s` creates and never closes a writer) until the writer closes it (inotify's close-write), or it is renamed
/// or removed. `None`: no news. Backends without close events make every in-place
/// write wait the max delay, which is safe.
fn writer_open_after(event: &Event, config_name: Option<&OsStr>) -> Option<bool> {
    let about_config = event.paths.iter().any(|path| {
        path.file_name()
            .is_some_and(|name| Some(name) == config_name)
    });
    if !about_config {
        return None;
    }
    match event.kind {
        EventKind::Modify(ModifyKind::Data(_)) => Some(true),
        EventKind::Access(AccessKind::Close(AccessMode::Write))
        | EventKind::Modify(ModifyKind::Name(_))
        | EventKind::Remove(_) => Some(false),
        _ => None,
    }
}

/// Opens and reads (ours included) change nothing; a closed writer, a create, a
/// modification, a rename or a removal of a watched name may.
fn is_relevant(event: &Event, names: &[OsString]) -> bool {
    if event.need_rescan() {
        return true;
    }
    let changes = match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    };
    changes
        && event.paths.iter().any(|path| match path.file_name() {
            Some(name) => {
                names.iter().any(|n| n == name) || name.as_encoded_bytes().starts_with(b"..")
            }
            None => true,
        })
}

// === SIGHUP ===

/// Force-reloads the config on every SIGHUP until `shutdown` completes. Forced, so that
/// `secret_file` contents are re-read even when the config file itself is unchanged.
/// Fails only if the signal handler cannot be installed.
pub async fn reload_on_sighup(
    handle: ConfigHandle,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    sighup_loop(handle, hangups, shutdown).await;
    Ok(())
}

/// Installs the SIGHUP handler now (so a SIGHUP right after this returns is not lost
/// or fatal) and reloads on each one in a task. Needs a tokio runtime.
pub fn spawn_sighup_reloader(handle: ConfigHandle) -> std::io::Result<BackgroundTask> {
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    Ok(BackgroundTask::spawn(move |stopped| {
        sighup_loop(handle, hangups, stopped)
    }))
}

async fn sighup_loop(
    handle: ConfigHandle,
    mut hangups: tokio::signal::unix::Signal,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => return,
            signal = hangups.recv() => if signal.is_none() { return },
        }
        tracing::info!(target: "chatgate::reload", "SIGHUP: reloading the config");
        let reload = handle.clone();
        let _ = tokio::task::spawn_blocking(move || reload.force_reload()).await;
    }
}

// === all of it ===

/// The file watcher and the SIGHUP reloader together until `shutdown` completes: what
/// the proxy runs as one background service. Neither failing to start stops the other
/// (a directory that cannot be watched still leaves SIGHUP); such errors are logged.
pub async fn run_reloaders(handle: ConfigHandle, shutdown: impl Future<Output = ()>) {
    let shutdown = shutdown.shared();
    let watcher = match ConfigWatcher::new(handle.clone()) {
        Ok(watcher) => Some(watcher.run(shutdown.clone())),
        Err(error) => {
            tracing::error!(target: "chatgate::reload", %error, "config file watch disabled; SIGHUP still reloads");
            None
        }
    };
    let watching = async {
        if let Some(watcher) = watcher {
            watcher.await;
        }
    };
    let hangups = async {
        if let Err(error) = reload_on_sighup(handle, shutdown.clone()).await {
            tracing::error!(target: "chatgate::reload", %error, "SIGHUP reload disabled");
        }
    };
    tokio::join!(watching, hangups);
}

// === impl BackgroundTask ===

impl BackgroundTask {
    fn spawn<F, Fut>(run: F) -> Self
    where
        F: FnOnce(std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (stop, stopped) = oneshot::channel::<()>();
        // Stopping by message or by the guard's drop (the sender's drop) alike.
        let stopped = Box::pin(async move {
            let _ = stopped.await;
        });
        BackgroundTask {
            stop: Some(stop),
            task: tokio::spawn(run(stopped)),
        }
    }

    /// Stops the task and waits for it to finish.
    pub async fn stop(mut self) {
        drop(self.stop.take());
        let _ = (&mut self.task).await;
    }

    /// Whether the task has ended.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// A handle that sees the task end after this guard is gone.
    #[cfg(all(test, feature = "tower"))]
    pub(crate) fn abort_handle(&self) -> tokio::task::AbortHandle {
        self.task.abort_handle()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, DataChange, RemoveKind, RenameMode};

    fn event(kind: EventKind, paths: &[&str]) -> Event {
        let mut event = Event::new(kind);
        for path in paths {
            event = event.add_path(PathBuf::from(path));
        }
        event
    }

    /// Whether an event of `kind` on `paths` triggers a reload of `/d/config.toml`.
    fn relevant(kind: EventKind, paths: &[&str]) -> bool {
        is_relevant(&event(kind, paths), &[OsString::from("config.toml")])
    }

    #[test]
    fn changes_to_the_config_or_configmap_entries_are_relevant() {
        let config = ["/d/config.toml"];
        let data = EventKind::Modify(ModifyKind::Data(DataChange::Any));
        let closed = EventKind::Access(AccessKind::Close(AccessMode::Write));
        let renamed = EventKind::Modify(ModifyKind::Name(RenameMode::Both));
        assert!(relevant(data, &config));
        assert!(relevant(closed, &config));
        assert!(relevant(
            renamed,
            &["/d/.config.toml.tmp", "/d/config.toml"]
        ));
        assert!(relevant(EventKind::Remove(RemoveKind::File), &config));
        assert!(relevant(
            EventKind::Create(CreateKind::Any),
            &["/d/..data_tmp"]
        ));
        assert!(relevant(EventKind::Any, &config));
    }

    #[test]
    fn reads_and_other_files_are_not_relevant() {
        let config = ["/d/config.toml"];
        let opened = EventKind::Access(AccessKind::Open(AccessMode::Any));
        let read = EventKind::Access(AccessKind::Close(AccessMode::Read));
        let data = EventKind::Modify(ModifyKind::Data(DataChange::Any));
        assert!(!relevant(opened, &config));
        assert!(!relevant(read, &config));
        assert!(!relevant(data, &["/d/chatgate-revocations.db"]));
    }

    #[test]
    fn a_symlink_into_a_subdirectory_watches_that_entry_too() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("v1")).unwrap();
        std::fs::write(dir.path().join("v1/chat.toml"), "").unwrap();
        std::os::unix::fs::symlink("v1/chat.toml", dir.path().join("config.toml")).unwrap();
        let names = watched_names(&dir.path().join("config.toml"));
        assert_eq!(names, [OsString::from("config.toml"), OsString::from("v1")]);
        assert_eq!(
            watched_names(&dir.path().join("v1/chat.toml")),
            [OsString::from("chat.toml")]
        );
    }

    #[test]
    fn an_in_place_writer_is_open_from_its_first_write_until_it_closes() {
        let name = Some(OsStr::new("config.toml"));
        let on = |kind| writer_open_after(&event(kind, &["/d/config.toml"]), name);
        assert_eq!(on(EventKind::Create(CreateKind::File)), None);
        assert_eq!(
            on(EventKind::Modify(ModifyKind::Data(DataChange::Any))),
            Some(true)
        );
        assert_eq!(
            on(EventKind::Access(AccessKind::Close(AccessMode::Write))),
            Some(false)
        );
        assert_eq!(
            on(EventKind::Modify(ModifyKind::Name(RenameMode::To))),
            Some(false)
        );
        assert_eq!(on(EventKind::Remove(RemoveKind::File)), Some(false));
        assert_eq!(
            on(EventKind::Access(AccessKind::Open(AccessMode::Any))),
            None
        );
        let other = event(
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            &["/d/config.toml.tmp"],
        );
        assert_eq!(writer_open_after(&other, name), None);
    }
}
