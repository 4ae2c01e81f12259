//! BENCHMARK BASELINE ONLY, NOT FOR PRODUCTION: a Pingora pass-through with no auth at
//! all, tuned like chatgate's edge proxy (mimalloc, one prebuilt peer, no compression
//! module, one thread, no work stealing, the same upstream timeouts), so
//! `benches/compare.sh` measures what the auth gate itself costs.
//!
//! ```sh
//! cargo run --release --features cli --example passthrough -- \
//!     --listen 127.0.0.1:18182 --upstream 127.0.0.1:18180
//! ```

use async_trait::async_trait;
use clap::Parser;
use pingora::modules::http::HttpModules;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;
use std::net::ToSocketAddrs;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A Pingora pass-through without auth (benchmark baseline).
#[derive(Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long)]
    listen: String,
    /// Upstream host:port.
    #[arg(long)]
    upstream: String,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Upstream connect timeout, ms (chatgate's default: 2000; 0 = none).
    #[arg(long, default_value_t = 2_000)]
    connect_timeout_ms: u64,
    /// Upstream read and write timeout, ms (chatgate's default: 30000; 0 = none).
    /// Pingora arms a timer around every upstream read and write when one is set, so a
    /// pass-through without them would not be chatgate minus its auth.
    #[arg(long, default_value_t = 30_000)]
    read_timeout_ms: u64,
}

struct PassThrough {
    peer: HttpPeer,
}

#[async_trait]
impl ProxyHttp for PassThrough {
    type CTX = ();

    fn new_ctx(&self) {}

    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(self.peer.clone()))
    }
}

fn main() {
    let args = Args::parse();
    let address = args
        .upstream
        .to_socket_addrs()
        .expect("upstream resolves")
        .next()
        .expect("upstream has an address");
    let conf = ServerConf {
        threads: args.threads,
        work_stealing: false,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let timeout = |ms: u64| (ms > 0).then(|| std::time::Duration::from_millis(ms));
    let mut peer = HttpPeer::new(address, false, String::new());
    peer.options.connection_timeout = timeout(args.connect_timeout_ms);
    peer.options.read_timeout = timeout(args.read_timeout_ms);
    peer.options.write_timeout = timeout(args.read_timeout_ms);
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = pingora::proxy::http_proxy_service(&server.configuration, PassThrough { peer });
    proxy.add_tcp(&args.listen);
    server.add_service(proxy);
    server.run_forever();
}
