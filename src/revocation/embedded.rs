//! The default store: a redb database file. redb commits with fsync
//! (`Durability::Immediate`), so a revocation is on disk before the request that made
//! it is answered, and a kill -9 right after loses nothing.

use super::{RevocationEvent, RevocationStore, StoreError, UserCutoffChange};
use crate::time::Cutoff;
use redb::{Database, ReadableDatabase, TableDefinition};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::broadcast;

/// `(app, user) -> cutoff seconds`.
const USERS: TableDefinition<(&str, &str), i64> = TableDefinition::new("user_cutoffs");
/// `app -> cutoff seconds`.
const APPS: TableDefinition<&str, i64> = TableDefinition::new("app_cutoffs");

/// A redb-backed store. redb calls block, so they run on tokio's blocking pool.
pub struct EmbeddedStore {
    db: Arc<Database>,
    events: broadcast::Sender<RevocationEvent>,
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
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => OpenError::Locked(path.to_path_buf()),
            e => OpenError::Failed(unavailable(format!("{}: {e}", path.display()))),
        })?;
        let write = db.begin_write().map_err(unavailable)?;
        write.open_table(USERS).map_err(unavailable)?;
        write.open_table(APPS).map_err(unavailable)?;
        write.commit().map_err(unavailable)?;
        Ok(EmbeddedStore {
            db: Arc::new(db),
            events: broadcast::channel(1024).0,
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || work(&db))
            .await
            .map_err(unavailable)?
    }
}

#[async_trait::async_trait]
impl RevocationStore for EmbeddedStore {
    async fn user_cutoff(&self, app: &str, user: &str) -> Result<Option<Cutoff>, StoreError> {
        let (app, user) = (app.to_owned(), user.to_owned());
        self.blocking(move |db| {
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
        self.blocking(move |db| {
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
        self.blocking(move |db| {
            let read = db.begin_read().map_err(unavailable)?;
            let table = read.open_table(APPS).map_err(unavailable)?;
            let value = table.get(app.as_str()).map_err(unavailable)?;
            Ok(value.map(|v| Cutoff::from_unix_seconds(v.value())))
        })
        .await
    }

    async fn set_app_cutoff(&self, app: &str, cutoff: Option<Cutoff>) -> Result<(), StoreError> {
        let app_owned = app.to_owned();
        self.blocking(move |db| {
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
        self.blocking(|db| db.begin_read().map(|_| ()).map_err(unavailable))
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
