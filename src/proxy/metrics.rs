//! Prometheus metrics of the edge proxy, served on the admin listener's `/metrics`.
//!
//! Every series exists from the first scrape, zero where nothing happened yet: a rate
//! or an alert over a series that appears only with its first event sees no change
//! from "absent" to 1 and stays silent. So the labelled families are created up front
//! for their known label values (status classes, upstream error kinds, configured
//! apps, also after a reload adds one); only refusals, whose (app, code, reason)
//! combinations are many, appear with their first event. Figures owned elsewhere (the
//! revocation cache's counters, the reload counters) are copied in at scrape time.

use crate::error::AuthError;
use crate::reload::ConfigHandle;
use crate::revocation::RevocationCache;
use arc_swap::ArcSwap;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

/// `upstream_error` kinds, created at zero.
const UPSTREAM_ERROR_KINDS: [&str; 2] = ["unavailable", "timeout"];
/// Status classes of `chatgate_responses_total`, index = status / 100 - 1.
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Why a relayed WebSocket session ended (`chatgate_websocket_sessions_ended_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionEndReason {
    /// A revocation cutoff covered its token: closed with 4000.
    Revoked,
    /// Its token's `exp` (plus leeway) passed: closed with 4000.
    Expired,
    /// The end of a drain: closed with 1001.
    Shutdown,
    /// The client closed or failed.
    Client,
    /// The upstream closed or failed.
    Upstream,
    /// Nothing passed for `[upstream] websocket_idle_timeout`: closed with 1001.
    Idle,
}

impl SessionEndReason {
    /// Every reason, in label order.
    pub const ALL: [SessionEndReason; 6] = [
        SessionEndReason::Revoked,
        SessionEndReason::Expired,
        SessionEndReason::Shutdown,
        SessionEndReason::Client,
        SessionEndReason::Upstream,
        SessionEndReason::Idle,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionEndReason::Revoked => "revoked",
            SessionEndReason::Expired => "expired",
            SessionEndReason::Shutdown => "shutdown",
            SessionEndReason::Client => "client",
            SessionEndReason::Upstream => "upstream",
            SessionEndReason::Idle => "idle",
        }
    }
}

/// Label used for requests whose `api_key` names no configured app: arbitrary client
/// input must not become a label value (unbounded series).
pub const UNKNOWN_APP: &str = "unknown";

/// One `chatgate_requests_denied_total` series of an app: its code, reason and counter.
type DeniedCounter = (i32, &'static str, IntCounter);

/// One labelled metric's series by app, each looked up once: `with_label_values`
/// hashes, locks and clones on every call, and these series change on the hot path
/// (every allowed request, every relayed session's start and end). Bounded by the
/// configured apps: only those are counted here.
struct ByApp<M>(ArcSwap<HashMap<Arc<str>, M, foldhash::fast::RandomState>>);

impl<M> Default for ByApp<M> {
    fn default() -> Self {
        ByApp(ArcSwap::default())
    }
}

impl<M: Clone> ByApp<M> {
    /// Applies `change` to `app`'s series, made by `series` the first time.
    fn with(&self, app: &str, series: impl FnOnce() -> M, change: impl FnOnce(&M)) {
        if let Some(known) = self.0.load().get(app) {
            change(known);
            return;
        }
        let made = series();
        change(&made);
        let app: Arc<str> = Arc::from(app);
        self.0.rcu(|known| {
            let mut known = HashMap::clone(known);
            known.insert(app.clone(), made.clone());
            known
        });
    }
}

/// The proxy's counters, gauges and histograms, in their own registry.
pub struct ProxyMetrics {
    registry: Registry,
    allowed: IntCounterVec,
    allowed_by_app: ByApp<IntCounter>,
    denied: IntCounterVec,
    /// Refusal counters looked up so far, by app, then code and reason: a client that
    /// is refused again and again (a bad token retried) is counted without hashing the
    /// three labels and formatting the code each time. Bounded: the apps are configured
    /// ones and `unknown`, the codes and reasons a fixed set.
    denied_by_app: ArcSwap<HashMap<Arc<str>, Vec<DeniedCounter>, foldhash::fast::RandomState>>,
    check_seconds: Histogram,
    websockets_open: IntGauge,
    sessions_open: IntGaugeVec,
    sessions_open_by_app: ByApp<IntGauge>,
    /// Indexed like [`SessionEndReason::ALL`].
    sessions_ended: [IntCounter; 6],
    session_runs: IntCounter,
    upstream_errors: IntCounterVec,
    cache_hits: IntCounter,
    cache_misses: IntCounter,
    store_errors: IntCounter,
    cache_entries: IntGauge,
    /// Looked up once: counted on every response.
    responses: [IntCounter; 5],
    upstream_seconds: Histogram,
    reloads: IntCounterVec,
    last_reload_success: Gauge,
    store_warnings: IntGaugeVec,
    upstream_up: IntGaugeVec,
    /// The addresses `upstream_up` has a series for: a reload may drop one.
    upstreams_labelled: Mutex<Vec<String>>,
    /// Serialises the copy of the cache's atomics into the counters, so two concurrent
    /// scrapes cannot add the same delta twice.
    sync: Mutex<()>,
}

impl ProxyMetrics {
    /// A fresh set of metrics.
    pub fn new() -> Self {
        let registry = Registry::new();
        let allowed = IntCounterVec::new(
            Opts::new(
                "chatgate_requests_allowed_total",
                "Requests the gate let through, by app",
            ),
            &["app"],
        )
        .expect("valid metric");
        let denied = IntCounterVec::new(
            Opts::new(
                "chatgate_requests_denied_total",
                "Requests the gate refused, by app, Stream error code and reason",
            ),
            &["app", "code", "reason"],
        )
        .expect("valid metric");
        let check_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "chatgate_check_duration_seconds",
                "Time spent deciding a request (token, app, revocation lookup)",
            )
            .buckets(vec![
                0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.005,
                0.025, 0.1, 0.5,
            ]),
        )
        .expect("valid metric");
        let websockets_open = IntGauge::new(
            "chatgate_websockets_open",
            "WebSocket connections currently proxied",
        )
        .expect("valid metric");
        let sessions_open = IntGaugeVec::new(
            Opts::new(
                "chatgate_websocket_sessions_open",
                "WebSocket sessions the proxy relays now, by app",
            ),
            &["app"],
        )
        .expect("valid metric");
        let sessions_ended_by_reason = IntCounterVec::new(
            Opts::new(
                "chatgate_websocket_sessions_ended_total",
                "Relayed WebSocket sessions ended, by reason (revoked, expired, shutdown, client, upstream, idle)",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let session_runs = IntCounter::new(
            "chatgate_websocket_session_runs_total",
            "Times a relayed WebSocket session's task ran (bytes moving, its timers, a revocation of its user or app, the drain); an idle session adds none",
        )
        .expect("valid metric");
        let sessions_ended = SessionEndReason::ALL
            .map(|reason| sessions_ended_by_reason.with_label_values(&[reason.as_str()]));
        let upstream_errors = IntCounterVec::new(
            Opts::new(
                "chatgate_upstream_errors_total",
                "Requests answered with a 5xx because the upstream failed, by kind",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let cache_hits = IntCounter::new(
            "chatgate_revocation_cache_hits_total",
            "Revocation lookups answered from the cache",
        )
        .expect("valid metric");
        let cache_misses = IntCounter::new(
            "chatgate_revocation_cache_misses_total",
            "Revocation lookups that went to the store",
        )
        .expect("valid metric");
        let store_errors = IntCounter::new(
            "chatgate_revocation_store_errors_total",
            "Revocation store reads or writes that failed or timed out",
        )
        .expect("valid metric");
        let cache_entries = IntGauge::new(
            "chatgate_revocation_cache_entries",
            "Cutoffs (or their absence) currently cached",
        )
        .expect("valid metric");
        let build_info = IntGaugeVec::new(
            Opts::new(
                "chatgate_build_info",
                "Always 1; the labels say which chatgate runs",
            ),
            &["version"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let responses_by_class = IntCounterVec::new(
            Opts::new(
                "chatgate_responses_total",
                "Responses sent to clients (refusals and upstream failures included), by status class",
            ),
            &["class"],
        )
        .expect("valid metric");
        let responses = STATUS_CLASSES.map(|class| responses_by_class.with_label_values(&[class]));
        let upstream_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "chatgate_upstream_response_seconds",
                "From picking an upstream to its response head (connect included)",
            )
            .buckets(vec![
                0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
        )
        .expect("valid metric");
        let reloads = IntCounterVec::new(
            Opts::new(
                "chatgate_config_reloads_total",
                "Config reloads, by result (success: swapped in; failure: kept the running config)",
            ),
            &["result"],
        )
        .expect("valid metric");
        for result in ["success", "failure"] {
            reloads.with_label_values(&[result]);
        }
        let last_reload_success = Gauge::new(
            "chatgate_config_last_reload_success_timestamp_seconds",
            "Unix time the running config was loaded (at start or by the last successful reload)",
        )
        .expect("valid metric");
        for kind in UPSTREAM_ERROR_KINDS {
            upstream_errors.with_label_values(&[kind]);
        }
        let store_warnings = IntGaugeVec::new(
            Opts::new(
                "chatgate_revocation_store_warning",
                "1 for each problem with the revocation store's setup (e.g. redis_persists_nothing)",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let upstream_up = IntGaugeVec::new(
            Opts::new(
                "chatgate_upstream_up",
                "1 if the upstream address accepted the last TCP probe (every second), else 0",
            ),
            &["upstream"],
        )
        .expect("valid metric");
        for collector in [
            Box::new(allowed.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(build_info),
            Box::new(responses_by_class),
            Box::new(upstream_seconds.clone()),
            Box::new(reloads.clone()),
            Box::new(last_reload_success.clone()),
            Box::new(denied.clone()),
            Box::new(check_seconds.clone()),
            Box::new(websockets_open.clone()),
            Box::new(sessions_open.clone()),
            Box::new(sessions_ended_by_reason),
            Box::new(session_runs.clone()),
            Box::new(upstream_errors.clone()),
            Box::new(cache_hits.clone()),
            Box::new(cache_misses.clone()),
            Box::new(store_errors.clone()),
            Box::new(cache_entries.clone()),
            Box::new(store_warnings.clone()),
            Box::new(upstream_up.clone()),
        ] {
            registry.register(collector).expect("unique metric names");
        }
        // CPU, memory, file descriptors and start time of this process (Linux).
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metric names");
        ProxyMetrics {
            registry,
            allowed,
            allowed_by_app: ByApp::default(),
            denied,
            denied_by_app: ArcSwap::default(),
            check_seconds,
            websockets_open,
            sessions_open,
            sessions_open_by_app: ByApp::default(),
            sessions_ended,
            session_runs,
            upstream_errors,
            cache_hits,
            cache_misses,
            store_errors,
            cache_entries,
            responses,
            upstream_seconds,
            reloads,
            last_reload_success,
            store_warnings,
            upstream_up,
            upstreams_labelled: Mutex::default(),
            sync: Mutex::new(()),
        }
    }

    /// Counts an allowed request.
    pub fn allowed(&self, app: &str) {
        self.allowed_by_app.with(
            app,
            || self.allowed.with_label_values(&[app]),
            IntCounter::inc,
        );
    }

    /// Counts a refused request. `app` must be a configured api_key or [`UNKNOWN_APP`].
    pub fn denied(&self, app: &str, error: &AuthError) {
        let (code, reason) = (error.code(), error.reason());
        if let Some(counter) = self.denied_by_app.load().get(app).and_then(|counters| {
            counters
                .iter()
                .find(|(c, r, _)| *c == code && *r == reason)
                .map(|(_, _, counter)| counter)
        }) {
            counter.inc();
            return;
        }
        let mut digits = itoa::Buffer::new();
        let counter = self
            .denied
            .with_label_values(&[app, digits.format(code), reason]);
        counter.inc();
        let app: Arc<str> = Arc::from(app);
        self.denied_by_app.rcu(|counters| {
            let mut counters = HashMap::clone(counters);
            let series = counters.entry(app.clone()).or_default();
            if !series.iter().any(|(c, r, _)| *c == code && *r == reason) {
                series.push((code, reason, counter.clone()));
            }
            counters
        });
    }

    /// Records how long one gate decision took.
    pub fn observe_check(&self, elapsed: Duration) {
        self.check_seconds.observe(elapsed.as_secs_f64());
    }

    /// A proxied WebSocket was established.
    pub fn websocket_opened(&self) {
        self.websockets_open.inc();
    }

    /// A proxied WebSocket ended.
    pub fn websocket_closed(&self) {
        self.websockets_open.dec();
    }

    /// Currently open WebSockets.
    pub fn websockets_open(&self) -> i64 {
        self.websockets_open.get()
    }

    /// A relayed WebSocket session of `app` started (also counted in
    /// `chatgate_websockets_open`).
    pub fn session_opened(&self, app: &str) {
        self.websockets_open.inc();
        self.sessions_open_by_app.with(
            app,
            || self.sessions_open.with_label_values(&[app]),
            IntGauge::inc,
        );
    }

    /// A relayed WebSocket session of `app` ended.
    pub fn session_closed(&self, app: &str) {
        self.websockets_open.dec();
        self.sessions_open_by_app.with(
            app,
            || self.sessions_open.with_label_values(&[app]),
            IntGauge::dec,
        );
    }

    /// Counts one run (poll) of a relayed session's task.
    pub fn session_ran(&self) {
        self.session_runs.inc();
    }

    /// Counts why a relayed session ended.
    pub fn session_ended(&self, reason: SessionEndReason) {
        let index = SessionEndReason::ALL
            .iter()
            .position(|r| *r == reason)
            .expect("every reason is in ALL");
        self.sessions_ended[index].inc();
    }

    /// Counts a request that failed at the upstream (`unavailable`, `timeout`).
    pub fn upstream_error(&self, kind: &str) {
        self.upstream_errors.with_label_values(&[kind]).inc();
    }

    /// Counts an upstream failure answered with `error`: kind `timeout` for
    /// [`AuthError::UpstreamTimeout`], `unavailable` for any other.
    pub fn upstream_failure(&self, error: &AuthError) {
        self.upstream_error(match error {
            AuthError::UpstreamTimeout => "timeout",
            _ => "unavailable",
        });
    }

    /// Counts a response sent to a client (`None`: the client got none) and how long
    /// the upstream took to answer, if it was asked.
    pub fn response(&self, status: Option<u16>, upstream: Option<Duration>) {
        if let Some(counter) = status
            .and_then(|s| (s / 100).checked_sub(1))
            .and_then(|class| self.responses.get(usize::from(class)))
        {
            counter.inc();
        }
        if let Some(upstream) = upstream {
            self.upstream_seconds.observe(upstream.as_secs_f64());
        }
    }

    /// Sets `chatgate_upstream_up` from one probe round (address, accepted); the
    /// series of an address no longer configured is removed.
    pub fn upstreams_probed<'a>(&self, probes: impl Iterator<Item = (&'a str, bool)>) {
        let mut labelled = self
            .upstreams_labelled
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let previous = std::mem::take(&mut *labelled);
        for (address, up) in probes {
            self.upstream_up
                .with_label_values(&[address])
                .set(i64::from(up));
            labelled.push(address.to_owned());
        }
        for gone in previous.iter().filter(|a| !labelled.contains(a)) {
            let _ = self.upstream_up.remove_label_values(&[gone.as_str()]);
        }
    }

    /// Copies the reload counters and the last load time in, and creates the
    /// allowed-requests series of every configured app (a reload may add one).
    pub fn observe_config(&self, config: &ConfigHandle) {
        let _guard = self.sync.lock().unwrap_or_else(|e| e.into_inner());
        let status = config.status();
        for (result, now) in [
            ("success", status.reloads_ok),
            ("failure", status.reloads_failed),
        ] {
            let counter = self.reloads.with_label_values(&[result]);
            counter.inc_by(now.saturating_sub(counter.get()));
        }
        let loaded = status
            .loaded_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.last_reload_success.set(loaded.as_secs_f64());
        for app in config.load().apps() {
            self.allowed.with_label_values(&[&*app.api_key]);
            self.sessions_open.with_label_values(&[&*app.api_key]);
        }
    }

    /// The Prometheus text exposition, with the revocation cache's counters copied in.
    pub fn render(&self, cache: &RevocationCache) -> String {
        {
            let _guard = self.sync.lock().unwrap_or_else(|e| e.into_inner());
            let stats = cache.stats();
            for (counter, value) in [
                (&self.cache_hits, &stats.hits),
                (&self.cache_misses, &stats.misses),
                (&self.store_errors, &stats.store_errors),
            ] {
                let now = value.load(Ordering::Relaxed);
                counter.inc_by(now.saturating_sub(counter.get()));
            }
            self.cache_entries
                .set(i64::try_from(cache.entry_count()).unwrap_or(i64::MAX));
            self.store_warnings.reset();
            for warning in cache.store().warnings() {
                self.store_warnings
                    .with_label_values(&[warning.kind])
                    .set(1);
            }
        }
        let mut out = Vec::with_capacity(4096);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for ProxyMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyMetrics")
            .field("websockets_open", &self.websockets_open.get())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigSnapshot;
    use crate::revocation::MemoryStore;
    use std::sync::Arc;

    /// A revocation cache over an empty store, with the default settings.
    fn empty_cache() -> Arc<RevocationCache> {
        RevocationCache::new(
            Arc::new(MemoryStore::new()),
            &ConfigSnapshot::with_apps(vec![]).revocation,
        )
    }

    #[test]
    fn an_upstream_failure_is_counted_by_the_kind_its_error_names() {
        let metrics = ProxyMetrics::new();
        let cache = empty_cache();
        metrics.upstream_failure(&AuthError::UpstreamTimeout);
        metrics.upstream_failure(&AuthError::UpstreamUnavailable);
        metrics.upstream_failure(&AuthError::UpstreamUnavailable);
        let text = metrics.render(&cache);
        for series in [
            r#"chatgate_upstream_errors_total{kind="timeout"} 1"#,
            r#"chatgate_upstream_errors_total{kind="unavailable"} 2"#,
        ] {
            assert!(text.contains(series), "{series} missing from:\n{text}");
        }
    }

    #[test]
    fn denials_are_labelled_by_app_code_and_reason() {
        let metrics = ProxyMetrics::new();
        metrics.allowed("demo-key");
        metrics.denied("demo-key", &AuthError::Expired);
        metrics.denied(UNKNOWN_APP, &AuthError::UnknownApiKey);
        metrics.denied("demo-key", &AuthError::StoreUnavailable);
        let cache = empty_cache();
        let text = metrics.render(&cache);
        assert!(text.contains(r#"chatgate_requests_allowed_total{app="demo-key"} 1"#));
        assert!(text.contains(
            r#"chatgate_requests_denied_total{app="demo-key",code="40",reason="expired"} 1"#
        ));
        assert!(text.contains(
            r#"chatgate_requests_denied_total{app="unknown",code="2",reason="unknown_api_key"} 1"#
        ));
        assert!(text.contains(r#"code="-1",reason="store_unavailable""#));
    }

    #[test]
    fn repeated_denials_count_on_the_same_series() {
        let metrics = ProxyMetrics::new();
        for _ in 0..3 {
            metrics.denied("demo-key", &AuthError::Expired);
            metrics.denied("demo-key", &AuthError::Revoked);
            metrics.denied("other-key", &AuthError::Expired);
        }
        let cache = empty_cache();
        let text = metrics.render(&cache);
        for series in [
            r#"chatgate_requests_denied_total{app="demo-key",code="40",reason="expired"} 3"#,
            r#"chatgate_requests_denied_total{app="demo-key",code="40",reason="revoked"} 3"#,
            r#"chatgate_requests_denied_total{app="other-key",code="40",reason="expired"} 3"#,
        ] {
            assert!(text.contains(series), "{series} missing from:\n{text}");
        }
    }

    #[test]
    fn cache_counters_follow_the_cache_stats_without_double_counting() {
        let metrics = ProxyMetrics::new();
        let cache = empty_cache();
        cache.stats().hits.store(7, Ordering::Relaxed);
        cache.stats().misses.store(2, Ordering::Relaxed);
        metrics.render(&cache);
        let text = metrics.render(&cache);
        assert!(text.contains("chatgate_revocation_cache_hits_total 7"));
        assert!(text.contains("chatgate_revocation_cache_misses_total 2"));
        assert!(text.contains("chatgate_revocation_store_errors_total 0"));
    }

    #[test]
    fn every_series_is_there_before_its_first_event() {
        let metrics = ProxyMetrics::new();
        let config = ConfigHandle::new(ConfigSnapshot::with_apps(vec![crate::config::App::new(
            "demo-key",
            vec!["s".into()],
        )]));
        metrics.observe_config(&config);
        let cache = empty_cache();
        let text = metrics.render(&cache);
        for series in [
            concat!(
                "chatgate_build_info{version=\"",
                env!("CARGO_PKG_VERSION"),
                "\"} 1"
            ),
            r#"chatgate_responses_total{class="2xx"} 0"#,
            r#"chatgate_responses_total{class="5xx"} 0"#,
            "chatgate_upstream_response_seconds_count 0",
            r#"chatgate_config_reloads_total{result="success"} 0"#,
            r#"chatgate_config_reloads_total{result="failure"} 0"#,
            r#"chatgate_upstream_errors_total{kind="timeout"} 0"#,
            r#"chatgate_requests_allowed_total{app="demo-key"} 0"#,
            "chatgate_websockets_open 0",
            r#"chatgate_websocket_sessions_open{app="demo-key"} 0"#,
            r#"chatgate_websocket_sessions_ended_total{reason="revoked"} 0"#,
            r#"chatgate_websocket_sessions_ended_total{reason="expired"} 0"#,
            r#"chatgate_websocket_sessions_ended_total{reason="shutdown"} 0"#,
            r#"chatgate_websocket_sessions_ended_total{reason="client"} 0"#,
            r#"chatgate_websocket_sessions_ended_total{reason="upstream"} 0"#,
            r#"chatgate_websocket_sessions_ended_total{reason="idle"} 0"#,
            "process_start_time_seconds",
            "process_resident_memory_bytes",
        ] {
            assert!(text.contains(series), "{series} missing from:\n{text}");
        }
        let loaded: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("chatgate_config_last_reload_success_timestamp_seconds "))
            .unwrap()
            .parse()
            .unwrap();
        assert!(loaded > 1.7e9, "{loaded}");
    }

    #[test]
    fn responses_are_counted_by_class_and_upstream_time_observed() {
        let metrics = ProxyMetrics::new();
        metrics.response(Some(200), Some(Duration::from_millis(3)));
        metrics.response(Some(401), None);
        metrics.response(Some(502), Some(Duration::from_secs(1)));
        metrics.response(None, None);
        metrics.response(Some(99), None);
        let cache = empty_cache();
        let text = metrics.render(&cache);
        for series in [
            r#"chatgate_responses_total{class="1xx"} 0"#,
            r#"chatgate_responses_total{class="2xx"} 1"#,
            r#"chatgate_responses_total{class="4xx"} 1"#,
            r#"chatgate_responses_total{class="5xx"} 1"#,
            "chatgate_upstream_response_seconds_count 2",
            r#"chatgate_upstream_response_seconds_bucket{le="0.005"} 1"#,
        ] {
            assert!(text.contains(series), "{series} missing from:\n{text}");
        }
    }

    #[test]
    fn upstream_up_follows_each_probe_round_and_drops_addresses_a_reload_removed() {
        let metrics = ProxyMetrics::new();
        let cache = empty_cache();
        metrics.upstreams_probed([("a:1", true), ("b:2", false)].into_iter());
        let text = metrics.render(&cache);
        assert!(
            text.contains(r#"chatgate_upstream_up{upstream="a:1"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"chatgate_upstream_up{upstream="b:2"} 0"#),
            "{text}"
        );
        metrics.upstreams_probed([("b:2", true)].into_iter());
        let text = metrics.render(&cache);
        assert!(
            text.contains(r#"chatgate_upstream_up{upstream="b:2"} 1"#),
            "{text}"
        );
        assert!(!text.contains(r#"upstream="a:1""#), "{text}");
    }
}
