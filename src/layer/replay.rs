//! [`ReplayBody`]: a request body the layer can rebuild after reading it. The revocation
//! endpoints (contract §3) are applied by the gate before they are forwarded, so the
//! layer buffers their body and hands the inner service the same bytes; every other
//! body streams through untouched. A bare hyper service's `Incoming` cannot be rebuilt
//! from bytes, hence this wrapper.

use bytes::Bytes;
use pin_project_lite::pin_project;
use std::pin::Pin;
use std::task::{Context, Poll};

pin_project! {
    /// A request body the layer can rebuild: the original body streamed through, or the
    /// bytes it buffered for a revocation endpoint. Lets a bare hyper service use the
    /// layer: `ServiceBuilder::new().map_request(|r: Request<Incoming>| r.map(ReplayBody::new))`.
    pub struct ReplayBody<B> {
        #[pin]
        inner: Replay<B>,
    }
}

pin_project! {
    #[project = ReplayProj]
    enum Replay<B> {
        Streaming {
            #[pin]
            body: B,
        },
        Buffered {
            bytes: Option<Bytes>,
        },
    }
}

impl<B> ReplayBody<B> {
    /// Streams `body` through unchanged.
    pub fn new(body: B) -> Self {
        ReplayBody {
            inner: Replay::Streaming { body },
        }
    }
}

impl<B> From<Bytes> for ReplayBody<B> {
    fn from(bytes: Bytes) -> Self {
        ReplayBody {
            inner: Replay::Buffered {
                bytes: Some(bytes).filter(|b| !b.is_empty()),
            },
        }
    }
}

impl<B> http_body::Body for ReplayBody<B>
where
    B: http_body::Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        match self.project().inner.project() {
            ReplayProj::Streaming { body } => body.poll_frame(cx),
            ReplayProj::Buffered { bytes } => {
                Poll::Ready(bytes.take().map(|b| Ok(http_body::Frame::data(b))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Replay::Streaming { body } => body.is_end_stream(),
            Replay::Buffered { bytes } => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match &self.inner {
            Replay::Streaming { body } => body.size_hint(),
            Replay::Buffered { bytes } => {
                http_body::SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}

impl<B> std::fmt::Debug for ReplayBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Replay::Streaming { .. } => f.write_str("ReplayBody::Streaming"),
            Replay::Buffered { bytes } => f
                .debug_struct("ReplayBody::Buffered")
                .field("len", &bytes.as_ref().map_or(0, Bytes::len))
                .finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn a_replay_body_streams_the_original_or_yields_its_bytes_once() {
        use http_body::Body as _;
        let buffered: ReplayBody<http_body_util::Full<Bytes>> = Bytes::from_static(b"abc").into();
        assert_eq!(buffered.size_hint().exact(), Some(3));
        assert_eq!(&buffered.collect().await.unwrap().to_bytes()[..], b"abc");
        let empty: ReplayBody<http_body_util::Full<Bytes>> = Bytes::new().into();
        assert!(empty.is_end_stream());
        let streamed = ReplayBody::new(http_body_util::Full::new(Bytes::from_static(b"xyz")));
        assert_eq!(&streamed.collect().await.unwrap().to_bytes()[..], b"xyz");
    }
}
