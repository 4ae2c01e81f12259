//! TLS for clients (`[server.tls]`): certificates that follow config reloads, and
//! HTTP/2 next to HTTP/1.1 by ALPN.
//!
//! - **Rotation without dropping connections.** The listener's OpenSSL acceptor holds
//!   no certificate of its own: Pingora suspends every handshake at the certificate
//!   step and calls [`CertificateFromConfig`], which hands OpenSSL the pair in the live
//!   config snapshot. A reload that swaps the snapshot (SIGHUP re-reads the files) is
//!   therefore a certificate rotation: the next handshake presents the new pair, and
//!   connections already open keep the keys they negotiated. A bad pair never reaches
//!   the callback: it fails the reload in `config` and the last good snapshot stays.
//!   Session tickets are issued by the acceptor, so a client resumes across a rotation.
//! - **ALPN.** `h2` is preferred, `http/1.1` allowed; a client offering no ALPN gets
//!   HTTP/1.1. HTTP/2 connections are served by Pingora's own HTTP/2 loop (see
//!   `head::HeadLimitedApp`), HTTP/1.1 ones keep the head limits of contract §6 rule 6.
//!   WebSockets stay on HTTP/1.1: the HTTP/2 server does not enable extended CONNECT
//!   (RFC 8441), so a WebSocket client negotiates `http/1.1` and upgrades as over TCP.
//! - **Contract §6 on HTTP/2** (the gate and the upstream must see the same request):
//!   the h2 crate refuses connection-specific headers (`connection`, `upgrade`,
//!   `keep-alive`, `transfer-encoding`, `te` other than `trailers`), so rule 2's
//!   `Connection:`-listed headers cannot arise; the gate reads `:path` as the target,
//!   which is what is forwarded (rule 3); Pingora's HTTP/2 server answers 400 (before
//!   any hook, so without the contract's JSON body) to a `Host` that differs from
//!   `:authority` or is repeated, since it forwards `:authority` as the upstream's
//!   `Host`; [`settle_h2_authority`] gives a request without `Host` its authority as
//!   one. The HTTP/2 header list is bounded by `[server] max_header_bytes` (read at
//!   start), as HTTP/1.1 heads are (rule 6).

use crate::reload::ConfigHandle;
use async_trait::async_trait;
use pingora::listeners::TlsAccept;
use pingora::listeners::tls::TlsSettings;
use pingora::protocols::tls::TlsRef;
use pingora::tls::ext;

/// Most concurrent HTTP/2 streams per client connection (Pingora's own default).
const MAX_CONCURRENT_STREAMS: u32 = 100;

/// Presents the certificate of the live config snapshot in every handshake.
struct CertificateFromConfig {
    config: ConfigHandle,
}

#[async_trait]
impl TlsAccept for CertificateFromConfig {
    async fn certificate_callback(&self, ssl: &mut TlsRef) {
        // The guard is dropped before any await (there is none): a reload may swap the
        // snapshot meanwhile, and this handshake finishes with the pair it took.
        let config = self.config.load();
        let Some(tls) = &config.server.tls else {
            // Only a snapshot stored in code can drop `[server.tls]` from a TLS
            // listener (a reload keeps it); the handshake then fails for lack of a
            // certificate, which is the honest answer.
            tracing::error!(target: "chatgate::proxy", "TLS handshake: the config has no [server.tls]");
            return;
        };
        let pair = tls.certified_key();
        let result = ext::ssl_use_certificate(ssl, &pair.leaf)
            .and_then(|()| ext::ssl_use_private_key(ssl, &pair.key))
            .and_then(|()| {
                pair.chain
                    .iter()
                    .try_for_each(|intermediate| ext::ssl_add_chain_cert(ssl, intermediate))
            });
        if let Err(error) = result {
            tracing::error!(target: "chatgate::proxy", %error, "TLS handshake: cannot use the configured certificate");
        }
    }
}

/// The listener's TLS settings: certificates from the live config, ALPN `h2` then
/// `http/1.1`, Mozilla's intermediate profile (TLS 1.2 and 1.3).
pub(crate) fn listener_settings(config: &ConfigHandle) -> pingora::Result<TlsSettings> {
    let mut settings = TlsSettings::with_callbacks(Box::new(CertificateFromConfig {
        config: config.clone(),
    }))?;
    settings.enable_h2();
    Ok(settings)
}

/// How long an HTTP/2 connection may stay without an open stream: Pingora's HTTP/1.1
/// keep-alive, so both protocols hold an idle client the same time, and a client that
/// never completes a request head (its stream does not exist until the head is whole)
/// is let go after it.
const H2_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Options for client connections: the HTTP/2 idle timeout.
pub(crate) fn server_options() -> pingora::apps::HttpServerOptions {
    let mut options = pingora::apps::HttpServerOptions::default();
    options.h2_idle_timeout = Some(H2_IDLE_TIMEOUT);
    options
}

/// HTTP/2 limits for client connections: the header list bounded like an HTTP/1.1
/// head (contract §6 rule 6), Pingora's default stream limit.
pub(crate) fn h2_options(
    max_header_bytes: usize,
) -> pingora::protocols::http::v2::server::H2Options {
    let mut options = pingora::protocols::http::v2::server::H2Options::default();
    options.max_header_list_size(u32::try_from(max_header_bytes).unwrap_or(u32::MAX));
    options.max_concurrent_streams(MAX_CONCURRENT_STREAMS);
    options
}

/// Contract §6 on HTTP/2: an HTTP/2 request without a `Host` header gets one from
/// its `:authority`, so that the gate, the access log and the upstream read the same
/// header, and the upstream keeps its `Host` when the gate rewrites the target to its
/// normal form (an origin-form target has no authority, and Pingora would then send an
/// empty `Host`). A `Host` that disagrees with `:authority`, or a repeated one, never
/// gets here: Pingora's HTTP/2 server answers it 400 before any hook (RFC 9113
/// §8.3.1). HTTP/1.1 requests are left as they are.
pub(crate) fn settle_h2_authority(
    header: &mut pingora::http::RequestHeader,
) -> pingora::Result<()> {
    if header.version != http::Version::HTTP_2 || header.headers.contains_key(http::header::HOST) {
        return Ok(());
    }
    match header.uri.authority().map(|a| a.as_str().to_owned()) {
        Some(authority) => header.insert_header(http::header::HOST, authority),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::http::RequestHeader;

    fn h2_request(authority: &str, hosts: &[&str]) -> RequestHeader {
        let mut header = RequestHeader::build("GET", b"/channels", None).unwrap();
        header.set_version(http::Version::HTTP_2);
        header.set_uri(
            format!("https://{authority}/channels")
                .parse::<http::Uri>()
                .unwrap(),
        );
        for host in hosts {
            header.append_header(http::header::HOST, *host).unwrap();
        }
        header
    }

    fn hosts(header: &RequestHeader) -> Vec<&[u8]> {
        header
            .headers
            .get_all(http::header::HOST)
            .iter()
            .map(|v| v.as_bytes())
            .collect()
    }

    #[test]
    fn an_h2_host_is_left_as_sent() {
        let mut header = h2_request("chat.example", &["chat.example"]);
        settle_h2_authority(&mut header).unwrap();
        assert_eq!(hosts(&header), [b"chat.example".as_slice()]);
    }

    #[test]
    fn an_h2_request_without_host_gets_its_authority_as_host() {
        let mut header = h2_request("chat.example:8443", &[]);
        settle_h2_authority(&mut header).unwrap();
        assert_eq!(hosts(&header), [b"chat.example:8443".as_slice()]);
    }

    #[test]
    fn http1_requests_are_left_to_the_http1_rules() {
        let mut header = RequestHeader::build("GET", b"/channels", None).unwrap();
        header.append_header(http::header::HOST, "a").unwrap();
        header.append_header(http::header::HOST, "b").unwrap();
        settle_h2_authority(&mut header).unwrap();
        assert_eq!(hosts(&header), [b"a".as_slice(), b"b"]);
    }
}
