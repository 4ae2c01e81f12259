//! Stream JWTs (contract §2), by concern: `verify` checks a compact JWS ([`verify()`]),
//! `keyring` holds one app's secrets and the tokens they verified ([`Keyring`]),
//! `rules` says what an app accepts beyond the signature ([`TokenRules`]), `mint`
//! makes tokens ([`TokenBuilder`]); the binary's `token inspect` explains one with this module's public API.
//!
//! This module depends on nothing of `config`: the config builds a `Keyring` per app
//! from its file and derives its `TokenRules`, and the gate hands both to [`verify()`].

mod keyring;
mod mint;
mod rules;
mod verify;

pub use keyring::Keyring;
pub use mint::TokenBuilder;
pub use rules::TokenRules;
pub(crate) use verify::{Cached, verify_stamped};
pub use verify::{
    Claims, DEVELOPER_SIGNATURE, TokenKind, VerifiedToken, check_header, decode_segment,
    read_claims, segments, verify, verify_uncached,
};
