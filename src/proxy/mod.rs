//! The Pingora edge proxy (feature `proxy`): `chatgate serve`.
//!
//! - [`ChatAuthFilter`] runs the gate inside any Pingora `ProxyHttp::request_filter`
//!   (see `examples/pingora_custom_proxy.rs`);
//! - [`EdgeProxy`] is the `ProxyHttp` the binary runs: round robin over
//!   `[upstream] addresses`, retries of failed connects for idempotent requests,
//!   optional TLS, WebSockets with long idle timeouts, JSON 502/504 on upstream failure;
//! - [`admin`] serves `/healthz`, `/readyz`, `/metrics` and `/config`;
//! - [`run`] wires them into a Pingora `Server` with a caller-chosen shutdown signal,
//!   [`serve`] is the `chatgate serve` command.
//!
//! Signals (Pingora's): SIGTERM stops accepting and lets in-flight requests finish
//! within `[server] grace_period_seconds`; SIGINT stops at once; SIGQUIT hands the
//! listening sockets to a new process started with `chatgate serve --upgrade`
//! (zero-downtime upgrade), then drains like SIGTERM.

pub mod admin;
mod edge;
mod filter;
mod live;
mod metrics;

pub use edge::{EdgeCtx, EdgeProxy};
pub use filter::{
    AUTH_HEADER, ChatAuthFilter, MAX_REVOCATION_BODY, USER_ID_HEADER, Verdict, respond,
};
pub use live::LiveWatch;
pub use metrics::{ProxyMetrics, UNKNOWN_APP};

use crate::gate::Gate;
use crate::reload::ConfigHandle;
use crate::revocation::{RevocationCache, open_store};
use async_trait::async_trait;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{BackgroundService, background_service};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long, after the grace period, Pingora waits for its runtimes to stop.
const RUNTIME_SHUTDOWN_TIMEOUT_SECONDS: u64 = 5;

/// `chatgate serve`: run the edge proxy.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// The config file.
    #[arg(long, default_value = "config.toml")]
    pub config: PathBuf,
    /// Take over the listening sockets of a running chatgate (zero-downtime upgrade:
    /// start the new binary with --upgrade, then send SIGQUIT to the old one).
    #[arg(long)]
    pub upgrade: bool,
    /// Unix socket the listening sockets are handed over on during an upgrade.
    #[arg(long, default_value = "/tmp/chatgate-upgrade.sock")]
    pub upgrade_sock: PathBuf,
}

/// Options of [`run`] that do not come from the config file.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Take over the sockets of a running instance (see [`ServeArgs::upgrade`]).
    pub upgrade: bool,
    /// The upgrade handover socket.
    pub upgrade_sock: PathBuf,
}

impl From<&ServeArgs> for RunOptions {
    fn from(args: &ServeArgs) -> Self {
        RunOptions {
            upgrade: args.upgrade,
            upgrade_sock: args.upgrade_sock.clone(),
        }
    }
}

/// `chatgate serve --config F`: loads the config, then [`run`]s until a signal.
pub fn serve(args: &ServeArgs) -> Result<(), String> {
    init_logging();
    let config = ConfigHandle::from_file(&args.config).map_err(|e| e.to_string())?;
    run(
        config,
        RunOptions::from(args),
        Box::new(pingora::server::UnixShutdownSignalWatch),
    )
}

fn init_logging() {
    // Pingora logs through `log`; tracing-subscriber forwards it. A second init (tests
    // calling serve twice in one process) is harmless, so its error is ignored.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true)
        .try_init();
}

/// Runs the proxy, the admin listener and the background services for `config` until
/// `shutdown` asks to stop (see the module docs for the Unix signals).
///
/// Binds `[server] listen` and `[server] admin_listen` itself; errors before serving
/// (store, addresses, demo upstream port) are returned, not logged.
pub fn run(
    config: ConfigHandle,
    options: RunOptions,
    shutdown: Box<dyn ShutdownSignalWatch>,
) -> Result<(), String> {
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
        .map_err(|e| format!("cannot start the support runtime: {e}"))?;
    let store = support
        .block_on(open_store(&snapshot.revocation))
        .map_err(|e| format!("revocation store: {e}"))?;
    let cache = RevocationCache::new(store, &snapshot.revocation);
    let gate = Gate::new(config.clone(), cache.clone());
    let metrics = Arc::new(ProxyMetrics::new());

    let (demo_stop, demo_stopped) = tokio::sync::watch::channel(false);
    if snapshot.upstream.demo {
        start_demo_upstream(&support, &snapshot.upstream.addresses, demo_stopped)?;
    }

    let conf = ServerConf {
        threads: snapshot.server.threads.max(1),
        work_stealing: snapshot.server.work_stealing,
        grace_period_seconds: Some(snapshot.server.grace_period.as_secs()),
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

    let edge = EdgeProxy::new(ChatAuthFilter::with_metrics(gate, metrics.clone()))?;
    let mut proxy =
        pingora::proxy::http_proxy_service_with_name(&server.configuration, edge, "chatgate");
    proxy.add_tcp(&snapshot.server.listen.to_string());
    server.add_service(proxy);

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
            Some(bind_nonblocking(address).map_err(|e| format!("admin_listen {address}: {e}"))?)
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
        demo = snapshot.upstream.demo,
        "chatgate serving"
    );
    server.run(RunArgs {
        shutdown_signal: shutdown,
    });
    let _ = demo_stop.send(true);
    support.shutdown_timeout(Duration::from_secs(2));
    Ok(())
}

/// The parts of a config that cannot be shared with the running instance during a
/// zero-downtime upgrade are refused before anything starts.
fn check_upgrade_possible(snapshot: &crate::config::ConfigSnapshot) -> Result<(), String> {
    if snapshot.revocation.store == crate::config::StoreKind::Embedded {
        return Err("--upgrade needs [revocation] store = \"redis\" (or \"memory\"): the embedded store's file stays locked by the running instance until it exits".into());
    }
    if snapshot.upstream.demo {
        return Err("--upgrade is not supported with [upstream] demo = true (the demo API's port belongs to the running instance)".into());
    }
    Ok(())
}

fn bind_nonblocking(address: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(address)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Starts the built-in demo chat API ([`crate::demo`]) on the first upstream address
/// (quickstart only).
fn start_demo_upstream(
    runtime: &tokio::runtime::Runtime,
    addresses: &[String],
    mut stopped: tokio::sync::watch::Receiver<bool>,
) -> Result<(), String> {
    let address = addresses
        .first()
        .ok_or("[upstream] demo needs an address to listen on")?;
    let listener = std::net::TcpListener::bind(address.as_str())
        .map_err(|e| format!("demo upstream on {address}: {e}"))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("demo upstream on {address}: {e}"))?;
    tracing::warn!(target: "chatgate::proxy", %address, "[upstream] demo = true: serving the DEMO chat API, not for production");
    runtime.spawn(async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(error) => {
                tracing::error!(target: "chatgate::proxy", %error, "demo upstream");
                return;
            }
        };
        let shutdown = async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        };
        if let Err(error) = crate::demo::serve(listener, shutdown).await {
            tracing::error!(target: "chatgate::proxy", %error, "demo upstream stopped");
        }
    });
    Ok(())
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
        let stop = async move {
            let _ = shutdown.changed().await;
        };
        if let Err(error) = admin::serve(listener, self.state.clone(), stop).await {
            tracing::error!(target: "chatgate::proxy", %error, "admin listener stopped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{App, ConfigSnapshot, StoreKind};

    #[test]
    fn an_upgrade_is_refused_with_the_embedded_store_or_the_demo_upstream() {
        let mut snapshot = ConfigSnapshot::with_apps(vec![App::new("k", vec!["s".into()])]);
        snapshot.revocation.store = StoreKind::Embedded;
        assert!(
            check_upgrade_possible(&snapshot)
                .unwrap_err()
                .contains("store")
        );
        snapshot.revocation.store = StoreKind::Redis;
        assert_eq!(check_upgrade_possible(&snapshot), Ok(()));
        snapshot.upstream.demo = true;
        assert!(
            check_upgrade_possible(&snapshot)
                .unwrap_err()
                .contains("demo")
        );
    }
}
