//! Live sessions through the proxy (contract §4): a proxied WebSocket must not outlive
//! its token. Once the token expires or a cutoff revokes it, the next bytes the
//! upstream sends are cut at a frame boundary and replaced by a close frame with code
//! 4000, so the SDK reconnects, gets the code-40 frame and refreshes its token; bytes
//! the client sends instead end the connection at once.
//!
//! This is the fallback for an [`super::EdgeProxy`] run in an embedder's own Pingora
//! service, where Pingora tunnels the upgrade: Pingora offers no hook to write to a
//! tunnel by itself, so the close rides on the next traffic in either direction. Under
//! [`super::head::HeadLimitedApp`] (what [`super::run`] uses) sessions are relayed by
//! [`super::relay`] instead, which closes them at once, idle or not.

use crate::gate::{Gate, Identity};
use crate::session::{LiveSession, SessionEnd};
use crate::ws::{FrameBoundaries, close_frame};
use bytes::{Bytes, BytesMut};
use std::sync::{Arc, OnceLock};

/// Watches one proxied WebSocket's token and applies the end to its traffic.
#[derive(Debug)]
pub struct LiveWatch {
    ended: Arc<OnceLock<SessionEnd>>,
    watcher: tokio::task::JoinHandle<()>,
    downstream: FrameBoundaries,
    close_sent: bool,
}

impl LiveWatch {
    /// Starts watching `identity`'s token; `None` for sessions nothing can end (server
    /// and anonymous identities: no user to revoke, no `exp`).
    pub fn start(gate: &Gate, identity: &Identity) -> Option<Self> {
        if identity.user_id.is_none() && identity.expires_at.is_none() {
            return None;
        }
        let ended = Arc::new(OnceLock::new());
        let session = LiveSession::new(gate.clone(), identity.clone());
        let watcher = tokio::spawn({
            let ended = ended.clone();
            async move {
                let _ = ended.set(session.ended().await);
            }
        });
        Some(LiveWatch {
            ended,
            watcher,
            downstream: FrameBoundaries::default(),
            close_sent: false,
        })
    }

    /// Why the session ended, once it has.
    pub fn ended(&self) -> Option<SessionEnd> {
        self.ended.get().copied()
    }

    /// Filters bytes going from the upstream to the client: passed through while the
    /// token holds; afterwards, the frame in progress is completed, the close frame
    /// follows, and nothing more goes through.
    pub fn filter_downstream(&mut self, body: &mut Option<Bytes>) {
        if self.close_sent {
            *body = None;
            return;
        }
        let Some(bytes) = body.as_ref() else { return };
        let Some(end) = self.ended() else {
            self.downstream.advance(bytes);
            return;
        };
        let Some(frame_end) = self.downstream.finish_frame(bytes) else {
            return;
        };
        let close = close_frame(end.close_code(), end.reason());
        let mut out = BytesMut::with_capacity(frame_end + close.len());
        out.extend_from_slice(&bytes[..frame_end]);
        out.extend_from_slice(&close);
        *body = Some(out.freeze());
        self.close_sent = true;
        tracing::info!(target: "chatgate::proxy", reason = end.reason(), "closing a live WebSocket with 4000");
    }
}

impl Drop for LiveWatch {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::text_frame;

    /// A watch whose end the test sets by hand.
    fn watch() -> LiveWatch {
        LiveWatch {
            ended: Arc::default(),
            watcher: tokio::spawn(async {}),
            downstream: FrameBoundaries::default(),
            close_sent: false,
        }
    }

    #[tokio::test]
    async fn the_close_follows_the_frame_in_progress_then_nothing_passes() {
        let mut watch = watch();
        let first = text_frame(b"first message");
        let second = text_frame(b"second");
        // the session ends while `first` is half sent
        let mut head = Some(first.slice(..4));
        watch.filter_downstream(&mut head);
        assert_eq!(head.as_deref(), Some(&first[..4]));
        watch.ended.set(SessionEnd::Revoked).unwrap();

        let mut rest = [&first[4..], &second[..]].concat();
        let mut body = Some(Bytes::from(rest.clone()));
        watch.filter_downstream(&mut body);
        rest.truncate(first.len() - 4);
        rest.extend_from_slice(&close_frame(4000, "token revoked"));
        assert_eq!(body.as_deref(), Some(&rest[..]));

        let mut later = Some(text_frame(b"after the close"));
        watch.filter_downstream(&mut later);
        assert_eq!(later, None);
    }

    #[tokio::test]
    async fn at_a_boundary_the_close_comes_first() {
        let mut watch = watch();
        watch.ended.set(SessionEnd::Expired).unwrap();
        let mut body = Some(text_frame(b"next"));
        watch.filter_downstream(&mut body);
        assert_eq!(
            body.as_deref(),
            Some(&close_frame(4000, "token expired")[..])
        );
    }
}
