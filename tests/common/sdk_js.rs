//! Running the official JS SDK (tests/sdk, `npm ci`) from a test: a Node script whose
//! `main(out)` fills `out`, printed as the last line of JSON.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

/// Runs an SDK script off the async runtime, at most 60 s, and parses its JSON output.
pub async fn run_script(mut command: Command, sdk: &str) -> serde_json::Value {
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

/// A Node script around `body`, which defines `async function main(out)`: `main` fills
/// `out`, which is printed as the last line of JSON; any throw fails the script.
pub fn js_main(body: &str) -> String {
    format!(
        "const {{ StreamChat }} = require('stream-chat');\n{body}\n\
         const out = {{}};\n\
         main(out).then(() => {{ console.log(JSON.stringify(out)); process.exit(0); }}, \
         (e) => {{ console.error(e); process.exit(1); }});\n"
    )
}

/// `node -e script` in tests/sdk (where the SDK is installed).
pub fn js_command(script: String) -> Command {
    let mut command = Command::new("node");
    command
        .current_dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sdk"))
        .arg("-e")
        .arg(script);
    command
}

/// The JS SDK, for failure messages.
pub const JS_SDK: &str = "the JS SDK (npm install in tests/sdk)";

/// A script body connecting `user` idle through `base` with a tokenProvider whose
/// first token is `first` (JS expression) and whose later tokens are minted by the
/// server SDK when asked (`iat` one second on, so a cutoff made before the call,
/// rounded up to its second, does not cover them). `event` is JS run while the
/// session is idle (it sets `markAt = Date.now()` when the session should end);
/// the script then waits, bounded, for the SDK to reconnect on its own. `out`:
/// `connected`, `first_socket_closed` (close events of the first socket),
/// `close_code`, `close_reason`, `close_after_mark_ms`, `provider_calls`,
/// `reconnected`, plus whatever `event` records.
pub fn idle_session_script(
    key: &str,
    secret: &str,
    client_base: &str,
    server_base: &str,
    user: &str,
    first: &str,
    event: &str,
) -> String {
    js_main(&format!(
        r#"
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function main(out) {{
  const server = new StreamChat('{key}', '{secret}', {{ baseURL: '{server_base}', timeout: 5000 }});
  const client = new StreamChat('{key}', {{ baseURL: '{client_base}', timeout: 5000 }});
  let calls = 0;
  const provider = async () => {{
    calls += 1;
    if (calls === 1) return {first};
    return server.createToken('{user}', undefined, Math.floor(Date.now() / 1000) + 1);
  }};
  await client.connectUser({{ id: '{user}' }}, provider);
  out.connected = client.wsConnection.isHealthy;
  const firstSocket = client.wsConnection.ws;
  let closes = 0;
  let closedAt = null;
  firstSocket.on('close', (code, reason) => {{
    closes += 1;
    closedAt = Date.now();
    out.close_code = code;
    out.close_reason = String(reason);
  }});
  let markAt = null;
  {event}
  // Idle: nothing is sent. Bounded: 150 x 100 ms.
  for (let i = 0; i < 150; i++) {{
    if (calls >= 2 && client.wsConnection.isHealthy && client.wsConnection.ws !== firstSocket) break;
    await sleep(100);
  }}
  out.first_socket_closed = closes;
  out.close_after_mark_ms = closedAt === null || markAt === null ? null : closedAt - markAt;
  out.provider_calls = calls;
  out.reconnected = client.wsConnection.isHealthy && client.wsConnection.ws !== firstSocket;
  await client.disconnectUser();
}}
"#
    ))
}
