//! # chatgate
//!
//! An auth gate for Stream-style chat APIs. It validates the JWTs the official Stream
//! SDKs send (user, server, developer and anonymous), enforces "revoke tokens issued
//! before" cutoffs, and answers every refusal with the JSON error and code the SDKs
//! react to. One transport-neutral core, [`Gate`], serves:
//!
//! - a tower layer (feature `tower`, axum extractors with `axum`),
//! - a Pingora edge proxy and the `chatgate` binary (feature `proxy`),
//! - a TOML config, validated whole and hot-swapped.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod cli;
pub mod config;
#[cfg(feature = "axum")]
pub mod demo;
pub mod error;
#[cfg(feature = "axum")]
pub mod extract;
pub mod gate;
#[cfg(feature = "tower")]
pub mod layer;
pub mod normalize;
#[cfg(feature = "proxy")]
pub mod proxy;
pub mod reload;
pub mod revocation;
pub mod session;
pub mod time;
pub mod token;
pub mod ws;

pub use config::{App, ConfigError, ConfigSnapshot};
pub use error::{AuthError, ErrorResponse};
pub use gate::{
    Decision, Gate, Identity, IdentityKind, PendingCheck, RequestParts, RevocationEndpoint,
};
#[cfg(feature = "tower")]
pub use layer::{ChatAuth, ChatAuthLayer};
pub use reload::ConfigHandle;
pub use reload::{ConfigStatus, ConfigWatcher, ReloadOutcome};
pub use token::TokenBuilder;
