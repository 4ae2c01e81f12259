//! What the revocation check costs per request, next to the bare token verify in the
//! same run; a cache miss against the in-memory store (the cache's own cost of a miss)
//! and against a real Redis (when `redis-server` can be started and the `redis` feature
//! is on). Target (issue 3): a cache hit adds at most 100 ns.
//!
//! `cargo bench --bench revocation --features redis`
//!
//! The hit path is synchronous (`RevocationCache::cached_cutoff`), so it is measured
//! next to the synchronous verify; whole `Gate::check` calls run under `block_on`, whose
//! empty cost is measured too.

#[cfg(feature = "redis")]
#[path = "../tests/support/redis_server.rs"]
mod redis_server;

use chatgate::config::App;
use chatgate::gate::{Gate, RequestParts};
use chatgate::reload::ConfigHandle;
use chatgate::revocation::{MemoryStore, RevocationCache, RevocationStore, UserCutoffChange};
use chatgate::time::{Cutoff, now_unix};
use chatgate::token::{self, TokenBuilder};
use chatgate::{ConfigSnapshot, Decision};
use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

const SECRET: &str = "bench-secret-0123456789abcdef0123456789abcdef";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn config() -> ConfigSnapshot {
    ConfigSnapshot::with_apps(vec![App::new("demo-key", vec![SECRET.into()])])
}

struct Request {
    method: http::Method,
    uri: http::Uri,
    headers: http::HeaderMap,
}

impl Request {
    fn new(token: &str) -> Self {
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::AUTHORIZATION, token.parse().unwrap());
        headers.insert("stream-auth-type", "jwt".parse().unwrap());
        Request {
            method: http::Method::POST,
            uri: "/channels/messaging/general/query?api_key=demo-key"
                .parse()
                .unwrap(),
            headers,
        }
    }

    fn parts(&self) -> RequestParts<'_> {
        RequestParts {
            method: &self.method,
            uri: &self.uri,
            headers: &self.headers,
            peer: None,
        }
    }
}

/// For comparison only: the sharded front map this branch first used for hits (commit
/// b3c5435), reduced to its lookup, measured next to `cached_cutoff` in the same run.
mod front {
    use chatgate::time::Cutoff;
    use std::collections::HashMap;
    use std::hash::{BuildHasher, Hasher};
    use std::sync::{Arc, RwLock};
    use std::time::Instant;

    const SHARDS: usize = 64;

    #[derive(Default, Clone, Copy)]
    pub struct PassThrough(u64);
    impl Hasher for PassThrough {
        fn finish(&self) -> u64 {
            self.0
        }
        fn write(&mut self, _: &[u8]) {
            unreachable!("only u64 keys")
        }
        fn write_u64(&mut self, n: u64) {
            self.0 = n;
        }
    }
    #[derive(Default, Clone, Copy)]
    pub struct BuildPassThrough;
    impl BuildHasher for BuildPassThrough {
        type Hasher = PassThrough;
        fn build_hasher(&self) -> PassThrough {
            PassThrough::default()
        }
    }

    type Entry = (Arc<str>, Option<Arc<str>>, Option<Cutoff>, Instant);

    pub struct Hot {
        shards: Box<[RwLock<HashMap<u64, Entry, BuildPassThrough>>]>,
        hasher: foldhash::fast::FixedState,
    }

    impl Hot {
        pub fn new() -> Self {
            Hot {
                shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
                hasher: foldhash::fast::FixedState::with_seed(7),
            }
        }
        fn hash(&self, app: &str, user: Option<&str>) -> u64 {
            let mut h = self.hasher.build_hasher();
            h.write(app.as_bytes());
            h.write_u8(0xff);
            if let Some(user) = user {
                h.write(user.as_bytes());
            }
            h.finish()
        }
        pub fn insert(&self, app: &Arc<str>, user: Option<&Arc<str>>, expires: Instant) {
            let hash = self.hash(app, user.map(|u| &**u));
            self.shards[(hash as usize) & (SHARDS - 1)]
                .write()
                .unwrap()
                .insert(hash, (app.clone(), user.cloned(), None, expires));
        }
        pub fn get(&self, app: &str, user: Option<&str>, now: Instant) -> Option<Option<Cutoff>> {
            let hash = self.hash(app, user);
            let shard = self.shards[(hash as usize) & (SHARDS - 1)].read().unwrap();
            let (a, u, cutoff, expires) = shard.get(&hash)?;
            (*expires > now && &**a == app && u.as_deref() == user).then_some(*cutoff)
        }
    }
}

fn bench_cache_hit(c: &mut Criterion) {
    let runtime = runtime();
    let config = config();
    let app = config.app("demo-key").unwrap().clone();
    let rules = app.token_rules(&config.auth);
    let store = Arc::new(MemoryStore::new());
    let (gate, cache) = {
        let _guard = runtime.enter();
        let cache = RevocationCache::new(store.clone(), &config.revocation);
        (Gate::new(ConfigHandle::new(config), cache.clone()), cache)
    };
    let now = now_unix();
    // "alice" has no cutoff (the common case); "bob" has one his token postdates.
    let alice = TokenBuilder::user("alice-0123456789")
        .expires_in(Duration::from_secs(3600))
        .sign(SECRET);
    let bob = TokenBuilder::user("bob-0123456789")
        .expires_in(Duration::from_secs(3600))
        .sign(SECRET);
    runtime
        .block_on(store.set_user_cutoffs(
            "demo-key",
            &[UserCutoffChange {
                user_id: "bob-0123456789".into(),
                cutoff: Some(Cutoff::from_unix_seconds(now - 3600)),
            }],
        ))
        .unwrap();
    let (alice_request, bob_request) = (Request::new(&alice), Request::new(&bob));
    // Warm the cache: the steady state of a known user.
    for request in [&alice_request, &bob_request] {
        assert!(matches!(
            runtime.block_on(gate.check(request.parts())),
            Ok(Decision::Allow(_))
        ));
    }
    let app_key: Arc<str> = Arc::from("demo-key");
    let user: Arc<str> = Arc::from("alice-0123456789");

    let mut group = c.benchmark_group("revocation_hit");
    // Synchronous, as the gate runs them: the bare verify, and the revocation lookup the
    // gate adds for a user token (app and user cutoff, warm cache).
    group.bench_function("token_verify", |b| {
        b.iter(|| token::verify(black_box(&alice), app.keyring(), &rules, now_unix()).unwrap())
    });
    group.bench_function("cached_cutoff_hit", |b| {
        b.iter(|| {
            cache
                .cached_cutoff(black_box(&app_key), black_box(&user), now)
                .unwrap()
        })
    });
    let (hot_apps, hot_users) = (front::Hot::new(), front::Hot::new());
    let expires = std::time::Instant::now() + Duration::from_secs(3600);
    hot_apps.insert(&app_key, None, expires);
    hot_users.insert(&app_key, Some(&user), expires);
    group.bench_function("front_map_hit_for_comparison", |b| {
        b.iter(|| {
            let now = std::time::Instant::now();
            let app_cutoff = hot_apps.get(black_box(&app_key), None, now).unwrap();
            let user_cutoff = hot_users
                .get(black_box(&app_key), Some(black_box(&user)), now)
                .unwrap();
            app_cutoff.max(user_cutoff)
        })
    });
    group.bench_function("token_verify_then_cached_cutoff", |b| {
        b.iter(|| {
            let verified =
                token::verify(black_box(&alice), app.keyring(), &rules, now_unix()).unwrap();
            let cutoff = cache.cached_cutoff(&app_key, &user, now).unwrap();
            (verified.claims.issued_at, cutoff)
        })
    });
    // The whole check, under block_on (whose empty cost is measured alongside).
    group.bench_function("empty_block_on", |b| {
        b.iter(|| runtime.block_on(async { black_box(()) }))
    });
    group.bench_function("gate_check_no_cutoff", |b| {
        b.iter(|| runtime.block_on(gate.check(black_box(alice_request.parts()))))
    });
    group.bench_function("gate_check_with_cutoff", |b| {
        b.iter(|| runtime.block_on(gate.check(black_box(bob_request.parts()))))
    });
    group.finish();
}

fn bench_memory_miss(c: &mut Criterion) {
    use criterion::BatchSize;

    let runtime = runtime();
    let config = config();
    let cache = {
        let _guard = runtime.enter();
        RevocationCache::new(Arc::new(MemoryStore::new()), &config.revocation)
    };
    let app_key: Arc<str> = Arc::from("demo-key");
    runtime.block_on(cache.app_cutoff(&app_key)).unwrap();
    let mut next_user = 0u64;
    let mut group = c.benchmark_group("revocation_miss");
    // Each iteration a user never seen before: the store read is a hash map lookup, so
    // this is what the cache itself costs on a miss (lookup, coalescing, insert).
    group.bench_function("cache_miss_memory_store", |b| {
        b.iter_batched(
            || {
                next_user += 1;
                Arc::<str>::from(format!("user-{next_user:015}"))
            },
            |user| {
                runtime
                    .block_on(cache.user_cutoff(&app_key, &user))
                    .unwrap()
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

#[cfg(feature = "redis")]
fn bench_redis_miss(c: &mut Criterion) {
    use chatgate::config::{RevocationSettings, StoreErrorPolicy, StoreKind};
    use chatgate::revocation::redis::RedisStore;
    use criterion::BatchSize;

    if !redis_server::installed() {
        println!("revocation_redis_miss: skipped, redis-server is not installed");
        return;
    }
    let redis = redis_server::RedisServer::start();
    let runtime = runtime();
    let store = Arc::new(runtime.block_on(RedisStore::connect(&redis.url())).unwrap());
    let settings = RevocationSettings {
        store: StoreKind::Redis,
        path: "unused".into(),
        redis_url: redis.url(),
        cache_ttl: Duration::from_secs(300),
        cache_capacity: 10_000_000,
        on_store_error: StoreErrorPolicy::Deny,
        store_timeout: Duration::from_millis(250),
        redis: Default::default(),
    };
    let (gate, cache) = {
        let _guard = runtime.enter();
        let cache = RevocationCache::new(store.clone(), &settings);
        let gate = Gate::new(
            ConfigHandle::new(config().with_revocation(settings)),
            cache.clone(),
        );
        (gate, cache)
    };
    let app_key: Arc<str> = Arc::from("demo-key");
    let mut next_user = 0u64;
    let mut fresh_user = move || {
        next_user += 1;
        format!("user-{next_user}")
    };
    // The app cutoff stays cached; each iteration is a user never seen before.
    runtime.block_on(cache.app_cutoff(&app_key)).unwrap();

    let mut group = c.benchmark_group("revocation_redis_miss");
    group.bench_function("redis_hget", |b| {
        b.iter(|| runtime.block_on(store.user_cutoff("demo-key", black_box("user-0"))))
    });
    group.bench_function("cache_miss_to_redis", |b| {
        b.iter_batched(
            || Arc::<str>::from(fresh_user()),
            |user| {
                runtime
                    .block_on(cache.user_cutoff(&app_key, &user))
                    .unwrap()
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("gate_check_miss_to_redis", |b| {
        b.iter_batched(
            || Request::new(&TokenBuilder::user(fresh_user()).sign(SECRET)),
            |request| {
                let decision = runtime.block_on(gate.check(request.parts()));
                assert!(matches!(decision, Ok(Decision::Allow(_))));
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

#[cfg(not(feature = "redis"))]
fn bench_redis_miss(_: &mut Criterion) {
    println!("revocation_redis_miss: skipped, build with --features redis");
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    targets = bench_cache_hit, bench_memory_miss, bench_redis_miss
}
criterion_main!(benches);
