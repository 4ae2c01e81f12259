//! Request normalisation (contract §6 rules 1, 3, 4 and 5): one step that runs before
//! any matching, so that every later rule, and the upstream, see one canonical request.
//!
//! An auth gate is only as good as the agreement between what it judged and what the
//! upstream acts on. The model is Envoy's `normalize_path` + `merge_slashes` + escaped
//! slash rejection, applied once, whose result is both judged and forwarded:
//!
//! - [`path`]: percent-decode unreserved characters (`%2e` → `.`, `%75` → `u`), merge
//!   repeated `/` and remove dot segments (RFC 3986 §5.2.4). Refuse what different
//!   servers read differently: an encoded `/` or `\` (`%2F`, `%5C`), a raw `\`, a control
//!   character (raw or encoded), a `%` not followed by two hex digits (so that `%%32%65`
//!   cannot become `%2e` after one decode), and a `;` (**Decision**: servlet containers
//!   cut path parameters, so `/static/..;/x` is `/x` to them).
//! - [`check_method`]: a standard method in another case (`patch`, `Get`) is refused
//!   (**Decision**): methods are case-sensitive, but some servers fold them, so `patch
//!   /users` could be a revocation to the upstream and not to the gate.
//! - [`check_repeated`]: the credential parameters and headers at most once each (Go's
//!   `Query().Get`, Node's `URLSearchParams.get` and Python's `parse_qs()[0]` take the
//!   first of several values; whichever the gate took, some upstream takes another). Names
//!   are percent-decoded first, and `;` counts as a separator too, as older Go and Python
//!   parsers treat it.
//! - [`user_id_is_text`]: a `user_id` with a control character or edge whitespace is
//!   malformed rather than a header the proxy cannot write (a 5xx) or an alias of
//!   another user.
//! - [`is_identity_header`], [`forged_identity_headers`]: the names an upstream may read
//!   as the gate's identity headers (case folded, `_` for `-`), which only the gate may
//!   send (rule 2); each adapter removes them its own way.
//!
//! Refusals are [`Unsafe`], whose messages are fixed text: nothing from the request (and
//! so no token) is echoed. The gate turns them into code 4 (400, or the WebSocket
//! rejection on an upgrade).

use http::{HeaderMap, HeaderName, Method, Uri, header};
use std::borrow::Cow;

/// Query parameters a request may carry at most once (rule 1).
pub const CREDENTIAL_PARAMETERS: [&str; 6] = [
    "api_key",
    "authorization",
    "json",
    "stream-auth-type",
    "user_id",
    "connection_id",
];

/// Headers a request may carry at most once (rule 1).
pub const CREDENTIAL_HEADERS: [&str; 2] = ["authorization", "stream-auth-type"];

/// The identity headers only the gate may send upstream (rule 2).
pub const IDENTITY_HEADERS: [&str; 2] = ["x-chatgate-user-id", "x-chatgate-auth"];

/// Why a request cannot be normalised. Every variant is answered with code 4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Unsafe {
    /// A credential query parameter appears more than once.
    #[error("query parameter {0} appears more than once: send each credential once")]
    RepeatedParameter(&'static str),
    /// A credential header appears more than once.
    #[error("header {0} appears more than once: send each credential once")]
    RepeatedHeader(&'static str),
    /// On `/connect`, the header and the query carry different tokens.
    #[error(
        "the Authorization header and the authorization query parameter carry different tokens"
    )]
    TokensDiffer,
    /// The path contains `%2F` or `%5C`.
    #[error("the path contains an encoded slash or backslash (%2F, %5C)")]
    EncodedSeparator,
    /// The path contains a raw `\`.
    #[error("the path contains a backslash")]
    Backslash,
    /// The path contains a control character, raw or percent-encoded.
    #[error("the path contains a control character")]
    ControlCharacter,
    /// A `%` in the path is not followed by two hex digits.
    #[error("the path contains an invalid percent-encoding")]
    BadEscape,
    /// The path contains a `;` (path parameters).
    #[error("the path contains a ';' (path parameters are not accepted)")]
    PathParameter,
    /// The request target is neither an absolute path nor `*`.
    #[error("the request target is not an absolute path")]
    NotAbsolute,
    /// A standard method spelled in another case.
    #[error("the method must be written in upper case")]
    MethodCase,
}

impl From<Unsafe> for crate::error::AuthError {
    fn from(why: Unsafe) -> Self {
        crate::error::AuthError::BadInput(why.to_string())
    }
}

/// The one normalisation step: refuses what §6 refuses and returns the path in normal
/// form, which is what the gate matches and what an adapter must forward
/// ([`target`] builds the request target from it).
pub fn request<'a>(
    method: &Method,
    uri: &'a Uri,
    headers: &HeaderMap,
) -> Result<Cow<'a, str>, Unsafe> {
    check_method(method)?;
    check_repeated(uri.query().unwrap_or(""), headers)?;
    path(uri.path())
}

/// The origin-form target to forward: the normal path and the query as it was sent.
pub fn target(normal_path: &str, query: Option<&str>) -> String {
    match query {
        Some(query) => format!("{normal_path}?{query}"),
        None => normal_path.to_owned(),
    }
}

/// `uri` with its path replaced by `normal_path`; scheme, authority (absolute-form)
/// and query are kept.
pub fn with_path(uri: &Uri, normal_path: &str) -> Uri {
    let mut parts = uri.clone().into_parts();
    // A normal path is a valid path (it only lost escapes of unreserved characters,
    // slashes and dot segments), so the rebuilt target always parses.
    parts.path_and_query = target(normal_path, uri.query()).parse().ok();
    Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
}

/// The standard methods (RFC 9110 §9 and PATCH), which [`check_method`] wants upper case.
const STANDARD_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// The normal form of a request path, borrowed when it already is normal (the common
/// case costs one scan and no allocation). `*` (for `OPTIONS *`) is left as it is.
pub fn path(raw: &str) -> Result<Cow<'_, str>, Unsafe> {
    if raw == "*" {
        return Ok(Cow::Borrowed(raw));
    }
    if !raw.starts_with('/') {
        return Err(Unsafe::NotAbsolute);
    }
    if is_plainly_normal(raw.as_bytes())? {
        return Ok(Cow::Borrowed(raw));
    }
    let decoded = decode_unreserved(raw)?;
    match remove_dot_segments(&decoded) {
        Some(normal) => Ok(Cow::Owned(normal)),
        None => Ok(decoded),
    }
}

/// The common case in one pass: `Ok(true)` when `path` (which starts with `/`) has no
/// escape, no empty segment but a trailing slash, and no dot segment. Refuses the raw
/// bytes [`decode_unreserved`] would refuse; escapes are left to it.
fn is_plainly_normal(path: &[u8]) -> Result<bool, Unsafe> {
    let mut plain = true;
    let mut segment_start = 1;
    for (i, &byte) in path.iter().enumerate().skip(1) {
        match byte {
            b'/' => {
                if matches!(&path[segment_start..i], b"" | b"." | b"..") {
                    plain = false;
                }
                segment_start = i + 1;
            }
            b'%' => plain = false,
            b'\\' => return Err(Unsafe::Backslash),
            b';' => return Err(Unsafe::PathParameter),
            b if is_control(b) => return Err(Unsafe::ControlCharacter),
            _ => {}
        }
    }
    Ok(plain && !matches!(&path[segment_start..], b"." | b".."))
}

/// Checks every byte and decodes the escapes of unreserved characters (RFC 3986 §2.3);
/// other escapes stay as they were sent.
fn decode_unreserved(raw: &str) -> Result<Cow<'_, str>, Unsafe> {
    let bytes = raw.as_bytes();
    let mut out: Option<Vec<u8>> = None;
    let mut i = 0;
    // Bounded by the length: each step moves at least one byte on.
    while i < bytes.len() {
        let byte = bytes[i];
        match byte {
            b'\\' => return Err(Unsafe::Backslash),
            b';' => return Err(Unsafe::PathParameter),
            b'%' => {
                let decoded = bytes
                    .get(i + 1..i + 3)
                    .and_then(|hex| std::str::from_utf8(hex).ok())
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                    .ok_or(Unsafe::BadEscape)?;
                match decoded {
                    b'/' | b'\\' => return Err(Unsafe::EncodedSeparator),
                    b if is_control(b) => return Err(Unsafe::ControlCharacter),
                    b if is_unreserved(b) => {
                        out.get_or_insert_with(|| bytes[..i].to_vec()).push(b);
                    }
                    _ => {
                        if let Some(out) = &mut out {
                            out.extend_from_slice(&bytes[i..i + 3]);
                        }
                    }
                }
                i += 3;
                continue;
            }
            b if is_control(b) => return Err(Unsafe::ControlCharacter),
            _ => {
                if let Some(out) = &mut out {
                    out.push(byte);
                }
            }
        }
        i += 1;
    }
    Ok(match out {
        // Only ASCII was replaced by ASCII, and only at ASCII positions.
        Some(out) => Cow::Owned(String::from_utf8(out).expect("UTF-8 in, UTF-8 out")),
        None => Cow::Borrowed(raw),
    })
}

fn is_control(byte: u8) -> bool {
    byte < 0x20 || byte == 0x7f
}

fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

/// Merges repeated `/` and removes `.` and `..` segments (never above the root); a path
/// whose last segment was `.` or `..` keeps its trailing `/`, as RFC 3986 §5.2.4 does.
/// `None` when `path` is already normal.
fn remove_dot_segments(path: &str) -> Option<String> {
    let segments = || path[1..].split('/');
    let count = segments().count();
    let normal = segments()
        .enumerate()
        .all(|(i, s)| !matches!(s, "." | "..") && (!s.is_empty() || i + 1 == count));
    if normal {
        return None;
    }
    let mut kept: Vec<&str> = Vec::with_capacity(count);
    let mut trailing_slash = false;
    for segment in segments() {
        trailing_slash = matches!(segment, "" | "." | "..");
        match segment {
            "" | "." => {}
            ".." => {
                kept.pop();
            }
            name => kept.push(name),
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in &kept {
        out.push('/');
        out.push_str(segment);
    }
    if trailing_slash || kept.is_empty() {
        out.push('/');
    }
    Some(out)
}

/// Refuses a standard method written in another case (`patch`, `Get`).
pub fn check_method(method: &Method) -> Result<(), Unsafe> {
    let name = method.as_str();
    let standard = STANDARD_METHODS
        .iter()
        .find(|standard| standard.eq_ignore_ascii_case(name));
    match standard {
        Some(standard) if *standard != name => Err(Unsafe::MethodCase),
        _ => Ok(()),
    }
}

/// Refuses a request carrying a credential parameter (names percent-decoded, `&` or `;`
/// separated) or a credential header more than once.
pub fn check_repeated(query: &str, headers: &HeaderMap) -> Result<(), Unsafe> {
    // Names built once: looking a header up by `&str` parses the name every time.
    static HEADERS: [HeaderName; 2] = [
        header::AUTHORIZATION,
        HeaderName::from_static(CREDENTIAL_HEADERS[1]),
    ];
    for (name, label) in HEADERS.iter().zip(CREDENTIAL_HEADERS) {
        let mut values = headers.get_all(name).iter();
        if values.next().is_some() && values.next().is_some() {
            return Err(Unsafe::RepeatedHeader(label));
        }
    }
    let mut seen = [false; CREDENTIAL_PARAMETERS.len()];
    // Split on bytes: `&` and `;` are ASCII, so every piece is still UTF-8.
    for pair in query.split(['&', ';']).filter(|p| !p.is_empty()) {
        let name = pair.split_once('=').map_or(pair, |(name, _)| name);
        let name = decode_component(name);
        if let Some(at) = CREDENTIAL_PARAMETERS.iter().position(|p| *p == name) {
            if seen[at] {
                return Err(Unsafe::RepeatedParameter(CREDENTIAL_PARAMETERS[at]));
            }
            seen[at] = true;
        }
    }
    Ok(())
}

/// A query component as `application/x-www-form-urlencoded` reads it: `+` is a space,
/// `%XX` a byte, invalid UTF-8 replaced. Shared with the gate's credential reader, so
/// the names judged for repetition are the names the gate reads.
pub(crate) fn decode_component(raw: &str) -> Cow<'_, str> {
    if !raw.bytes().any(|b| b == b'%' || b == b'+') {
        return Cow::Borrowed(raw);
    }
    let spaced = raw.replace('+', " ");
    Cow::Owned(
        percent_encoding::percent_decode_str(&spaced)
            .decode_utf8_lossy()
            .into_owned(),
    )
}

/// Whether a `user_id` is text: no control character (U+0000–U+001F, U+007F) and no
/// whitespace at either end.
pub fn user_id_is_text(id: &str) -> bool {
    !id.chars().any(|c| c.is_ascii_control())
        && !id.starts_with(char::is_whitespace)
        && !id.ends_with(char::is_whitespace)
}

/// The names in `headers` an upstream may read as the gate's identity headers, for the
/// adapter to remove with its own call (hyper's `HeaderMap::remove`, Pingora's
/// `remove_header`, which also drops its case map entry). Collected first: the common
/// request has none, so this does not allocate, and removing while iterating is not
/// possible.
pub fn forged_identity_headers(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .keys()
        .filter(|name| is_identity_header(name.as_str()))
        .cloned()
        .collect()
}

/// Whether an upstream may read `name` as one of the gate's identity headers: equal to
/// one case-insensitively, with `_` read as `-` (as CGI, PHP and many frameworks do).
pub fn is_identity_header(name: &str) -> bool {
    IDENTITY_HEADERS.iter().any(|identity| {
        identity.len() == name.len()
            && identity
                .bytes()
                .zip(name.bytes())
                .all(|(i, n)| i == n.to_ascii_lowercase() || (i == b'-' && n == b'_'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn normal_paths_are_borrowed_unchanged() {
        for normal in [
            "/",
            "/channels",
            "/users/",
            "/static/x.css",
            "/a/b/c",
            "/%3F",
            "*",
        ] {
            assert!(
                matches!(path(normal), Ok(Cow::Borrowed(p)) if p == normal),
                "{normal}"
            );
        }
    }

    #[test]
    fn dot_segments_and_repeated_slashes_are_resolved() {
        for (raw, normal) in [
            ("/static/../channels", "/channels"),
            ("/static/%2e%2e/channels", "/channels"),
            ("/static/%2E%2E/channels", "/channels"),
            ("/static/.%2e/channels", "/channels"),
            ("/static/./../channels", "/channels"),
            ("//static/../channels", "/channels"),
            ("/static//../../channels", "/channels"),
            ("/../../channels", "/channels"),
            ("//static///x", "/static/x"),
            ("/%73tatic/x", "/static/x"),
            ("/static/%7Euser", "/static/~user"),
            ("/users/.", "/users/"),
            ("/users/..", "/"),
            ("/x/..", "/"),
            ("/..", "/"),
            ("//", "/"),
            ("/users//", "/users/"),
            ("/app/%2e", "/app/"),
            ("/a/./b/../c/", "/a/c/"),
            ("/a%3Fb/./c", "/a%3Fb/c"),
            ("/%41%7a", "/Az"),
        ] {
            assert_eq!(path(raw).unwrap(), normal, "{raw}");
        }
    }

    #[test]
    fn what_servers_read_differently_is_refused() {
        for (raw, why) in [
            ("/static/..%2Fchannels", Unsafe::EncodedSeparator),
            ("/a%2fb", Unsafe::EncodedSeparator),
            ("/a%5Cb", Unsafe::EncodedSeparator),
            ("/a%5cb", Unsafe::EncodedSeparator),
            ("/a\\b", Unsafe::Backslash),
            ("/a%00", Unsafe::ControlCharacter),
            ("/a%1F", Unsafe::ControlCharacter),
            ("/a%7f", Unsafe::ControlCharacter),
            ("/a%0D%0Ab", Unsafe::ControlCharacter),
            ("/a\u{0}b", Unsafe::ControlCharacter),
            ("/a\tb", Unsafe::ControlCharacter),
            ("/a\u{7f}", Unsafe::ControlCharacter),
            ("/a%", Unsafe::BadEscape),
            ("/a%2", Unsafe::BadEscape),
            ("/a%zz", Unsafe::BadEscape),
            ("/static/%%32%65%%32%65/x", Unsafe::BadEscape),
            ("/static/..;/channels", Unsafe::PathParameter),
            ("/users;x=1", Unsafe::PathParameter),
            ("channels", Unsafe::NotAbsolute),
            ("", Unsafe::NotAbsolute),
        ] {
            assert_eq!(path(raw), Err(why), "{raw:?}");
        }
    }

    #[test]
    fn a_double_encoded_escape_stays_encoded() {
        // %25 is not unreserved: it stays, so the result still decodes to "%2e" once,
        // never to a dot segment.
        assert_eq!(
            path("/static/%252e%252e/x").unwrap(),
            "/static/%252e%252e/x"
        );
        assert_eq!(path("/static/%25%32%65/x").unwrap(), "/static/%252e/x");
    }

    proptest::proptest! {
        #[test]
        fn normalising_twice_changes_nothing(
            raw in proptest::string::string_regex("(/(\\.|\\.\\.|%2[eE]|%7[35]|a|b|%41|%25|~|)){1,8}").unwrap(),
        ) {
            let once = path(&raw).unwrap().into_owned();
            let twice = path(&once).unwrap();
            proptest::prop_assert_eq!(&*twice, once.as_str());
            proptest::prop_assert!(matches!(twice, Cow::Borrowed(_)));
            proptest::prop_assert!(once.starts_with('/'));
            // No dot segment and no empty segment but a trailing slash survives.
            let segments: Vec<&str> = once[1..].split('/').collect();
            for (i, segment) in segments.iter().enumerate() {
                proptest::prop_assert!(*segment != "." && *segment != "..");
                proptest::prop_assert!(!segment.is_empty() || i + 1 == segments.len());
            }
        }
    }

    #[test]
    fn standard_methods_must_be_upper_case() {
        for refused in [
            "patch", "Patch", "pAtCh", "get", "Post", "delete", "options",
        ] {
            let method = Method::from_bytes(refused.as_bytes()).unwrap();
            assert_eq!(check_method(&method), Err(Unsafe::MethodCase), "{refused}");
        }
        for allowed in ["PATCH", "GET", "PROPFIND", "purge", "X-Custom"] {
            let method = Method::from_bytes(allowed.as_bytes()).unwrap();
            assert_eq!(check_method(&method), Ok(()), "{allowed}");
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn a_credential_parameter_counts_once_whatever_its_spelling() {
        let none = HeaderMap::new();
        for query in [
            "api_key=a&api_key=b",
            "api_key=a&api_key=a",
            "api_key=a&%61pi_key=b",
            "api%5Fkey=a&api_key=b",
            "api%5fkey&api_key",
            "api_key=a;api_key=b",
            "x=1;api_key=b&api_key=a",
            "authorization=t&authorization=",
            "json=1&js%6Fn=2",
            "stream-auth-type=jwt&stream%2Dauth-type=jwt",
            "user_id=a&user%5Fid=b",
            "connection_id=a&%63onnection_id=a",
        ] {
            assert!(
                matches!(
                    check_repeated(query, &none),
                    Err(Unsafe::RepeatedParameter(_))
                ),
                "{query}"
            );
        }
        for query in [
            "",
            "api_key=a&authorization=t&json=j&stream-auth-type=jwt&user_id=u&connection_id=c",
            "api_key=a&API_KEY=b&apikey=c&api+key=d",
            "x=api_key&y=api_key",
        ] {
            assert_eq!(check_repeated(query, &none), Ok(()), "{query}");
        }
    }

    #[test]
    fn a_credential_header_counts_once_whatever_its_case() {
        for pairs in [
            &[("authorization", "a"), ("authorization", "a")][..],
            &[("Authorization", "a"), ("AUTHORIZATION", "b")],
            &[
                ("stream-auth-type", "jwt"),
                ("Stream-Auth-Type", "anonymous"),
            ],
        ] {
            assert!(matches!(
                check_repeated("", &headers(pairs)),
                Err(Unsafe::RepeatedHeader(_))
            ));
        }
        let once = headers(&[
            ("authorization", "a"),
            ("stream-auth-type", "jwt"),
            ("x", "1"),
        ]);
        assert_eq!(check_repeated("", &once), Ok(()));
    }

    #[test]
    fn user_ids_with_control_characters_or_edge_whitespace_are_not_text() {
        for bad in [
            "alice\u{0}",
            "\u{1}alice",
            "ali\nce",
            "alice\r",
            "a\u{1f}",
            "alice\u{7f}",
            " alice",
            "alice ",
            "\talice",
            "alice\t",
            " ",
            "alice\u{3000}",
        ] {
            assert!(!user_id_is_text(bad), "{bad:?}");
        }
        for good in ["alice", "alice smith", "josé", "a-b_c@d.e", "用户"] {
            assert!(user_id_is_text(good), "{good:?}");
        }
    }

    #[test]
    fn identity_headers_are_recognised_as_upstreams_read_them() {
        for name in [
            "x-chatgate-user-id",
            "X-ChatGate-User-Id",
            "x_chatgate_user_id",
            "X_CHATGATE_AUTH",
            "x-chatgate_auth",
        ] {
            assert!(is_identity_header(name), "{name}");
        }
        for name in [
            "x-chatgate-user",
            "x-chatgate-user-id2",
            "authorization",
            "x-chatgate",
        ] {
            assert!(!is_identity_header(name), "{name}");
        }
    }

    #[test]
    fn forged_identity_headers_lists_every_spelling_and_nothing_else() {
        let mut headers = HeaderMap::new();
        for name in [
            "x-chatgate-user-id",
            "x_chatgate_auth",
            "authorization",
            "x-chatgate",
        ] {
            headers.insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static("v"),
            );
        }
        let mut forged: Vec<String> = forged_identity_headers(&headers)
            .iter()
            .map(|name| name.as_str().to_owned())
            .collect();
        forged.sort();
        assert_eq!(forged, ["x-chatgate-user-id", "x_chatgate_auth"]);
        assert!(forged_identity_headers(&HeaderMap::new()).is_empty());
    }
}
