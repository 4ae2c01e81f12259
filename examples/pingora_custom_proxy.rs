//! chatgate's auth inside your own Pingora proxy.
//!
//! `ChatAuthFilter` is the whole gate in one call from `request_filter`: it strips
//! client-sent `x-chatgate-*` headers, normalises the path, verifies the Stream token,
//! applies revocation bodies (`PATCH /users`, `PATCH /app`), and answers refusals the
//! way Stream SDKs expect (JSON over HTTP, keeping the connection open; 101 + error
//! frame + close 1000 on a WebSocket upgrade). A second call from
//! `upstream_request_filter` writes the verified identity headers (with
//! `forward_identity = true`). Everything else (routing, retries, caching, logging)
//! stays yours.
//!
//! ```sh
//! cargo run --features proxy --example pingora_custom_proxy -- config.toml
//! # the proxy listens on 127.0.0.1:6188 and forwards to [upstream] addresses[0]
//! ```

use async_trait::async_trait;
use chatgate::proxy::{ChatAuthFilter, Verdict};
use chatgate::revocation::{RevocationCache, open_store};
use chatgate::{ConfigHandle, Gate, Identity};
use pingora::prelude::*;
use std::net::ToSocketAddrs;

struct MyProxy {
    auth: ChatAuthFilter,
    upstream: HttpPeer,
}

/// Your per-request state: here just who the caller is.
#[derive(Default)]
struct MyCtx {
    identity: Option<Identity>,
}

#[async_trait]
impl ProxyHttp for MyProxy {
    type CTX = MyCtx;

    fn new_ctx(&self) -> MyCtx {
        MyCtx::default()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut MyCtx) -> Result<bool> {
        match self.auth.request_filter(session).await? {
            Verdict::Forward(identity) => {
                // Your own rules can use the verified identity here.
                ctx.identity = identity;
                Ok(false)
            }
            // The refusal is already written: tell Pingora the request is done.
            Verdict::Responded => Ok(true),
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut MyCtx,
    ) -> Result<Box<HttpPeer>> {
        Ok(Box::new(self.upstream.clone()))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut MyCtx,
    ) -> Result<()> {
        // After Pingora's hop-by-hop removal, so a client cannot drop these headers.
        self.auth
            .upstream_request_filter(upstream_request, ctx.identity.as_ref())
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut MyCtx) {
        let user = ctx
            .identity
            .as_ref()
            .and_then(|i| i.user_id())
            .unwrap_or("-");
        // Log the path only: WebSocket clients put their token in the query string.
        println!(
            "{} {} user={user}",
            session.req_header().method,
            session.req_header().uri.path()
        );
    }
}

fn main() {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "config.toml".into());
    let config = ConfigHandle::from_file(&path).unwrap_or_else(|e| panic!("{e}"));
    let snapshot = config.load_full();

    // The revocation store is opened once; the cache in front of it is what requests read.
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let store = runtime
        .block_on(open_store(&snapshot.revocation))
        .unwrap_or_else(|e| panic!("{e}"));
    let cache = RevocationCache::new(store, &snapshot.revocation);
    let gate = Gate::new(config.clone(), cache);

    let address = snapshot.upstream.addresses[0]
        .to_socket_addrs()
        .expect("upstream resolves")
        .next()
        .expect("upstream has an address");
    let mut server = Server::new(None).expect("a pingora server");
    server.bootstrap();
    let mut proxy = pingora::proxy::http_proxy_service(
        &server.configuration,
        MyProxy {
            auth: ChatAuthFilter::new(gate),
            upstream: HttpPeer::new(address, false, String::new()),
        },
    );
    proxy.add_tcp("127.0.0.1:6188");
    server.add_service(proxy);
    server.run_forever();
}
