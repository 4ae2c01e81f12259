//! DEMO ONLY: a stand-in chat API behind the proxy for the README quickstart
//! (`[upstream] demo = true`). It answers every HTTP request with a small JSON echo of
//! what reached it, including the identity headers chatgate forwards. It stores
//! nothing and checks nothing: never put it in front of anything real.

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderMap, header};
use axum::response::IntoResponse;
use std::future::Future;

/// Serves the demo API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router())
        .with_graceful_shutdown(shutdown)
        .await
}

/// The demo routes: everything echoes.
pub fn router() -> Router {
    Router::new().fallback(echo)
}

async fn echo(request: Request) -> impl IntoResponse {
    let headers: &HeaderMap = request.headers();
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let body = serde_json::json!({
        "demo": "chatgate demo upstream: not a real chat API",
        "method": request.method().as_str(),
        "path": request.uri().path(),
        "user_id": text("x-chatgate-user-id"),
        "auth": text("x-chatgate-auth"),
        "duration": "0.00ms",
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
}
