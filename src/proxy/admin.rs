//! The admin listener (`[server] admin_listen`): `/healthz`, `/readyz`, `/metrics`,
//! `/config`. A small axum server, run as a Pingora background service so it starts and
//! stops with the proxy.
//!
//! `/readyz` answers what a load balancer needs to know before sending traffic: 200
//! only when the proxy's listener accepts connections, a config with apps is loaded,
//! the revocation store answers and some upstream address accepts a connection (a
//! background probe with hysteresis, see [`super::upstream_health`]: the answer is
//! read, not probed, so `/readyz` never waits on the upstream); otherwise 503 with the
//! reason of each check. A
//! draining instance (after SIGTERM or SIGQUIT) is 503 `draining` while this listener
//! stays up, so the balancer sees it leave instead of a refused connection. The
//! listener check connects to the proxy's port: Pingora binds it on its own runtime
//! and says nothing when that fails, so asking the socket is the honest answer.

use super::metrics::ProxyMetrics;
use super::upstream_health::UpstreamHealth;
use crate::reload::ConfigHandle;
use crate::revocation::RevocationCache;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Longest `/readyz` waits for the revocation store's ping.
const READY_PING_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest `/readyz` waits for the proxy's listener to accept a connection.
const READY_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// What `/readyz` cannot read from the config or the store: where the proxy listens,
/// whether it is draining and whether the upstream accepts connections.
#[derive(Debug, Default)]
pub struct Readiness {
    listen: Option<SocketAddr>,
    draining: AtomicBool,
    upstream: UpstreamHealth,
}

impl Readiness {
    /// Readiness of a proxy listening on `listen` (`None`: no listener to check).
    pub fn new(listen: Option<SocketAddr>) -> Self {
        Readiness {
            listen,
            draining: AtomicBool::new(false),
            upstream: UpstreamHealth::default(),
        }
    }

    /// The upstream's reachability: fed by [`super::upstream_health::watch`], not
    /// judged until a first round is recorded.
    pub fn upstream(&self) -> &UpstreamHealth {
        &self.upstream
    }

    /// The proxy stopped accepting: `/readyz` says 503 `draining` from now on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Whether [`Readiness::start_draining`] was called.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Whether the proxy's listener accepts a connection.
    async fn listener(&self) -> Result<(), String> {
        let Some(mut address) = self.listen else {
            return Ok(());
        };
        // A wildcard listener is reached on loopback.
        if address.ip().is_unspecified() {
            address.set_ip(match address {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        match tokio::time::timeout(
            READY_CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect(address),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(format!("listener {address} not accepting: {error}")),
            Err(_) => Err(format!("listener {address} did not accept in time")),
        }
    }
}

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    /// The live config.
    pub config: ConfigHandle,
    /// The revocation cache (and its store).
    pub cache: Arc<RevocationCache>,
    /// The proxy's metrics.
    pub metrics: Arc<ProxyMetrics>,
    /// The listener and drain state `/readyz` reports.
    pub readiness: Arc<Readiness>,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState").finish_non_exhaustive()
    }
}

/// The admin routes.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/config", get(config))
        .with_state(state)
}

/// Serves the admin routes on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let draining = state.readiness.draining();
    let config_loaded = state.config.load().apps().next().is_some();
    let (store, listener) = tokio::join!(
        async {
            match tokio::time::timeout(READY_PING_TIMEOUT, state.cache.store().ping()).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => Err(error.to_string()),
                Err(_) => Err("revocation store did not answer in time".to_owned()),
            }
        },
        state.readiness.listener()
    );
    let upstream = state.readiness.upstream.verdict();
    let ready = !draining && config_loaded && store.is_ok() && listener.is_ok() && upstream.is_ok();
    let reason = |check: &Result<(), String>| match check {
        Ok(()) => "ok".to_owned(),
        Err(e) => e.clone(),
    };
    let body = serde_json::json!({
        "ready": ready,
        "draining": draining,
        "listener": reason(&listener),
        "config": if config_loaded { "ok" } else { "no apps configured" },
        "store": reason(&store),
        "upstream": reason(&upstream),
        // Each address's last probe, also while the verdict holds against it.
        "upstreams": state
            .readiness
            .upstream
            .last()
            .into_iter()
            .map(|probe| (probe.address, reason(&probe.result).into()))
            .collect::<serde_json::Map<String, serde_json::Value>>(),
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(status, body)
}

async fn metrics(State(state): State<AdminState>) -> Response {
    state.metrics.observe_config(&state.config);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(&state.cache),
    )
        .into_response()
}

async fn config(State(state): State<AdminState>) -> Response {
    // version, content_hash, loaded_at, source, last reload error and counts.
    let mut body = state.config.status().to_json();
    body["apps"] = state.config.load().apps().count().into();
    // Which client certificate new handshakes get (`[server.tls]`), e.g. after a rotation.
    if let Some(tls) = &state.config.load().server.tls {
        body["tls"] = tls.to_json();
    }
    // How the revocation store is reached (never a password) and what to fix about it.
    let store = state.cache.store();
    let warnings: Vec<serde_json::Value> = store
        .warnings()
        .into_iter()
        .map(|w| serde_json::json!({"kind": w.kind, "message": w.message}))
        .collect();
    body["revocation_store"] = serde_json::json!({
        "backend": store.report(),
        "warnings": warnings,
    });
    json(StatusCode::OK, body)
}

fn json(status: StatusCode, body: serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{App, ConfigSnapshot};
    use crate::revocation::MemoryStore;

    async fn get_text(state: AdminState, path: &str) -> (StatusCode, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, state, async {
            let _ = stopped.await;
        }));
        let response = reqwest::get(format!("http://{address}{path}"))
            .await
            .unwrap();
        let status = StatusCode::from_u16(response.status().as_u16()).unwrap();
        let text = response.text().await.unwrap();
        let _ = stop.send(());
        server.await.unwrap().unwrap();
        (status, text)
    }

    fn state() -> AdminState {
        let config = ConfigSnapshot::with_apps(vec![App::new("k", vec!["s".into()])]);
        let cache = RevocationCache::new(Arc::new(MemoryStore::new()), &config.revocation);
        AdminState {
            config: ConfigHandle::new(config),
            cache,
            metrics: Arc::new(ProxyMetrics::new()),
            readiness: Arc::new(Readiness::new(None)),
        }
    }

    /// A memory store that reports a warning and how it is reached, as Redis does.
    struct Warned(MemoryStore);

    #[async_trait::async_trait]
    impl crate::revocation::RevocationStore for Warned {
        async fn user_cutoff(
            &self,
            app: &str,
            user: &str,
        ) -> Result<Option<crate::time::Cutoff>, crate::revocation::StoreError> {
            self.0.user_cutoff(app, user).await
        }
        async fn set_user_cutoffs(
            &self,
            app: &str,
            changes: &[crate::revocation::UserCutoffChange],
        ) -> Result<(), crate::revocation::StoreError> {
            self.0.set_user_cutoffs(app, changes).await
        }
        async fn app_cutoff(
            &self,
            app: &str,
        ) -> Result<Option<crate::time::Cutoff>, crate::revocation::StoreError> {
            self.0.app_cutoff(app).await
        }
        async fn set_app_cutoff(
            &self,
            app: &str,
            cutoff: Option<crate::time::Cutoff>,
        ) -> Result<(), crate::revocation::StoreError> {
            self.0.set_app_cutoff(app, cutoff).await
        }
        fn subscribe(
            &self,
        ) -> tokio::sync::broadcast::Receiver<crate::revocation::RevocationEvent> {
            self.0.subscribe()
        }
        async fn ping(&self) -> Result<(), crate::revocation::StoreError> {
            Ok(())
        }
        fn warnings(&self) -> Vec<crate::revocation::StoreWarning> {
            vec![crate::revocation::StoreWarning {
                kind: "redis_persists_nothing",
                message: "set appendonly yes".into(),
            }]
        }
        fn report(&self) -> serde_json::Value {
            serde_json::json!({"url": crate::config::redact_url("redis://u:hunter2@r")})
        }
    }

    #[tokio::test]
    async fn store_warnings_reach_config_and_metrics_without_secrets() {
        let mut state = state();
        state.cache = RevocationCache::new(
            Arc::new(Warned(MemoryStore::new())),
            &state.config.load().revocation,
        );
        let (_, text) = get_text(state.clone(), "/config").await;
        assert!(!text.contains("hunter2"), "{text}");
        let config: serde_json::Value = serde_json::from_str(&text).unwrap();
        let store = &config["revocation_store"];
        assert_eq!(store["backend"]["url"], "redis://u:***@r");
        assert_eq!(store["warnings"][0]["kind"], "redis_persists_nothing");
        let (_, text) = get_text(state, "/metrics").await;
        assert!(
            text.contains(r#"chatgate_revocation_store_warning{kind="redis_persists_nothing"} 1"#),
            "{text}"
        );
    }

    #[tokio::test]
    async fn endpoints_answer() {
        let (status, text) = get_text(state(), "/healthz").await;
        assert_eq!((status, text.as_str()), (StatusCode::OK, "ok\n"));
        let (status, text) = get_text(state(), "/readyz").await;
        assert_eq!(status, StatusCode::OK, "{text}");
        let ready: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(ready["store"], "ok");
        let (_, text) = get_text(state(), "/metrics").await;
        assert!(text.contains("chatgate_websockets_open 0"), "{text}");
        let (_, text) = get_text(state(), "/config").await;
        let config: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(config["content_hash"].is_string());
        assert_eq!(config["apps"], 1);
    }

    #[tokio::test]
    async fn readyz_is_503_with_the_reason_while_draining_or_not_listening() {
        let state = state();
        state.readiness.start_draining();
        let (status, text) = get_text(state, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
        let body: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            (&body["ready"], &body["draining"]),
            (&false.into(), &true.into())
        );

        // A port nothing listens on: bound, then released.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mut state = super::tests::state();
        state.readiness = Arc::new(Readiness::new(Some(closed)));
        let (status, text) = get_text(state.clone(), "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
        let body: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(
            body["listener"].as_str().unwrap().contains("not accepting"),
            "{body}"
        );

        let open = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        state.readiness = Arc::new(Readiness::new(Some(open.local_addr().unwrap())));
        let (status, text) = get_text(state, "/readyz").await;
        assert_eq!(status, StatusCode::OK, "{text}");
    }

    #[tokio::test]
    async fn readyz_is_503_naming_the_upstream_when_no_address_accepts() {
        let state = state();
        let probe = |up: bool| {
            vec![crate::proxy::upstream_health::Probe {
                address: "127.0.0.1:9".into(),
                result: if up { Ok(()) } else { Err("refused".into()) },
            }]
        };
        state.readiness.upstream().record(probe(false));
        let (status, text) = get_text(state.clone(), "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
        let body: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(
            body["upstream"]
                .as_str()
                .unwrap()
                .contains("127.0.0.1:9 refused"),
            "{body}"
        );
        assert_eq!(body["upstreams"]["127.0.0.1:9"], "refused");
        for _ in 0..crate::proxy::upstream_health::RISE {
            state.readiness.upstream().record(probe(true));
        }
        let (status, text) = get_text(state, "/readyz").await;
        assert_eq!(status, StatusCode::OK, "{text}");
        let body: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            (&body["upstream"], &body["upstreams"]["127.0.0.1:9"]),
            (&"ok".into(), &"ok".into())
        );
    }
}
