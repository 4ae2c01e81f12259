//! `ChatAuthLayer` in a real axum server on loopback, driven by reqwest and
//! tokio-tungstenite: identities reach handlers, every contract error is Stream JSON,
//! revocations go through the layer to the inner service, WebSocket refusals are
//! 101 + one error frame + close 1000.

mod common;

use axum::extract::State;
use axum::routing::{get, patch};
use axum::{Json, Router};
use bytes::Bytes;
use chatgate::config::PublicPaths;
use chatgate::time::now_unix;
use chatgate::{App, ConfigSnapshot, Gate, Identity, TokenBuilder};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const SECRET: &str = "secret";
const TEST_TIMEOUT: Duration = Duration::from_secs(20);

/// What the recording handlers saw: the identity and the exact body.
type Seen = Arc<Mutex<Vec<(Identity, Bytes)>>>;

struct Server {
    addr: SocketAddr,
    gate: Gate,
    seen: Seen,
    client: reqwest::Client,
}

async fn within<F: Future>(test: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("test timed out")
}

fn config(apps: Vec<App>) -> ConfigSnapshot {
    let mut config = common::config(apps);
    config.auth.public_paths = PublicPaths::new(["/healthz"]);
    config
}

fn default_apps() -> Vec<App> {
    let mut dev = common::app("dev", "dev-secret");
    dev.disable_auth_checks = true;
    vec![common::app("key", SECRET), dev]
}

async fn whoami(identity: Identity) -> Json<Value> {
    Json(json!({
        "app": &*identity.app,
        "kind": identity.kind.as_str(),
        "user_id": identity.user_id(),
    }))
}

async fn record(State(seen): State<Seen>, identity: Identity, body: Bytes) -> Json<Value> {
    seen.lock().unwrap().push((identity, body));
    Json(json!({"duration": "0.00ms"}))
}

async fn start(snapshot: ConfigSnapshot) -> Server {
    let seen = Seen::default();
    let routes = Router::new()
        .route("/whoami", get(whoami))
        .route("/users", patch(record))
        .route("/app", patch(record))
        .with_state(seen.clone())
        .fallback_service(chatgate::demo::router(chatgate::demo::DemoState::new()));
    let (addr, gate) = common::layer_app(snapshot, routes).await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    Server {
        addr,
        gate,
        seen,
        client,
    }
}

impl Server {
    fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{path_and_query}", self.addr)
    }

    async fn get(&self, path_and_query: &str, token: Option<&str>) -> (u16, Value) {
        let mut request = self.client.get(self.url(path_and_query));
        if let Some(token) = token {
            request = request
                .header("authorization", token)
                .header("stream-auth-type", "jwt");
        }
        read(request.send().await.unwrap()).await
    }

    async fn patch(&self, path_and_query: &str, token: &str, body: &str) -> (u16, Value) {
        let response = self
            .client
            .patch(self.url(path_and_query))
            .header("authorization", token)
            .header("stream-auth-type", "jwt")
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        read(response).await
    }

    fn ws_url(&self, token: &str, json: &str) -> String {
        let json: String = form_urlencoded::byte_serialize(json.as_bytes()).collect();
        format!(
            "ws://{}/connect?api_key=key&authorization={token}&stream-auth-type=jwt&json={json}",
            self.addr
        )
    }
}

/// Status and JSON body; error bodies must say `Content-Type: application/json`.
async fn read(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    if status >= 400 {
        assert_eq!(
            response.headers()["content-type"],
            "application/json",
            "status {status}"
        );
    }
    let body = response.bytes().await.unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn assert_stream_error(got: &(u16, Value), code: i64, status: u16) {
    let (got_status, body) = got;
    assert_eq!(*got_status, status, "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["StatusCode"], status, "{body}");
    assert!(body["message"].is_string(), "{body}");
    assert_eq!(
        body["more_info"], "https://getstream.io/chat/docs/api_errors_response",
        "{body}"
    );
}

#[tokio::test]
async fn a_valid_user_token_reaches_the_handler_with_its_identity() {
    within(async {
        let server = start(config(default_apps())).await;
        let token = TokenBuilder::user("alice").sign(SECRET);
        let (status, body) = server.get("/whoami?api_key=key", Some(&token)).await;
        assert_eq!(status, 200);
        assert_eq!(
            body,
            json!({"app": "key", "kind": "user", "user_id": "alice"})
        );
    })
    .await
}

#[tokio::test]
async fn every_contract_error_is_stream_json() {
    within(async {
        let server = start(config(default_apps())).await;
        let now = now_unix();
        let user = TokenBuilder::user("alice").sign(SECRET);
        let server_token = TokenBuilder::server().sign(SECRET);
        let expired = TokenBuilder::user("alice")
            .expires_at(now - 60)
            .sign(SECRET);
        let not_yet = TokenBuilder::user("alice")
            .not_before(now + 600)
            .sign(SECRET);
        let future_iat = TokenBuilder::user("alice")
            .issued_at(now + 600)
            .sign(SECRET);
        let wrong_secret = TokenBuilder::user("alice").sign("not-the-secret");

        assert_stream_error(&server.get("/whoami", Some(&user)).await, 2, 401);
        assert_stream_error(
            &server.get("/whoami?api_key=nope", Some(&user)).await,
            2,
            401,
        );
        assert_stream_error(
            &server
                .patch("/users?api_key=key", &server_token, "{not json")
                .await,
            4,
            400,
        );
        assert_stream_error(&server.get("/whoami?api_key=key", None).await, 5, 401);
        assert_stream_error(
            &server.get("/whoami?api_key=key", Some("a.b")).await,
            5,
            401,
        );
        assert_stream_error(
            &server
                .patch(
                    "/users?api_key=key",
                    &user,
                    r#"{"users":[{"id":"alice","set":{"revoke_tokens_issued_before":null}}]}"#,
                )
                .await,
            17,
            403,
        );
        assert_stream_error(
            &server.get("/whoami?api_key=key", Some(&expired)).await,
            40,
            401,
        );
        assert_stream_error(
            &server.get("/whoami?api_key=key", Some(&not_yet)).await,
            41,
            401,
        );
        assert_stream_error(
            &server.get("/whoami?api_key=key", Some(&future_iat)).await,
            42,
            401,
        );
        assert_stream_error(
            &server.get("/whoami?api_key=key", Some(&wrong_secret)).await,
            43,
            401,
        );
        // Nothing refused reached the handlers.
        assert!(server.seen.lock().unwrap().is_empty());
    })
    .await
}

#[tokio::test]
async fn developer_tokens_pass_only_where_auth_checks_are_disabled() {
    within(async {
        let server = start(config(default_apps())).await;
        let dev = TokenBuilder::developer_token("dora");
        let (status, body) = server.get("/whoami?api_key=dev", Some(&dev)).await;
        assert_eq!(status, 200);
        assert_eq!(body["kind"], "developer");
        assert_eq!(body["user_id"], "dora");
        assert_stream_error(
            &server.get("/whoami?api_key=key", Some(&dev)).await,
            43,
            401,
        );
    })
    .await
}

#[tokio::test]
async fn public_paths_from_the_config_need_no_token() {
    within(async {
        let server = start(config(default_apps())).await;
        let response = server
            .client
            .get(server.url("/healthz"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), "ok");
    })
    .await
}

#[tokio::test]
async fn a_user_revocation_is_applied_then_forwarded_with_the_same_body() {
    within(async {
        let server = start(config(default_apps())).await;
        let now = now_unix();
        let old = TokenBuilder::user("alice").issued_at(now - 100).sign(SECRET);
        let other = TokenBuilder::user("bob").issued_at(now - 100).sign(SECRET);
        let server_token = TokenBuilder::server().sign(SECRET);
        let cutoff = chrono::DateTime::from_timestamp(now, 0).unwrap().to_rfc3339();
        let body = format!(
            r#"{{"users":[{{"id":"alice","set":{{"revoke_tokens_issued_before":"{cutoff}","name":"Alice"}}}}]}}"#
        );
        let (status, _) = server
            .patch("/users?api_key=key", &server_token, &body)
            .await;
        assert_eq!(status, 200);
        {
            let seen = server.seen.lock().unwrap();
            assert_eq!(seen.len(), 1);
            assert!(seen[0].0.is_server());
            assert_eq!(seen[0].1, Bytes::from(body.clone()));
        }
        assert_stream_error(&server.get("/whoami?api_key=key", Some(&old)).await, 40, 401);
        assert_eq!(server.get("/whoami?api_key=key", Some(&other)).await.0, 200);
        let fresh = TokenBuilder::user("alice").issued_at(now + 1).sign(SECRET);
        assert_eq!(server.get("/whoami?api_key=key", Some(&fresh)).await.0, 200);

        let undo = r#"{"users":[{"id":"alice","set":{"revoke_tokens_issued_before":null}}]}"#;
        assert_eq!(
            server
                .patch("/users?api_key=key", &server_token, undo)
                .await
                .0,
            200
        );
        assert_eq!(server.get("/whoami?api_key=key", Some(&old)).await.0, 200);
    })
    .await
}

#[tokio::test]
async fn an_app_revocation_is_applied_then_forwarded() {
    within(async {
        let server = start(config(default_apps())).await;
        let now = now_unix();
        let old = TokenBuilder::user("alice")
            .issued_at(now - 100)
            .sign(SECRET);
        let server_token = TokenBuilder::server().sign(SECRET);
        let body = format!(r#"{{"revoke_tokens_issued_before":{now},"webhook_url":""}}"#);
        assert_eq!(
            server
                .patch("/app?api_key=key", &server_token, &body)
                .await
                .0,
            200
        );
        assert_eq!(server.seen.lock().unwrap()[0].1, Bytes::from(body));
        assert_stream_error(
            &server.get("/whoami?api_key=key", Some(&old)).await,
            40,
            401,
        );
        // Server tokens are not subject to cutoffs.
        assert_eq!(
            server
                .get("/whoami?api_key=key", Some(&server_token))
                .await
                .0,
            200
        );
        let undo = r#"{"revoke_tokens_issued_before":null}"#;
        assert_eq!(
            server
                .patch("/app?api_key=key", &server_token, undo)
                .await
                .0,
            200
        );
        assert_eq!(server.get("/whoami?api_key=key", Some(&old)).await.0, 200);
    })
    .await
}

#[tokio::test]
async fn a_reload_of_the_config_handle_applies_to_the_next_request() {
    within(async {
        let server = start(config(default_apps())).await;
        let old = TokenBuilder::user("alice").sign(SECRET);
        let new = TokenBuilder::user("alice").sign("rotated");
        assert_eq!(server.get("/whoami?api_key=key", Some(&old)).await.0, 200);
        server
            .gate
            .config()
            .store(config(vec![common::app("key", "rotated")]));
        assert_stream_error(
            &server.get("/whoami?api_key=key", Some(&old)).await,
            43,
            401,
        );
        assert_eq!(server.get("/whoami?api_key=key", Some(&new)).await.0, 200);
    })
    .await
}

#[tokio::test]
async fn a_valid_websocket_upgrade_reaches_the_chat_api() {
    within(async {
        let server = start(config(default_apps())).await;
        let token = TokenBuilder::user("alice").sign(SECRET);
        let url = server.ws_url(
            &token,
            r#"{"user_id":"alice","user_details":{"id":"alice"}}"#,
        );
        let (mut socket, response) = tokio_tungstenite::connect_async(url).await.unwrap();
        assert_eq!(response.status(), 101);
        let Some(Ok(Message::Text(first))) = socket.next().await else {
            panic!("expected a text frame first");
        };
        let event: Value = serde_json::from_str(&first).unwrap();
        assert_eq!(event["type"], "health.check");
        assert_eq!(event["me"]["id"], "alice");
        assert!(
            event["connection_id"]
                .as_str()
                .is_some_and(|id| !id.is_empty())
        );
        // The client's ping is answered with another health.check.
        socket
            .send(Message::text(
                r#"[{"type":"health.check","client_id":"c"}]"#,
            ))
            .await
            .unwrap();
        let Some(Ok(Message::Text(pong))) = socket.next().await else {
            panic!("expected a health.check answer");
        };
        assert_eq!(
            serde_json::from_str::<Value>(&pong).unwrap()["type"],
            "health.check"
        );
        socket.close(None).await.unwrap();
    })
    .await
}

/// Connects, and returns the frames received until the server closed: Stream's
/// refusal is exactly one text frame then a close.
async fn refused_frames(url: String) -> (Value, Option<CloseCode>) {
    let (mut socket, response) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(response.status(), 101);
    let Some(Ok(Message::Text(first))) = socket.next().await else {
        panic!("expected the error frame first");
    };
    let close = match socket.next().await {
        Some(Ok(Message::Close(frame))) => frame.map(|f| f.code),
        other => panic!("expected a close frame, got {other:?}"),
    };
    // The stream ends after the close handshake; a bounded number of reads.
    for _ in 0..4 {
        if socket.next().await.is_none() {
            break;
        }
    }
    (serde_json::from_str(&first).unwrap(), close)
}

#[tokio::test]
async fn a_refused_websocket_gets_101_one_error_frame_and_close_1000() {
    within(async {
        let server = start(config(default_apps())).await;
        let bad = TokenBuilder::user("alice").sign("wrong");
        let (frame, close) = refused_frames(server.ws_url(&bad, r#"{"user_id":"alice"}"#)).await;
        assert_eq!(frame["error"]["code"], 43);
        assert_eq!(frame["error"]["StatusCode"], 401);
        assert_eq!(close, Some(CloseCode::Normal));

        let expired = TokenBuilder::user("alice")
            .expires_at(now_unix() - 60)
            .sign(SECRET);
        let (frame, close) =
            refused_frames(server.ws_url(&expired, r#"{"user_id":"alice"}"#)).await;
        assert_eq!(frame["error"]["code"], 40);
        assert_eq!(close, Some(CloseCode::Normal));

        let token = TokenBuilder::user("alice").sign(SECRET);
        let (frame, _) = refused_frames(server.ws_url(&token, r#"{"user_id":"mallory"}"#)).await;
        assert_eq!(frame["error"]["code"], 17);
    })
    .await
}

/// Connects and reads the health.check, so the session is admitted and running.
async fn open_session(
    url: String,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let Some(Ok(Message::Text(first))) = socket.next().await else {
        panic!("expected the health.check first");
    };
    assert_eq!(
        serde_json::from_str::<Value>(&first).unwrap()["type"],
        "health.check"
    );
    socket
}

/// Reads frames until the server closes; returns the close code and reason.
async fn close_of<S>(socket: &mut S) -> (u16, String)
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    for _ in 0..8 {
        match socket.next().await {
            Some(Ok(Message::Close(Some(frame)))) => {
                return (u16::from(frame.code), frame.reason.to_string());
            }
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
    panic!("no close frame within 8 frames");
}

#[tokio::test]
async fn a_live_websocket_closes_with_4000_when_its_user_is_revoked() {
    within(async {
        let server = start(config(default_apps())).await;
        let now = now_unix();
        let token = TokenBuilder::user("alice").issued_at(now - 10).sign(SECRET);
        let mut socket = open_session(server.ws_url(&token, r#"{"user_id":"alice"}"#)).await;
        let body = format!(
            r#"{{"users":[{{"id":"alice","set":{{"revoke_tokens_issued_before":{now}}}}}]}}"#
        );
        let server_token = TokenBuilder::server().sign(SECRET);
        assert_eq!(
            server
                .patch("/users?api_key=key", &server_token, &body)
                .await
                .0,
            200
        );
        let (code, reason) = close_of(&mut socket).await;
        assert_eq!((code, reason.as_str()), (4000, "token revoked"));
    })
    .await
}

#[tokio::test]
async fn a_live_websocket_closes_with_4000_when_its_token_expires() {
    within(async {
        let mut snapshot = config(default_apps());
        snapshot.auth.leeway_seconds = 0;
        let server = start(snapshot).await;
        let token = TokenBuilder::user("alice")
            .expires_at(now_unix() + 2)
            .sign(SECRET);
        let mut socket = open_session(server.ws_url(&token, r#"{"user_id":"alice"}"#)).await;
        let (code, reason) = close_of(&mut socket).await;
        assert_eq!((code, reason.as_str()), (4000, "token expired"));
    })
    .await
}
