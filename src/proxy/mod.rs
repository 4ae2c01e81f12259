//! The Pingora edge proxy (feature `proxy`): what `chatgate serve` runs.
//!
//! - [`ChatAuthFilter`] runs the gate inside any Pingora `ProxyHttp::request_filter`
//!   (see `examples/pingora_custom_proxy.rs`);
//! - [`EdgeProxy`] is the `ProxyHttp` the binary runs: round robin over
//!   `[upstream] addresses`, retries of failed connects for idempotent requests,
//!   optional TLS, WebSockets with long idle timeouts, JSON 502/504 on upstream failure;
//! - `tls` serves clients over TLS (`[server.tls]`): certificates that follow reloads,
//!   HTTP/2 and HTTP/1.1 by ALPN;
//! - [`access_log`] writes one line per request (target `chatgate::access`);
//! - [`admin`] serves `/healthz`, `/readyz`, `/metrics` and `/config`;
//! - [`run`] wires them into a Pingora `Server` that stops on a [`Shutdown`] of the
//!   caller's choice: Unix signals for `chatgate serve`, any future for a test or an
//!   embedding program. Argument parsing, logging setup and the demo upstream belong
//!   to the binary (`src/bin/chatgate/`), so this module pulls in neither clap nor
//!   tracing-subscriber.
//!
//! Signals (Pingora's): SIGTERM stops accepting and lets in-flight requests finish
//! within `[server] grace_period_seconds`; SIGINT stops at once; SIGQUIT hands the
//! listening sockets to a new process started with `chatgate serve --upgrade`
//! (zero-downtime upgrade), then drains like SIGTERM. A drain ends as soon as no
//! request or relayed WebSocket is left; WebSockets still open when the grace period
//! ends are closed with 1001 `going away` on both sides (contract §4).

pub mod access_log;
pub mod admin;
#[cfg(target_os = "linux")]
mod defer_accept;
mod edge;
mod filter;
mod forward;
pub mod head;
mod live;
mod metrics;
mod relay;
mod tls;
pub mod upstream_health;
mod upstream_pool;

pub use edge::{EdgeCtx, EdgeProxy, UpstreamError};
pub use filter::{
    AUTH_HEADER, ChatAuthFilter, MAX_REVOCATION_BODY, USER_ID_HEADER, Verdict, respond,
};
pub use live::LiveWatch;
pub use metrics::{ProxyMetrics, SessionEndReason, UNKNOWN_APP};
pub use relay::RelayHub;

use crate::gate::Gate;
use crate::reload::ConfigHandle;
use crate::revocation::{RevocationCache, open_store};
use async_trait::async_trait;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{BackgroundService, background_service};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long, after the grace period, Pingora waits for its runtimes to stop.
const RUNTIME_SHUTDOWN_TIMEOUT_SECONDS: u64 = 5;

/// Options of [`run`] that do not come from the config file.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RunOptions {
    /// Take over the listening sockets of a running instance (zero-downtime upgrade:
    /// start the new process with this set, then send SIGQUIT to the old one).
    pub upgrade: bool,
    /// The Unix socket the listening sockets are handed over on during an upgrade.
    pub upgrade_sock: PathBuf,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            upgrade: false,
            upgrade_sock: PathBuf::from("/tmp/chatgate-upgrade.sock"),
        }
    }
}

/// What ends [`run`].
#[non_exhaustive]
pub enum Shutdown {
    /// Pingora's Unix signals (see the module docs): what `chatgate serve` uses, and
    /// the only choice that can hand the sockets over on SIGQUIT.
    UnixSignals,
    /// Drain like SIGTERM once the future completes; signals are left alone, so a
    /// test or an embedding program decides when the proxy stops.
    When(Pin<Box<dyn Future<Output = ()> + Send>>),
    /// Any Pingora shutdown watch (`Send`: Pingora runs on a thread of its own).
    Watch(Box<dyn ShutdownSignalWatch + Send>),
}

impl Shutdown {
    /// [`Shutdown::When`] `stop` completes.
    pub fn when(stop: impl Future<Output = ()> + Send + 'static) -> Self {
        Shutdown::When(Box::pin(stop))
    }

    fn into_watch(self) -> Box<dyn ShutdownSignalWatch + Send> {
        match self {
            Shutdown::UnixSignals => Box::new(pingora::server::UnixShutdownSignalWatch),
            Shutdown::When(stop) => Box::new(FutureWatch(tokio::sync::Mutex::new(Some(stop)))),
            Shutdown::Watch(watch) => watch,
        }
    }
}

impl std::fmt::Debug for Shutdown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Shutdown::UnixSignals => "Shutdown::UnixSignals",
            Shutdown::When(_) => "Shutdown::When(..)",
            Shutdown::Watch(_) => "Shutdown::Watch(..)",
        })
    }
}

/// A future as a Pingora shutdown watch: a graceful terminate once it completes.
struct FutureWatch(tokio::sync::Mutex<Option<Pin<Box<dyn Future<Output = ()> + Send>>>>);

#[async_trait]
impl ShutdownSignalWatch for FutureWatch {
    async fn recv(&self) -> ShutdownSignal {
        // Pingora asks once; were it to ask again, the future has already completed.
        if let Some(stop) = self.0.lock().await.take() {
            stop.await;
        }
        ShutdownSignal::GracefulTerminate
    }
}

/// Why [`run`] could not start (it returns `Ok` after a shutdown).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The config asks for something a zero-downtime upgrade cannot do.
    #[error("{0}")]
    UpgradeImpossible(&'static str),
    /// The support runtime (store connections) did not start.
    #[error("cannot start the support runtime: {0}")]
    Runtime(std::io::Error),
    /// The revocation store did not open.
    #[error("revocation store: {0}")]
    Store(#[from] crate::revocation::StoreError),
    /// `[upstream]` gives no peer.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// `[server] listen` could not be bound (Pingora would retry it for 30 s and then
    /// leave the process running without a proxy listener).
    #[error("cannot listen on {address} ([server] listen): {source}")]
    Listen {
        /// The configured address.
        address: std::net::SocketAddr,
        /// The bind error.
        source: std::io::Error,
    },
    /// The TLS listener could not be set up (OpenSSL refused its settings).
    #[error("TLS listener ([server.tls]): {0}")]
    Tls(String),
    /// `[server] admin_listen` could not be bound.
    #[error("admin_listen {address}: {source}")]
    AdminListen {
        /// The configured address.
        address: std::net::SocketAddr,
        /// The bind error.
        source: std::io::Error,
    },
}

/// Runs the proxy, the admin listener and the background services (revocation events,
/// config reload on file change and SIGHUP) for `config` until `shutdown` asks to stop,
/// then drains within `[server] grace_period_seconds`.
///
/// Binds `[server] listen` and `[server] admin_listen` itself; errors before serving
/// (store, addresses, admin port) are returned, not logged. It does not start the demo
/// upstream (`[upstream] demo`): the binary does, as an application would start its own.
pub fn run(
    config: ConfigHandle,
    options: RunOptions,
    shutdown: Shutdown,
) -> Result<(), ServeError> {
    let snapshot = config.load_full();
    if options.upgrade {
        check_upgrade_possible(&snapshot)?;
    }
    // The store (and a Redis store's connection tasks) lives on a small runtime of its
    // own that outlives every Pingora service, so no service's runtime owns it.
    let support = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("chatgate-support")
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?;
    if !options.upgrade {
        // Pingora binds on its own runtime, retrying for 30 s and then running on
        // without the listener while `/readyz` cannot tell why; a trial bind here turns
        // a busy or forbidden port into an error and a non-zero exit. (During an
        // upgrade the running instance holds the port and hands it over.)
        let address = snapshot.server.listen;
        drop(
            std::net::TcpListener::bind(address)
                .map_err(|source| ServeError::Listen { address, source })?,
        );
    }
    let store = support.block_on(open_store(&snapshot.revocation))?;
    let cache = RevocationCache::new(store, &snapshot.revocation);
    let gate = Gate::new(config.clone(), cache.clone());
    let metrics = Arc::new(ProxyMetrics::new());

    let conf = ServerConf {
        threads: snapshot.server.threads.max(1),
        work_stealing: snapshot.server.work_stealing,
        // The drain itself is [`drain`]'s: Pingora's own fixed sleep only backs it up
        // (see `run`'s body).
        grace_period_seconds: Some(snapshot.server.grace_period.as_secs() + DRAIN_BACKSTOP_SECONDS),
        graceful_shutdown_timeout_seconds: Some(RUNTIME_SHUTDOWN_TIMEOUT_SECONDS),
        upgrade_sock: options.upgrade_sock.display().to_string(),
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade: options.upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let auth = ChatAuthFilter::with_metrics(gate, metrics.clone());
    let edge = EdgeProxy::new(auth.clone())?;
    let hub = edge.hub().clone();
    // Contract §6 rule 6: the proxy behind the request-head limits (see `head`).
    let mut http = pingora::proxy::http_proxy(&server.configuration, edge);
    http.h2_options = Some(tls::h2_options(snapshot.server.max_header_bytes));
    http.server_options = Some(tls::server_options());
    let app = head::HeadLimitedApp::new(http, config.clone());
    match snapshot.server.engine {
        crate::config::Engine::Filter => add_listener(&mut server, app, &snapshot, &config)?,
        crate::config::Engine::Forward => {
            let app = forward::ForwardApp::new(auth, hub.clone(), Arc::new(app))?;
            server.add_service(background_service(
                "chatgate upstream pool sweep",
                app.idle_sweep(),
            ));
            add_listener(&mut server, app, &snapshot, &config)?
        }
    }

    #[cfg(target_os = "linux")]
    server.add_service(background_service(
        "chatgate listener options",
        defer_accept::DeferAccept {
            address: snapshot.server.listen,
        },
    ));
    server.add_service(background_service(
        "chatgate revocation events",
        RevocationEvents {
            cache: cache.clone(),
            config: config.clone(),
        },
    ));
    if let Some(address) = snapshot.server.admin_listen {
        // During an upgrade the old instance holds the admin port until it has drained,
        // so the new one binds it when it is free; otherwise a busy port fails here.
        let listener = if options.upgrade {
            None
        } else {
            Some(
                bind_nonblocking(address)
                    .map_err(|source| ServeError::AdminListen { address, source })?,
            )
        };
        server.add_service(background_service(
            "chatgate admin",
            AdminService {
                address,
                listener: Mutex::new(listener),
                state: admin::AdminState {
                    config: config.clone(),
                    cache: cache.clone(),
                    metrics,
                    readiness: Arc::new(admin::Readiness::new(Some(snapshot.server.listen))),
                },
            },
        ));
    }
    // The file watcher and SIGHUP: a reload swaps the snapshot every request loads.
    server.add_service(background_service(
        "chatgate config reload",
        ConfigReload {
            config: config.clone(),
        },
    ));

    tracing::info!(
        target: "chatgate::proxy",
        listen = %snapshot.server.listen,
        admin = ?snapshot.server.admin_listen,
        upstream = %snapshot.upstream.addresses.join(","),
        "chatgate serving"
    );
    // Pingora's graceful shutdown always sleeps its whole grace period, then cancels
    // whatever still runs. So Pingora runs on a thread of its own, and `run` returns
    // at the first of: Pingora finishing (a fast shutdown, or the backstop), or
    // [`drain`] finding nothing left. Pingora's grace period is the configured one plus
    // a backstop, so the relays' 1001 goes out before any runtime stops.
    let (finished, done) = std::sync::mpsc::channel::<()>();
    support.spawn(drain(
        server.watch_execution_phase(),
        hub,
        snapshot.server.grace_period,
        finished.clone(),
    ));
    let signal = shutdown.into_watch();
    let pingora = std::thread::Builder::new()
        .name("chatgate-pingora".into())
        .spawn(move || {
            server.run(RunArgs {
                shutdown_signal: signal,
            });
            let _ = finished.send(());
        })
        .map_err(ServeError::Runtime)?;
    let _ = done.recv();
    if pingora.is_finished() {
        let _ = pingora.join();
    }
    support.shutdown_timeout(Duration::from_secs(2));
    Ok(())
}

/// The client listener over `app`: plain TCP, or TLS with certificates from the live
/// config (h2 and http/1.1 by ALPN) under `[server.tls]`.
fn add_listener<A: pingora::apps::ServerApp + Send + Sync + 'static>(
    server: &mut Server,
    app: A,
    snapshot: &crate::config::ConfigSnapshot,
    config: &ConfigHandle,
) -> Result<(), ServeError> {
    let mut proxy = pingora::services::listening::Service::new("chatgate".to_owned(), app);
    match &snapshot.server.tls {
        // (Pingora's L4 read buffer stays under TLS: OpenSSL reads each record in
        // pieces, which the buffer turns into one read.)
        Some(_) => proxy.add_tls_with_settings(
            &snapshot.server.listen.to_string(),
            None,
            tls::listener_settings(config).map_err(|e| ServeError::Tls(e.to_string()))?,
        ),
        // No L4 buffers on plain client connections: Pingora's default puts a 64 KiB
        // read buffer and a 1,460-byte write buffer in front of every accepted
        // socket, held for the connection's life; an idle relayed WebSocket would
        // keep them (Pingora's HTTP/1 session reads into buffers of its own, the
        // relay reads into its stack, and `head::HeadGuard` coalesces the HTTP
        // writes the same way, in a buffer the relay drops).
        None => proxy.add_listener(
            ListenerConfig::tcp(snapshot.server.listen.to_string())
                .l4_buffer(L4BufferSettings::default().read(0).write(0)),
        ),
    }
    server.add_service(proxy);
    Ok(())
}

/// Seconds Pingora's own grace period exceeds `[server] grace_period_seconds`: time
/// for [`drain`] to close the remaining sessions before Pingora stops its runtimes.
const DRAIN_BACKSTOP_SECONDS: u64 = 5;
/// The shortest drain (or the whole grace period, if shorter): how long `/readyz`
/// answers `draining` before a process with nothing left exits.
const ANNOUNCE_DRAIN: Duration = Duration::from_secs(5);
/// How long sessions told to go away get to close.
const GOING_AWAY_WITHIN: Duration = Duration::from_secs(3);

/// The drain (contract §4 and `[server] grace_period_seconds`): once Pingora has
/// stopped accepting (and, on an upgrade, handed the sockets over), waits until no
/// request or relayed session is left, at most the grace period; then tells the open
/// sessions to go away (close 1001 to both sides) and gives them a moment to close.
/// Sends on `done` when nothing is left (but not before [`ANNOUNCE_DRAIN`]), so the
/// process exits then instead of at the end of the grace period.
async fn drain(
    mut phases: tokio::sync::broadcast::Receiver<pingora::server::ExecutionPhase>,
    hub: Arc<RelayHub>,
    grace: Duration,
    done: std::sync::mpsc::Sender<()>,
) {
    use pingora::server::ExecutionPhase;
    use tokio::sync::broadcast::error::RecvError;
    // Bounded by Pingora's lifetime: the sender goes when the server does.
    loop {
        match phases.recv().await {
            Ok(ExecutionPhase::ShutdownGracePeriod) => break,
            Ok(_) | Err(RecvError::Lagged(_)) => {}
            Err(RecvError::Closed) => return,
        }
    }
    let started = tokio::time::Instant::now();
    tracing::info!(target: "chatgate::proxy", busy = hub.busy(), "draining");
    if tokio::time::timeout(grace, hub.until_idle()).await.is_err() {
        tracing::info!(target: "chatgate::proxy", sessions = hub.open(), "grace period over: closing open WebSockets with 1001");
        hub.go_away();
        let _ = tokio::time::timeout(GOING_AWAY_WITHIN, hub.until_idle()).await;
    } else {
        // `/readyz` says `draining` for a while before the admin port goes away with
        // the process, so a balancer polling it sees the instance leave.
        tokio::time::sleep_until(started + grace.min(ANNOUNCE_DRAIN)).await;
    }
    let _ = done.send(());
}

/// The parts of a config that cannot be shared with the running instance during a
/// zero-downtime upgrade are refused before anything starts.
fn check_upgrade_possible(snapshot: &crate::config::ConfigSnapshot) -> Result<(), ServeError> {
    if snapshot.revocation.store == crate::config::StoreKind::Embedded {
        return Err(ServeError::UpgradeImpossible(
            "--upgrade needs [revocation] store = \"redis\" (or \"memory\"): the embedded store's file stays locked by the running instance until it exits",
        ));
    }
    if snapshot.upstream.demo {
        return Err(ServeError::UpgradeImpossible(
            "--upgrade is not supported with [upstream] demo = true (the demo API's port belongs to the running instance)",
        ));
    }
    Ok(())
}

fn bind_nonblocking(address: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(address)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Follows the revocation store's change events, and `[revocation]` cache settings
/// across reloads.
struct RevocationEvents {
    cache: Arc<RevocationCache>,
    config: ConfigHandle,
}

#[async_trait]
impl BackgroundService for RevocationEvents {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let events = self.cache.spawn_invalidation();
        let settings = self.cache.follow_config(&self.config);
        let _ = shutdown.changed().await;
        events.abort();
        settings.abort();
    }
}

/// Reloads the config on file changes and SIGHUP.
struct ConfigReload {
    config: ConfigHandle,
}

#[async_trait]
impl BackgroundService for ConfigReload {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let stop = async move {
            let _ = shutdown.changed().await;
        };
        crate::reload::run_reloaders(self.config.clone(), stop).await;
    }
}

/// The admin listener as a Pingora background service.
struct AdminService {
    address: std::net::SocketAddr,
    /// Bound before the server starts so a busy port fails `run` (`None` during an
    /// upgrade), taken once on start.
    listener: Mutex<Option<std::net::TcpListener>>,
    state: admin::AdminState,
}

/// How often, and how many times, an upgrading instance tries the admin port while the
/// old instance drains (covers the default 30 s grace period with room to spare).
const ADMIN_BIND_RETRY: Duration = Duration::from_millis(500);
const ADMIN_BIND_ATTEMPTS: u32 = 240;

#[async_trait]
impl BackgroundService for AdminService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut listener = self.listener.lock().ok().and_then(|mut l| l.take());
        for _ in 0..ADMIN_BIND_ATTEMPTS {
            if listener.is_some() || *shutdown.borrow() {
                break;
            }
            match bind_nonblocking(self.address) {
                Ok(bound) => listener = Some(bound),
                Err(_) => tokio::time::sleep(ADMIN_BIND_RETRY).await,
            }
        }
        let Some(listener) = listener else {
            tracing::error!(target: "chatgate::proxy", address = %self.address, "admin listener: port never became free");
            return;
        };
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(error) => {
                tracing::error!(target: "chatgate::proxy", %error, "admin listener");
                return;
            }
        };
        // The upstream probe's first round before the first answer, so `/readyz`
        // and `chatgate_upstream_up` are right from the start (a request arriving
        // meanwhile waits in the bound listener's backlog, at most PROBE_TIMEOUT).
        let state = &self.state;
        let upstream = state.readiness.upstream();
        upstream_health::probe_round(&state.config, upstream, &state.metrics).await;
        let probes = upstream_health::watch(state.config.clone(), upstream, &state.metrics);
        // The admin listener outlives the drain: `/readyz` turns 503 `draining` when
        // the proxy stops accepting, and the listener ends with Pingora's runtimes
        // after the grace period, so a balancer polling it sees the instance leave.
        let readiness = state.readiness.clone();
        let stop = async move {
            let _ = shutdown.changed().await;
            readiness.start_draining();
            std::future::pending::<()>().await;
        };
        tokio::select! {
            served = admin::serve(listener, state.clone(), stop) => if let Err(error) = served {
                tracing::error!(target: "chatgate::proxy", %error, "admin listener stopped");
            },
            () = probes => {}
        }
    }
}

/// What both engines answer a client whose request body could not be read (a body that
/// stalled past `[server] client_body_timeout_ms`, bad chunked framing): the contract's
/// input error (§4 and §6: code 4, HTTP 400, in JSON like every other refusal), where
/// Pingora would answer a bare 400. `None` when the client went away, broke the
/// connection or stopped reading: nobody is left to answer. One mapping for both
/// engines, so they cannot drift apart.
pub(crate) fn unreadable_request(error: &pingora::Error) -> Option<crate::error::AuthError> {
    use pingora::ErrorType;
    let why = match error.etype() {
        ErrorType::ReadError
        | ErrorType::WriteError
        | ErrorType::WriteTimedout
        | ErrorType::ConnectionClosed => return None,
        ErrorType::ReadTimedout => {
            "the request body stopped arriving ([server] client_body_timeout_ms)"
        }
        _ => "the request body is malformed",
    };
    Some(crate::error::AuthError::BadInput(why.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{App, ConfigSnapshot, StoreKind};

    #[test]
    fn an_unreadable_body_is_an_input_error_unless_the_client_is_gone() {
        use pingora::{Error, ErrorType};
        // pingora-core's HTTP/1 body errors (`v1::body::INVALID_CHUNK`, ...: a private
        // module, so by the names it gives them).
        for kind in [
            ErrorType::ReadTimedout,
            ErrorType::new("InvalidChunk"),
            ErrorType::new("PrematureBodyEnd"),
        ] {
            let error = unreadable_request(&Error::new(kind.clone()))
                .unwrap_or_else(|| panic!("{kind:?} is answered"));
            assert_eq!(
                (error.code(), error.status().as_u16()),
                (4, 400),
                "{kind:?}"
            );
        }
        let stalled = unreadable_request(&Error::new(ErrorType::ReadTimedout)).unwrap();
        assert!(
            stalled.to_string().contains("client_body_timeout_ms"),
            "{stalled}"
        );
        for kind in [
            ErrorType::ReadError,
            ErrorType::WriteError,
            ErrorType::WriteTimedout,
            ErrorType::ConnectionClosed,
        ] {
            assert!(
                unreadable_request(&Error::new(kind.clone())).is_none(),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn an_upgrade_is_refused_with_the_embedded_store_or_the_demo_upstream() {
        let mut snapshot = ConfigSnapshot::with_apps(vec![App::new("k", vec!["s".into()])]);
        snapshot.revocation.store = StoreKind::Embedded;
        assert!(
            check_upgrade_possible(&snapshot)
                .unwrap_err()
                .to_string()
                .contains("store")
        );
        snapshot.revocation.store = StoreKind::Redis;
        assert!(check_upgrade_possible(&snapshot).is_ok());
        snapshot.upstream.demo = true;
        assert!(
            check_upgrade_possible(&snapshot)
                .unwrap_err()
                .to_string()
                .contains("demo")
        );
    }
}
