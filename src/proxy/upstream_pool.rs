//! Idle upstream connections the forward engine ([`super::forward`]) shares between
//! client connections, as HAProxy's `http-reuse always` does: a client connection
//! keeps the upstream connection it used for its next request (affinity), and gives it
//! here when it ends; a new client connection takes an idle one before it connects.
//! Contract §6 is not touched: what travels on a connection is decided per request,
//! and a pooled connection carries nothing of the client that used it before (the
//! response was read whole and the upstream said keep-alive before it was put back).
//!
//! Why the design is so: an upstream connect per client connection cost the forward
//! engine a third more CPU than HAProxy per resumed TLS handshake with one request
//! (issue 14's figures in the README), a connect and a close a client connection. The
//! filter engine takes its upstream from Pingora's pool, whose `put` allocates a
//! oneshot and a `Notify` and spawns a task that watches each idle connection for the
//! upstream closing it; that per-request machinery is part of why the forward engine
//! exists. Here there is one short mutex per pool, held for a push or a pop and never
//! across an `.await` or a `close`, and no task: a connection's state is checked once
//! when it is taken (a closed or readable connection is dropped, see
//! [`IdlePool::take`]), and connections idle longer than [`IDLE_TIMEOUT`] are dropped
//! whenever the pool is used, so connections the upstream closed cannot pile up: at
//! most [`IDLE_PER_PEER`] a peer. With no traffic at all, the forward engine's
//! background service calls [`IdlePool::sweep`] every [`SWEEP_EVERY`], so an idle
//! proxy holds no upstream connection longer than the timeout plus that.
//!
//! The rules:
//! - LIFO: the most recently used connection is taken first, so the ones that stay
//!   idle age out and the pool shrinks to what the load needs.
//! - Bounded: at most [`IDLE_PER_PEER`] idle connections a peer; putting one more
//!   closes the oldest.
//! - A reload that changes `[upstream]` retires the peer set: connections opened from a
//!   retired set are never put back, and the first use of the new set closes the
//!   old set's idle ones (a peer's index only means the same peer within one set, and
//!   its TLS settings and SNI come with the set, so TLS connections pool the same way).
//! - The pool knows nothing of resends: a taken connection counts as reused, and
//!   [`super::forward`] keeps its rule (an idempotent request without a body that finds
//!   a reused connection closed before any response byte is resent once on a fresh
//!   connection, never a pooled one).
//!
//! No pool crate fits: the general ones (deadpool, bb8, r2d2, mobc) bound the number of
//! connections in use (a waiter blocks when it is reached) and recycle through an async
//! manager per checkout, and keep no per-peer idle list with an age; Pingora's own
//! (`pingora-pool`) is the watcher design above.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

/// Most idle connections kept a peer: Pingora's default pool size
/// (`ServerConf::upstream_keepalive_pool_size`, which chatgate does not change), so the
/// two engines keep as many idle connections to a single upstream.
pub(super) static IDLE_PER_PEER: std::sync::LazyLock<usize> = std::sync::LazyLock::new(|| {
    pingora::server::configuration::ServerConf::default().upstream_keepalive_pool_size
});

/// How long a connection may stay idle (since its last response) and still be used:
/// below the 5 s keep-alive timeout of Node's HTTP server, the shortest default among
/// common upstream servers (nginx keeps 75 s), so a pooled connection is seldom taken
/// just as its upstream closes it. At a few connects a peer every 4 s when the load
/// is light, it costs nothing measurable.
pub(super) const IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// How often idle connections past [`IDLE_TIMEOUT`] are closed when nothing uses the
/// pool: a lock and a walk over the peers' lists, once a second.
pub(super) const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Idle connections of type `C`, a list per peer of the current peer set `S`.
pub(super) struct IdlePool<S, C> {
    state: Mutex<State<S, C>>,
    per_peer: usize,
    idle_timeout: Duration,
}

struct State<S, C> {
    /// The set the lists belong to. `Weak` keeps the allocation, so the address is never
    /// another set's while this one is remembered.
    set: Weak<S>,
    /// Per peer index, oldest first (sorted by `since`).
    peers: Vec<VecDeque<Idle<C>>>,
}

struct Idle<C> {
    connection: C,
    /// When its last response ended.
    since: Instant,
}

impl<S, C> IdlePool<S, C> {
    /// A pool keeping at most `per_peer` connections a peer, each at most `idle_timeout`.
    pub(super) fn new(per_peer: usize, idle_timeout: Duration) -> Self {
        IdlePool {
            state: Mutex::new(State {
                set: Weak::new(),
                peers: Vec::new(),
            }),
            per_peer,
            idle_timeout,
        }
    }

    /// Keeps `connection` to peer `peer` of `set`, idle since `since`, unless `set` is
    /// no longer `current` (retired by a reload) or the connection is too old. What is
    /// closed here (the connection itself, the oldest one past the cap, the expired
    /// ones) is closed after the lock is released.
    pub(super) fn put(
        &self,
        current: &Arc<S>,
        set: &Arc<S>,
        peer: usize,
        connection: C,
        since: Instant,
    ) {
        let now = Instant::now();
        if !Arc::ptr_eq(current, set)
            || now.saturating_duration_since(since) >= self.idle_timeout
            || self.per_peer == 0
        {
            return;
        }
        let retired;
        let expired: Vec<Idle<C>>;
        let evicted;
        {
            let mut state = self.lock();
            retired = state.renew(current);
            if state.peers.len() <= peer {
                state.peers.resize_with(peer + 1, VecDeque::new);
            }
            let list = &mut state.peers[peer];
            let stale = list.partition_point(|idle| {
                now.saturating_duration_since(idle.since) >= self.idle_timeout
            });
            // Allocates only when something expired: once per idle spell, not per put.
            expired = list.drain(..stale).collect();
            evicted = if list.len() >= self.per_peer {
                list.pop_front()
            } else {
                None
            };
            let at = list.partition_point(|idle| idle.since <= since);
            list.insert(at, Idle { connection, since });
        }
        drop((retired, expired, evicted));
    }

    /// The most recently used idle connection to peer `peer` of `current` that
    /// `usable` accepts (it is given each candidate, outside the lock: a closed one, or
    /// one with bytes nobody asked for, is refused and closed). `None`: connect.
    pub(super) fn take(
        &self,
        current: &Arc<S>,
        peer: usize,
        mut usable: impl FnMut(&mut C) -> bool,
    ) -> Option<C> {
        // Bounded: every round removes a connection, and at most `per_peer` can be
        // idle a peer (more rounds would only race with concurrent puts).
        for _ in 0..=self.per_peer {
            let now = Instant::now();
            let retired;
            let expired: Vec<Idle<C>>;
            let newest;
            {
                let mut state = self.lock();
                retired = state.renew(current);
                let list = state.peers.get_mut(peer)?;
                let stale = list.partition_point(|idle| {
                    now.saturating_duration_since(idle.since) >= self.idle_timeout
                });
                expired = list.drain(..stale).collect();
                newest = list.pop_back();
            }
            drop((retired, expired));
            let mut idle = newest?;
            if usable(&mut idle.connection) {
                return Some(idle.connection);
            }
        }
        None
    }

    /// Closes the connections idle longer than the timeout, whichever peer (and peer
    /// set) they belong to; the closes happen after the lock is released.
    pub(super) fn sweep(&self) {
        self.sweep_at(Instant::now());
    }

    fn sweep_at(&self, now: Instant) {
        let expired: Vec<Idle<C>> = {
            let mut state = self.lock();
            let mut expired = Vec::new();
            for list in &mut state.peers {
                let stale = list.partition_point(|idle| {
                    now.saturating_duration_since(idle.since) >= self.idle_timeout
                });
                expired.extend(list.drain(..stale));
            }
            expired
        };
        drop(expired);
    }

    /// How many connections are idle now (tests and metrics).
    #[cfg(test)]
    fn idle(&self) -> usize {
        self.lock().peers.iter().map(VecDeque::len).sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<S, C>> {
        // Nothing here can leave the lists half-changed: a panic elsewhere in a holder
        // of the lock does not make them wrong.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<S, C> State<S, C> {
    /// Makes `current` the set the lists belong to; returns the lists of the retired
    /// set, if it changed, for the caller to close outside the lock.
    fn renew(&mut self, current: &Arc<S>) -> Vec<VecDeque<Idle<C>>> {
        if std::ptr::eq(self.set.as_ptr(), Arc::as_ptr(current)) {
            return Vec::new();
        }
        self.set = Arc::downgrade(current);
        std::mem::take(&mut self.peers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A connection that counts its closes.
    struct Conn {
        id: usize,
        closed: Arc<AtomicUsize>,
    }

    impl Drop for Conn {
        fn drop(&mut self) {
            self.closed.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn conns() -> (impl FnMut(usize) -> Conn, Arc<AtomicUsize>) {
        let closed = Arc::new(AtomicUsize::new(0));
        let counter = closed.clone();
        (
            move |id| Conn {
                id,
                closed: counter.clone(),
            },
            closed,
        )
    }

    const LONG: Duration = Duration::from_secs(3600);

    #[test]
    fn a_sweep_closes_the_expired_connections_of_every_peer_and_keeps_the_others() {
        let (mut conn, closed) = conns();
        let pool = IdlePool::new(8, Duration::from_secs(4));
        let set = Arc::new(());
        let now = Instant::now();
        let old = now.checked_sub(Duration::from_secs(3)).unwrap();
        pool.put(&set, &set, 0, conn(0), old);
        pool.put(&set, &set, 1, conn(1), old);
        pool.put(&set, &set, 1, conn(2), now);
        // Nothing has expired yet.
        pool.sweep_at(now);
        assert_eq!((pool.idle(), closed.load(Ordering::Relaxed)), (3, 0));
        // 1.5 s later the two older ones are past the 4 s timeout; the newer one is not.
        pool.sweep_at(now + Duration::from_millis(1500));
        assert_eq!((pool.idle(), closed.load(Ordering::Relaxed)), (1, 2));
        let kept = pool
            .take(&set, 1, |_| true)
            .expect("the newer connection is kept");
        assert_eq!(kept.id, 2);
    }

    #[test]
    fn the_most_recently_used_connection_is_taken_first() {
        let pool = IdlePool::new(8, LONG);
        let set = Arc::new(());
        let (mut conn, _) = conns();
        let now = Instant::now();
        for id in 0..3 {
            pool.put(&set, &set, 0, conn(id), now);
        }
        let order: Vec<usize> = (0..3)
            .map(|_| pool.take(&set, 0, |_| true).unwrap().id)
            .collect();
        assert_eq!(order, [2, 1, 0]);
        assert!(pool.take(&set, 0, |_| true).is_none());
    }

    #[test]
    fn connections_are_kept_per_peer() {
        let pool = IdlePool::new(8, LONG);
        let set = Arc::new(());
        let (mut conn, _) = conns();
        pool.put(&set, &set, 1, conn(10), Instant::now());
        assert!(pool.take(&set, 0, |_| true).is_none());
        assert!(pool.take(&set, 2, |_| true).is_none());
        assert_eq!(pool.take(&set, 1, |_| true).unwrap().id, 10);
    }

    #[test]
    fn past_the_cap_the_oldest_connection_is_closed() {
        let pool = IdlePool::new(2, LONG);
        let set = Arc::new(());
        let (mut conn, closed) = conns();
        let now = Instant::now();
        for id in 0..5 {
            pool.put(
                &set,
                &set,
                0,
                conn(id),
                now + Duration::from_millis(id as u64),
            );
        }
        assert_eq!(pool.idle(), 2);
        assert_eq!(closed.load(Ordering::Relaxed), 3);
        assert_eq!(pool.take(&set, 0, |_| true).unwrap().id, 4);
        assert_eq!(pool.take(&set, 0, |_| true).unwrap().id, 3);
    }

    #[test]
    fn a_connection_used_longer_ago_goes_behind_the_newer_ones() {
        let pool = IdlePool::new(8, LONG);
        let set = Arc::new(());
        let (mut conn, _) = conns();
        let now = Instant::now();
        pool.put(&set, &set, 0, conn(1), now);
        // Held by an idle client connection before it came back: older than 1.
        pool.put(&set, &set, 0, conn(2), now - Duration::from_secs(1));
        assert_eq!(pool.take(&set, 0, |_| true).unwrap().id, 1);
        assert_eq!(pool.take(&set, 0, |_| true).unwrap().id, 2);
    }

    #[test]
    fn connections_idle_past_the_timeout_are_closed_not_taken() {
        let pool = IdlePool::new(8, Duration::from_secs(4));
        let set = Arc::new(());
        let (mut conn, closed) = conns();
        let now = Instant::now();
        // Already too old when put back: closed at once.
        pool.put(&set, &set, 0, conn(0), now - Duration::from_secs(5));
        assert_eq!((pool.idle(), closed.load(Ordering::Relaxed)), (0, 1));
        pool.put(&set, &set, 0, conn(1), now - Duration::from_millis(3700));
        pool.put(&set, &set, 0, conn(2), now - Duration::from_millis(3690));
        std::thread::sleep(Duration::from_millis(400));
        // Both expired meanwhile: a put closes them and keeps only the new one.
        pool.put(&set, &set, 0, conn(3), Instant::now());
        assert_eq!((pool.idle(), closed.load(Ordering::Relaxed)), (1, 3));
        pool.put(
            &set,
            &set,
            0,
            conn(4),
            Instant::now() - Duration::from_millis(3700),
        );
        std::thread::sleep(Duration::from_millis(400));
        // A take skips (and closes) the expired one and returns the live one.
        let taken = pool.take(&set, 0, |_| true).unwrap();
        assert_eq!(taken.id, 3);
        assert_eq!((pool.idle(), closed.load(Ordering::Relaxed)), (0, 4));
    }

    #[test]
    fn a_connection_refused_on_take_is_closed_and_the_next_one_tried() {
        let pool = IdlePool::new(8, LONG);
        let set = Arc::new(());
        let (mut conn, closed) = conns();
        let now = Instant::now();
        for id in 0..3 {
            pool.put(&set, &set, 0, conn(id), now);
        }
        let mut seen = Vec::new();
        let taken = pool.take(&set, 0, |c| {
            seen.push(c.id);
            c.id == 0
        });
        assert_eq!(taken.as_ref().unwrap().id, 0);
        assert_eq!(seen, [2, 1, 0]);
        assert_eq!(closed.load(Ordering::Relaxed), 2);
        // All refused: nothing is returned and nothing kept.
        pool.put(&set, &set, 0, conn(5), now);
        assert!(pool.take(&set, 0, |_| false).is_none());
        assert_eq!(pool.idle(), 0);
    }

    #[test]
    fn a_retired_peer_set_is_never_reused() {
        let pool = IdlePool::new(8, LONG);
        let old = Arc::new(1);
        let (mut conn, closed) = conns();
        let now = Instant::now();
        pool.put(&old, &old, 0, conn(1), now);
        let new = Arc::new(2);
        // A connection of the old set that comes back after the reload is closed...
        pool.put(&new, &old, 0, conn(2), now);
        assert_eq!(closed.load(Ordering::Relaxed), 1);
        // ...and the new set's first use closes the old set's idle ones.
        assert!(pool.take(&new, 0, |_| true).is_none());
        assert_eq!((pool.idle(), closed.load(Ordering::Relaxed)), (0, 2));
        pool.put(&new, &new, 0, conn(3), now);
        assert_eq!(pool.take(&new, 0, |_| true).unwrap().id, 3);
    }

    #[test]
    fn a_set_at_the_address_of_a_dropped_one_is_still_another_set() {
        let pool = IdlePool::new(8, LONG);
        let (mut conn, _) = conns();
        let old = Arc::new([0u64; 4]);
        pool.put(&old, &old, 0, conn(1), Instant::now());
        drop(old);
        // The pool's `Weak` keeps the old allocation: no new set can take its address.
        let new = Arc::new([0u64; 4]);
        assert!(pool.take(&new, 0, |_| true).is_none());
    }

    #[test]
    fn a_zero_cap_keeps_nothing() {
        let pool = IdlePool::new(0, LONG);
        let set = Arc::new(());
        let (mut conn, closed) = conns();
        pool.put(&set, &set, 0, conn(1), Instant::now());
        assert_eq!((pool.idle(), closed.load(Ordering::Relaxed)), (0, 1));
    }

    #[test]
    fn the_cap_is_pingoras_pool_size() {
        assert_eq!(*IDLE_PER_PEER, 128);
    }
}
