//! The official SDKs through the edge proxy: the Python SDK's server calls and
//! revocations, and the JS SDK's `connectUser` (valid token, expired token refreshed by
//! a tokenProvider, developer token, and a live session revoked under it). The SDKs come
//! from `.ci/run` (pip, npm).

#[path = "common/proxy_harness.rs"]
mod harness;
#[path = "common/sdk_js.rs"]
mod sdk_js;

use chatgate::TokenBuilder;
use chatgate::time::now_unix;
use harness::*;
use sdk_js::*;
use std::process::Command;
use std::time::Duration;

async fn echo_proxy() -> (TestUpstream, Proxy) {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let proxy = Proxy::start(ProxyOptions {
        upstreams: vec![upstream.address.to_string()],
        ..ProxyOptions::default()
    })
    .await;
    (upstream, proxy)
}

#[tokio::test]
async fn python_sdk_server_calls_and_revocations_work_through_the_proxy() {
    let (upstream, proxy) = echo_proxy().await;
    let now = now_unix();
    let old_u1 = TokenBuilder::user("u1").issued_at(now - 100).sign(SECRET);
    let old_u2 = TokenBuilder::user("u2").issued_at(now - 100).sign(SECRET);
    let script = format!(
        r#"
import datetime, json, requests, warnings
warnings.simplefilter("ignore")
from stream_chat import StreamChat
from stream_chat.base.exceptions import StreamAPIException
base = "{base}"
c = StreamChat(api_key="{KEY}", api_secret="{SECRET}", base_url=base)
out = {{}}
def user_call(token):
    r = requests.get(base + "/channels", params={{"api_key": "{KEY}"}},
                     headers={{"Authorization": token, "stream-auth-type": "jwt"}}, timeout=10)
    return [r.status_code, r.json().get("code")]
out["upsert"] = c.upsert_user({{"id": "u1", "name": "one"}}).status_code()
out["u1_before"] = user_call("{old_u1}")
now = datetime.datetime.now(datetime.timezone.utc)
out["revoke_user"] = c.revoke_user_token("u1", now).status_code()
out["u1_after"] = user_call("{old_u1}")
out["u2_before_app"] = user_call("{old_u2}")
out["revoke_app"] = c.revoke_tokens(now).status_code()
out["u2_after_app"] = user_call("{old_u2}")
out["unrevoke_app"] = c.revoke_tokens(None).status_code()
out["u2_after_undo"] = user_call("{old_u2}")
try:
    StreamChat(api_key="{KEY}", api_secret="wrong", base_url=base).upsert_user({{"id": "x"}})
    out["wrong_secret"] = None
except StreamAPIException as e:
    out["wrong_secret"] = [e.status_code, e.error_code]
print(json.dumps(out))
"#,
        base = proxy.url(""),
    );
    let mut command = Command::new("python3");
    command.arg("-c").arg(script);
    let out = run_script(command, "the Python SDK (pip install stream-chat)").await;
    assert_eq!(out["upsert"], 200, "{out}");
    assert_eq!(out["u1_before"], serde_json::json!([200, null]), "{out}");
    assert_eq!(out["revoke_user"], 200, "{out}");
    assert_eq!(out["u1_after"], serde_json::json!([401, 40]), "{out}");
    assert_eq!(
        out["u2_before_app"],
        serde_json::json!([200, null]),
        "{out}"
    );
    assert_eq!(out["revoke_app"], 200, "{out}");
    assert_eq!(out["u2_after_app"], serde_json::json!([401, 40]), "{out}");
    assert_eq!(out["unrevoke_app"], 200, "{out}");
    assert_eq!(
        out["u2_after_undo"],
        serde_json::json!([200, null]),
        "{out}"
    );
    assert_eq!(out["wrong_secret"], serde_json::json!([401, 43]), "{out}");
    // Both revocations reached the upstream with the SDK's own body.
    let patches: Vec<String> = upstream
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .map(|r| String::from_utf8(r.body).unwrap())
        .collect();
    assert_eq!(patches.len(), 3, "{patches:?}");
    assert!(patches[0].contains(r#""revoke_tokens_issued_before""#));
    assert!(patches[0].contains(r#""u1""#));
}

#[tokio::test]
async fn js_sdk_connect_user_works_through_the_proxy() {
    let (_upstream, proxy) = echo_proxy().await;
    let now = now_unix();
    let valid = user_token("alice");
    let expired = TokenBuilder::user("carol")
        .issued_at(now - 7200)
        .expires_at(now - 3600)
        .sign(SECRET);
    let fresh = TokenBuilder::user("carol")
        .expires_in(Duration::from_secs(3600))
        .sign(SECRET);
    let script = js_main(&format!(
        r#"
const base = '{base}';
async function connect(key, user, token) {{
  const client = new StreamChat(key, {{ baseURL: base, timeout: 5000 }});
  try {{
    const health = await client.connectUser({{ id: user }}, token);
    return {{ ok: true, me: health && health.me ? health.me.id : null, calls: 0, client }};
  }} catch (e) {{
    return {{ ok: false, error: String(e && e.message || e), client }};
  }}
}}
async function main(out) {{
  const a = await connect('{KEY}', 'alice', '{valid}');
  out.valid = {{ ok: a.ok, me: a.me, error: a.error }};
  await a.client.disconnectUser();

  const tokens = ['{expired}', '{fresh}'];
  let calls = 0;
  const b = await connect('{KEY}', 'carol', async () => tokens[Math.min(calls++, 1)]);
  out.refreshed = {{ ok: b.ok, me: b.me, calls, error: b.error }};
  await b.client.disconnectUser();

  const dev = new StreamChat('{DEV_KEY}', {{ baseURL: base, timeout: 5000 }});
  const d = await connect('{DEV_KEY}', 'bender', dev.devToken('bender'));
  out.developer = {{ ok: d.ok, me: d.me, error: d.error }};
  await d.client.disconnectUser();

  const n = await connect('{KEY}', 'bender', dev.devToken('bender'));
  out.developer_refused = {{ ok: n.ok, error: n.error }};
  await n.client.disconnectUser();
}}
"#,
        base = proxy.url(""),
    ));
    let out = run_script(js_command(script), "the JS SDK (npm install in tests/sdk)").await;
    assert_eq!(out["valid"]["ok"], true, "{out}");
    assert_eq!(out["valid"]["me"], "alice", "{out}");
    // The expired token got the code-40 frame, the SDK asked its provider again and
    // connected with the fresh token.
    assert_eq!(out["refreshed"]["ok"], true, "{out}");
    assert_eq!(out["refreshed"]["me"], "carol", "{out}");
    assert!(out["refreshed"]["calls"].as_i64().unwrap() >= 2, "{out}");
    assert_eq!(out["developer"]["ok"], true, "{out}");
    assert_eq!(out["developer"]["me"], "bender", "{out}");
    // On an app without disable_auth_checks the developer token is a bad signature.
    assert_eq!(out["developer_refused"]["ok"], false, "{out}");
    assert!(
        out["developer_refused"]["error"]
            .as_str()
            .unwrap()
            .contains("43"),
        "{out}"
    );
}

/// Contract §4, live: the JS SDK is connected and idle when its user's tokens are
/// revoked (by the JS server SDK's `revokeUserToken`, through the proxy). The proxy
/// closes the socket with 4000 within a second of the revocation's answer, without
/// waiting for traffic; the SDK reconnects on its own, gets the code-40 frame, asks its
/// tokenProvider for a new token and is connected again.
#[tokio::test]
async fn an_idle_js_sdk_session_is_closed_within_a_second_of_a_revocation_and_reconnects() {
    let (_upstream, proxy) = echo_proxy().await;
    // issued before the revocation the script makes
    let first = TokenBuilder::user("dana")
        .issued_at(now_unix() - 10)
        .sign(SECRET);
    let base = proxy.url("");
    let script = idle_session_script(
        KEY,
        SECRET,
        &base,
        &base,
        "dana",
        &format!("'{first}'"),
        "await sleep(300);
  await server.revokeUserToken('dana', new Date());
  markAt = Date.now();",
    );
    let out = run_script(js_command(script), JS_SDK).await;
    assert_eq!(out["connected"], true, "{out}");
    assert_eq!(out["first_socket_closed"], 1, "{out}");
    assert_eq!(out["close_code"], 4000, "{out}");
    assert_eq!(out["close_reason"], "token revoked", "{out}");
    // The contract's bound: at most 1 s after the revocation's 2xx.
    assert!(
        out["close_after_mark_ms"].as_i64().unwrap() <= 1000,
        "{out}"
    );
    assert!(out["provider_calls"].as_i64().unwrap() >= 2, "{out}");
    assert_eq!(out["reconnected"], true, "{out}");
}

/// Contract §4, live: an idle JS SDK session whose token's `exp` passes is closed with
/// 4000 `token expired` within a second of `exp + leeway`, and reconnects with a new
/// token from its provider.
#[tokio::test]
async fn an_idle_js_sdk_session_is_closed_within_a_second_of_its_expiry_and_reconnects() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let leeway = 1;
    let proxy = Proxy::start(ProxyOptions {
        upstreams: vec![upstream.address.to_string()],
        leeway_seconds: Some(leeway),
        ..ProxyOptions::default()
    })
    .await;
    let base = proxy.url("");
    // The first token expires 3 s after the script asks for it; the deadline is the
    // instant the gate starts refusing it.
    let first = "(() => { out.exp = Math.floor(Date.now() / 1000) + 3; \
                 return server.createToken('erin', out.exp, Math.floor(Date.now() / 1000) - 1); })()";
    let event = format!("markAt = (out.exp + {leeway}) * 1000;");
    let script = idle_session_script(KEY, SECRET, &base, &base, "erin", first, &event);
    let out = run_script(js_command(script), JS_SDK).await;
    assert_eq!(out["connected"], true, "{out}");
    assert_eq!(out["first_socket_closed"], 1, "{out}");
    assert_eq!(out["close_code"], 4000, "{out}");
    assert_eq!(out["close_reason"], "token expired", "{out}");
    assert!(
        out["close_after_mark_ms"].as_i64().unwrap() <= 1000,
        "closed later than 1 s after exp + leeway: {out}"
    );
    assert!(out["provider_calls"].as_i64().unwrap() >= 2, "{out}");
    assert_eq!(out["reconnected"], true, "{out}");
}
