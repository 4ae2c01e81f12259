//! Hot reload end to end: real files in temp dirs, the real watcher, and the gate's
//! answers right after each swap.

mod common;

use chatgate::reload::{BackgroundTask, ConfigHandle, ConfigWatcher, ReloadOutcome};
use chatgate::revocation::MemoryStore;
use chatgate::{AuthError, Decision, Gate, TokenBuilder};
use common::check;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// A config with these apps, each `(api_key, secrets)`, and `extra` TOML before them.
fn config_text(extra: &str, apps: &[(&str, &[&str])]) -> String {
    let mut text = format!(
        "[server]\nlisten = \"127.0.0.1:8080\"\n\n[revocation]\nstore = \"memory\"\n\n{extra}\n"
    );
    for (api_key, secrets) in apps {
        let secrets: Vec<String> = secrets.iter().map(|s| format!("{s:?}")).collect();
        text.push_str(&format!(
            "[[apps]]\napi_key = \"{api_key}\"\nsecrets = [{}]\n\n",
            secrets.join(", ")
        ));
    }
    text
}

struct Fixture {
    // Held so the directory lives as long as the test.
    dir: tempfile::TempDir,
    path: PathBuf,
    config: ConfigHandle,
    gate: Gate,
    watcher: Option<BackgroundTask>,
}

impl Fixture {
    /// `config.toml` in a fresh temp dir, loaded, with a gate and a running watcher.
    fn new(text: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        Self::at(dir, path, true)
    }

    fn at(dir: tempfile::TempDir, path: PathBuf, watch: bool) -> Self {
        let config = ConfigHandle::from_file(&path).unwrap();
        let gate = common::gate_over(config.clone(), Arc::new(MemoryStore::new()));
        let watcher = watch.then(|| ConfigWatcher::new(config.clone()).unwrap().spawn());
        Fixture {
            dir,
            path,
            config,
            gate,
            watcher,
        }
    }

    async fn check(&self, api_key: &str, token: &str) -> Result<Decision, AuthError> {
        check(&self.gate, api_key, token).await
    }
}

fn allowed(result: Result<Decision, AuthError>) {
    assert!(matches!(result, Ok(Decision::Allow(_))), "{result:?}");
}

/// Polls `done` every 10 ms until it holds; fails saying what was not seen within `limit`.
async fn wait_for(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not seen within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

const ONE_SECOND: Duration = Duration::from_secs(1);
/// For outcomes without a latency requirement: generous, for a loaded CI machine.
const PATIENCE: Duration = Duration::from_secs(5);

fn secrets_of(config: &ConfigHandle, api_key: &str) -> Option<usize> {
    config.load().app(api_key).map(|app| app.secret_count())
}

/// Writes `text` beside `path` and renames it over, as editors and `kubectl cp` do.
fn rename_over(path: &Path, text: &str) {
    let temp = path.with_file_name(".config.toml.swp");
    std::fs::write(&temp, text).unwrap();
    std::fs::rename(&temp, path).unwrap();
}

#[tokio::test]
async fn a_valid_edit_is_applied_within_one_second() {
    let f = Fixture::new(&config_text("", &[("k", &["one"])]));
    let old_token = TokenBuilder::user("u").sign("one");
    let new_token = TokenBuilder::user("u").sign("two");
    assert_eq!(
        f.check("k", &new_token).await.unwrap_err(),
        AuthError::BadSignature
    );

    std::fs::write(&f.path, config_text("", &[("k", &["two", "one"])])).unwrap();
    wait_for(ONE_SECOND, "an in-place edit applied", || {
        secrets_of(&f.config, "k") == Some(2)
    })
    .await;
    allowed(f.check("k", &new_token).await);
    allowed(f.check("k", &old_token).await);
    let status = f.config.status();
    assert_eq!((status.version, status.reloads_ok), (2, 1));
    assert_eq!(status.last_error, None);
    f.watcher.unwrap().stop().await;
}

#[tokio::test]
async fn invalid_toml_invalid_values_and_a_truncated_file_keep_the_old_config() {
    let good = config_text("", &[("k", &["one"]), ("other", &["two"])]);
    let f = Fixture::new(&good);
    let token = TokenBuilder::user("u").sign("one");
    let running = f.config.load_full();
    let cut = good.find("\"two\"").unwrap() + 3;
    let bad = [
        // (file text, what the located error must name)
        (
            good.replace("[revocation]", "[revocation"),
            "config.toml:4:".to_owned(),
        ),
        (
            good.replace(
                "store = \"memory\"",
                "store = \"memory\"\ncache_ttl_seconds = -1",
            ),
            "revocation.cache_ttl_seconds".to_owned(),
        ),
        (
            good.replacen(
                "\n[[apps]]",
                "[auth]\nleeway_seconds = 100000\n\n[[apps]]",
                1,
            ),
            "auth.leeway_seconds: must be between 0 and 86400".to_owned(),
        ),
        (
            good.replace("api_key = \"other\"", "api_key = \"k\""),
            "apps[1].api_key: duplicate api_key".to_owned(),
        ),
        (good[..cut].to_owned(), "config.toml:14:".to_owned()),
    ];
    for (i, (text, expected)) in bad.iter().enumerate() {
        std::fs::write(&f.path, text).unwrap();
        wait_for(
            PATIENCE,
            &format!("failure {i} ({expected}) reported"),
            || {
                let status = f.config.status();
                status.reloads_failed > i as u64
                    && status
                        .last_error
                        .is_some_and(|e| e.message.contains(expected.as_str()))
            },
        )
        .await;
        let status = f.config.status();
        assert_eq!((status.version, status.reloads_ok), (1, 0));
        assert!(Arc::ptr_eq(&running, &f.config.load_full()));
        let message = status.last_error.unwrap().message;
        assert!(
            message.starts_with(&f.path.display().to_string()),
            "{message}"
        );
        allowed(f.check("k", &token).await);
    }
    // the fix is picked up and clears the error
    std::fs::write(&f.path, config_text("", &[("k", &["one", "three"])])).unwrap();
    wait_for(PATIENCE, "the fixed file applied", || {
        secrets_of(&f.config, "k") == Some(2)
    })
    .await;
    assert_eq!(f.config.status().last_error, None);
}

#[tokio::test]
async fn a_rename_over_the_file_is_picked_up() {
    let f = Fixture::new(&config_text("", &[("k", &["one"])]));
    rename_over(&f.path, &config_text("", &[("k", &["two", "one"])]));
    wait_for(ONE_SECOND, "a renamed-over file applied", || {
        secrets_of(&f.config, "k") == Some(2)
    })
    .await;
    // and again: the watch survived the inode change
    rename_over(
        &f.path,
        &config_text("", &[("k", &["three", "two", "one"])]),
    );
    wait_for(ONE_SECOND, "a second rename applied", || {
        secrets_of(&f.config, "k") == Some(3)
    })
    .await;
}

/// Kubernetes' atomic writer: `config.toml -> ..data/config.toml`,
/// `..data -> ..<timestamp>`, updated by writing a new timestamped dir and renaming a
/// new `..data_tmp` link over `..data`.
fn configmap_version(dir: &Path, version: &str, text: &str) {
    let data = dir.join(version);
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("config.toml"), text).unwrap();
    std::os::unix::fs::symlink(version, dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
}

#[tokio::test]
async fn a_configmap_symlink_swap_is_picked_up() {
    let dir = tempfile::tempdir().unwrap();
    configmap_version(
        dir.path(),
        "..2026_11_28_10_00_00.1",
        &config_text("", &[("k", &["one"])]),
    );
    let path = dir.path().join("config.toml");
    std::os::unix::fs::symlink("..data/config.toml", &path).unwrap();
    let f = Fixture::at(dir, path, true);
    assert_eq!(secrets_of(&f.config, "k"), Some(1));

    let root = f.dir.path();
    configmap_version(
        root,
        "..2026_11_28_10_05_00.2",
        &config_text("", &[("k", &["two", "one"])]),
    );
    std::fs::remove_dir_all(root.join("..2026_11_28_10_00_00.1")).unwrap();
    wait_for(ONE_SECOND, "a ConfigMap ..data flip applied", || {
        secrets_of(&f.config, "k") == Some(2)
    })
    .await;
    allowed(f.check("k", &TokenBuilder::user("u").sign("two")).await);
    assert_eq!(f.config.status().source, f.path);
}

#[tokio::test]
async fn a_deleted_file_keeps_the_running_config_and_a_recreated_one_is_picked_up() {
    let f = Fixture::new(&config_text("", &[("k", &["one"])]));
    let token = TokenBuilder::user("u").sign("one");
    std::fs::remove_file(&f.path).unwrap();
    wait_for(PATIENCE, "the missing file reported", || {
        f.config
            .status()
            .last_error
            .is_some_and(|e| e.message.contains("cannot read config"))
    })
    .await;
    assert_eq!(f.config.version(), 1);
    allowed(f.check("k", &token).await);

    std::fs::write(&f.path, config_text("", &[("k", &["two"])])).unwrap();
    wait_for(ONE_SECOND, "the re-created file applied", || {
        f.config
            .load()
            .app("k")
            .is_some_and(|a| a.signing_secret() == "two")
    })
    .await;
    assert_eq!(
        f.check("k", &token).await.unwrap_err(),
        AuthError::BadSignature
    );
    assert_eq!(f.config.status().last_error, None);
}

#[tokio::test]
async fn removing_an_app_or_a_secret_rejects_its_tokens_right_after_the_swap() {
    // reload() on demand (as tower users do), so "right after" is exact
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(
        &path,
        config_text("", &[("k", &["new", "old"]), ("gone", &["g"])]),
    )
    .unwrap();
    let f = Fixture::at(dir, path, false);
    let old = TokenBuilder::user("u").sign("old");
    let gone = TokenBuilder::server().sign("g");
    allowed(f.check("k", &old).await);
    allowed(f.check("gone", &gone).await);

    std::fs::write(&f.path, config_text("", &[("k", &["new"])])).unwrap();
    assert!(matches!(
        f.config.reload_async().await.unwrap(),
        ReloadOutcome::Applied { version: 2, .. }
    ));
    assert_eq!(
        f.check("k", &old).await.unwrap_err(),
        AuthError::BadSignature
    );
    assert_eq!(
        f.check("gone", &gone).await.unwrap_err(),
        AuthError::UnknownApiKey
    );
    allowed(f.check("k", &TokenBuilder::user("u").sign("new")).await);
}

#[tokio::test]
async fn restart_only_changes_are_reported_not_applied() {
    let f = Fixture::new(&config_text("", &[("k", &["one"])]));
    let text = config_text("", &[("k", &["two"])])
        .replace("127.0.0.1:8080", "0.0.0.0:9999")
        .replace("[server]\n", "[server]\nthreads = 4\n");
    std::fs::write(&f.path, text).unwrap();
    wait_for(ONE_SECOND, "the live part of the edit applied", || {
        f.config
            .load()
            .app("k")
            .is_some_and(|a| a.signing_secret() == "two")
    })
    .await;
    let running = f.config.load();
    assert_eq!(running.server.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(running.server.threads, 1);
    assert_eq!(
        f.config.status().restart_required,
        ["server.listen", "server.threads"]
    );
    assert_eq!(
        f.config.status().to_json()["restart_required"],
        serde_json::json!(["server.listen", "server.threads"])
    );
}

#[tokio::test]
async fn sighup_force_reloads_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config_text("", &[("k", &["one"])])).unwrap();
    let f = Fixture::at(dir, path, false);
    let reloader = chatgate::reload::spawn_sighup_reloader(f.config.clone()).unwrap();
    std::fs::write(&f.path, config_text("", &[("k", &["two", "one"])])).unwrap();
    let sent = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    wait_for(PATIENCE, "the SIGHUP reload applied", || {
        secrets_of(&f.config, "k") == Some(2)
    })
    .await;
    tokio::time::timeout(PATIENCE, reloader.stop())
        .await
        .expect("the SIGHUP task did not stop");
}

#[tokio::test]
async fn a_stopped_watcher_ends_and_a_handle_without_a_file_cannot_be_watched() {
    let f = Fixture::new(&config_text("", &[("k", &["one"])]));
    tokio::time::timeout(PATIENCE, f.watcher.unwrap().stop())
        .await
        .expect("the watcher did not stop");
    let in_code = ConfigHandle::new(chatgate::ConfigSnapshot::with_apps(vec![]));
    assert!(matches!(
        ConfigWatcher::new(in_code),
        Err(chatgate::reload::WatchError::NoFile)
    ));
}

#[tokio::test]
async fn a_slow_in_place_write_is_applied_whole_not_half_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(
        &path,
        config_text("", &[("k", &["one"]), ("other", &["o"])]),
    )
    .unwrap();
    let f = Fixture::at(dir, path, false);
    // A generous max delay so that only the writer's close, not the clock, ends the wait.
    let watcher = ConfigWatcher::new(f.config.clone())
        .unwrap()
        .with_max_delay(Duration::from_secs(10))
        .spawn();
    let full = config_text("", &[("k", &["one"]), ("other", &["o", "two"])]);
    // Cut between the apps: the first half alone is a valid config without `other`.
    let cut = full.find("[[apps]]\napi_key = \"other\"").unwrap();
    let writer_path = f.path.clone();
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut file = std::fs::File::create(&writer_path).unwrap();
        file.write_all(&full.as_bytes()[..cut]).unwrap();
        file.flush().unwrap();
        // longer than the quiet period: a debounce alone would load the half file
        std::thread::sleep(Duration::from_millis(400));
        file.write_all(&full.as_bytes()[cut..]).unwrap();
    })
    .await
    .unwrap();
    wait_for(PATIENCE, "the whole file applied", || {
        secrets_of(&f.config, "other") == Some(2)
    })
    .await;
    let status = f.config.status();
    assert_eq!(
        (status.version, status.reloads_ok, status.reloads_failed),
        (2, 1, 0),
        "the half-written file was loaded: {status:?}"
    );
    watcher.stop().await;
}

#[tokio::test]
async fn run_reloaders_follows_the_file_until_shut_down() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config_text("", &[("k", &["one"])])).unwrap();
    let f = Fixture::at(dir, path, false);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let service = tokio::spawn(chatgate::reload::run_reloaders(
        f.config.clone(),
        async move {
            let _ = stopped.await;
        },
    ));
    // the watch is set up inside the service: write until it is seen (bounded)
    let deadline = Instant::now() + PATIENCE;
    let mut n = 1;
    while secrets_of(&f.config, "k") == Some(1) {
        assert!(
            Instant::now() < deadline,
            "run_reloaders applied no edit within {PATIENCE:?}"
        );
        n += 1;
        let secrets: Vec<String> = (0..n).map(|i| format!("s{i}")).collect();
        let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
        std::fs::write(&f.path, config_text("", &[("k", &secrets)])).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.send(()).unwrap();
    tokio::time::timeout(PATIENCE, service)
        .await
        .expect("run_reloaders did not stop")
        .unwrap();
}
