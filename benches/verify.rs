//! The core's check next to a bare `jsonwebtoken::decode` of the same token with a
//! prebuilt key, in one run. Target (issue 2): the core's full check costs at most
//! 1.2x the bare decode.
//!
//! `cargo bench --bench verify`

use chatgate::config::{App, ConfigSnapshot};
use chatgate::gate::{Gate, RequestParts};
use chatgate::reload::ConfigHandle;
use chatgate::revocation::{MemoryStore, RevocationCache};
use chatgate::time::now_unix;
use chatgate::token::{self, TokenBuilder};
use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

const SECRET: &str = "bench-secret-0123456789abcdef0123456789abcdef";

#[derive(serde::Deserialize)]
#[allow(dead_code)] // fields are decoded to do the same work as the core, not read
struct StreamClaims {
    user_id: String,
    iat: i64,
    exp: i64,
}

fn bench_verify(c: &mut Criterion) {
    let token = TokenBuilder::user("alice-0123456789")
        .expires_in(Duration::from_secs(3600))
        .sign(SECRET);
    let config = ConfigSnapshot::with_apps(vec![App::new("demo-key", vec![SECRET.into()])]);
    let app = config.app("demo-key").unwrap().clone();
    let rules = app.token_rules(&config.auth);

    let key = jsonwebtoken::DecodingKey::from_secret(SECRET.as_bytes()).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.leeway = 5;
    validation.validate_nbf = true;
    assert!(jsonwebtoken::decode::<StreamClaims>(&token, &key, &validation).is_ok());

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let gate = {
        let _guard = runtime.enter();
        let cache = RevocationCache::new(Arc::new(MemoryStore::new()), &config.revocation);
        Gate::new(
            ConfigHandle::new(ConfigSnapshot::with_apps(vec![App::new(
                "demo-key",
                vec![SECRET.into()],
            )])),
            cache,
        )
    };
    let uri: http::Uri = "/channels/messaging/general/query?api_key=demo-key"
        .parse()
        .unwrap();
    let mut headers = http::HeaderMap::new();
    headers.insert(http::header::AUTHORIZATION, token.parse().unwrap());
    headers.insert("stream-auth-type", "jwt".parse().unwrap());
    headers.insert(
        http::header::CONTENT_TYPE,
        "application/json".parse().unwrap(),
    );
    let method = http::Method::POST;
    let parts = RequestParts {
        method: &method,
        uri: &uri,
        headers: &headers,
        peer: None,
    };
    // warm the revocation cache: the steady state of a known user
    runtime.block_on(gate.check(parts)).unwrap();

    let mut group = c.benchmark_group("verify_user_token");
    group.bench_function("jsonwebtoken_decode", |b| {
        b.iter(|| {
            jsonwebtoken::decode::<StreamClaims>(black_box(&token), &key, &validation).unwrap()
        })
    });
    group.bench_function("chatgate_token_verify_first_sight", |b| {
        b.iter(|| {
            token::verify_uncached(black_box(&token), app.keyring(), &rules, now_unix()).unwrap()
        })
    });
    // A client repeats its token on every request: the app's verified-token cache.
    group.bench_function("chatgate_token_verify", |b| {
        b.iter(|| token::verify(black_box(&token), app.keyring(), &rules, now_unix()).unwrap())
    });
    let cache = gate.revocations().clone();
    let (app_key, user): (Arc<str>, Arc<str>) =
        (Arc::from("demo-key"), Arc::from("alice-0123456789"));
    assert_eq!(cache.cached_cutoff(&app_key, &user, now_unix()), Some(None));
    group.bench_function("chatgate_token_verify_plus_cached_revocation", |b| {
        b.iter(|| {
            let now = now_unix();
            let verified = token::verify(black_box(&token), app.keyring(), &rules, now).unwrap();
            let cutoff = cache.cached_cutoff(&app_key, &user, now).unwrap();
            (verified, cutoff)
        })
    });
    group.bench_function("revocation_cache_hit_alone", |b| {
        let now = now_unix();
        b.iter(|| {
            cache
                .cached_cutoff(black_box(&app_key), black_box(&user), now)
                .unwrap()
        })
    });
    group.bench_function("chatgate_gate_check_warm_cache", |b| {
        b.iter(|| runtime.block_on(gate.check(black_box(parts))).unwrap())
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    targets = bench_verify
}
criterion_main!(benches);
