//! `TCP_DEFER_ACCEPT` on the client listener (Linux): the kernel hands a connection to
//! the proxy only once its first bytes (the request head, or a TLS ClientHello) have
//! arrived, so accepting a connection and reading its request are one wake-up of the
//! proxy instead of two, with no read that finds nothing in between. nginx's
//! `deferred` and HAProxy's `defer-accept` bind options are the same setting.
//!
//! Measured (issue 13, `WS_INTERLEAVED=16`, the same binary with and without it in one
//! rotation): 0.87x the CPU per upgrade handshake. A connection that sends nothing is
//! accepted once the kernel's defer period ([`DEFER_SECONDS`]) has passed and the
//! client has acknowledged a repeated SYN-ACK; from then on it is treated as before.
//!
//! Pingora binds the listener itself and its `TcpSocketOptions` have no such option,
//! so [`DeferAccept`], a background service, finds the listening socket among the
//! process's descriptors once Pingora has bound it, and sets the option there. Linux
//! only (the module is not built elsewhere).

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::net::SocketAddr;
use std::time::Duration;

/// How long the kernel holds a connection that has sent nothing (rounded by it to
/// SYN-ACK retransmissions: one, after a second).
const DEFER_SECONDS: libc::c_int = 1;
/// How often, and how many times, [`DeferAccept`] looks for the listener before it
/// gives up (Pingora binds within milliseconds of starting; it retries a busy port for
/// longer, and then the proxy does not serve at all).
const LOOK_EVERY: Duration = Duration::from_millis(20);
const LOOKS: usize = 500;

/// Sets `TCP_DEFER_ACCEPT` on the listening socket of `address` once Pingora has
/// bound it (a background service: it ends when that is done, or after [`LOOKS`]).
pub(crate) struct DeferAccept {
    pub(crate) address: SocketAddr,
}

#[async_trait]
impl BackgroundService for DeferAccept {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        for _ in 0..LOOKS {
            match defer_accept_on(self.address) {
                Ok(0) => {}
                Ok(_) => {
                    tracing::debug!(target: "chatgate::proxy", address = %self.address, "TCP_DEFER_ACCEPT set on the listener");
                    return;
                }
                Err(error) => {
                    tracing::warn!(target: "chatgate::proxy", %error, "cannot set TCP_DEFER_ACCEPT on the listener; serving without it");
                    return;
                }
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                () = tokio::time::sleep(LOOK_EVERY) => {}
            }
        }
        tracing::warn!(target: "chatgate::proxy", address = %self.address, "listener not found; serving without TCP_DEFER_ACCEPT");
    }
}

/// Sets `TCP_DEFER_ACCEPT` on every listening TCP socket of this process bound to
/// `address`; returns how many it set it on.
pub(crate) fn defer_accept_on(address: SocketAddr) -> std::io::Result<usize> {
    let mut set = 0;
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let entry = entry?;
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<std::os::fd::RawFd>().ok())
        else {
            continue;
        };
        // Descriptors that are not sockets (or already closed) are skipped unasked.
        let is_socket = std::fs::read_link(entry.path()).is_ok_and(|target| {
            target
                .as_os_str()
                .as_encoded_bytes()
                .starts_with(b"socket:[")
        });
        if is_socket && listener_at(fd, address) {
            set_defer_accept(fd)?;
            set += 1;
        }
    }
    Ok(set)
}

/// Whether `fd` is a listening socket bound to `address`.
#[allow(unsafe_code)]
fn listener_at(fd: std::os::fd::RawFd, address: SocketAddr) -> bool {
    // SAFETY: `fd` was listed in /proc/self/fd just now and is only borrowed for these
    // two queries. Were it closed meanwhile (and its number reused), the queries would
    // fail or describe another descriptor, which the checks then reject; descriptors
    // are plain integers to the kernel, so no memory is at stake either way.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let socket = socket2::SockRef::from(&borrowed);
    socket.is_listener().unwrap_or(false)
        && socket.local_addr().ok().and_then(|local| local.as_socket()) == Some(address)
}

#[allow(unsafe_code)]
fn set_defer_accept(fd: std::os::fd::RawFd) -> std::io::Result<()> {
    let seconds: libc::c_int = DEFER_SECONDS;
    // SAFETY: the option value is a live `c_int` on the stack and its exact size is
    // passed; `fd` is a listening socket this process holds (see `listener_at`).
    let result = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            std::ptr::from_ref(&seconds).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    #[test]
    fn a_connection_is_accepted_once_its_first_bytes_arrive() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(defer_accept_on(address).unwrap(), 1);
        listener.set_nonblocking(true).unwrap();

        let mut silent = std::net::TcpStream::connect(address).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            listener.accept().unwrap_err().kind(),
            std::io::ErrorKind::WouldBlock,
            "a connection that has sent nothing is held by the kernel"
        );
        silent.write_all(b"GET / HTTP/1.1\r\n").unwrap();
        let accepted = (0..100).find_map(|_| {
            std::thread::sleep(Duration::from_millis(20));
            listener.accept().ok()
        });
        assert!(accepted.is_some(), "accepted once its first bytes arrived");

        // Only the listener at that address: another one accepts at once.
        let _unchanged = std::net::TcpStream::connect(other.local_addr().unwrap()).unwrap();
        other.set_nonblocking(true).unwrap();
        let accepted = (0..100).find_map(|_| {
            std::thread::sleep(Duration::from_millis(20));
            other.accept().ok()
        });
        assert!(accepted.is_some());
    }
}
