//! axum extractors for the [`Identity`] that [`crate::ChatAuthLayer`] puts into the
//! request extensions.
//!
//! ```no_run
//! use axum::{Router, routing::{get, post}};
//! use chatgate::extract::{ServerIdentity, UserIdentity};
//! use chatgate::{ChatAuthLayer, Gate, Identity};
//!
//! async fn me(UserIdentity(me): UserIdentity) -> String {
//!     me.user_id().unwrap_or_default().to_owned()
//! }
//! async fn export(ServerIdentity(server): ServerIdentity) -> String {
//!     format!("export for app {}", server.app)
//! }
//! async fn anyone(identity: Option<Identity>) -> &'static str {
//!     if identity.is_some() { "signed in" } else { "public" }
//! }
//!
//! fn app(gate: Gate) -> Router {
//!     Router::new()
//!         .route("/me", get(me))
//!         .route("/export", post(export))
//!         .route("/healthz", get(anyone))
//!         .layer(ChatAuthLayer::new(gate))
//! }
//! ```
//!
//! When the layer is missing, extracting an [`Identity`] fails with a 500 that says so,
//! rather than treating the request as anonymous.

use crate::error::{AuthError, Rejection};
use crate::gate::{Identity, IdentityKind};
use crate::session::LiveSession;
use axum::extract::{FromRequestParts, OptionalFromRequestParts};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use http::request::Parts;
use std::convert::Infallible;

/// Why an identity extractor refused a request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdentityRejection {
    /// No [`Identity`] in the extensions: the layer is not in front of this route, or
    /// the path is public. A server bug, hence 500.
    Missing,
    /// The identity is of the wrong kind for this handler (code 17, 403).
    NotAllowed(AuthError),
}

/// The message of [`IdentityRejection::Missing`].
pub const MISSING_IDENTITY: &str = "Identity missing from request extensions: add chatgate's ChatAuthLayer in front of this route (Router::layer), and do not list its path as public";

impl std::fmt::Display for IdentityRejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IdentityRejection::Missing => f.write_str(MISSING_IDENTITY),
            IdentityRejection::NotAllowed(error) => error.fmt(f),
        }
    }
}

impl std::error::Error for IdentityRejection {}

impl IntoResponse for IdentityRejection {
    fn into_response(self) -> Response {
        match self {
            IdentityRejection::Missing => {
                tracing::error!(target: "chatgate::extract", "{MISSING_IDENTITY}");
                (StatusCode::INTERNAL_SERVER_ERROR, MISSING_IDENTITY).into_response()
            }
            IdentityRejection::NotAllowed(error) => {
                tracing::debug!(
                    target: "chatgate::extract",
                    code = error.code(),
                    reason = error.reason(),
                    "identity refused by extractor"
                );
                http::Response::from(Rejection::http(&error)).map(axum::body::Body::from)
            }
        }
    }
}

fn identity(parts: &Parts) -> Result<Identity, IdentityRejection> {
    parts
        .extensions
        .get::<Identity>()
        .cloned()
        .ok_or(IdentityRejection::Missing)
}

impl<S: Send + Sync> FromRequestParts<S> for Identity {
    type Rejection = IdentityRejection;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        identity(parts)
    }
}

/// `Option<Identity>`: `None` on public paths (and where the layer is absent).
impl<S: Send + Sync> OptionalFromRequestParts<S> for Identity {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Option<Self>, Infallible> {
        Ok(parts.extensions.get::<Identity>().cloned())
    }
}

/// `Option<LiveSession>`: present on the WebSocket upgrades the layer admitted.
impl<S: Send + Sync> OptionalFromRequestParts<S> for LiveSession {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Option<Self>, Infallible> {
        Ok(parts.extensions.get::<LiveSession>().cloned())
    }
}

/// An identity with a user: a user token or a developer token. Anything else is
/// refused with code 17 (403).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserIdentity(pub Identity);

/// A server token's identity. Anything else is refused with code 17 (403).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerIdentity(pub Identity);

impl UserIdentity {
    /// The user id (always present).
    pub fn user_id(&self) -> &str {
        self.0.user_id().unwrap_or_default()
    }
}

impl std::ops::Deref for UserIdentity {
    type Target = Identity;

    fn deref(&self) -> &Identity {
        &self.0
    }
}

impl std::ops::Deref for ServerIdentity {
    type Target = Identity;

    fn deref(&self) -> &Identity {
        &self.0
    }
}

impl<S: Send + Sync> FromRequestParts<S> for UserIdentity {
    type Rejection = IdentityRejection;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let identity = identity(parts)?;
        match (identity.kind, identity.user_id.is_some()) {
            (IdentityKind::User | IdentityKind::Developer, true) => Ok(UserIdentity(identity)),
            _ => Err(IdentityRejection::NotAllowed(AuthError::NotAllowed(
                "this endpoint needs a user token",
            ))),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for ServerIdentity {
    type Rejection = IdentityRejection;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let identity = identity(parts)?;
        if identity.kind == IdentityKind::Server {
            Ok(ServerIdentity(identity))
        } else {
            Err(IdentityRejection::NotAllowed(AuthError::NotAllowed(
                "this endpoint needs server-side auth: use a server token",
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts_with(identity: Option<Identity>) -> Parts {
        let mut parts = http::Request::new(()).into_parts().0;
        if let Some(identity) = identity {
            parts.extensions.insert(identity);
        }
        parts
    }

    fn identity_of(kind: IdentityKind, user: Option<&str>) -> Identity {
        match (kind, user) {
            (IdentityKind::User, Some(user)) => Identity::user("key", user),
            (IdentityKind::Developer, Some(user)) => Identity::developer("key", user),
            (IdentityKind::Server, None) => Identity::server("key"),
            (IdentityKind::Anonymous, None) => Identity::anonymous("key"),
            other => panic!("no such identity: {other:?}"),
        }
    }

    async fn status_of(rejection: IdentityRejection) -> (StatusCode, String) {
        let response = rejection.into_response();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn a_missing_layer_is_a_500_that_names_the_layer() {
        let mut parts = parts_with(None);
        let rejection = <Identity as FromRequestParts<()>>::from_request_parts(&mut parts, &())
            .await
            .unwrap_err();
        let (status, body) = status_of(rejection).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(body.contains("ChatAuthLayer"), "{body}");
    }

    #[tokio::test]
    async fn the_optional_form_is_none_without_the_layer() {
        let mut parts = parts_with(None);
        let found =
            <Identity as OptionalFromRequestParts<()>>::from_request_parts(&mut parts, &()).await;
        assert_eq!(found, Ok(None));
        let mut parts = parts_with(Some(identity_of(IdentityKind::User, Some("u"))));
        let found =
            <Identity as OptionalFromRequestParts<()>>::from_request_parts(&mut parts, &()).await;
        assert_eq!(found.unwrap().unwrap().user_id(), Some("u"));
    }

    #[tokio::test]
    async fn user_identity_takes_users_and_developers_only() {
        for (kind, user, accepted) in [
            (IdentityKind::User, Some("u"), true),
            (IdentityKind::Developer, Some("u"), true),
            (IdentityKind::Server, None, false),
            (IdentityKind::Anonymous, None, false),
        ] {
            let mut parts = parts_with(Some(identity_of(kind, user)));
            let result = UserIdentity::from_request_parts(&mut parts, &()).await;
            assert_eq!(result.is_ok(), accepted, "{kind:?}");
            if let Err(rejection) = result {
                let (status, body) = status_of(rejection).await;
                assert_eq!(status, StatusCode::FORBIDDEN);
                let body: serde_json::Value = serde_json::from_str(&body).unwrap();
                assert_eq!(body["code"], 17);
            }
        }
    }

    #[tokio::test]
    async fn server_identity_takes_server_tokens_only() {
        let mut parts = parts_with(Some(identity_of(IdentityKind::Server, None)));
        assert!(
            ServerIdentity::from_request_parts(&mut parts, &())
                .await
                .is_ok()
        );
        let mut parts = parts_with(Some(identity_of(IdentityKind::User, Some("u"))));
        let rejection = ServerIdentity::from_request_parts(&mut parts, &())
            .await
            .unwrap_err();
        assert_eq!(
            rejection,
            IdentityRejection::NotAllowed(AuthError::NotAllowed(
                "this endpoint needs server-side auth: use a server token"
            ))
        );
    }
}
