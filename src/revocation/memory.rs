//! In-process store: tests, the tower quick path, single short-lived processes.

use super::{RevocationEvent, RevocationStore, StoreError, UserCutoffChange};
use crate::time::Cutoff;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;

/// Cutoffs in a map behind a mutex. The mutex is never held across `.await`: every
/// method locks, copies and unlocks synchronously.
pub struct MemoryStore {
    state: Mutex<State>,
    events: broadcast::Sender<RevocationEvent>,
}

#[derive(Default)]
struct State {
    users: HashMap<(Arc<str>, Arc<str>), Cutoff>,
    apps: HashMap<Arc<str>, Cutoff>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryStore {
            state: Mutex::new(State::default()),
            events: broadcast::channel(1024).0,
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait::async_trait]
impl RevocationStore for MemoryStore {
    async fn user_cutoff(&self, app: &str, user: &str) -> Result<Option<Cutoff>, StoreError> {
        let state = self.state.lock().expect("no panics while locked");
        Ok(state.users.get(&(Arc::from(app), Arc::from(user))).copied())
    }

    async fn set_user_cutoffs(
        &self,
        app: &str,
        changes: &[UserCutoffChange],
    ) -> Result<(), StoreError> {
        let app: Arc<str> = Arc::from(app);
        let mut events = Vec::with_capacity(changes.len());
        {
            let mut state = self.state.lock().expect("no panics while locked");
            for change in changes {
                let user: Arc<str> = Arc::from(change.user_id.as_str());
                let key = (app.clone(), user.clone());
                match change.cutoff {
                    Some(cutoff) => state.users.insert(key, cutoff),
                    None => state.users.remove(&key),
                };
                events.push(RevocationEvent::User {
                    app: app.clone(),
                    user,
                    cutoff: change.cutoff,
                });
            }
        }
        for event in events {
            let _ = self.events.send(event);
        }
        Ok(())
    }

    async fn app_cutoff(&self, app: &str) -> Result<Option<Cutoff>, StoreError> {
        let state = self.state.lock().expect("no panics while locked");
        Ok(state.apps.get(app).copied())
    }

    async fn set_app_cutoff(&self, app: &str, cutoff: Option<Cutoff>) -> Result<(), StoreError> {
        let app: Arc<str> = Arc::from(app);
        {
            let mut state = self.state.lock().expect("no panics while locked");
            match cutoff {
                Some(c) => state.apps.insert(app.clone(), c),
                None => state.apps.remove(&app),
            };
        }
        let _ = self.events.send(RevocationEvent::App { app, cutoff });
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<RevocationEvent> {
        self.events.subscribe()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn set_get_and_clear_announce_each_change() {
        let store = MemoryStore::new();
        let mut events = store.subscribe();
        let cutoff = Cutoff::from_unix_seconds(100);
        store
            .set_user_cutoffs(
                "app",
                &[UserCutoffChange {
                    user_id: "u".into(),
                    cutoff: Some(cutoff),
                }],
            )
            .await
            .unwrap();
        assert_eq!(store.user_cutoff("app", "u").await.unwrap(), Some(cutoff));
        assert_eq!(store.user_cutoff("other", "u").await.unwrap(), None);
        assert!(matches!(
            events.recv().await.unwrap(),
            RevocationEvent::User { .. }
        ));
        store.set_app_cutoff("app", Some(cutoff)).await.unwrap();
        assert_eq!(store.app_cutoff("app").await.unwrap(), Some(cutoff));
        store.set_app_cutoff("app", None).await.unwrap();
        assert_eq!(store.app_cutoff("app").await.unwrap(), None);
    }
}
