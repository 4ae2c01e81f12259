//! Shared setup of the gate and layer tests, one call each: a config, a gate over a
//! store, a layer, a server on loopback, one checked request. (The proxy tests' own
//! harness, which starts the `chatgate` binary and a recording upstream, is
//! `proxy_harness.rs` next to this file.)
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use chatgate::config::StoreKind;
use chatgate::revocation::{MemoryStore, RevocationCache, RevocationStore};
use chatgate::{App, AuthError, ConfigHandle, ConfigSnapshot, Decision, Gate, RequestParts};
use http::{HeaderMap, Method, Uri, header::AUTHORIZATION};
use std::sync::Arc;

/// A config built in code: defaults, these apps, and the in-memory revocation store
/// (so nothing a test does writes a database file).
pub fn config(apps: Vec<App>) -> ConfigSnapshot {
    let mut config = ConfigSnapshot::with_apps(apps);
    config.revocation.store = StoreKind::Memory;
    config
}

/// An app with one secret.
pub fn app(api_key: &str, secret: &str) -> App {
    App::new(api_key, vec![secret.into()])
}

/// A gate over `config` and an in-memory revocation store.
pub fn gate(config: ConfigSnapshot) -> Gate {
    gate_over(ConfigHandle::new(config), Arc::new(MemoryStore::new()))
}

/// A gate over a live config and a store of the test's own (redb, Redis, a failing
/// one), following the store's change events as a deployment does. Needs a runtime.
pub fn gate_over(config: ConfigHandle, store: Arc<dyn RevocationStore>) -> Gate {
    let cache = RevocationCache::new(store, &config.load().revocation);
    cache.spawn_invalidation();
    Gate::new(config, cache)
}

/// `GET /channels?api_key=<api_key>` with `Authorization: <token>`, decided by `gate`.
pub async fn check(gate: &Gate, api_key: &str, token: &str) -> Result<Decision, AuthError> {
    let uri: Uri = format!("/channels?api_key={api_key}").parse().unwrap();
    let mut headers = HeaderMap::new();
    headers.insert(AUTHORIZATION, token.parse().unwrap());
    gate.check(RequestParts {
        method: &Method::GET,
        uri: &uri,
        headers: &headers,
        peer: None,
    })
    .await
}

/// The layer a tower user builds in one call, over a config built in code.
#[cfg(feature = "tower")]
pub async fn layer(config: ConfigSnapshot) -> chatgate::ChatAuthLayer {
    chatgate::ChatAuthLayer::from_config(ConfigHandle::new(config))
        .await
        .expect("an in-memory store opens")
}

/// Serves `app` on a free loopback port until the test's runtime ends.
#[cfg(feature = "axum")]
pub async fn serve(app: axum::Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    address
}

/// `routes` behind a `ChatAuthLayer` over `config`, served on loopback: the address,
/// and the layer's gate (to revoke or reload behind the server's back).
#[cfg(feature = "axum")]
pub async fn layer_app(
    config: ConfigSnapshot,
    routes: axum::Router,
) -> (std::net::SocketAddr, Gate) {
    let layer = layer(config).await;
    let gate = layer.gate().clone();
    (serve(routes.layer(layer)).await, gate)
}
