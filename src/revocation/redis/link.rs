//! The two connections the store keeps to the primary, each following it by itself.
//!
//! Commands: one multiplexed connection, swapped by a supervisor task. The redis
//! crate's `ConnectionManager` reconnects to the address it was built with, so it cannot
//! follow a Sentinel failover, and it does not say when it reconnected (after which
//! caches must resync). Its Sentinel support names the primary (`SentinelClient`) but
//! keeps no connection to it. So the smallest correct thing on top of both: a task that
//! asks the endpoint for the primary, connects, publishes the connection, and watches it
//! (`PING`, or `ROLE` master with Sentinels, every second, and at once when a request
//! saw the link fail); on failure it withdraws the connection, so requests fail at once
//! (the cache then applies `on_store_error`) instead of waiting on a dead peer, and
//! reconnects with backoff. Every reconnect announces [`RevocationEvent::Resync`].
//!
//! Pub/sub: its own connection (a subscribed connection takes no other commands),
//! pinged so a silent peer is noticed, re-subscribed with backoff, also on the
//! primary the endpoint names, and re-made whenever the command link moved to
//! another primary. Messages published while it was away are lost, hence a Resync
//! after each re-subscription.

use super::endpoint::Endpoint;
use super::health::{self, Persistence};
use super::{CHANNEL, CONNECT_TIMEOUT, RESPONSE_TIMEOUT, decode, unavailable};
use crate::revocation::{RevocationEvent, StoreError};
use arc_swap::ArcSwapOption;
use futures_util::StreamExt;
use redis::aio::{MultiplexedConnection, PubSub};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, broadcast, watch};

/// Reconnect backoff of both connections: 100 ms doubling to 1 s. A failover takes
/// Sentinel a second or more; retrying every second at most costs a dead Redis nothing.
pub(super) const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub(super) const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How often the command link is checked while nothing goes wrong.
const HEALTH_EVERY: Duration = Duration::from_secs(1);

/// The primary as last connected.
pub(super) struct Connected {
    pub(super) connection: MultiplexedConnection,
    pub(super) address: String,
}

/// The command link: the current connection, if any, and what is known of its node.
pub(super) struct Link {
    current: ArcSwapOption<Connected>,
    trouble: Notify,
    /// Bumped at each new primary connection: the subscriber re-subscribes on it.
    epoch: watch::Sender<u64>,
    persistence: Mutex<Persistence>,
    replicas: Mutex<Option<u32>>,
}

/// Errors after which the connection (or the node's role) is in doubt.
fn link_error(error: &redis::RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
        || matches!(error.code(), Some("READONLY" | "MASTERDOWN" | "LOADING"))
}

impl Link {
    /// Connects to the primary the endpoint names, within [`CONNECT_TIMEOUT`].
    pub(super) async fn connect(endpoint: &Endpoint) -> Result<Arc<Self>, StoreError> {
        let connected = connect_primary(endpoint).await?;
        let link = Arc::new(Link {
            current: ArcSwapOption::empty(),
            trouble: Notify::new(),
            epoch: watch::channel(0).0,
            persistence: Mutex::new(Persistence::Unknown("not checked yet".into())),
            replicas: Mutex::new(None),
        });
        link.inspect(&connected).await;
        link.current.store(Some(Arc::new(connected)));
        Ok(link)
    }

    /// The connection to use now; fails at once while reconnecting.
    pub(super) fn connection(&self) -> Result<MultiplexedConnection, StoreError> {
        self.current
            .load()
            .as_ref()
            .map(|connected| connected.connection.clone())
            .ok_or_else(|| unavailable("no connection to the primary (reconnecting)"))
    }

    /// Turns a command's error into a store error, waking the supervisor when the
    /// link itself may be at fault.
    pub(super) fn failed(&self, error: redis::RedisError) -> StoreError {
        if link_error(&error) {
            self.trouble.notify_one();
        }
        if error.is_timeout() {
            StoreError::Timeout
        } else {
            unavailable(error)
        }
    }

    pub(super) fn address(&self) -> Option<String> {
        self.current.load().as_ref().map(|c| c.address.clone())
    }

    pub(super) fn persistence(&self) -> Persistence {
        lock(&self.persistence).clone()
    }

    pub(super) fn replicas(&self) -> Option<u32> {
        *lock(&self.replicas)
    }

    pub(super) fn epochs(&self) -> watch::Receiver<u64> {
        self.epoch.subscribe()
    }

    /// Reads what the store reports about a (new) primary, warning when it persists
    /// nothing.
    async fn inspect(&self, connected: &Connected) {
        let mut connection = connected.connection.clone();
        let checks = async {
            let persistence = health::persistence(&mut connection).await;
            let replicas = health::connected_replicas(&mut connection).await;
            (persistence, replicas)
        };
        let (persistence, replicas) = tokio::time::timeout(RESPONSE_TIMEOUT, checks)
            .await
            .unwrap_or_else(|_| (Persistence::Unknown("CONFIG GET timed out".into()), None));
        match &persistence {
            Persistence::Nothing => tracing::warn!(
                target: "chatgate::revocation",
                primary = %connected.address,
                "redis persists nothing (no AOF, no RDB save rules): a restart of this Redis loses every revocation; set appendonly yes"
            ),
            Persistence::Unknown(reason) => tracing::info!(
                target: "chatgate::revocation",
                primary = %connected.address,
                %reason,
                "redis persistence not checked"
            ),
            Persistence::Persists { .. } => {}
        }
        *lock(&self.persistence) = persistence;
        *lock(&self.replicas) = replicas;
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

async fn connect_primary(endpoint: &Endpoint) -> Result<Connected, StoreError> {
    let client = endpoint.primary().await?;
    let address = client.get_connection_info().addr().to_string();
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT));
    let connect = client.get_multiplexed_async_connection_with_config(&config);
    let connection = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(result) => result.map_err(|e| unavailable(format!("connect to {address}: {e}")))?,
        Err(_) => {
            return Err(unavailable(format!(
                "connect to {address}: no answer within {CONNECT_TIMEOUT:?}"
            )));
        }
    };
    Ok(Connected {
        connection,
        address,
    })
}

/// Whether the link still leads to a usable primary.
async fn healthy(connected: &Connected, sentinels: bool) -> bool {
    let mut connection = connected.connection.clone();
    let check = async {
        if sentinels {
            health::is_primary(&mut connection).await
        } else {
            redis::cmd("PING")
                .query_async::<String>(&mut connection)
                .await
                .map(|_| true)
        }
    };
    matches!(
        tokio::time::timeout(RESPONSE_TIMEOUT, check).await,
        Ok(Ok(true))
    )
}

/// The command link's supervisor; runs until the store aborts it.
pub(super) async fn supervise(
    endpoint: Arc<Endpoint>,
    link: Arc<Link>,
    events: broadcast::Sender<RevocationEvent>,
) {
    loop {
        // Connected: watch.
        loop {
            tokio::select! {
                _ = link.trouble.notified() => {}
                _ = tokio::time::sleep(HEALTH_EVERY) => {}
            }
            let Some(connected) = link.current.load_full() else {
                break;
            };
            if !healthy(&connected, endpoint.uses_sentinels()).await {
                tracing::warn!(target: "chatgate::revocation", primary = %connected.address, "redis primary lost, reconnecting");
                break;
            }
        }
        link.current.store(None);
        // Reconnect.
        let mut delay = BACKOFF_MIN;
        loop {
            tokio::time::sleep(delay).await;
            match connect_primary(&endpoint).await {
                Ok(connected) => {
                    tracing::info!(target: "chatgate::revocation", primary = %connected.address, "redis primary connected, resyncing caches");
                    link.inspect(&connected).await;
                    link.current.store(Some(Arc::new(connected)));
                    link.epoch.send_modify(|epoch| *epoch += 1);
                    // What was cached may come from the node we left, and events may
                    // have gone unheard meanwhile.
                    let _ = events.send(RevocationEvent::Resync);
                    break;
                }
                Err(error) => {
                    tracing::warn!(target: "chatgate::revocation", %error, retry_in = ?delay, "redis primary reconnect failed");
                    delay = (delay * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

/// Opens a pub/sub connection on the primary, subscribed to [`CHANNEL`], within
/// [`CONNECT_TIMEOUT`].
pub(super) async fn subscribe(endpoint: &Endpoint) -> Result<PubSub, StoreError> {
    let client = endpoint.primary().await?;
    let work = async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(CHANNEL).await?;
        Ok::<_, redis::RedisError>(pubsub)
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, work).await {
        Ok(result) => result.map_err(|e| unavailable(format!("subscribe: {e}"))),
        Err(_) => Err(unavailable(format!(
            "subscribe: no answer within {CONNECT_TIMEOUT:?}"
        ))),
    }
}

/// The subscriber task: turns channel messages into events, re-subscribes when the
/// connection drops, stops answering pings, or the command link moved to another
/// primary, and sends `Resync` after each re-subscription. Runs until aborted.
pub(super) async fn follow(
    endpoint: Arc<Endpoint>,
    first: PubSub,
    events: broadcast::Sender<RevocationEvent>,
    mut epochs: watch::Receiver<u64>,
    ping_every: Duration,
) {
    let mut connection = Some(first);
    let mut delay = BACKOFF_MIN;
    epochs.borrow_and_update();
    loop {
        if let Some(pubsub) = connection.take() {
            listen(pubsub, &events, &mut epochs, ping_every).await;
            tracing::warn!(target: "chatgate::revocation", "redis subscriber connection lost, reconnecting");
        }
        tokio::time::sleep(delay).await;
        match subscribe(&endpoint).await {
            Ok(pubsub) => {
                tracing::info!(target: "chatgate::revocation", "redis subscriber reconnected, resyncing caches");
                delay = BACKOFF_MIN;
                connection = Some(pubsub);
                epochs.borrow_and_update();
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

/// Reads messages until the connection ends, a ping goes unanswered, or the command
/// link reports a new primary.
async fn listen(
    pubsub: PubSub,
    events: &broadcast::Sender<RevocationEvent>,
    epochs: &mut watch::Receiver<u64>,
    ping_every: Duration,
) {
    let (mut sink, mut stream) = pubsub.split();
    let mut ping = tokio::time::interval(ping_every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    let mut link_alive = true;
    loop {
        tokio::select! {
            message = stream.next() => {
                let Some(message) = message else { return };
                for event in decode(message.get_payload_bytes()) {
                    let _ = events.send(event);
                }
            }
            changed = epochs.changed(), if link_alive => {
                // A new primary: this connection may lead to the old one.
                if changed.is_ok() {
                    return;
                }
                link_alive = false;
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
