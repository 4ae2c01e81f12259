//! The admin listener (`[server] admin_listen`): `/healthz`, `/readyz`, `/metrics`,
//! `/config`. A small axum server, run as a Pingora background service so it starts and
//! stops with the proxy.

use super::metrics::ProxyMetrics;
use crate::reload::ConfigHandle;
use crate::revocation::RevocationCache;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Longest `/readyz` waits for the revocation store's ping.
const READY_PING_TIMEOUT: Duration = Duration::from_secs(2);

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    /// The live config.
    pub config: ConfigHandle,
    /// The revocation cache (and its store).
    pub cache: Arc<RevocationCache>,
    /// The proxy's metrics.
    pub metrics: Arc<ProxyMetrics>,
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
    let config_loaded = state.config.load().apps().next().is_some();
    let store = match tokio::time::timeout(READY_PING_TIMEOUT, state.cache.store().ping()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("revocation store did not answer in time".to_owned()),
    };
    let ready = config_loaded && store.is_ok();
    let body = serde_json::json!({
        "ready": ready,
        "config": if config_loaded { "ok" } else { "no apps configured" },
        "store": match &store { Ok(()) => "ok", Err(e) => e.as_str() },
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(status, body)
}

async fn metrics(State(state): State<AdminState>) -> Response {
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
}
