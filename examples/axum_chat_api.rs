//! chatgate's demo chat API behind `ChatAuthLayer`, in one axum server.
//!
//! ```sh
//! cargo run --example axum_chat_api --features demo -- config.toml 127.0.0.1:3000
//! KEY=demo-key
//! TOKEN=$(cargo run -q --features cli -- token create --api-key $KEY --user alice --ttl 1h)
//! SERVER=$(cargo run -q --features cli -- token create --api-key $KEY --server)
//! curl -s "http://127.0.0.1:3000/channels/messaging/general/query?api_key=$KEY" \
//!      -H "Authorization: $TOKEN" -H "stream-auth-type: jwt" -H "content-type: application/json" -d '{}'
//! curl -s "http://127.0.0.1:3000/channels/messaging/general/message?api_key=$KEY" \
//!      -H "Authorization: $TOKEN" -H "content-type: application/json" -d '{"message":{"text":"hi"}}'
//! curl -s "http://127.0.0.1:3000/channels?api_key=$KEY" -H "Authorization: $TOKEN"
//! curl -s "http://127.0.0.1:3000/channels?api_key=$KEY" -H "Authorization: bad.token.here"  # code 5/43
//! curl -s "http://127.0.0.1:3000/whoami?api_key=$KEY" -H "Authorization: $TOKEN"
//! curl -s -X PATCH "http://127.0.0.1:3000/users?api_key=$KEY" -H "Authorization: $SERVER" \
//!      -H "content-type: application/json" \
//!      -d "{\"users\":[{\"id\":\"alice\",\"set\":{\"revoke_tokens_issued_before\":\"$(date -u +%FT%TZ)\"}}]}"
//! curl -s "http://127.0.0.1:3000/whoami?api_key=$KEY" -H "Authorization: $TOKEN"   # now code 40
//! ```
//!
//! Arguments: the config file (default `config.toml`) and the listen address (default
//! the config's `[server] listen`). Apps, secrets and the revocation store come from
//! the config; revocations go through `PATCH /users` / `PATCH /app` with a server token.
//! `ChatAuthLayer::from_config_file` opens the store and follows the file: edits (or
//! SIGHUP) are applied live, until the router holding the layer is dropped.

use axum::routing::get;
use chatgate::ChatAuthLayer;
use chatgate::extract::UserIdentity;
use std::net::SocketAddr;

async fn whoami(user: UserIdentity) -> String {
    format!("{} (app {})\n", user.user_id(), user.app)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,chatgate=debug".into()),
        )
        .init();
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| "config.toml".to_owned());

    let layer = ChatAuthLayer::from_config_file(&path).await?;
    let app = chatgate::demo::router(chatgate::demo::DemoState::new())
        .route("/whoami", get(whoami))
        .layer(layer.clone());

    let listen: SocketAddr = match args.next() {
        Some(addr) => addr.parse()?,
        None => layer.gate().config().load().server.listen,
    };
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(address = %listener.local_addr()?, config = %path, "chat API listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
