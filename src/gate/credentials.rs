//! What a request presents (contract §1-§3): the `api_key`, the token (header, or the
//! query on a WebSocket upgrade, where browsers cannot set headers), the auth type and
//! the connect payload. Read here, in one place, so that the decision in the parent
//! module sees values and not the transport's encodings; the gate asks for each only
//! when its rule comes up, so the order of refusals is the decision's, not this
//! reader's.

use super::{AUTH_TYPE_HEADER, RequestParts};
use crate::error::{AuthError, Malformed};
use crate::normalize::decode_component;
use http::{HeaderMap, HeaderName, header};
use std::borrow::Cow;

/// A request's credentials, read lazily: the query is split once, nothing is checked.
pub(super) struct Credentials<'a> {
    headers: &'a HeaderMap,
    query: Query<'a>,
    websocket: bool,
}

impl<'a> Credentials<'a> {
    /// Splits the query; headers are read when asked for.
    pub(super) fn read(request: RequestParts<'a>) -> Self {
        Credentials {
            headers: request.headers,
            query: parse_query(request.uri.query().unwrap_or("")),
            websocket: request.is_websocket_upgrade(),
        }
    }

    /// The `api_key` query parameter.
    pub(super) fn api_key(&self) -> Option<&str> {
        self.query.api_key.as_deref()
    }

    /// The token without its `Bearer` scheme, if one is presented and not empty. On a
    /// WebSocket upgrade a header token and a query token must be the same one
    /// (contract §6 rule 1: the upstream may read either).
    pub(super) fn token(&self) -> Result<Option<&str>, AuthError> {
        let query_token = self
            .query
            .authorization
            .as_deref()
            .map(strip_bearer)
            .filter(|t| !t.is_empty());
        // Swift sends headers on the upgrade too, so headers win when both are present.
        let token = match header_str(self.headers, header::AUTHORIZATION, Malformed::Base64)? {
            Some(t) => Some(strip_bearer(t)),
            None if self.websocket => query_token,
            None => None,
        }
        .filter(|t| !t.is_empty());
        if let (true, Some(header), Some(query)) = (self.websocket, token, query_token)
            && header != query
        {
            return Err(crate::normalize::Unsafe::TokensDiffer.into());
        }
        Ok(token)
    }

    /// Whether the caller asks to be anonymous (`stream-auth-type`; absent means jwt).
    pub(super) fn is_anonymous(&self) -> Result<bool, AuthError> {
        // A name built once: looking a header up by `&str` parses the name on every
        // request (`HdrName::from_bytes`, 1.4% of the layer bench's profile).
        static AUTH_TYPE: HeaderName = HeaderName::from_static(AUTH_TYPE_HEADER);
        let auth_type =
            header_str(self.headers, &AUTH_TYPE, Malformed::AuthType)?.or(if self.websocket {
                self.query.auth_type.as_deref()
            } else {
                None
            });
        match auth_type.map(str::trim) {
            None => Ok(false),
            Some(t) if t.eq_ignore_ascii_case("jwt") => Ok(false),
            Some(t) if t.eq_ignore_ascii_case("anonymous") => Ok(true),
            Some(_) => Err(AuthError::Malformed(Malformed::AuthType)),
        }
    }

    /// On a WebSocket upgrade, the connect payload (`json`) may only name `user`.
    pub(super) fn check_connect_user(&self, user: &str) -> Result<(), AuthError> {
        match (self.websocket, self.query.json.as_deref()) {
            (true, Some(json)) => check_connect_user(json, user),
            _ => Ok(()),
        }
    }
}

/// The query parameters the gate reads, borrowed unless percent-encoded.
#[derive(Default)]
struct Query<'a> {
    api_key: Option<Cow<'a, str>>,
    authorization: Option<Cow<'a, str>>,
    auth_type: Option<Cow<'a, str>>,
    json: Option<Cow<'a, str>>,
}

/// Reads the four parameters the gate needs, as `application/x-www-form-urlencoded`
/// does (`form_urlencoded::parse` is the reference in the tests), but decodes only the
/// components it keeps, and only those with something to decode: the common query
/// costs no allocation and no UTF-8 repair pass.
fn parse_query(query: &str) -> Query<'_> {
    let mut found = Query::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match &*decode_component(name) {
            "api_key" => &mut found.api_key,
            "authorization" => &mut found.authorization,
            "stream-auth-type" => &mut found.auth_type,
            "json" => &mut found.json,
            _ => continue,
        };
        *slot = Some(decode_component(value));
    }
    found
}

/// A credential header as text. `from_utf8` rather than `HeaderValue::to_str`, whose
/// byte-by-byte check of a 200-byte token showed in the profile; a non-ASCII value still
/// fails later, as malformed, because no token or keyword contains one. A present value
/// that is not UTF-8 is refused, never read as absent (contract §6 rule 1: the upstream
/// would still receive it).
fn header_str(
    headers: &HeaderMap,
    name: impl header::AsHeaderName,
    not_text: Malformed,
) -> Result<Option<&str>, AuthError> {
    match headers.get(name) {
        None => Ok(None),
        Some(value) => std::str::from_utf8(value.as_bytes())
            .map(Some)
            .map_err(|_| AuthError::Malformed(not_text)),
    }
}

fn strip_bearer(token: &str) -> &str {
    let token = token.trim();
    match token.get(..6) {
        Some(scheme)
            if scheme.eq_ignore_ascii_case("bearer")
                && token[6..].starts_with(|c: char| c.is_ascii_whitespace()) =>
        {
            token[6..].trim_start()
        }
        Some(scheme) if scheme.eq_ignore_ascii_case("bearer") && token.len() == 6 => "",
        _ => token,
    }
}

/// `/connect?json={"user_id":..,"user_details":{"id":..}}` must name the token's user.
fn check_connect_user(json: &str, token_user: &str) -> Result<(), AuthError> {
    #[derive(serde::Deserialize)]
    struct Connect<'a> {
        #[serde(borrow, default)]
        user_id: Option<Cow<'a, str>>,
        #[serde(borrow, default)]
        user_details: Option<Details<'a>>,
    }
    #[derive(serde::Deserialize)]
    struct Details<'a> {
        #[serde(borrow, default)]
        id: Option<Cow<'a, str>>,
    }
    let connect: Connect<'_> = serde_json::from_str(json).map_err(|_| {
        AuthError::BadInput("the json query parameter is not a valid connect payload".into())
    })?;
    let claimed = [connect.user_id, connect.user_details.and_then(|d| d.id)];
    if claimed
        .iter()
        .flatten()
        .any(|claimed| claimed.as_ref() != token_user)
    {
        return Err(AuthError::NotAllowed(
            "the user_id in the connect payload does not match the token's user_id",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn the_query_reads_as_form_urlencoded_does(
            query in proptest::string::string_regex(
                "((api_key|authorization|stream-auth-type|json|api%5Fkey|x|)(=[a-zA-Z0-9%+=._\\-]{0,12})?&?){0,6}"
            ).unwrap(),
        ) {
            let ours = parse_query(&query);
            let mut reference: [Option<String>; 4] = Default::default();
            for (name, value) in form_urlencoded::parse(query.as_bytes()) {
                let at = match &*name {
                    "api_key" => 0,
                    "authorization" => 1,
                    "stream-auth-type" => 2,
                    "json" => 3,
                    _ => continue,
                };
                reference[at] = Some(value.into_owned());
            }
            let ours = [ours.api_key, ours.authorization, ours.auth_type, ours.json]
                .map(|v| v.map(Cow::into_owned));
            proptest::prop_assert_eq!(ours, reference);
        }
    }
}
