//! The default store (contract §3: a revocation is stored before it is acknowledged):
//! a redb database file. redb commits with fsync
//! (`Durability::Immediate`), so a revocation is on disk before the request that made
//! it is answered, and a kill -9 right after loses nothing.
//!
//! A disk that fails under a running proxy (full, or read-only): redb fails the commit,
//! the revocation is answered 503 (contract §4, code -1) and nothing claims it was
//! stored. redb then latches the handle ("previous I/O error: close and re-open the
//! database") and fails every later write, even once the disk has room again; so the
//! store keeps serving reads from the latched handle (its page cache), and before the
//! next operation (at most once per [`REOPEN_INTERVAL`]) checks whether the disk takes
//! writes again — the database file opens for writing and a probe file next to it can be
//! written and synced — and only then closes the handle and opens the file afresh
//! (redb's repair brings it back to its last commit). Closing first is required: the
//! file lock is per open file, so a second handle cannot be opened beside the first.

use super::{RevocationEvent, RevocationStore, StoreError, UserCutoffChange};
use crate::time::Cutoff;
use redb::{Database, ReadableDatabase, TableDefinition};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

/// `(app, user) -> cutoff seconds`.
const USERS: TableDefinition<(&str, &str), i64> = TableDefinition::new("user_cutoffs");
/// `app -> cutoff seconds`.
const APPS: TableDefinition<&str, i64> = TableDefinition::new("app_cutoffs");

/// How often a store whose disk failed checks whether the disk takes writes again: a
/// probe is a small write and an fsync, cheap once a second, wasteful per request.
pub const REOPEN_INTERVAL: Duration = Duration::from_secs(1);

/// Bytes the writability probe writes (and syncs) next to the database: enough that a
/// disk with only a few free pages is not taken for a recovered one.
const PROBE_BYTES: usize = 256 * 1024;

/// A redb-backed store. redb calls block, so they run on tokio's blocking pool.
pub struct EmbeddedStore {
    handle: Arc<Handle>,
    events: broadcast::Sender<RevocationEvent>,
}

/// The open database, and what is known about its disk.
struct Handle {
    path: PathBuf,
    /// `None` only between closing a failed handle and a reopen that did not succeed.
    db: RwLock<Option<Database>>,
    /// An operation failed: redb has (probably) latched the handle.
    failed: AtomicBool,
    /// When a failed handle last checked its disk.
    last_check: Mutex<Option<Instant>>,
}

fn unavailable(error: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(error.to_string())
}

/// Why [`EmbeddedStore::try_open`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// Another process (usually a running chatgate) holds the file's lock.
    #[error("{}: the revocation database is locked by another process (is chatgate running?)", .0.display())]
    Locked(PathBuf),
    /// Anything else.
    #[error(transparent)]
    Failed(#[from] StoreError),
}

impl From<OpenError> for StoreError {
    fn from(error: OpenError) -> Self {
        match error {
            OpenError::Locked(_) => unavailable(&error),
            OpenError::Failed(error) => error,
        }
    }
}

/// Opens (or creates) the file and its tables, so reads never meet a missing table.
fn open_database(path: &Path) -> Result<Database, OpenError> {
    let db = Database::create(path).map_err(|e| match e {
        redb::DatabaseError::DatabaseAlreadyOpen => OpenError::Locked(path.to_path_buf()),
        e => OpenError::Failed(unavailable(format!("{}: {e}", path.display()))),
    })?;
    let write = db.begin_write().map_err(unavailable)?;
    write.open_table(USERS).map_err(unavailable)?;
    write.open_table(APPS).map_err(unavailable)?;
    write.commit().map_err(unavailable)?;
    Ok(db)
}

/// Whether the disk takes writes again: the database file opens for writing, and a
/// probe file beside it takes [`PROBE_BYTES`] and an fsync.
fn writable(path: &Path) -> std::io::Result<()> {
    use std::io::Write as _;
    std::fs::OpenOptions::new().write(true).open(path)?;
    let mut probe_name = path.as_os_str().to_owned();
    probe_name.push(".probe");
    let probe = PathBuf::from(probe_name);
    let written = std::fs::File::create(&probe).and_then(|mut file| {
        file.write_all(&vec![0u8; PROBE_BYTES])?;
        file.sync_all()
    });
    let _ = std::fs::remove_file(&probe);
    written
}

impl Handle {
    /// After a failure, at most once per [`REOPEN_INTERVAL`]: if the disk takes writes
    /// again, close the handle and open the file afresh. `Ok` when the handle is usable
    /// for writes; otherwise why not (reads may still use the latched handle).
    fn recover(&self) -> Result<(), StoreError> {
        if !self.failed.load(Ordering::Acquire) {
            return Ok(());
        }
        let shown = self.path.display();
        {
            let mut last = self
                .last_check
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if last.is_some_and(|at| at.elapsed() < REOPEN_INTERVAL) {
                return Err(unavailable(format!(
                    "{shown}: the disk failed a write; checking again shortly"
                )));
            }
            *last = Some(Instant::now());
        }
        writable(&self.path)
            .map_err(|e| unavailable(format!("{shown}: the disk does not take writes: {e}")))?;
        let mut slot = self.db.write().unwrap_or_else(PoisonError::into_inner);
        if !self.failed.load(Ordering::Acquire) {
            // Another operation reopened it while this one waited for the lock.
            return Ok(());
        }
        // Close first: the file's lock is held until the old handle is dropped.
        drop(slot.take());
        let db = open_database(&self.path).map_err(StoreError::from)?;
        *slot = Some(db);
        self.failed.store(false, Ordering::Release);
        tracing::info!(target: "chatgate::revocation", path = %shown, "revocation database reopened after a disk failure");
        Ok(())
    }

    /// Runs `work` on the database; a write needs a handle that has not failed, a read
    /// makes do with a latched one (redb's cache often still answers).
    fn run<T>(
        &self,
        writes: bool,
        work: impl FnOnce(&Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let recovered = self.recover();
        let slot = self.db.read().unwrap_or_else(PoisonError::into_inner);
        let Some(db) = slot.as_ref() else {
            return Err(recovered
                .err()
                .unwrap_or_else(|| unavailable(format!("{}: not open", self.path.display()))));
        };
        if writes {
            recovered?;
        }
        work(db).map_err(|error| {
            self.failed.store(true, Ordering::Release);
            // redb's I/O errors do not say which file: the operator needs to know.
            match error {
                StoreError::Unavailable(message) => {
                    unavailable(format!("{}: {message}", self.path.display()))
                }
                other => other,
            }
        })
    }
}

impl EmbeddedStore {
    /// Opens (or creates) the database file, creating its tables so reads never meet a
    /// missing table.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Ok(Self::try_open(path)?)
    }

    /// [`EmbeddedStore::open`], telling a file locked by another process apart (the CLI
    /// then points at the running proxy's endpoint instead).
    pub fn try_open(path: &Path) -> Result<Self, OpenError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| unavailable(format!("{}: {e}", dir.display())))?;
        }
        let db = open_database(path)?;
        Ok(EmbeddedStore {
            handle: Arc::new(Handle {
                path: path.to_path_buf(),
                db: RwLock::new(Some(db)),
                failed: AtomicBool::new(false),
                last_check: Mutex::new(None),
            }),
            events: broadcast::channel(1024).0,
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        writes: bool,
        work: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let handle = self.handle.clone();
        tokio::task::spawn_blocking(move || handle.run(writes, work))
            .await
            .map_err(unavailable)?
    }
}

#[async_trait::async_trait]
impl RevocationStore for EmbeddedStore {
    async fn user_cutoff(&self, app: &str, user: &str) -> Result<Option<Cutoff>, StoreError> {
        let (app, user) = (app.to_owned(), user.to_owned());
        self.blocking(false, move |db| {
            let read = db.begin_read().map_err(unavailable)?;
            let table = read.open_table(USERS).map_err(unavailable)?;
            let value = table
                .get((app.as_str(), user.as_str()))
                .map_err(unavailable)?;
            Ok(value.map(|v| Cutoff::from_unix_seconds(v.value())))
        })
        .await
    }

    async fn set_user_cutoffs(
        &self,
        app: &str,
        changes: &[UserCutoffChange],
    ) -> Result<(), StoreError> {
        let app_owned = app.to_owned();
        let owned = changes.to_vec();
        self.blocking(true, move |db| {
            let write = db.begin_write().map_err(unavailable)?;
            {
                let mut table = write.open_table(USERS).map_err(unavailable)?;
                for change in &owned {
                    let key = (app_owned.as_str(), change.user_id.as_str());
                    match change.cutoff {
                        Some(c) => table.insert(key, c.unix_seconds()).map(|_| ()),
                        None => table.remove(key).map(|_| ()),
                    }
                    .map_err(unavailable)?;
                }
            }
            write.commit().map_err(unavailable)
        })
        .await?;
        let app: Arc<str> = Arc::from(app);
        for change in changes {
            let _ = self.events.send(RevocationEvent::User {
                app: app.clone(),
                user: Arc::from(change.user_id.as_str()),
                cutoff: change.cutoff,
            });
        }
        Ok(())
    }

    async fn app_cutoff(&self, app: &str) -> Result<Option<Cutoff>, StoreError> {
        let app = app.to_owned();
        self.blocking(false, move |db| {
            let read = db.begin_read().map_err(unavailable)?;
            let table = read.open_table(APPS).map_err(unavailable)?;
            let value = table.get(app.as_str()).map_err(unavailable)?;
            Ok(value.map(|v| Cutoff::from_unix_seconds(v.value())))
        })
        .await
    }

    async fn set_app_cutoff(&self, app: &str, cutoff: Option<Cutoff>) -> Result<(), StoreError> {
        let app_owned = app.to_owned();
        self.blocking(true, move |db| {
            let write = db.begin_write().map_err(unavailable)?;
            {
                let mut table = write.open_table(APPS).map_err(unavailable)?;
                match cutoff {
                    Some(c) => table
                        .insert(app_owned.as_str(), c.unix_seconds())
                        .map(|_| ()),
                    None => table.remove(app_owned.as_str()).map(|_| ()),
                }
                .map_err(unavailable)?;
            }
            write.commit().map_err(unavailable)
        })
        .await?;
        let _ = self.events.send(RevocationEvent::App {
            app: Arc::from(app),
            cutoff,
        });
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<RevocationEvent> {
        self.events.subscribe()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.blocking(false, |db| db.begin_read().map(|_| ()).map_err(unavailable))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cutoffs_survive_reopening_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("revocations.db");
        let cutoff = Cutoff::from_unix_seconds(1_800_000_000);
        {
            let store = EmbeddedStore::open(&path).unwrap();
            assert_eq!(store.user_cutoff("a", "u").await.unwrap(), None);
            store
                .set_user_cutoffs(
                    "a",
                    &[UserCutoffChange {
                        user_id: "u".into(),
                        cutoff: Some(cutoff),
                    }],
                )
                .await
                .unwrap();
            store.set_app_cutoff("a", Some(cutoff)).await.unwrap();
        }
        let store = EmbeddedStore::open(&path).unwrap();
        assert_eq!(store.user_cutoff("a", "u").await.unwrap(), Some(cutoff));
        assert_eq!(store.user_cutoff("a", "v").await.unwrap(), None);
        assert_eq!(store.app_cutoff("a").await.unwrap(), Some(cutoff));
        store
            .set_user_cutoffs(
                "a",
                &[UserCutoffChange {
                    user_id: "u".into(),
                    cutoff: None,
                }],
            )
            .await
            .unwrap();
        assert_eq!(store.user_cutoff("a", "u").await.unwrap(), None);
        store.ping().await.unwrap();
    }

    fn change(user: &str, cutoff: Option<Cutoff>) -> Vec<UserCutoffChange> {
        vec![UserCutoffChange {
            user_id: user.into(),
            cutoff,
        }]
    }

    #[tokio::test]
    async fn a_failed_handle_refuses_writes_until_its_disk_is_checked_then_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("revocations.db");
        let store = EmbeddedStore::open(&path).unwrap();
        let cutoff = Cutoff::from_unix_seconds(1_800_000_000);
        store
            .set_user_cutoffs("a", &change("u", Some(cutoff)))
            .await
            .unwrap();
        // As after a failed commit whose disk was checked a moment ago.
        store.handle.failed.store(true, Ordering::Release);
        *store.handle.last_check.lock().unwrap() = Some(Instant::now());
        let refused = store
            .set_user_cutoffs("a", &change("v", Some(cutoff)))
            .await;
        assert!(
            matches!(&refused, Err(StoreError::Unavailable(m)) if m.contains("checking again shortly")),
            "{refused:?}"
        );
        // Reads make do with the handle they have.
        assert_eq!(store.user_cutoff("a", "u").await.unwrap(), Some(cutoff));
        // Once the interval has passed, the disk (fine here) is checked, the file reopened.
        *store.handle.last_check.lock().unwrap() = Some(Instant::now() - REOPEN_INTERVAL);
        store
            .set_user_cutoffs("a", &change("v", Some(cutoff)))
            .await
            .unwrap();
        assert!(!store.handle.failed.load(Ordering::Acquire));
        assert_eq!(store.user_cutoff("a", "v").await.unwrap(), Some(cutoff));
        assert_eq!(store.user_cutoff("a", "u").await.unwrap(), Some(cutoff));
        // The probe cleaned up after itself.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["revocations.db"]);
    }

    #[test]
    fn a_missing_database_file_is_not_writable() {
        let dir = tempfile::tempdir().unwrap();
        assert!(writable(&dir.path().join("gone.db")).is_err());
    }

    #[test]
    fn a_second_open_of_a_held_file_reports_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("revocations.db");
        let _held = EmbeddedStore::open(&path).unwrap();
        match EmbeddedStore::try_open(&path) {
            Err(OpenError::Locked(locked)) => assert_eq!(locked, path),
            other => panic!("expected Locked, got {:?}", other.err()),
        }
    }
}
