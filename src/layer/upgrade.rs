//! The hyper upgrade path of a refused WebSocket (contract §4): the layer answers the
//! [`Rejection`]'s 101 as its response, and this module writes the rest of the
//! rejection (the error frame and the close) on the connection hyper hands over. It
//! owns only the raw I/O; what is written comes whole from the rejection.

use crate::error::Rejection;
use bytes::Bytes;
use http::Response;
use std::pin::Pin;
use std::time::Duration;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long a refused WebSocket may take to receive its frames and close.
const WS_REJECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends a WebSocket rejection: returns its 101 for the layer to answer with, and
/// writes its frames on the connection once hyper has upgraded it.
pub(super) fn refuse(
    on_upgrade: hyper::upgrade::OnUpgrade,
    rejection: Rejection,
) -> Response<Bytes> {
    let (head, frames) = rejection.into_head();
    tokio::spawn(async move {
        match tokio::time::timeout(WS_REJECTION_TIMEOUT, send_and_close(on_upgrade, frames)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::debug!(target: "chatgate::layer", %error, "refused WebSocket went away")
            }
            Err(_) => tracing::debug!(target: "chatgate::layer", "refused WebSocket timed out"),
        }
    });
    head.map(|()| Bytes::new())
}

/// Writes the frames, half-closes, then drains what the client still sends (its close
/// frame) until it hangs up: closing with unread input would make the kernel reset the
/// connection, and a reset can destroy the frames before the client reads them.
async fn send_and_close(
    on_upgrade: hyper::upgrade::OnUpgrade,
    frames: Bytes,
) -> Result<(), BoxError> {
    use hyper::rt::{Read, Write};
    const MAX_DRAIN_BYTES: usize = 64 * 1024;

    let mut io = on_upgrade.await?;
    let mut written = 0;
    while written < frames.len() {
        let n =
            std::future::poll_fn(|cx| Pin::new(&mut io).poll_write(cx, &frames[written..])).await?;
        if n == 0 {
            return Err("connection closed while writing the rejection".into());
        }
        written += n;
    }
    std::future::poll_fn(|cx| Pin::new(&mut io).poll_flush(cx)).await?;
    std::future::poll_fn(|cx| Pin::new(&mut io).poll_shutdown(cx)).await?;
    let mut drained = 0;
    let mut storage = [0u8; 1024];
    while drained < MAX_DRAIN_BYTES {
        let mut buf = hyper::rt::ReadBuf::new(&mut storage);
        std::future::poll_fn(|cx| Pin::new(&mut io).poll_read(cx, buf.unfilled())).await?;
        let n = buf.filled().len();
        if n == 0 {
            break;
        }
        drained += n;
    }
    Ok(())
}
