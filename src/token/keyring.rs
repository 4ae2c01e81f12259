//! [`Keyring`]: one app's HMAC keys (contract §2: several secrets during a rotation,
//! the token verifies if any one matches) and the tokens it has already verified.
//!
//! The keyed HMAC state is built once per secret, so a check hashes only the token.
//! The verified-token cache lives beside the keys because its entries are only true
//! for those keys: a reload builds a new `Keyring`, so a secret rotated out (or
//! developer tokens turned off, see [`verify`](crate::token::verify)) can never be
//! answered from an old entry.
//!
//! The cache is `moka::sync::Cache`, the crate the product names for its caches, with
//! foldhash and a borrowed key: a lookup hashes the presented `&str` and compares it
//! without allocating, and the comparison never stops early.
//!
//! An entry also carries the revocation cache's last answer for the token's user
//! (`StampedCutoff`), so that a repeated token costs one moka lookup, not two: the
//! gate takes that answer when the revocation cache says its state has not moved
//! since (see `revocation::cache`), and otherwise looks the cutoffs up and stamps the
//! entry again.

use crate::time::StampedCutoff;
use crate::token::VerifiedToken;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::sync::atomic::{AtomicU64, Ordering};

/// How many verified tokens an app keeps.
const VERIFIED_TOKENS_PER_APP: u64 = 65_536;

/// Slots of an app's filter of tokens verified once ([`SeenOnce`]): 64 KiB.
const SEEN_ONCE_SLOTS: usize = 8_192;

/// An HMAC-SHA256 key with its inner and outer pads already hashed.
#[derive(Clone)]
struct HmacKey(Hmac<Sha256>);

impl HmacKey {
    fn new(secret: &[u8]) -> Self {
        HmacKey(Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length"))
    }

    /// Whether `tag` is the MAC of `message` (constant time).
    fn verify(&self, message: &[u8], tag: &[u8]) -> bool {
        self.0
            .clone()
            .chain_update(message)
            .verify_slice(tag)
            .is_ok()
    }
}

/// One app's secrets, their prebuilt HMAC keys, and the tokens they verified.
pub struct Keyring {
    keys: Vec<HmacKey>,
    secrets: Vec<String>,
    verified: VerifiedTokens,
    seen_once: SeenOnce,
}

impl Keyring {
    /// Builds the keys from the secrets, in rotation order: the first is the one new
    /// tokens are signed with, every one is accepted.
    pub fn new(secrets: Vec<String>) -> Self {
        Keyring {
            keys: secrets.iter().map(|s| HmacKey::new(s.as_bytes())).collect(),
            secrets,
            verified: VerifiedTokens::default(),
            seen_once: SeenOnce::default(),
        }
    }

    /// The secret new tokens are signed with (the first listed).
    ///
    /// # Panics
    /// If the keyring has no secret (the config never builds one).
    pub fn signing_secret(&self) -> &str {
        &self.secrets[0]
    }

    /// How many secrets are accepted.
    pub fn secret_count(&self) -> usize {
        self.secrets.len()
    }

    /// The secrets, for the config's own checks (weak or demo secrets, reload
    /// differences); never leaves the crate.
    pub(crate) fn secrets(&self) -> &[String] {
        &self.secrets
    }

    /// The position (0 = the signing secret) of the first secret whose HMAC-SHA256 of
    /// `signing_input` is `tag`, if any. Each comparison is constant time.
    pub fn matching_secret(&self, signing_input: &[u8], tag: &[u8]) -> Option<usize> {
        if tag.len() != 32 {
            return None;
        }
        self.keys
            .iter()
            .position(|key| key.verify(signing_input, tag))
    }

    /// How many verified tokens are kept. Settles the cache's pending bookkeeping
    /// first, so it is exact but not for a hot path.
    pub fn cached_tokens(&self) -> u64 {
        self.verified.0.run_pending_tasks();
        self.verified.0.entry_count()
    }

    #[cfg(test)]
    pub(crate) fn cached(&self, token: &str) -> Option<VerifiedToken> {
        self.cached_stamped(token).map(|entry| entry.verified)
    }

    /// The verified token and the revocation answer last stamped on it, if any.
    pub(crate) fn cached_stamped(&self, token: &str) -> Option<Entry> {
        self.verified.0.get(&TokenRef(token))
    }

    /// Keeps a token this keyring has just verified, with the revocation answer for its
    /// user when the gate has one, from the second time it is verified: a token
    /// verified once only costs its verification, not a cache insert (see
    /// [`SeenOnce`]). Returns whether it was kept.
    pub(crate) fn remember(
        &self,
        token: &str,
        verified: &VerifiedToken,
        stamp: Option<StampedCutoff>,
    ) -> bool {
        if !self.seen_once.seen_before(token) {
            return false;
        }
        self.insert(token, verified.clone(), stamp);
        true
    }

    /// Keeps `stamp` with a token this keyring verified, for its next requests. Off
    /// the hit path: once per token after each revocation change (or TTL). A token
    /// evicted meanwhile stays out (it was verified; it will be again).
    pub(crate) fn restamp(&self, token: &str, stamp: StampedCutoff) {
        if let Some(entry) = self.cached_stamped(token) {
            self.insert(token, entry.verified, Some(stamp));
        }
    }

    fn insert(&self, token: &str, verified: VerifiedToken, stamp: Option<StampedCutoff>) {
        self.verified
            .0
            .insert(TokenKey(Box::from(token)), Entry { verified, stamp });
    }
}

impl std::fmt::Debug for Keyring {
    // Secrets never reach logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field(
                "secrets",
                &format_args!("[{} redacted]", self.secrets.len()),
            )
            .finish_non_exhaustive()
    }
}

/// Which tokens a keyring verified once and did not keep, so that a token is kept
/// from its second verification on.
///
/// Why: many tokens are presented once only (each WebSocket handshake after a login,
/// a wave of new users, a client that gets a fresh token per connection), and
/// keeping one cost more than verifying it: moka's insert with its bookkeeping came
/// to about 2% of the proxy's CPU per upgrade handshake with a new token (`perf`,
/// issue 13), the HMAC and JSON of the verification 1.4%. A token a client uses
/// again (an SDK's every request and reconnection) is verified twice, then kept.
///
/// One hash per slot, overwritten on collision: lossy on purpose, since a lost mark
/// only costs one more verification. Only tokens that passed every check get here,
/// so a flood of invalid tokens cannot wash the marks of valid ones out.
struct SeenOnce {
    hasher: foldhash::fast::RandomState,
    slots: Box<[AtomicU64]>,
}

impl Default for SeenOnce {
    fn default() -> Self {
        SeenOnce {
            hasher: foldhash::fast::RandomState::default(),
            slots: (0..SEEN_ONCE_SLOTS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl SeenOnce {
    /// Whether `token` was marked since its slot last changed; marks it otherwise.
    fn seen_before(&self, token: &str) -> bool {
        use std::hash::BuildHasher as _;
        // Never 0, the empty slot's value.
        let mark = self.hasher.hash_one(token.as_bytes()) | 1;
        // The slot from the high bits, so that the mark's low bits still tell apart
        // tokens that share a slot.
        let slot = &self.slots[(mark >> 40) as usize % self.slots.len()];
        if slot.load(Ordering::Relaxed) == mark {
            return true;
        }
        slot.store(mark, Ordering::Relaxed);
        false
    }
}

/// Tokens that passed every check for one keyring. Every request of a client session
/// repeats the same token, so a hit skips the base64, JSON and HMAC work for a hash
/// and a comparison of the token. Only successes are kept, so invalid tokens cannot
/// fill it; times are checked on every hit.
struct VerifiedTokens(moka::sync::Cache<TokenKey, Entry, foldhash::fast::RandomState>);

/// What the cache keeps per token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) verified: VerifiedToken,
    /// The revocation cache's answer for the token's user, as of its stamp (users'
    /// tokens only, once a request has found both cutoffs cached).
    pub(crate) stamp: Option<StampedCutoff>,
}

impl Default for VerifiedTokens {
    fn default() -> Self {
        VerifiedTokens(
            moka::sync::Cache::builder()
                .max_capacity(VERIFIED_TOKENS_PER_APP)
                .initial_capacity(1024)
                .build_with_hasher(foldhash::fast::RandomState::default()),
        )
    }
}

/// A verified token as the cache keeps it. Equality never stops early: a lookup must
/// not tell, by its timing, how much of a presented token matches a valid one.
#[derive(Debug)]
struct TokenKey(Box<str>);

/// A presented token, for lookups; hashes exactly as [`TokenKey`] does.
struct TokenRef<'a>(&'a str);

impl std::hash::Hash for TokenKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write(self.0.as_bytes());
    }
}

impl std::hash::Hash for TokenRef<'_> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write(self.0.as_bytes());
    }
}

/// Compares without stopping at the first difference (so the time says nothing about
/// where they differ) but, unlike `subtle`'s byte-by-byte barrier, in a loop the compiler
/// can vectorise: a 200-byte token compares in nanoseconds.
fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |difference, (x, y)| difference | (x ^ y))
            == 0
}

impl PartialEq for TokenKey {
    fn eq(&self, other: &Self) -> bool {
        same_token(&self.0, &other.0)
    }
}

impl Eq for TokenKey {}

impl equivalent::Equivalent<TokenKey> for TokenRef<'_> {
    fn equivalent(&self, key: &TokenKey) -> bool {
        same_token(self.0, &key.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::{Claims, TokenKind};
    use std::hash::BuildHasher;

    #[test]
    fn a_borrowed_token_hashes_and_compares_as_its_key() {
        let state = foldhash::fast::RandomState::default();
        let key = TokenKey(Box::from("a.b.c"));
        assert_eq!(state.hash_one(&key), state.hash_one(TokenRef("a.b.c")));
        assert!(equivalent::Equivalent::equivalent(&TokenRef("a.b.c"), &key));
        assert!(!equivalent::Equivalent::equivalent(
            &TokenRef("a.b.d"),
            &key
        ));
        assert!(!equivalent::Equivalent::equivalent(
            &TokenRef("a.b.c."),
            &key
        ));
        assert!(!same_token("", "x") && same_token("", ""));
    }

    #[test]
    fn remembered_tokens_are_found_by_reference_and_counted() {
        let keyring = Keyring::new(vec!["s".into()]);
        let verified = VerifiedToken {
            kind: TokenKind::User,
            claims: Claims {
                user_id: Some("u".into()),
                ..Claims::default()
            },
        };
        assert_eq!(keyring.cached("t.o.k"), None);
        assert!(!keyring.remember("t.o.k", &verified, None));
        assert_eq!(keyring.cached("t.o.k"), None);
        assert!(keyring.remember("t.o.k", &verified, None));
        assert!(keyring.remember("t.o.k", &verified, None));
        assert_eq!(keyring.cached("t.o.k"), Some(verified));
        assert_eq!(keyring.cached_tokens(), 1);
    }

    #[test]
    fn rotation_names_the_matching_secret_and_debug_hides_them() {
        let keyring = Keyring::new(vec!["new".into(), "old".into()]);
        let tag: [u8; 32] = HmacKey::new(b"old")
            .0
            .chain_update(b"input")
            .finalize()
            .into_bytes()
            .into();
        assert_eq!(keyring.matching_secret(b"input", &tag), Some(1));
        assert_eq!(keyring.matching_secret(b"other", &tag), None);
        assert_eq!(keyring.matching_secret(b"input", &tag[..31]), None);
        assert_eq!(keyring.signing_secret(), "new");
        assert_eq!(keyring.secret_count(), 2);
        let shown = format!("{keyring:?}");
        assert!(
            shown.contains("2 redacted") && !shown.contains("old"),
            "{shown}"
        );
    }
}
