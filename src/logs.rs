//! Contract §6 rule 8: no credential in any log, at any level (`RUST_LOG=trace`
//! included).
//!
//! chatgate's own events never carry a token, a secret or a query string: refusals log
//! the code, the reason and the path alone, `App`'s `Debug` redacts secrets, and the
//! proxy's `request_summary` is method and path. What remains is the libraries under
//! it, which format whole requests at debug and trace level: pingora-proxy logs
//! `Request header: {:?}` and `Sending header to upstream {:?}` (the URI with its
//! query, where WebSocket clients send their token, and the `Authorization` header),
//! pingora-core `Writing request header`, and hyper, h2 and tungstenite trace what
//! they parse. Redacting inside those strings would be guesswork, so their events are
//! capped at `INFO` whatever the filter asks for: [`may_log`] is a per-event filter a
//! subscriber installs next to its level filter (the `chatgate` binary does). Their
//! info, warn and error events stay: they name errors, and the request only through
//! the proxy's own `request_summary`.

use tracing::{Level, Metadata};

/// Targets (and their submodules) whose debug and trace events format whole requests.
pub const CAPPED_TARGETS: &[&str] = &[
    "pingora",
    "pingora_core",
    "pingora_proxy",
    "pingora_http",
    "pingora_pool",
    "pingora_load_balancing",
    "pingora_cache",
    "hyper",
    "hyper_util",
    "h2",
    "tungstenite",
    "tokio_tungstenite",
    "reqwest",
];

/// Whether an event may be written: everything of chatgate's and the application's,
/// and the [`CAPPED_TARGETS`] at `INFO` or less verbose.
pub fn may_log(metadata: &Metadata<'_>) -> bool {
    // More verbose levels compare greater in tracing.
    if *metadata.level() <= Level::INFO {
        return true;
    }
    !is_capped(metadata.target())
}

fn is_capped(target: &str) -> bool {
    CAPPED_TARGETS.iter().any(|capped| {
        target
            .strip_prefix(capped)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_targets_are_capped_by_module_path_only() {
        for target in [
            "pingora_proxy",
            "pingora_proxy::proxy_h1",
            "pingora_core::protocols::http::v1::client",
            "hyper::proto::h1::role",
            "h2::codec",
            "tungstenite::handshake::server",
        ] {
            assert!(is_capped(target), "{target}");
        }
        for target in [
            "chatgate::proxy",
            "h2c_app",
            "hyperion",
            "pingoral",
            "my_app",
        ] {
            assert!(!is_capped(target), "{target}");
        }
    }

    #[test]
    fn levels_up_to_info_always_pass() {
        assert!(Level::ERROR <= Level::INFO && Level::WARN <= Level::INFO);
        assert!(Level::DEBUG > Level::INFO && Level::TRACE > Level::INFO);
    }
}
