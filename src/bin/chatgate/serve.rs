//! `chatgate serve`: logging, the demo upstream, then the library's [`proxy::run`].
//!
//! The logging setup and the demo chat API belong to the application, not to the
//! library a user embeds (mini-redis's split): the library's proxy neither installs a
//! subscriber nor starts an upstream of its own.

use crate::allocator::COLLECT_EVERY;
use chatgate::ConfigHandle;
use chatgate::config::LogFormat;
use chatgate::proxy::{self, RunOptions, Shutdown};
use clap::Args;
use std::io::IsTerminal;
use std::path::PathBuf;

/// `chatgate serve`: run the edge proxy.
#[derive(Debug, Clone, Args)]
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

/// Why `serve` stopped before serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The config file.
    #[error(transparent)]
    Config(#[from] chatgate::ConfigError),
    /// The demo upstream's address.
    #[error("[upstream] demo needs an address to listen on")]
    NoDemoAddress,
    /// The demo upstream's port or runtime.
    #[error("demo upstream on {address}: {source}")]
    Demo {
        /// `[upstream] addresses[0]`.
        address: String,
        /// What failed.
        source: std::io::Error,
    },
    /// The proxy.
    #[error(transparent)]
    Proxy(#[from] proxy::ServeError),
}

/// Loads the config, starts the demo upstream when the config asks for it, and runs
/// the proxy until a Unix signal stops it. `purge_delay` is the allocator's (ms),
/// logged once logging is up.
pub fn serve(args: &ServeArgs, purge_delay: i64) -> Result<(), ServeError> {
    // The config names the log format, so it is read first; its errors are printed by
    // the caller, not logged.
    let config = ConfigHandle::from_file(&args.config)?;
    init_logging(config.load().log.format);
    tracing::info!(
        target: "chatgate::allocator",
        purge_delay_ms = purge_delay,
        collect_every_ms = COLLECT_EVERY.as_millis(),
        "mimalloc returns freed memory to the OS purge_delay_ms after it is freed (MIMALLOC_PURGE_DELAY), checked every collect_every_ms"
    );
    for warning in config.load().warnings() {
        tracing::warn!(target: "chatgate::config", "{warning}");
    }
    let mut options = RunOptions::default();
    options.upgrade = args.upgrade;
    options.upgrade_sock = args.upgrade_sock.clone();
    // An upgrading instance cannot take the demo's port from the running one; the
    // library refuses that combination with its own message.
    let demo = if config.load().upstream.demo && !args.upgrade {
        Some(DemoUpstream::start(&config.load().upstream.addresses)?)
    } else {
        None
    };
    let served = proxy::run(config, options, Shutdown::UnixSignals);
    if let Some(demo) = demo {
        demo.stop();
    }
    Ok(served?)
}

/// Logs go to stderr (stdout stays free for a command's output), as text or JSON lines
/// (`[log] format`), with ANSI colour only when stderr is a terminal: escape codes in a
/// file or journald are noise. Read once: a reload cannot change the format.
fn init_logging(format: LogFormat) {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    // Pingora logs through `log`; tracing-subscriber forwards it (`try_init` installs
    // the `log` bridge). Contract §6 rule 8: whatever RUST_LOG asks for, the libraries
    // that format whole requests (URI with its query, Authorization) are capped at
    // INFO by `chatgate::logs::may_log`, so no token reaches the output.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // `may_log` only ever narrows, so the output is never more verbose than `filter`:
    // saying so gives the subscriber a maximum level, which `try_init` also hands the
    // `log` bridge. Without it the maximum is TRACE, and every `log::debug!` in
    // Pingora's per-request path (TLS reads included) was formatted into a record and
    // offered to the subscriber to be refused: ~4% of the proxy core per request.
    let hint = filter.max_level_hint();
    let mut redact = tracing_subscriber::filter::filter_fn(chatgate::logs::may_log);
    if let Some(hint) = hint {
        redact = redact.with_max_level_hint(hint);
    }
    let base = tracing_subscriber::fmt::layer()
        .with_target(true)
        .with_writer(std::io::stderr);
    let output = match format {
        LogFormat::Text => base
            .with_ansi(std::io::stderr().is_terminal())
            .with_filter(filter)
            .with_filter(redact)
            .boxed(),
        // Fields at the top level of each object, where log shippers look for them.
        LogFormat::Json => base
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_filter(filter)
            .with_filter(redact)
            .boxed(),
    };
    let _ = tracing_subscriber::registry().with(output).try_init();
}

/// The built-in demo chat API ([`chatgate::demo`]) on the first upstream address
/// (quickstart only), on a runtime of its own that outlives the proxy's.
struct DemoUpstream {
    runtime: tokio::runtime::Runtime,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl DemoUpstream {
    fn start(addresses: &[String]) -> Result<Self, ServeError> {
        let address = addresses.first().ok_or(ServeError::NoDemoAddress)?;
        let failed = |source| ServeError::Demo {
            address: address.clone(),
            source,
        };
        // Bound here, before the proxy starts, so a busy port fails `serve`.
        let listener = std::net::TcpListener::bind(address.as_str()).map_err(failed)?;
        listener.set_nonblocking(true).map_err(failed)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("chatgate-demo")
            .enable_all()
            .build()
            .map_err(failed)?;
        let listener = {
            let _entered = runtime.enter();
            tokio::net::TcpListener::from_std(listener).map_err(failed)?
        };
        tracing::warn!(target: "chatgate::proxy", %address, "[upstream] demo = true: serving the DEMO chat API, not for production");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        runtime.spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            if let Err(error) = chatgate::demo::serve(listener, shutdown).await {
                tracing::error!(target: "chatgate::proxy", %error, "demo upstream stopped");
            }
        });
        Ok(DemoUpstream { runtime, stop })
    }

    fn stop(self) {
        let _ = self.stop.send(());
        self.runtime
            .shutdown_timeout(std::time::Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The subscriber's maximum level follows `RUST_LOG` (INFO without it), not TRACE:
    /// the `log` bridge takes the same maximum, so libraries' debug records are
    /// skipped where they are written instead of being built and refused.
    #[test]
    fn logging_declares_the_filter_level_as_its_maximum() {
        let expected = match std::env::var("RUST_LOG") {
            Ok(directives) => tracing_subscriber::EnvFilter::new(directives).max_level_hint(),
            Err(_) => Some(tracing::level_filters::LevelFilter::INFO),
        };
        init_logging(LogFormat::Text);
        assert_eq!(
            Some(tracing::level_filters::LevelFilter::current()),
            expected
        );
    }
}
