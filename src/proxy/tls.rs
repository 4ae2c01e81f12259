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
//!   which is what is forwarded (rule 3); and [`check_h2_authority`] refuses a `Host`
//!   that names another authority than `:authority`, since Pingora would forward the
//!   latter as `Host` whatever the gate was shown. The HTTP/2 header list is bounded by
//!   `[server] max_header_bytes` (read at start), as HTTP/1.1 heads are (rule 6).

use crate::error::AuthError;
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

/// Contract §6 on HTTP/2: a request whose `Host` header names another authority than
/// its `:authority` (or is repeated) is refused (400, code 4): Pingora forwards
/// `:authority` as the upstream's `Host`, so the two must not tell different stories.
/// A request without `Host` gets one from `:authority`, so the gate, the access log and
/// the upstream read the same header, and the upstream keeps its `Host` when the gate
/// rewrites the target to its normal form (an origin-form target has no authority).
/// HTTP/1.1 requests are left as they are.
pub(crate) fn settle_h2_authority(
    header: &mut pingora::http::RequestHeader,
) -> Result<(), AuthError> {
    if header.version != http::Version::HTTP_2 {
        return Ok(());
    }
    let authority = header.uri.authority().map(|a| a.as_str().to_owned());
    let mut hosts = header.headers.get_all(http::header::HOST).iter();
    match (hosts.next(), authority) {
        (None, Some(authority)) => header
            .insert_header(http::header::HOST, authority)
            .map_err(|_| AuthError::BadInput("invalid :authority".to_owned())),
        (None, None) => Ok(()),
        (Some(host), authority) => {
            let agrees = hosts.next().is_none()
                && authority.is_none_or(|a| host.as_bytes().eq_ignore_ascii_case(a.as_bytes()));
            if agrees {
                Ok(())
            } else {
                Err(AuthError::BadInput(
                    "Host and :authority name different hosts".to_owned(),
                ))
            }
        }
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
    fn an_h2_host_must_name_the_authority_once() {
        for (authority, sent) in [
            ("chat.example", &["chat.example"][..]),
            ("chat.example:443", &["CHAT.example:443"]),
        ] {
            let mut header = h2_request(authority, sent);
            assert!(settle_h2_authority(&mut header).is_ok(), "{sent:?}");
            assert_eq!(hosts(&header), [sent[0].as_bytes()]);
        }
        for sent in [&["other.example"][..], &["chat.example", "chat.example"]] {
            let mut header = h2_request("chat.example", sent);
            let refused = settle_h2_authority(&mut header).unwrap_err();
            assert_eq!(refused.code(), 4, "{sent:?}");
        }
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
        assert!(settle_h2_authority(&mut header).is_ok());
        assert_eq!(hosts(&header).len(), 2);
    }
}
