//! The config file torn while the proxy runs: emptied, cut mid-value, cut before a
//! section it needs, and written in two steps with a pause between them.
//!
//! What must hold (README "Configuration"): a file that does not load leaves the running
//! config in place (requests keep their answers), `/config` names the file and the line
//! or key at fault, and the next good write is applied. A regression shows as an app
//! that stops answering after a torn write, an error that does not say where, or a good
//! write that is never picked up.

use super::harness::*;
use std::io::Write as _;
use std::time::Duration;

/// How long a reload may take to be seen (the watcher debounces, the debug build is slow).
const PATIENCE: Duration = Duration::from_secs(10);

/// Writes `text` over the file in place (truncate, then write), as an editor or a
/// careless deploy does: the watcher can see each step.
fn write_in_place(path: &std::path::Path, text: &str) {
    let mut file = std::fs::File::create(path).unwrap();
    file.write_all(text.as_bytes()).unwrap();
    file.sync_all().unwrap();
}

/// The 1-based line on which `text[..at]` ends.
fn line_at(text: &str, at: usize) -> usize {
    text[..at].matches('\n').count() + 1
}

fn status_number(status: &serde_json::Value, field: &str) -> u64 {
    status[field].as_u64().unwrap_or(0)
}

#[tokio::test]
async fn a_torn_config_file_keeps_the_last_good_config_and_the_next_good_write_applies() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let proxy = Proxy::start(ProxyOptions {
        upstreams: vec![upstream.address.to_string()],
        ..ProxyOptions::default()
    })
    .await;
    let client = reqwest::Client::new();
    let path = proxy.config_path().to_owned();
    let file = path.display().to_string();
    let good = proxy.config_text().to_owned();
    // The next good config: a second app.
    let next = format!("{good}[[apps]]\napi_key = \"{KEY_B}\"\nsecrets = [\"{SECRET_B}\"]\n");
    let b_token = chatgate::TokenBuilder::user("bob").sign(SECRET_B);
    let b_request = |client: &reqwest::Client| {
        client
            .get(proxy.url(&format!("/channels?api_key={KEY_B}")))
            .header("authorization", b_token.clone())
            .send()
    };
    let alice = user_token("alice");
    within(Duration::from_secs(90), async {
        let first = proxy
            .wait_config_status(PATIENCE, "the first status", |s| s["version"] == 1)
            .await;
        assert_eq!(status_number(&first, "reloads_failed"), 0, "{first}");

        let cut_mid_value = next.rfind(SECRET_B).unwrap() + 4;
        let cut_before_apps = good.find("[[apps]]").unwrap();
        let torn = [
            // (what, file text, what the error must name)
            ("zero-length", String::new(), "apps".to_owned()),
            (
                "cut mid-value",
                next[..cut_mid_value].to_owned(),
                format!("{file}:{}:", line_at(&next, cut_mid_value)),
            ),
            (
                "cut before [[apps]]",
                good[..cut_before_apps].to_owned(),
                "apps".to_owned(),
            ),
        ];
        for (failures, (what, text, names)) in torn.iter().enumerate() {
            write_in_place(&path, text);
            let status = proxy
                .wait_config_status(PATIENCE, &format!("{what}: the failure reported"), |s| {
                    status_number(s, "reloads_failed") > failures as u64
                })
                .await;
            let message = status["last_error"]["message"].as_str().unwrap_or_default();
            eprintln!("{what}: {message}");
            assert!(message.starts_with(&file), "{what}: {message}");
            assert!(
                message.contains(names.as_str()),
                "{what}: {message} should name {names}"
            );
            // Still the first config: its app answers, the torn file's app does not exist.
            assert_eq!(status["version"], 1, "{what}: {status}");
            assert_eq!(status["apps"], 2, "{what}: {status}");
            let (code, body) = get_channels(&client, &proxy, &alice).await;
            assert_eq!(code, 200, "{what}: {body}");
            assert_eq!(b_request(&client).await.unwrap().status(), 401, "{what}");
        }

        // A two-step write with a pause the watcher sees between the steps: the first
        // half is torn mid-value; the last good config serves all along.
        let failed_before = status_number(
            &proxy.wait_config_status(PATIENCE, "status", |_| true).await,
            "reloads_failed",
        );
        let writer_path = path.clone();
        let whole = next.clone();
        let writer = tokio::task::spawn_blocking(move || {
            let mut file = std::fs::File::create(&writer_path).unwrap();
            file.write_all(&whole.as_bytes()[..cut_mid_value]).unwrap();
            file.sync_all().unwrap();
            std::thread::sleep(Duration::from_millis(800));
            file.write_all(&whole.as_bytes()[cut_mid_value..]).unwrap();
            file.sync_all().unwrap();
        });
        // While the half sits in the file: the first config serves.
        for _ in 0..5 {
            assert_eq!(get_channels(&client, &proxy, &alice).await.0, 200);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        writer.await.unwrap();
        let applied = proxy
            .wait_config_status(PATIENCE, "the whole two-step write applied", |s| {
                s["apps"] == 3 && s["last_error"].is_null()
            })
            .await;
        eprintln!(
            "two-step write: {} failed reload(s) seen between the steps; now {applied}",
            status_number(&applied, "reloads_failed") - failed_before
        );
        assert_eq!(applied["version"], 2, "{applied}");
        let response = b_request(&client).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(get_channels(&client, &proxy, &alice).await.0, 200);
    })
    .await;
}
