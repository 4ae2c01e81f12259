//! Per-request cost of `ChatAuthLayer` in process (no network): the same axum router
//! bare, behind chatgate's layer, and behind jwt-authorizer's layer validating an
//! equivalent HS256 token. Criterion measures each; then an interleaved side-by-side
//! run prints the overhead over the bare router and both ratios.
//!
//! `cargo bench --bench layer --features axum`

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use chatgate::revocation::{MemoryStore, RevocationCache};
use chatgate::{App, ChatAuthLayer, ConfigHandle, ConfigSnapshot, Gate, TokenBuilder};
use criterion::{Criterion, criterion_group};
use http::{Request, Response};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tower::{Layer, Service, ServiceExt};

const SECRET: &str = "bench-secret";
const URI: &str = "/channels?api_key=key";

#[derive(Clone, serde::Deserialize)]
#[allow(dead_code)] // jwt-authorizer deserializes the claims; the handler does not read them
struct Claims {
    user_id: String,
    exp: i64,
    iat: i64,
}

/// jwt-authorizer needs `Response: From<its AuthError>`; this wrapper provides it for
/// an axum 0.8 router (jwt-authorizer itself is built on axum 0.7).
struct JwtResponse(#[allow(dead_code)] Response<Body>);

impl From<jwt_authorizer::AuthError> for JwtResponse {
    fn from(_: jwt_authorizer::AuthError) -> Self {
        let mut response = Response::new(Body::empty());
        *response.status_mut() = http::StatusCode::UNAUTHORIZED;
        JwtResponse(response)
    }
}

fn router() -> Router {
    Router::new().route("/channels", get(|| async { "ok" }))
}

fn token() -> String {
    TokenBuilder::user("alice")
        .expires_in(Duration::from_secs(3600))
        .sign(SECRET)
}

fn request(token: &str) -> Request<Body> {
    Request::get(URI)
        .header("authorization", format!("Bearer {token}"))
        .header("stream-auth-type", "jwt")
        .body(Body::empty())
        .unwrap()
}

/// The router with jwt-authorizer in front.
type JwtStack = jwt_authorizer::layer::AuthorizationService<
    tower::util::MapResponse<Router, fn(Response<Body>) -> JwtResponse>,
    Claims,
>;

struct Stacks {
    gate: Gate,
    bare: Router,
    chatgate: chatgate::ChatAuth<Router>,
    jwt: JwtStack,
}

async fn stacks() -> Stacks {
    let config = ConfigSnapshot::with_apps(vec![App::new("key", vec![SECRET.into()])]);
    let cache = RevocationCache::new(Arc::new(MemoryStore::new()), &config.revocation);
    let gate = Gate::new(ConfigHandle::new(config), cache);
    let authorizer = jwt_authorizer::JwtAuthorizer::<Claims>::from_secret(SECRET)
        .build()
        .await
        .unwrap();
    let wrap: fn(Response<Body>) -> JwtResponse = JwtResponse;
    Stacks {
        gate: gate.clone(),
        bare: router(),
        chatgate: ChatAuthLayer::new(gate).layer(router()),
        jwt: jwt_authorizer::IntoLayer::into_layer(authorizer)
            .layer(tower::util::MapResponse::new(router(), wrap)),
    }
}

async fn send<S, R>(service: &mut S, token: &str) -> R
where
    S: Service<Request<Body>, Response = R>,
    S::Error: std::fmt::Debug,
{
    let service = service.ready().await.unwrap();
    service.call(request(token)).await.unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn bench_layers(c: &mut Criterion) {
    let rt = runtime();
    let mut stacks = rt.block_on(stacks());
    let token = token();
    // Warm the revocation cache and check every stack accepts the token.
    rt.block_on(async {
        assert!(
            !check_only(&stacks.gate, &token).await,
            "cold cache: not decided yet"
        );
        assert_eq!(send(&mut stacks.bare, &token).await.status(), 200);
        assert_eq!(send(&mut stacks.chatgate, &token).await.status(), 200);
        assert_eq!(send(&mut stacks.jwt, &token).await.0.status(), 200);
        assert!(
            check_only(&stacks.gate, &token).await,
            "warm cache: decided at once"
        );
    });
    let mut group = c.benchmark_group("layer");
    group.bench_function("bare_router", |b| {
        b.iter(|| rt.block_on(async { black_box(send(&mut stacks.bare, &token).await) }))
    });
    group.bench_function("chatgate_layer", |b| {
        b.iter(|| rt.block_on(async { black_box(send(&mut stacks.chatgate, &token).await) }))
    });
    group.bench_function("jwt_authorizer_layer", |b| {
        b.iter(|| rt.block_on(async { black_box(send(&mut stacks.jwt, &token).await) }))
    });
    group.bench_function("gate_check_cached_alone", |b| {
        b.iter(|| rt.block_on(check_only(&stacks.gate, &token)))
    });
    group.finish();
}

/// The core alone: build the same request, decide it as the layer does on a cache hit
/// (`Gate::check_cached`, no future).
async fn check_only(gate: &Gate, token: &str) -> bool {
    let (parts, _) = request(token).into_parts();
    matches!(
        gate.check_cached(chatgate::RequestParts::from(&parts)),
        Ok(Ok(_))
    )
}

/// Nanoseconds this thread has run on a CPU (Linux: the first field of
/// `/proc/thread-self/schedstat`). On a shared machine the wall clock also counts the
/// time the thread waited for a core; its CPU time does not.
fn thread_cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Interleaved rounds so that all three see the same machine state; the best round
/// of each counts, by wall clock and by the thread's CPU time (the runtime is
/// current-thread: every poll of the request runs on this thread).
fn side_by_side() {
    const PER_ROUND: u32 = 50_000;
    const ROUNDS: usize = 7;
    let rt = runtime();
    let mut stacks = rt.block_on(stacks());
    let token = token();
    // Warm the revocation cache, as in a running server.
    rt.block_on(async { assert_eq!(send(&mut stacks.chatgate, &token).await.status(), 200) });
    let mut best_wall = [f64::MAX; 5];
    let mut best_cpu = [f64::MAX; 5];
    for _ in 0..ROUNDS {
        for i in 0..best_wall.len() {
            let started = Instant::now();
            let cpu_started = thread_cpu_ns();
            rt.block_on(async {
                for _ in 0..PER_ROUND {
                    match i {
                        0 => drop(black_box(send(&mut stacks.bare, &token).await)),
                        1 => drop(black_box(send(&mut stacks.chatgate, &token).await)),
                        2 => drop(black_box(send(&mut stacks.jwt, &token).await)),
                        3 => assert!(check_only(&stacks.gate, &token).await),
                        _ => drop(black_box(request(&token))),
                    }
                }
            });
            let wall = started.elapsed().as_nanos() as f64 / f64::from(PER_ROUND);
            best_wall[i] = best_wall[i].min(wall);
            if let (Some(before), Some(after)) = (cpu_started, thread_cpu_ns()) {
                let cpu = after.saturating_sub(before) as f64 / f64::from(PER_ROUND);
                best_cpu[i] = best_cpu[i].min(cpu);
            }
        }
    }
    report(
        &format!("wall clock, best of {ROUNDS} rounds x {PER_ROUND} requests"),
        best_wall,
    );
    if best_cpu[0] < f64::MAX {
        report(
            &format!("thread CPU time, best of {ROUNDS} rounds x {PER_ROUND} requests"),
            best_cpu,
        );
    }
}

fn report(what: &str, [bare, chat, jwt, check, build]: [f64; 5]) {
    println!("\nside by side, {what}:");
    println!("  bare router           {bare:8.0} ns/request");
    println!("  chatgate layer        {chat:8.0} ns/request");
    println!("  jwt-authorizer layer  {jwt:8.0} ns/request");
    println!("  Gate::check_cached    {:8.0} ns/request", check - build);
    println!(
        "  the layer's own part  {:8.0} ns/request (overhead minus Gate::check_cached)",
        (chat - bare) - (check - build)
    );
    println!(
        "  chatgate overhead over bare: {:.0} ns (target <= 1000), ratio chatgate/bare = {:.2}",
        chat - bare,
        chat / bare
    );
    println!(
        "  chatgate overhead / jwt-authorizer overhead = {:.2} (target <= 0.5; chatgate {:.0} ns, jwt-authorizer {:.0} ns)",
        (chat - bare) / (jwt - bare),
        chat - bare,
        jwt - bare
    );
}

criterion_group!(benches, bench_layers);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    // `--profile-time N <filter>` runs one stack alone, for `perf record -g` (README,
    // Performance): the side-by-side would mix the other stacks into the profile.
    if !std::env::args().any(|arg| arg == "--profile-time") {
        side_by_side();
    }
}
