//! `chatgate::proxy::run` driven in process, as a program embedding the proxy would:
//! the listeners on 127.0.0.1, a future as the shutdown signal, no binary and no Unix
//! signals involved.

use chatgate::config::{App, ConfigSnapshot};
use chatgate::proxy::{RunOptions, Shutdown};
use chatgate::{ConfigHandle, TokenBuilder};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

fn free_address() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[tokio::test]
async fn run_serves_the_gate_and_the_admin_listener_until_its_shutdown_future_completes() {
    // An upstream that answers every request with 200 "upstream".
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_address = upstream.local_addr().unwrap();
    let upstream_task = tokio::spawn(async move {
        let app = axum::Router::new().fallback(|| async { "upstream" });
        axum::serve(upstream, app).await.unwrap();
    });

    let mut snapshot = ConfigSnapshot::with_apps(vec![App::new("key", vec!["secret".into()])]);
    snapshot.server.listen = free_address();
    snapshot.server.admin_listen = Some(free_address());
    snapshot.server.threads = 1;
    snapshot.server.grace_period = Duration::from_secs(1);
    snapshot.upstream.addresses = vec![upstream_address.to_string()];
    let (listen, admin) = (
        snapshot.server.listen,
        snapshot.server.admin_listen.unwrap(),
    );

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut options = RunOptions::default();
    options.upgrade_sock =
        std::env::temp_dir().join(format!("chatgate-run-{}.sock", listen.port()));
    let proxy = std::thread::spawn(move || {
        chatgate::proxy::run(
            ConfigHandle::new(snapshot),
            options,
            Shutdown::when(async {
                let _ = stopped.await;
            }),
        )
    });

    let client = reqwest::Client::new();
    let started = Instant::now();
    while client
        .get(format!("http://{admin}/healthz"))
        .send()
        .await
        .is_err()
    {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "admin never answered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let url = format!("http://{listen}/channels?api_key=key");
    let mut refused = None;
    for _ in 0..100 {
        if let Ok(response) = client.get(&url).send().await {
            refused = Some(response);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = refused.expect("the proxy listens");
    assert_eq!(refused.status().as_u16(), 401);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["code"], 5);

    let token = TokenBuilder::user("alice").sign("secret");
    let allowed = client
        .get(&url)
        .header("Authorization", token)
        .header("stream-auth-type", "jwt")
        .send()
        .await
        .unwrap();
    assert_eq!(allowed.status().as_u16(), 200);
    assert_eq!(allowed.text().await.unwrap(), "upstream");

    stop.send(()).unwrap();
    let finished = tokio::task::spawn_blocking(move || proxy.join().unwrap());
    let result = tokio::time::timeout(Duration::from_secs(15), finished)
        .await
        .expect("run returns after its shutdown future completes")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
    upstream_task.abort();
}
