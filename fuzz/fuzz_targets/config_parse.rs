//! Config parsing (`ConfigSnapshot::parse_with_env`): TOML text into validated
//! settings, as a start or a reload reads the file. The input is the file's text.
//!
//! Invariants:
//! - no panic, whatever the text;
//! - a refusal is `ConfigError::Invalid` naming this file, a line within the text, a
//!   column within that line and a key (at worst `(document)`), and its message reads
//!   `file:line:column: key: ...`;
//! - the same text parses the same way twice, and a config compared with its own
//!   re-parse shows no change and needs no restart.
//!
//! Secret files are read as the config says. The harness skips texts naming a device
//! or kernel file (`/dev/`, `/proc/`, `/sys/`), since `secret_file = "/dev/zero"` is the
//! operator's own hang, not the parser's.
#![no_main]

use chatgate::ConfigError;
use chatgate::config::ConfigSnapshot;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

const FILE: &str = "fuzz-config-dir/chatgate.toml";

/// `secret_env` names starting with `FUZZ_` are set, others are not.
fn env(name: &str) -> Option<String> {
    match name {
        "FUZZ_EMPTY" => Some(String::new()),
        _ if name.starts_with("FUZZ_") => Some(format!("fuzz-env-secret-for-{name}")),
        _ => None,
    }
}

fn parse(text: &str) -> Result<ConfigSnapshot, ConfigError> {
    ConfigSnapshot::parse_with_env(text, Path::new(FILE), &env)
}

fn check_error(text: &str, error: &ConfigError) {
    let ConfigError::Invalid {
        file,
        line,
        column,
        key,
        message,
    } = error
    else {
        panic!("parsing text gave {error:?}");
    };
    assert_eq!(file, Path::new(FILE));
    let lines: Vec<&str> = text.split('\n').collect();
    assert!(
        (1..=lines.len()).contains(line),
        "line {line} of {}",
        lines.len()
    );
    let width = lines[line - 1].chars().count();
    assert!(
        (1..=width + 1).contains(column),
        "column {column} of a {width}-character line"
    );
    assert!(!key.is_empty(), "an error without a key: {error}");
    assert!(!message.is_empty(), "an error without a message: {error}");
    let shown = error.to_string();
    assert!(
        shown.starts_with(&format!("{FILE}:{line}:{column}: {key}: ")),
        "{shown}"
    );
    assert_eq!(error.key(), Some(key.as_str()));
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if ["/dev/", "/proc/", "/sys/"]
        .iter()
        .any(|p| text.contains(p))
    {
        return;
    }
    let first = parse(text);
    let second = parse(text);
    match (&first, &second) {
        (Err(error), Err(again)) => {
            assert_eq!(error, again, "two parses of one text disagree");
            check_error(text, error);
        }
        (Ok(config), Ok(again)) => {
            assert_eq!(config.content_hash, again.content_hash);
            assert!(
                config.changes_to(again).is_empty(),
                "{:?}",
                config.changes_to(again)
            );
            assert!(config.restart_required_changes(again).is_empty());
            let _ = config.warnings();
            for app in config.apps() {
                assert!(!app.api_key.is_empty(), "an app without an api_key");
                assert!(app.secret_count() > 0, "an app without a secret");
                assert!(!app.signing_secret().is_empty());
                assert!(config.app(&app.api_key).is_some());
            }
        }
        _ => panic!("two parses of one text disagree: {first:?} / {second:?}"),
    }
});
