//! # chatgate
//!
//! An auth gate for Stream-style chat APIs. It validates the JWTs the official Stream
//! SDKs send (user, server, developer and anonymous), enforces "revoke tokens issued
//! before" cutoffs, and answers every refusal with the JSON error and code the SDKs
//! react to. One transport-neutral core, [`Gate`], serves:
//!
//! - a tower layer (feature `tower`, axum extractors with `axum`),
//! - a Pingora edge proxy (feature `proxy`, `proxy::run`),
//! - a TOML config, validated whole and hot-swapped,
//! - a demo chat API to put behind either (feature `demo`).
//!
//! The `chatgate` binary (feature `cli`) is a thin command line over this library: the
//! argument parsing, logging setup and the demo upstream are its own, so a library user
//! compiles neither clap nor tracing-subscriber.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
pub mod error;
#[cfg(feature = "axum")]
pub mod extract;
pub mod gate;
#[cfg(feature = "tower")]
pub mod layer;
pub mod limits;
pub mod logs;
pub mod normalize;
#[cfg(feature = "proxy")]
pub mod proxy;
pub mod reload;
pub mod request;
pub mod revocation;
pub mod session;
pub mod time;
pub mod token;
pub mod ws;

pub use config::{App, ConfigError, ConfigSnapshot};
pub use error::{AuthError, ErrorResponse, Rejection};
pub use gate::{
    Decision, Gate, Identity, IdentityKind, PendingCheck, Policy, RequestParts, RevocationEndpoint,
};
#[cfg(feature = "tower")]
pub use layer::{ChatAuth, ChatAuthLayer};
pub use reload::ConfigHandle;
pub use reload::{ConfigStatus, ConfigWatcher, ReloadOutcome};
pub use token::TokenBuilder;
