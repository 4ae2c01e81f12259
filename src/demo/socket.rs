//! The demo API's `/connect` WebSocket: the first `health.check` frame the SDKs wait
//! for, pings answered, `message.new` events pushed, and the close the contract asks
//! for (4000 when the layer's [`LiveSession`] ends, 1001 on idle or shutdown). Apart
//! from the REST handlers because it is a connection's lifetime, not one request.

use super::{Caller, DemoState, IDLE_TIMEOUT, api_error, now, user_json};
use crate::session::LiveSession;
use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use http::StatusCode;
use serde_json::{Value, json};
use tokio::sync::broadcast;

pub(super) async fn connect(
    State(state): State<DemoState>,
    caller: Caller,
    live: Option<LiveSession>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let user = match caller.user_id {
        Some(user) => user,
        None => {
            return api_error(
                4,
                StatusCode::BAD_REQUEST,
                "Connect failed: no user: send a user token, or json={\"user_id\":..}",
            );
        }
    };
    upgrade.on_upgrade(move |socket| session(socket, state, user, live))
}

/// One client connection: `health.check` with `connection_id` and `me` first (the JS
/// SDK resolves `connectUser` on it), answers to the client's pings, pushed events.
/// Behind the layer, closes with 4000 when the token expires or is revoked.
async fn session(mut socket: WebSocket, state: DemoState, user: String, live: Option<LiveSession>) {
    let n = state.next_id();
    let connection_id = format!(
        "{:08x}-{:04x}-{:04x}-0000-{:012x}",
        std::process::id(),
        n >> 48,
        (n >> 32) & 0xffff,
        n & 0xffff_ffff
    );
    let me = {
        let data = state.inner.data.lock().expect("demo state lock");
        let mut me = user_json(&data, &user);
        if let Value::Object(fields) = &mut me {
            for (key, empty) in [
                ("channel_mutes", json!([])),
                ("mutes", json!([])),
                ("devices", json!([])),
                ("blocked_user_ids", json!([])),
                ("unread_count", json!(0)),
                ("total_unread_count", json!(0)),
                ("unread_channels", json!(0)),
            ] {
                fields.entry(key).or_insert(empty);
            }
        }
        me
    };
    let health = |me: Option<&Value>| {
        let mut event = json!({
            "type": "health.check",
            "connection_id": connection_id,
            "cid": "*",
            "created_at": now(),
        });
        if let Some(me) = me {
            event["me"] = me.clone();
        }
        Message::Text(Utf8Bytes::from(event.to_string()))
    };
    if socket.send(health(Some(&me))).await.is_err() {
        return;
    }
    let mut events = state.inner.events.subscribe();
    let mut shutdown = state.inner.shutdown.subscribe();
    let mut closing = *shutdown.borrow_and_update();
    let token_end = async {
        match &live {
            Some(live) => live.ended().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(token_end);
    loop {
        if closing {
            let _ = socket
                .send(Message::Close(Some(CloseFrame {
                    code: 1001,
                    reason: Utf8Bytes::from_static("server shutting down"),
                })))
                .await;
            return;
        }
        tokio::select! {
            frame = tokio::time::timeout(IDLE_TIMEOUT, socket.recv()) => match frame {
                Ok(Some(Ok(Message::Text(text)))) => {
                    if text.contains("health.check") && socket.send(health(None)).await.is_err() {
                        return;
                    }
                }
                Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => return,
                Ok(Some(Ok(_))) => {}
                Err(_) => {
                    let _ = socket.send(Message::Close(Some(CloseFrame {
                        code: 1001,
                        reason: Utf8Bytes::from_static("idle"),
                    }))).await;
                    return;
                }
            },
            event = events.recv() => match event {
                Ok(event) => {
                    if socket.send(Message::Text(event)).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            },
            end = &mut token_end => {
                let _ = socket.send(Message::Close(Some(CloseFrame {
                    code: end.close_code(),
                    reason: Utf8Bytes::from_static(end.reason()),
                }))).await;
                return;
            }
            changed = shutdown.changed() => {
                // A dropped sender means the state is gone: close as on shutdown.
                closing = changed.is_err() || *shutdown.borrow_and_update();
            }
        }
    }
}
