//! The official SDKs through the edge proxy: the Python SDK's server calls and
//! revocations, and the JS SDK's `connectUser` (valid token, expired token refreshed by
//! a tokenProvider, developer token, and a live session revoked under it). The SDKs come
//! from `.ci/run` (pip, npm).

#[path = "common/proxy_harness.rs"]
mod harness;

use chatgate::TokenBuilder;
use chatgate::time::now_unix;
use harness::*;
use std::path::PathBuf;
use std::process::{Command, Output};
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

/// Runs an SDK script off the async runtime, at most 60 s, and parses its JSON output.
async fn run_script(mut command: Command, sdk: &str) -> serde_json::Value {
    let sdk = sdk.to_owned();
    let output: Output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || command.output()),
    )
    .await
    .expect("the SDK script finished within 60 s")
    .unwrap()
    .unwrap_or_else(|e| panic!("cannot run {sdk}: {e}"));
    assert!(
        output.status.success(),
        "{sdk} failed (install it: see .ci/run):\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or("");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{sdk} printed no JSON ({e}): {stdout}"))
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

/// A Node script around `body`, which defines `async function main(out)`: `main` fills
/// `out`, which is printed as the last line of JSON; any throw fails the script.
fn js_main(body: &str) -> String {
    format!(
        "const {{ StreamChat }} = require('stream-chat');\n{body}\n\
         const out = {{}};\n\
         main(out).then(() => {{ console.log(JSON.stringify(out)); process.exit(0); }}, \
         (e) => {{ console.error(e); process.exit(1); }});\n"
    )
}

fn js_command(script: String) -> Command {
    let mut command = Command::new("node");
    command
        .current_dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sdk"))
        .arg("-e")
        .arg(script);
    command
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

/// Contract §4, live: the JS SDK is connected when its user's tokens are revoked (by
/// the JS server SDK's `revokeUserToken`, through the proxy). The proxy ends the live
/// socket; the SDK reconnects on its own, gets the code-40 frame, asks its
/// tokenProvider for a new token and is connected again.
#[tokio::test]
async fn js_sdk_reconnects_with_a_fresh_token_after_a_live_revocation() {
    let (_upstream, proxy) = echo_proxy().await;
    // issued before the revocation the script makes
    let first = TokenBuilder::user("dana")
        .issued_at(now_unix() - 10)
        .sign(SECRET);
    let script = js_main(&format!(
        r#"
const base = '{base}';
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function main(out) {{
  const server = new StreamChat('{KEY}', '{SECRET}', {{ baseURL: base, timeout: 5000 }});
  const client = new StreamChat('{KEY}', {{ baseURL: base, timeout: 5000 }});
  let calls = 0;
  const provider = async () => {{
    calls += 1;
    if (calls === 1) return '{first}';
    // issued after the cutoff (which is rounded up to its second); within the leeway
    return server.createToken('dana', undefined, Math.floor(Date.now() / 1000) + 2);
  }};
  await client.connectUser({{ id: 'dana' }}, provider);
  out.connected = client.wsConnection.isHealthy;
  let closes = 0;
  const firstSocket = client.wsConnection.ws;
  firstSocket.on('close', (code) => {{ closes += 1; out.close_code = code; }});
  await server.revokeUserToken('dana', new Date());
  // The end of the session rides on the next traffic: the client's own (binary
  // frames, which the test upstream ignores). Bounded: 100 x 100 ms.
  await sleep(300);
  for (let i = 0; i < 100; i++) {{
    if (calls >= 2 && client.wsConnection.isHealthy && client.wsConnection.ws !== firstSocket) break;
    if (firstSocket.readyState === 1) firstSocket.send(Buffer.from([i]));
    await sleep(100);
  }}
  out.first_socket_closed = closes;
  out.provider_calls = calls;
  out.reconnected = client.wsConnection.isHealthy && client.wsConnection.ws !== firstSocket;
  await client.disconnectUser();
}}
"#,
        base = proxy.url(""),
    ));
    let out = run_script(js_command(script), "the JS SDK (npm install in tests/sdk)").await;
    assert_eq!(out["connected"], true, "{out}");
    assert_eq!(out["first_socket_closed"], 1, "{out}");
    assert_ne!(out["close_code"], 1000, "{out}");
    assert!(out["provider_calls"].as_i64().unwrap() >= 2, "{out}");
    assert_eq!(out["reconnected"], true, "{out}");
}
