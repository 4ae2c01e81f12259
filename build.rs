//! Checks the system tools the `proxy` feature's dependencies build with, before they
//! fail with pages of CMake or pkg-config output.
//!
//! Pingora compresses with zlib-ng (`libz-ng-sys`, built by CMake) and links OpenSSL
//! (`openssl-sys`, found by pkg-config). On a fresh Debian/Ubuntu with only Rust and
//! git none of the three is there, and the first error a user sees is a wall of build
//! output from a crate they never heard of. This script runs first (it has no
//! dependencies of its own) and fails with the one command that installs what is
//! missing: `pip install cmake` needs no root, the rest comes from apt.

use std::path::Path;
use std::process::{Command, Stdio};

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=PATH");
    println!("cargo::rerun-if-env-changed=CMAKE");
    println!("cargo::rerun-if-env-changed=OPENSSL_DIR");
    println!("cargo::rerun-if-env-changed=CHATGATE_SKIP_PREREQUISITES");
    // Only Pingora needs these; the tower layer alone builds with Rust only.
    if std::env::var_os("CARGO_FEATURE_PROXY").is_none()
        || std::env::var_os("CHATGATE_SKIP_PREREQUISITES").is_some()
    {
        return;
    }
    let missing = missing_prerequisites();
    if missing.is_empty() {
        return;
    }
    let names: Vec<&str> = missing.iter().map(|m| m.what).collect();
    let apt: Vec<&str> = missing.iter().filter_map(|m| m.apt).collect();
    let command = if apt.is_empty() {
        // Only cmake is missing: PyPI has it, no root needed.
        "pip install cmake   (or, as root: apt-get install -y cmake)".to_owned()
    } else {
        let mut packages = apt.clone();
        if !packages.contains(&"cmake") && names.contains(&"cmake") {
            packages.push("cmake");
        }
        format!(
            "sudo apt-get install -y {}   (or: sudo scripts/install-prerequisites.sh, which also installs what the tests need)",
            packages.join(" ")
        )
    };
    eprintln!();
    eprintln!(
        "chatgate: the `proxy` feature (Pingora) needs cmake, pkg-config and the OpenSSL headers to build; not found: {}.",
        names.join(", ")
    );
    eprintln!("Run:");
    eprintln!();
    eprintln!("    {command}");
    eprintln!();
    eprintln!("then the same cargo command again. See README.md, Prerequisites.");
    // The cargo:: error line is what cargo shows first, above the script's output.
    println!(
        "cargo::error=missing build prerequisites ({}); run: {command}",
        names.join(", ")
    );
    std::process::exit(1);
}

struct Missing {
    what: &'static str,
    /// The Debian/Ubuntu package, when apt is the only way (no root-free install).
    apt: Option<&'static str>,
}

fn missing_prerequisites() -> Vec<Missing> {
    let mut missing = Vec::new();
    // The cmake crate runs `$CMAKE` or `cmake`.
    let cmake = std::env::var("CMAKE").unwrap_or_else(|_| "cmake".to_owned());
    if !runs(&cmake, &["--version"]) {
        missing.push(Missing {
            what: "cmake",
            apt: None,
        });
    }
    // openssl-sys takes OPENSSL_DIR as is, without pkg-config.
    if std::env::var_os("OPENSSL_DIR").is_some() {
        return missing;
    }
    if !runs("pkg-config", &["--version"]) {
        missing.push(Missing {
            what: "pkg-config",
            apt: Some("pkg-config"),
        });
        if !Path::new("/usr/include/openssl/ssl.h").exists() {
            missing.push(Missing {
                what: "the OpenSSL headers",
                apt: Some("libssl-dev"),
            });
        }
    } else if !runs("pkg-config", &["--exists", "openssl"]) {
        missing.push(Missing {
            what: "the OpenSSL headers",
            apt: Some("libssl-dev"),
        });
    }
    missing
}

fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}
