//! The shared store for several chatgate instances (the revocations of contract §3):
//! cutoffs live in Redis, and every write is announced on a pub/sub channel so each
//! instance's cache invalidates at once.
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
//! Production Redis (issue 15): `rediss://` with the system's roots or a private CA,
//! ACL user and password, and Sentinel (`endpoint`); both connections follow the
//! primary through a failover with no restart and resync caches after any reconnect
//! (`link`).
//!
//! No revocation lost: a write is acknowledged only once it is on the primary and on
//! `min_replicas_acked` replicas (`WAIT`, sent in the same round trip as the
//! transaction, with a little less than `store_timeout_ms`). A write the replicas did
//! not confirm is an error, so the API answers the contract's 503 and the client
//! retries (writes are idempotent: they set a cutoff). Without the `WAIT`, a failover
//! right after the 2xx promotes a replica that never saw the cutoff, and the stolen
//! phone's token works again. The default is 1 when the primary has replicas or
//! Sentinels are used, else 0 (a lone Redis has nothing to wait for).
//!
//! At each connection to a primary, its persistence is read (`CONFIG GET`) and a Redis
//! that persists nothing is warned about in the log, `/metrics` and `/config`
//! (`health`).

mod endpoint;
mod health;
mod link;

pub use endpoint::RedisOptions;

use super::{RevocationEvent, RevocationStore, StoreError, StoreWarning, UserCutoffChange};
use crate::time::Cutoff;
use endpoint::Endpoint;
use health::Persistence;
use link::Link;
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
    options: RedisOptions,
    link: Arc<Link>,
    events: broadcast::Sender<RevocationEvent>,
    /// Replicas each write waits for (decided at connect, see the module docs).
    min_replicas_acked: u32,
    _supervisor: AbortOnDrop,
    _subscriber: AbortOnDrop,
}

fn unavailable(error: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("redis: {error}"))
}

impl RedisStore {
    /// Connects to `url` (`redis://host:port/db`, `rediss://user:password@host:port`)
    /// with the defaults of [`RedisOptions::new`].
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(RedisOptions::new(url)).await
    }

    /// Connects as `[revocation]` says.
    pub async fn from_settings(
        settings: &crate::config::RevocationSettings,
    ) -> Result<Self, StoreError> {
        Self::connect_with(RedisOptions::from_settings(settings)?).await
    }

    /// Connects to the primary: one command connection and one subscriber connection,
    /// each attempt bounded to a couple of seconds. Fails when Redis cannot be reached,
    /// rather than starting blind to other instances' writes.
    pub async fn connect_with(options: RedisOptions) -> Result<Self, StoreError> {
        Self::connect_pinging_every(options, SUBSCRIBER_PING_EVERY).await
    }

    async fn connect_pinging_every(
        options: RedisOptions,
        ping_every: Duration,
    ) -> Result<Self, StoreError> {
        let endpoint = Arc::new(Endpoint::new(&options)?);
        let link = Link::connect(&endpoint).await?;
        // Subscribed before `connect` returns: a write made by another instance after
        // this point is always heard.
        let pubsub = link::subscribe(&endpoint).await?;
        let min_replicas_acked = match options.min_replicas_acked {
            Some(n) => n,
            None if endpoint.uses_sentinels() => 1,
            None => u32::from(link.replicas().unwrap_or(0) > 0),
        };
        tracing::info!(
            target: "chatgate::revocation",
            primary = link.address().as_deref().unwrap_or("?"),
            replicas = ?link.replicas(),
            min_replicas_acked,
            persistence = %link.persistence().describe(),
            "redis revocation store connected"
        );
        let events = broadcast::channel(1024).0;
        let supervisor = tokio::spawn(link::supervise(
            endpoint.clone(),
            link.clone(),
            events.clone(),
        ));
        let subscriber = tokio::spawn(link::follow(
            endpoint,
            pubsub,
            events.clone(),
            link.epochs(),
            ping_every,
        ));
        Ok(RedisStore {
            options,
            link,
            events,
            min_replicas_acked,
            _supervisor: AbortOnDrop(supervisor),
            _subscriber: AbortOnDrop(subscriber),
        })
    }

    /// Replicas each write waits for before it is acknowledged.
    pub fn min_replicas_acked(&self) -> u32 {
        self.min_replicas_acked
    }

    /// The `WAIT` timeout: four fifths of the store timeout, so that the answer
    /// ("reached k of n replicas") arrives before the caller gives up.
    fn wait_millis(&self) -> u64 {
        let millis = u64::try_from(self.options.store_timeout.as_millis()).unwrap_or(u64::MAX);
        // WAIT 0 would block for ever.
        (millis / 5 * 4).max(1)
    }

    async fn read(&self, command: redis::Cmd) -> Result<Option<Cutoff>, StoreError> {
        let mut connection = self.link.connection()?;
        let seconds: Option<i64> = command
            .query_async(&mut connection)
            .await
            .map_err(|e| self.link.failed(e))?;
        Ok(seconds.map(Cutoff::from_unix_seconds))
    }

    /// Runs `writes` and the announcement of `message` in one `MULTI`/`EXEC`, then
    /// `WAIT`s for the replicas, all in one round trip.
    async fn write(
        &self,
        writes: impl FnOnce(&mut redis::Pipeline),
        message: &Message,
    ) -> Result<(), StoreError> {
        let payload = serde_json::to_string(message).map_err(unavailable)?;
        let mut pipe = redis::pipe();
        pipe.cmd("MULTI").ignore();
        writes(&mut pipe);
        pipe.publish(CHANNEL, payload).ignore();
        pipe.cmd("EXEC");
        let needed = self.min_replicas_acked;
        if needed > 0 {
            pipe.cmd("WAIT").arg(needed).arg(self.wait_millis());
        }
        let mut connection = self.link.connection()?;
        let replies: Vec<redis::Value> = pipe
            .query_async(&mut connection)
            .await
            .map_err(|e| self.link.failed(e))?;
        check_write(&replies, needed, self.wait_millis())
    }
}

/// The answers to `EXEC` (and `WAIT`): every queued write succeeded, and enough
/// replicas have them.
fn check_write(replies: &[redis::Value], needed: u32, wait_millis: u64) -> Result<(), StoreError> {
    match replies.first() {
        Some(redis::Value::Array(results)) => {
            if let Some(redis::Value::ServerError(error)) = results
                .iter()
                .find(|r| matches!(r, redis::Value::ServerError(_)))
            {
                return Err(unavailable(format!("write failed: {error:?}")));
            }
        }
        other => return Err(unavailable(format!("transaction not run: {other:?}"))),
    }
    if needed == 0 {
        return Ok(());
    }
    match replies.get(1) {
        Some(redis::Value::Int(acked)) if *acked >= i64::from(needed) => Ok(()),
        Some(redis::Value::Int(acked)) => Err(unavailable(format!(
            "written on the primary but acknowledged by {acked} of the {needed} replicas \
             required (min_replicas_acked) within {wait_millis} ms: not acknowledged, retry"
        ))),
        other => Err(unavailable(format!("unexpected WAIT answer: {other:?}"))),
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
        let mut command = redis::cmd("HGET");
        command.arg(users_key(app)).arg(user);
        self.read(command).await
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
        let message = Message::Users {
            app: app.to_owned(),
            users: changes
                .iter()
                .map(|c| (c.user_id.clone(), c.cutoff.map(Cutoff::unix_seconds)))
                .collect(),
        };
        let writes = |pipe: &mut redis::Pipeline| {
            for change in changes {
                match change.cutoff {
                    Some(cutoff) => pipe
                        .hset(&key, &change.user_id, cutoff.unix_seconds())
                        .ignore(),
                    None => pipe.hdel(&key, &change.user_id).ignore(),
                };
            }
        };
        self.write(writes, &message).await
    }

    async fn app_cutoff(&self, app: &str) -> Result<Option<Cutoff>, StoreError> {
        let mut command = redis::cmd("HGET");
        command.arg(APPS_KEY).arg(app);
        self.read(command).await
    }

    async fn set_app_cutoff(&self, app: &str, cutoff: Option<Cutoff>) -> Result<(), StoreError> {
        let message = Message::App {
            app: app.to_owned(),
            cutoff: cutoff.map(Cutoff::unix_seconds),
        };
        let writes = |pipe: &mut redis::Pipeline| {
            match cutoff {
                Some(cutoff) => pipe.hset(APPS_KEY, app, cutoff.unix_seconds()).ignore(),
                None => pipe.hdel(APPS_KEY, app).ignore(),
            };
        };
        self.write(writes, &message).await
    }

    fn subscribe(&self) -> broadcast::Receiver<RevocationEvent> {
        self.events.subscribe()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut connection = self.link.connection()?;
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
            .map(|_| ())
            .map_err(|e| self.link.failed(e))
    }

    fn warnings(&self) -> Vec<StoreWarning> {
        match self.link.persistence() {
            Persistence::Nothing => vec![StoreWarning {
                kind: "redis_persists_nothing",
                message: "Redis persists nothing (no AOF, no RDB save rules): a restart of \
                          Redis loses every revocation; set appendonly yes"
                    .into(),
            }],
            _ => Vec::new(),
        }
    }

    fn report(&self) -> serde_json::Value {
        let mut report = self.options.describe();
        report["primary"] = self.link.address().into();
        report["connected_replicas"] = self.link.replicas().into();
        report["min_replicas_acked"] = self.min_replicas_acked.into();
        report["persistence"] = self.link.persistence().describe().into();
        report
    }
}

/// A throwaway `redis-server` for the tests below (shared with the integration tests).
#[cfg(test)]
#[path = "../../../tests/support/redis_server.rs"]
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
    fn a_write_counts_only_when_every_command_ran_and_enough_replicas_confirmed() {
        use redis::Value;
        let exec_ok = Value::Array(vec![Value::Int(1), Value::Int(1)]);
        assert_eq!(check_write(std::slice::from_ref(&exec_ok), 0, 200), Ok(()));
        assert_eq!(
            check_write(&[exec_ok.clone(), Value::Int(1)], 1, 200),
            Ok(())
        );
        assert_eq!(
            check_write(&[exec_ok.clone(), Value::Int(2)], 1, 200),
            Ok(())
        );
        let short = check_write(&[exec_ok.clone(), Value::Int(0)], 1, 200).unwrap_err();
        assert!(
            short
                .to_string()
                .contains("acknowledged by 0 of the 1 replicas"),
            "{short}"
        );
        assert!(check_write(&[exec_ok], 1, 200).is_err(), "no WAIT answer");
        // EXEC's array holds the error of a queued command that failed when run.
        let failed = redis::parse_redis_value(b"*2\r\n:1\r\n-WRONGTYPE Operation\r\n").unwrap();
        assert!(
            matches!(&failed, Value::Array(items) if matches!(items[1], Value::ServerError(_)))
        );
        assert!(check_write(&[failed, Value::Int(1)], 1, 200).is_err());
        assert!(check_write(&[Value::Nil], 0, 200).is_err(), "EXEC aborted");
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
            RedisStore::connect_pinging_every(
                RedisOptions::new(&redis.url()),
                Duration::from_millis(10),
            ),
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
