//! `ChatAuthLayer` on a bare hyper server (no axum): `Request<Incoming>` mapped to
//! `ReplayBody`, revocation bodies replayed to the inner service, and WebSocket refusals
//! through hyper's own upgrade path.

mod common;

use bytes::Bytes;
use chatgate::layer::ReplayBody;
use chatgate::{Identity, TokenBuilder};
use futures_util::StreamExt;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde_json::Value;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tower::ServiceBuilder;

const SECRET: &str = "secret";
const TEST_TIMEOUT: Duration = Duration::from_secs(20);
/// Connections the test server accepts before it stops.
const MAX_CONNECTIONS: usize = 16;

async fn within<F: Future>(test: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("test timed out")
}

/// Answers `<kind>:<user> <body>`.
async fn echo(request: Request<ReplayBody<Incoming>>) -> Result<Response<Full<Bytes>>, Infallible> {
    let who = request
        .extensions()
        .get::<Identity>()
        .map(|i| format!("{}:{}", i.kind.as_str(), i.user_id().unwrap_or("-")))
        .unwrap_or_else(|| "none".into());
    let body = request
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let text = format!("{who} {}", String::from_utf8_lossy(&body));
    Ok(Response::new(Full::new(Bytes::from(text))))
}

async fn start() -> SocketAddr {
    let layer = common::layer(common::config(vec![common::app("key", SECRET)])).await;
    let service = ServiceBuilder::new()
        .map_request(|request: Request<Incoming>| request.map(ReplayBody::new))
        .layer(layer)
        .service_fn(echo);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        for _ in 0..MAX_CONNECTIONS {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let service = TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_bare_hyper_server_receives_the_replayed_revocation_body() {
    within(async {
        let addr = start().await;
        let body =
            r#"{"users":[{"id":"u","set":{"revoke_tokens_issued_before":null,"name":"U"}}]}"#;
        let response = reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .patch(format!("http://{addr}/users?api_key=key"))
            .header("authorization", TokenBuilder::server().sign(SECRET))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), format!("server:- {body}"));
    })
    .await
}

#[tokio::test]
async fn a_bare_hyper_server_passes_ordinary_bodies_through() {
    within(async {
        let addr = start().await;
        let response = reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .post(format!(
                "http://{addr}/channels/messaging/c/message?api_key=key"
            ))
            .header("authorization", TokenBuilder::user("ann").sign(SECRET))
            .body("streamed")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), "user:ann streamed");
    })
    .await
}

#[tokio::test]
async fn a_bare_hyper_server_refuses_websockets_the_stream_way() {
    within(async {
        let addr = start().await;
        let bad = TokenBuilder::user("ann").sign("wrong");
        let url = format!("ws://{addr}/connect?api_key=key&authorization={bad}");
        let (mut socket, response) = tokio_tungstenite::connect_async(url).await.unwrap();
        assert_eq!(response.status(), 101);
        let Some(Ok(Message::Text(frame))) = socket.next().await else {
            panic!("expected the error frame");
        };
        let frame: Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(frame["error"]["code"], 43);
        match socket.next().await {
            Some(Ok(Message::Close(Some(close)))) => assert_eq!(close.code, CloseCode::Normal),
            other => panic!("expected close 1000, got {other:?}"),
        }
    })
    .await
}
