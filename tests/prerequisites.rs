//! One failure that names everything the test suite needs and is missing, with the one
//! command that installs it (README.md, Prerequisites), instead of a scatter of
//! per-test spawn errors. The check itself is `scripts/install-prerequisites.sh
//! --check`, the same script `.ci/run` installs with, so the list cannot drift.

use std::process::Command;

#[test]
fn every_test_prerequisite_is_installed() {
    let root = env!("CARGO_MANIFEST_DIR");
    let output = Command::new("bash")
        .arg(format!("{root}/scripts/install-prerequisites.sh"))
        .arg("--check")
        .output()
        .expect("bash runs the prerequisites check");
    assert!(
        output.status.success(),
        "\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
