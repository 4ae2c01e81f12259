//! A small chat API in Stream's shape, kept in memory, with no auth of its own: the
//! thing to put behind [`crate::ChatAuthLayer`] (the axum example) or behind the proxy
//! (`[upstream] demo = true`). Not a Stream replacement: enough of the protocol for the
//! official SDKs to connect, query a channel, send messages and revoke tokens.
//!
//! Who is calling comes from the [`Identity`] the layer inserts; behind the proxy there
//! is none, so it comes from the `x-chatgate-user-id` / `x-chatgate-auth` headers the
//! proxy forwards, or from the `/connect` `json` parameter's `user_id`. Those are
//! trusted as is: never expose this API without chatgate in front.
//!
//! | route | does |
//! |---|---|
//! | `GET`/`POST /channels` | lists channels |
//! | `POST /channels/{type}/{id}/query` | gets or creates a channel, joins the caller |
//! | `POST /channels/{type}/{id}/message` | adds a message, pushes `message.new` to sockets |
//! | `PATCH /users` | partial user update (`set` / `unset`), Stream's response shape |
//! | `PATCH /app` | accepts app settings (chatgate applies the revocation field) |
//! | `GET /connect` | WebSocket: `health.check` with `connection_id` and `me` first; closes with 4000 when the layer's [`LiveSession`](crate::session::LiveSession) ends |
//! | `GET /healthz` | `ok` |

mod socket;

use crate::gate::{Identity, IdentityKind};
use axum::extract::ws::Utf8Bytes;
use axum::extract::{FromRequestParts, Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use http::StatusCode;
use http::request::Parts;
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, watch};

/// Header the proxy uses to forward the verified user id.
pub const USER_ID_HEADER: &str = "x-chatgate-user-id";
/// Header the proxy uses to forward the identity kind (`user`, `server`, ...).
pub const AUTH_KIND_HEADER: &str = "x-chatgate-auth";

/// Most channels kept; creating more is refused.
const MAX_CHANNELS: usize = 10_000;
/// Messages kept per channel; older ones are dropped.
const MAX_MESSAGES_PER_CHANNEL: usize = 1_000;
/// Stream's limit on a message's text.
const MAX_TEXT_CHARS: usize = 5_000;
/// Most users kept.
const MAX_USERS: usize = 100_000;
/// A socket with no client frame for this long is closed (the JS SDK pings every 25 s).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The demo's data, shared by every request and socket. Cheap to clone.
#[derive(Clone)]
pub struct DemoState {
    inner: Arc<Inner>,
}

struct Inner {
    // A std Mutex: every critical section is a few map operations and none awaits.
    data: Mutex<Data>,
    events: broadcast::Sender<Utf8Bytes>,
    shutdown: watch::Sender<bool>,
    next_id: AtomicU64,
}

#[derive(Default)]
struct Data {
    channels: BTreeMap<String, Channel>,
    users: BTreeMap<String, Map<String, Value>>,
}

struct Channel {
    kind: String,
    id: String,
    created_by: String,
    created_at: String,
    custom: Map<String, Value>,
    members: Vec<String>,
    messages: VecDeque<Value>,
}

impl Default for DemoState {
    fn default() -> Self {
        DemoState {
            inner: Arc::new(Inner {
                data: Mutex::default(),
                events: broadcast::channel(1024).0,
                shutdown: watch::channel(false).0,
                next_id: AtomicU64::new(1),
            }),
        }
    }
}

impl DemoState {
    /// An empty chat.
    pub fn new() -> Self {
        Self::default()
    }

    /// Closes every open socket (with 1001, "going away").
    pub fn close_sockets(&self) {
        self.inner.shutdown.send_replace(true);
    }

    /// The number of stored messages in a channel (`type:id`), if it exists.
    pub fn message_count(&self, cid: &str) -> Option<usize> {
        let data = self.inner.data.lock().expect("demo state lock");
        data.channels.get(cid).map(|c| c.messages.len())
    }

    fn next_id(&self) -> u64 {
        self.inner.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// The demo API's routes.
pub fn router(state: DemoState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/channels", get(list_channels).post(list_channels))
        .route("/channels/{type}/{id}/query", post(query_channel))
        .route("/channels/{type}/{id}/message", post(send_message))
        .route("/users", patch(update_users))
        .route("/app", patch(update_app))
        .route("/connect", get(socket::connect))
        .with_state(state)
}

/// Serves the demo API on `listener` until `shutdown` resolves, then closes its sockets.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let state = DemoState::new();
    let result = axum::serve(listener, router(state.clone()))
        .with_graceful_shutdown(shutdown)
        .await;
    state.close_sockets();
    result
}

// === the caller ===

/// Who is calling, as far as the demo can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The user, if any.
    pub user_id: Option<String>,
    /// Whether a server token was used.
    pub server: bool,
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(caller(parts))
    }
}

fn caller(parts: &Parts) -> Caller {
    if let Some(identity) = parts.extensions.get::<Identity>() {
        return Caller {
            user_id: match identity.kind {
                IdentityKind::Anonymous => Some("!anon".to_owned()),
                _ => identity.user_id().map(str::to_owned),
            },
            server: identity.is_server(),
        };
    }
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
    };
    let from_query = || {
        let query = parts.uri.query()?;
        let (_, json) = form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == "json")?;
        let json: Value = serde_json::from_str(&json).ok()?;
        json.get("user_id")?.as_str().map(str::to_owned)
    };
    Caller {
        user_id: header(USER_ID_HEADER)
            .map(str::to_owned)
            .or_else(from_query),
        server: header(AUTH_KIND_HEADER) == Some("server"),
    }
}

// === responses ===

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A Stream-shaped API error.
fn api_error(code: i32, status: StatusCode, message: impl Into<String>) -> Response {
    let body = json!({
        "code": code,
        "message": message.into(),
        "StatusCode": status.as_u16(),
        "duration": "0.00ms",
        "more_info": crate::error::MORE_INFO_URL,
        "details": [],
    });
    (status, Json(body)).into_response()
}

fn with_duration(mut body: Value) -> Json<Value> {
    body["duration"] = json!("0.00ms");
    Json(body)
}

fn user_json(data: &Data, id: &str) -> Value {
    let mut user = data.users.get(id).cloned().unwrap_or_default();
    user.insert("id".into(), json!(id));
    user.entry("role").or_insert(json!("user"));
    user.entry("banned").or_insert(json!(false));
    user.entry("online").or_insert(json!(true));
    Value::Object(user)
}

fn channel_json(data: &Data, channel: &Channel, caller: Option<&str>) -> Value {
    let cid = format!("{}:{}", channel.kind, channel.id);
    let mut fields = channel.custom.clone();
    fields.extend([
        ("id".into(), json!(channel.id)),
        ("type".into(), json!(channel.kind)),
        ("cid".into(), json!(cid)),
        ("created_at".into(), json!(channel.created_at)),
        ("updated_at".into(), json!(channel.created_at)),
        ("created_by".into(), user_json(data, &channel.created_by)),
        ("member_count".into(), json!(channel.members.len())),
        ("frozen".into(), json!(false)),
        ("disabled".into(), json!(false)),
        (
            "config".into(),
            json!({"name": channel.kind, "typing_events": true, "read_events": true,
                   "connect_events": true, "reactions": true, "replies": true}),
        ),
        (
            "own_capabilities".into(),
            json!([
                "read-channel",
                "send-message",
                "send-reply",
                "update-own-message"
            ]),
        ),
    ]);
    if let Some(last) = channel.messages.back() {
        fields.insert("last_message_at".into(), last["created_at"].clone());
    }
    let members: Vec<Value> = channel
        .members
        .iter()
        .map(|m| json!({"user_id": m, "user": user_json(data, m), "role": "member"}))
        .collect();
    let membership = caller
        .filter(|c| channel.members.iter().any(|m| m == c))
        .map(|c| json!({"user_id": c, "user": user_json(data, c), "role": "member"}));
    json!({
        "channel": fields,
        "members": members,
        "membership": membership,
        "messages": channel.messages,
        "pinned_messages": [],
        "read": [],
        "watchers": [],
        "watcher_count": 0,
    })
}

// === handlers ===

async fn list_channels(State(state): State<DemoState>, caller: Caller) -> Json<Value> {
    let data = state.inner.data.lock().expect("demo state lock");
    let channels: Vec<Value> = data
        .channels
        .values()
        .map(|c| channel_json(&data, c, caller.user_id.as_deref()))
        .collect();
    with_duration(json!({ "channels": channels }))
}

async fn query_channel(
    State(state): State<DemoState>,
    Path((kind, id)): Path<(String, String)>,
    caller: Caller,
    body: Option<Json<Value>>,
) -> Response {
    let body = body.map(|Json(b)| b).unwrap_or_default();
    let cid = format!("{kind}:{id}");
    let mut data = state.inner.data.lock().expect("demo state lock");
    if !data.channels.contains_key(&cid) {
        if data.channels.len() >= MAX_CHANNELS {
            return api_error(4, StatusCode::BAD_REQUEST, "too many channels in the demo");
        }
        let Some(creator) = caller.user_id.clone().or_else(|| {
            body.pointer("/data/created_by_id")
                .and_then(Value::as_str)
                .map(str::to_owned)
        }) else {
            return api_error(
                4,
                StatusCode::BAD_REQUEST,
                "GetOrCreateChannel failed: either data.created_by or data.created_by_id must be provided when using server side auth",
            );
        };
        let mut custom = body
            .get("data")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        custom.remove("created_by_id");
        let members = custom
            .remove("members")
            .and_then(|m| serde_json::from_value::<Vec<String>>(m).ok())
            .unwrap_or_default();
        let mut channel = Channel {
            kind: kind.clone(),
            id: id.clone(),
            created_by: creator.clone(),
            created_at: now(),
            custom,
            members,
            messages: VecDeque::new(),
        };
        if !caller.server && !channel.members.contains(&creator) {
            channel.members.push(creator);
        }
        data.channels.insert(cid.clone(), channel);
    }
    let data = &mut *data;
    let channel = data.channels.get_mut(&cid).expect("inserted above");
    if let Some(user) = caller.user_id.as_ref().filter(|_| !caller.server)
        && !channel.members.contains(user)
    {
        channel.members.push(user.clone());
    }
    let channel = &data.channels[&cid];
    with_duration(channel_json(data, channel, caller.user_id.as_deref())).into_response()
}

async fn send_message(
    State(state): State<DemoState>,
    Path((kind, id)): Path<(String, String)>,
    caller: Caller,
    Json(body): Json<Value>,
) -> Response {
    let cid = format!("{kind}:{id}");
    let Some(message) = body.get("message").and_then(Value::as_object) else {
        return api_error(
            4,
            StatusCode::BAD_REQUEST,
            "SendMessage failed: message is required",
        );
    };
    let text = message.get("text").and_then(Value::as_str).unwrap_or("");
    if text.chars().count() > MAX_TEXT_CHARS {
        return api_error(
            4,
            StatusCode::BAD_REQUEST,
            format!("SendMessage failed: text is longer than {MAX_TEXT_CHARS} characters"),
        );
    }
    // Server tokens name the sender in the message, as with Stream.
    let sender = if caller.server {
        message
            .get("user_id")
            .or_else(|| message.get("user").and_then(|u| u.get("id")))
            .and_then(Value::as_str)
            .map(str::to_owned)
    } else {
        caller.user_id.clone()
    };
    let Some(sender) = sender else {
        return api_error(
            4,
            StatusCode::BAD_REQUEST,
            "SendMessage failed: either message.user or message.user_id must be provided when using server side auth",
        );
    };
    let message_id = message
        .get("id")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| format!("demo-{}", state.next_id()));
    let created_at = now();
    let (stored, event) = {
        let mut data = state.inner.data.lock().expect("demo state lock");
        let user = user_json(&data, &sender);
        let Some(channel) = data.channels.get_mut(&cid) else {
            return api_error(
                16,
                StatusCode::NOT_FOUND,
                format!("SendMessage failed with error: \"channel {cid} does not exist\""),
            );
        };
        let stored = json!({
            "id": message_id,
            "text": text,
            "type": "regular",
            "cid": cid,
            "user": user,
            "created_at": created_at,
            "updated_at": created_at,
            "attachments": [],
            "latest_reactions": [],
            "own_reactions": [],
            "reaction_counts": {},
            "mentioned_users": [],
        });
        if channel.messages.len() >= MAX_MESSAGES_PER_CHANNEL {
            channel.messages.pop_front();
        }
        channel.messages.push_back(stored.clone());
        let event = json!({
            "type": "message.new",
            "cid": cid,
            "channel_type": kind,
            "channel_id": id,
            "message": stored,
            "user": stored["user"],
            "created_at": created_at,
        });
        (stored, event)
    };
    // No subscribers is fine: nobody is connected.
    let _ = state.inner.events.send(Utf8Bytes::from(event.to_string()));
    with_duration(json!({ "message": stored })).into_response()
}

async fn update_users(State(state): State<DemoState>, Json(body): Json<Value>) -> Response {
    let Some(users) = body.get("users").and_then(Value::as_array) else {
        return api_error(
            4,
            StatusCode::BAD_REQUEST,
            "UpdateUsersPartial failed: users must be an array",
        );
    };
    let mut data = state.inner.data.lock().expect("demo state lock");
    let mut updated = Map::new();
    for user in users.iter().take(crate::revocation::MAX_USERS_PER_UPDATE) {
        let Some(id) = user.get("id").and_then(Value::as_str) else {
            continue;
        };
        if !data.users.contains_key(id) && data.users.len() >= MAX_USERS {
            return api_error(4, StatusCode::BAD_REQUEST, "too many users in the demo");
        }
        let now = now();
        let stored = data.users.entry(id.to_owned()).or_insert_with(|| {
            let mut fresh = Map::new();
            fresh.insert("created_at".into(), json!(now));
            fresh
        });
        if let Some(set) = user.get("set").and_then(Value::as_object) {
            for (field, value) in set {
                stored.insert(field.clone(), value.clone());
            }
        }
        if let Some(unset) = user.get("unset").and_then(Value::as_array) {
            for field in unset.iter().filter_map(Value::as_str) {
                stored.remove(field);
            }
        }
        stored.insert("updated_at".into(), json!(now));
        updated.insert(id.to_owned(), user_json(&data, id));
    }
    with_duration(json!({ "users": updated })).into_response()
}

async fn update_app(Json(_settings): Json<Value>) -> Json<Value> {
    with_duration(json!({}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn call(
        router: &Router,
        method: &str,
        uri: &str,
        user: Option<&str>,
        body: Value,
    ) -> (StatusCode, Value) {
        let mut request = http::Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/json");
        if let Some(user) = user {
            request = request.header(USER_ID_HEADER, user);
        }
        let request = request
            .body(axum::body::Body::from(body.to_string()))
            .unwrap();
        let response = router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// A `POST` as `user`.
    async fn post(router: &Router, uri: &str, user: &str, body: Value) -> (StatusCode, Value) {
        call(router, "POST", uri, Some(user), body).await
    }

    #[tokio::test]
    async fn querying_a_channel_creates_it_with_the_caller_as_member() {
        let router = router(DemoState::new());
        let (status, body) = post(
            &router,
            "/channels/messaging/general/query",
            "alice",
            json!({"data": {"name": "General"}}),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["channel"]["cid"], "messaging:general");
        assert_eq!(body["channel"]["name"], "General");
        assert_eq!(body["members"][0]["user_id"], "alice");
    }

    #[tokio::test]
    async fn a_sent_message_is_stored_with_its_sender() {
        let state = DemoState::new();
        let router = router(state.clone());
        post(&router, "/channels/messaging/c/query", "bob", json!({})).await;
        let (status, body) = post(
            &router,
            "/channels/messaging/c/message",
            "bob",
            json!({"message": {"text": "hi"}}),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["message"]["user"]["id"], "bob");
        assert_eq!(state.message_count("messaging:c"), Some(1));
    }

    #[tokio::test]
    async fn a_message_to_a_missing_channel_is_a_stream_404() {
        let router = router(DemoState::new());
        let (status, body) = post(
            &router,
            "/channels/messaging/nope/message",
            "bob",
            json!({"message": {"text": "hi"}}),
        )
        .await;
        assert_eq!(
            (status, body["code"].as_i64()),
            (StatusCode::NOT_FOUND, Some(16))
        );
    }

    #[tokio::test]
    async fn partial_user_updates_answer_like_stream() {
        let router = router(DemoState::new());
        let (status, body) = call(
            &router,
            "PATCH",
            "/users",
            None,
            json!({"users": [{"id": "u", "set": {"name": "U", "revoke_tokens_issued_before": null}}]}),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["users"]["u"]["name"], "U");
        assert!(body["duration"].is_string());
    }

    #[test]
    fn the_connect_json_names_the_user_behind_the_proxy() {
        let request = http::Request::get("/connect?json=%7B%22user_id%22%3A%22zoe%22%7D")
            .body(())
            .unwrap();
        let (parts, ()) = request.into_parts();
        assert_eq!(caller(&parts).user_id.as_deref(), Some("zoe"));
    }
}
