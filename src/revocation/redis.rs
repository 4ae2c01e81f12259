//! The shared store for several chatgate instances: cutoffs live in Redis, and every
//! write is announced on a pub/sub channel so each instance's cache invalidates at once.
//!
//! Layout (all names under the `chatgate:` prefix, so one Redis can hold other data):
//!
//! | key | type | content |
//! |---|---|---|
//! | `chatgate:cutoff:users:{api_key}` | hash | `user_id` → cutoff (Unix seconds) |
//! | `chatgate:cutoff:apps` | hash | `api_key` → app-wide cutoff (Unix seconds) |
//! | `chatgate:revocations` | pub/sub channel | one JSON message per write |
//!
//! A hash per app keeps an app's users together (`HLEN` tells how many are revoked) and
//! needs no escaping: a user id is a field, never part of a key name.
//!
//! A write and its announcement go in one `MULTI`/`EXEC`, so subscribers never hear of
//! a change that did not happen, and a change never lands without being announced.
//! Messages:
//!
//! ```json
//! {"kind":"users","app":"k","users":[["alice",1795860000],["bob",null]]}
//! {"kind":"app","app":"k","cutoff":1795860000}
//! ```
//!
//! Commands go through a [`ConnectionManager`], which reconnects by itself. Pub/sub needs
//! its own connection: a background task holds it, pings it so a silently dead link is
//! noticed, and reconnects with backoff (100 ms doubling to 5 s). Messages published
//! while it was away are lost, so after every reconnect it sends
//! [`RevocationEvent::Resync`] and caches start over from Redis.

use super::{RevocationEvent, RevocationStore, StoreError, UserCutoffChange};
use crate::time::Cutoff;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSub};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;

/// The channel every write is announced on.
pub const CHANNEL: &str = "chatgate:revocations";
/// Hash of app-wide cutoffs, `api_key` → seconds.
pub const APPS_KEY: &str = "chatgate:cutoff:apps";
/// Prefix of the per-app hashes of user cutoffs.
pub const USERS_KEY_PREFIX: &str = "chatgate:cutoff:users:";

/// One connection attempt (TCP connect plus handshake) may take this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A command that got no answer in this long fails (the cache's own, shorter
/// `store_timeout` usually fires first; this bounds callers that do not use the cache).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Subscriber reconnect backoff.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often the idle subscriber connection is pinged to notice a dead peer.
const SUBSCRIBER_PING_EVERY: Duration = Duration::from_secs(5);

/// The Redis key of an app's user-cutoff hash.
pub fn users_key(app: &str) -> String {
    format!("{USERS_KEY_PREFIX}{app}")
}

/// What goes over [`CHANNEL`].
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Message {
    Users {
        app: String,
        users: Vec<(String, Option<i64>)>,
    },
    App {
        app: String,
        cutoff: Option<i64>,
    },
}

impl Message {
    fn into_events(self) -> Vec<RevocationEvent> {
        match self {
            Message::Users { app, users } => {
                let app: Arc<str> = Arc::from(app);
                users
                    .into_iter()
                    .map(|(user, cutoff)| RevocationEvent::User {
                        app: app.clone(),
                        user: Arc::from(user),
                        cutoff: cutoff.map(Cutoff::from_unix_seconds),
                    })
                    .collect()
            }
            Message::App { app, cutoff } => vec![RevocationEvent::App {
                app: Arc::from(app),
                cutoff: cutoff.map(Cutoff::from_unix_seconds),
            }],
        }
    }
}

/// Aborts the subscriber task when the store goes away, which also drops the task's
/// event sender so caches following the store see the channel close.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A Redis-backed store shared by several instances.
pub struct RedisStore {
    commands: ConnectionManager,
    events: broadcast::Sender<RevocationEvent>,
    _subscriber: AbortOnDrop,
}

fn unavailable(error: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("redis: {error}"))
}

fn map_redis(error: redis::RedisError) -> StoreError {
    if error.is_timeout() {
        StoreError::Timeout
    } else {
        unavailable(error)
    }
}

async fn bounded<T>(
    what: &str,
    work: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(CONNECT_TIMEOUT, work).await {
        Ok(result) => result.map_err(map_redis),
        Err(_) => Err(unavailable(format!(
            "{what}: no answer within {CONNECT_TIMEOUT:?}"
        ))),
    }
}

/// Opens a pub/sub connection subscribed to [`CHANNEL`], within [`CONNECT_TIMEOUT`].
async fn subscribe(client: &redis::Client) -> Result<PubSub, StoreError> {
    bounded("subscribe", async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(CHANNEL).await?;
        Ok(pubsub)
    })
    .await
}

impl RedisStore {
    /// Connects to `url` (`redis://host:port/db`): one command connection and one
    /// subscriber connection, each attempt bounded to a couple of seconds. Fails when
    /// Redis cannot be reached, rather than starting blind to other instances' writes.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_pinging_every(url, SUBSCRIBER_PING_EVERY).await
    }

    async fn connect_pinging_every(url: &str, ping_every: Duration) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(unavailable)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_min_delay(BACKOFF_MIN)
            .set_max_delay(BACKOFF_MAX)
            .set_number_of_retries(2);
        let commands = bounded(
            "connect",
            ConnectionManager::new_with_config(client.clone(), config),
        )
        .await?;
        // Subscribed before `connect` returns: a write made by another instance after
        // this point is always heard.
        let pubsub = subscribe(&client).await?;
        let events = broadcast::channel(1024).0;
        let subscriber = tokio::spawn(follow(client, pubsub, events.clone(), ping_every));
        Ok(RedisStore {
            commands,
            events,
            _subscriber: AbortOnDrop(subscriber),
        })
    }

    async fn publish_atomically(
        &self,
        mut pipe: redis::Pipeline,
        message: &Message,
    ) -> Result<(), StoreError> {
        let payload = serde_json::to_string(message).map_err(unavailable)?;
        pipe.publish(CHANNEL, payload).ignore();
        let mut connection = self.commands.clone();
        pipe.query_async::<()>(&mut connection)
            .await
            .map_err(map_redis)
    }
}

/// The subscriber task: turns channel messages into events, reconnects when the
/// connection drops or stops answering pings, and sends `Resync` after each reconnect.
/// It runs until the store drops it.
async fn follow(
    client: redis::Client,
    first: PubSub,
    events: broadcast::Sender<RevocationEvent>,
    ping_every: Duration,
) {
    let mut connection = Some(first);
    let mut delay = BACKOFF_MIN;
    loop {
        if let Some(pubsub) = connection.take() {
            listen(pubsub, &events, ping_every).await;
            tracing::warn!(target: "chatgate::revocation", "redis subscriber connection lost, reconnecting");
        }
        tokio::time::sleep(delay).await;
        match subscribe(&client).await {
            Ok(pubsub) => {
                tracing::info!(target: "chatgate::revocation", "redis subscriber reconnected, resyncing caches");
                delay = BACKOFF_MIN;
                connection = Some(pubsub);
                // Messages published while disconnected are gone: forget everything.
                let _ = events.send(RevocationEvent::Resync);
            }
            Err(error) => {
                tracing::warn!(target: "chatgate::revocation", %error, retry_in = ?delay, "redis subscriber reconnect failed");
                delay = (delay * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Reads messages until the connection ends or a ping goes unanswered.
async fn listen(pubsub: PubSub, events: &broadcast::Sender<RevocationEvent>, ping_every: Duration) {
    let (mut sink, mut stream) = pubsub.split();
    let mut ping = tokio::time::interval(ping_every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    loop {
        tokio::select! {
            message = stream.next() => {
                let Some(message) = message else { return };
                for event in decode(message.get_payload_bytes()) {
                    let _ = events.send(event);
                }
            }
            _ = ping.tick() => {
                // A subscribed RESP2 connection answers PING with ["pong", ""], not +PONG.
                let answered =
                    tokio::time::timeout(RESPONSE_TIMEOUT, sink.ping::<redis::Value>()).await;
                if !matches!(answered, Ok(Ok(_))) {
                    return;
                }
            }
        }
    }
}

/// A message we cannot read still means something changed: resync rather than miss it.
fn decode(payload: &[u8]) -> Vec<RevocationEvent> {
    match serde_json::from_slice::<Message>(payload) {
        Ok(message) => message.into_events(),
        Err(error) => {
            tracing::warn!(target: "chatgate::revocation", %error, "unreadable revocation message, resyncing");
            vec![RevocationEvent::Resync]
        }
    }
}

#[async_trait::async_trait]
impl RevocationStore for RedisStore {
    async fn user_cutoff(&self, app: &str, user: &str) -> Result<Option<Cutoff>, StoreError> {
        let mut connection = self.commands.clone();
        let seconds: Option<i64> = redis::cmd("HGET")
            .arg(users_key(app))
            .arg(user)
            .query_async(&mut connection)
            .await
            .map_err(map_redis)?;
        Ok(seconds.map(Cutoff::from_unix_seconds))
    }

    async fn set_user_cutoffs(
        &self,
        app: &str,
        changes: &[UserCutoffChange],
    ) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let key = users_key(app);
        let mut pipe = redis::pipe();
        pipe.atomic();
        for change in changes {
            match change.cutoff {
                Some(cutoff) => pipe
                    .hset(&key, &change.user_id, cutoff.unix_seconds())
                    .ignore(),
                None => pipe.hdel(&key, &change.user_id).ignore(),
            };
        }
        let message = Message::Users {
            app: app.to_owned(),
            users: changes
                .iter()
                .map(|c| (c.user_id.clone(), c.cutoff.map(Cutoff::unix_seconds)))
                .collect(),
        };
        self.publish_atomically(pipe, &message).await
    }

    async fn app_cutoff(&self, app: &str) -> Result<Option<Cutoff>, StoreError> {
        let mut connection = self.commands.clone();
        let seconds: Option<i64> = redis::cmd("HGET")
            .arg(APPS_KEY)
            .arg(app)
            .query_async(&mut connection)
            .await
            .map_err(map_redis)?;
        Ok(seconds.map(Cutoff::from_unix_seconds))
    }

    async fn set_app_cutoff(&self, app: &str, cutoff: Option<Cutoff>) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        match cutoff {
            Some(cutoff) => pipe.hset(APPS_KEY, app, cutoff.unix_seconds()).ignore(),
            None => pipe.hdel(APPS_KEY, app).ignore(),
        };
        let message = Message::App {
            app: app.to_owned(),
            cutoff: cutoff.map(Cutoff::unix_seconds),
        };
        self.publish_atomically(pipe, &message).await
    }

    fn subscribe(&self) -> broadcast::Receiver<RevocationEvent> {
        self.events.subscribe()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut connection = self.commands.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
            .map(|_| ())
            .map_err(map_redis)
    }
}

/// A throwaway `redis-server` for the tests below (shared with the integration tests).
#[cfg(test)]
#[path = "../../tests/support/redis_server.rs"]
mod test_redis_server;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_into_events() {
        let message = Message::Users {
            app: "k".into(),
            users: vec![("alice".into(), Some(7)), ("bob".into(), None)],
        };
        let text = serde_json::to_string(&message).unwrap();
        assert_eq!(
            text,
            r#"{"kind":"users","app":"k","users":[["alice",7],["bob",null]]}"#
        );
        assert_eq!(
            decode(text.as_bytes()),
            vec![
                RevocationEvent::User {
                    app: Arc::from("k"),
                    user: Arc::from("alice"),
                    cutoff: Some(Cutoff::from_unix_seconds(7)),
                },
                RevocationEvent::User {
                    app: Arc::from("k"),
                    user: Arc::from("bob"),
                    cutoff: None,
                },
            ]
        );
        assert_eq!(
            decode(br#"{"kind":"app","app":"k","cutoff":null}"#),
            vec![RevocationEvent::App {
                app: Arc::from("k"),
                cutoff: None
            }]
        );
    }

    #[test]
    fn unreadable_messages_resync() {
        assert_eq!(
            decode(b"{\"kind\":\"nope\"}"),
            vec![RevocationEvent::Resync]
        );
        assert_eq!(decode(b"garbage"), vec![RevocationEvent::Resync]);
    }

    #[tokio::test]
    async fn connecting_to_nothing_fails_instead_of_hanging() {
        // A port nothing listens on: bind, note it, release it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("redis://127.0.0.1:{port}");
        let result = tokio::time::timeout(Duration::from_secs(30), RedisStore::connect(&url))
            .await
            .expect("connect must give up on its own");
        assert!(matches!(result, Err(StoreError::Unavailable(_))));
    }

    #[tokio::test]
    async fn answered_pings_keep_the_subscriber_connected() {
        let redis = super::test_redis_server::RedisServer::start();
        let store = tokio::time::timeout(
            Duration::from_secs(30),
            RedisStore::connect_pinging_every(&redis.url(), Duration::from_millis(10)),
        )
        .await
        .unwrap()
        .unwrap();
        let mut events = store.subscribe();
        // Many ping rounds; a subscriber that misread the replies would reconnect and
        // announce a Resync after each.
        tokio::time::sleep(Duration::from_millis(300)).await;
        store.set_app_cutoff("k", None).await.unwrap();
        let first = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .expect("the write is announced")
            .unwrap();
        assert_eq!(
            first,
            RevocationEvent::App {
                app: Arc::from("k"),
                cutoff: None
            }
        );
    }
}
