//! The embedded store (redb) when its disk fails: full, or read-only under the running
//! proxy.
//!
//! How the faults are made, and why: a full disk is a 2 MiB tmpfs holding the database,
//! filled to the last byte by a filler file (the kernel's own ENOSPC, not a simulation);
//! a read-only disk is `chattr +i` on the open database file (ext4: every later write
//! through the open descriptor fails with EPERM, even as root; a filesystem cannot be
//! remounted read-only while chatgate has the file open for writing, so `mount -o
//! remount,ro` is not an option). Both need root (`mount`, CAP_LINUX_IMMUTABLE); without
//! it the tests say so and do nothing. RLIMIT_FSIZE was the unprivileged alternative,
//! but it limits the file's size, not the free space: writes redb makes inside the
//! file's allocated length would still succeed, which is not what a full disk does.
//!
//! What must hold (contract §3, README "Revocation"): a revocation is answered 2xx only
//! after its write is durable, otherwise 503 with the contract's JSON (code -1); requests
//! that need no write keep being served; once the disk is writable again, revocations
//! work again without a restart. A regression shows as a 2xx whose cutoff is not in the
//! file after a kill -9, as 503s for users the store merely has to look up, or as
//! revocations that keep failing after the disk recovered.

use super::harness::*;
use chatgate::TokenBuilder;
use chatgate::revocation::RevocationStore;
use chatgate::revocation::embedded::EmbeddedStore;
use chatgate::time::now_unix;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn run(program: &str, args: &[&str]) {
    let status = Command::new(program).args(args).status().unwrap();
    assert!(status.success(), "{program} {args:?} failed");
}

/// A small tmpfs mounted on a temporary directory, unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                dir.path().to_str().unwrap(),
            ],
        );
        SmallDisk { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a filler file until the disk refuses (ENOSPC); returns its path.
    fn fill(&self) -> PathBuf {
        use std::io::Write as _;
        let filler = self.path().join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 4096];
        // Bounded: the disk is a few MiB.
        for _ in 0..10_000 {
            if let Err(e) = file.write_all(&block) {
                assert_eq!(e.raw_os_error(), Some(28), "expected ENOSPC, got {e}");
                // The last pages: a smaller write may still fit.
                let _ = file.write_all(&block[..512]);
                let _ = file.write_all(&block[..1]);
                return filler;
            }
        }
        panic!("the small disk never filled");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

fn embedded(path: &Path) -> String {
    format!(
        "store = \"embedded\"\npath = \"{}\"\non_store_error = \"deny\"",
        path.display()
    )
}

/// Ids long enough that a batch of 100 needs fresh pages of the database.
fn batch(tag: &str, n: usize) -> Vec<String> {
    (0..100)
        .map(|i| format!("{tag}-{n}-{i}-{}", "x".repeat(200)))
        .collect()
}

/// Revokes batches until one is refused (at most `tries`); returns the users of every
/// batch answered 2xx, and the refused answer's body. Every refusal must be the
/// contract's 503.
async fn revoke_until_refused(
    client: &reqwest::Client,
    proxy: &Proxy,
    tag: &str,
    cutoff: i64,
    tries: usize,
) -> (Vec<String>, serde_json::Value) {
    let mut acknowledged = Vec::new();
    for n in 0..tries {
        let users = batch(tag, n);
        let (status, body) = revoke(client, proxy, &users, cutoff).await;
        match status {
            200..=299 => acknowledged.extend(users),
            503 => return (acknowledged, body),
            other => panic!("a failed revocation must be 503, got {other}: {body}"),
        }
    }
    panic!("{tries} revocations of 100 users were all acknowledged on a failing disk");
}

/// While the write fault lasts: a user seen before the fault and one the store has
/// never been asked about are both served (reads need no write).
async fn still_serving(client: &reqwest::Client, proxy: &Proxy, what: &str) {
    let now = now_unix();
    for user in ["seen-before", &format!("never-seen-{}", now % 100_000)] {
        let token = TokenBuilder::user(user).issued_at(now - 1).sign(SECRET);
        let (status, body) = get_channels(client, proxy, &token).await;
        assert_eq!(status, 200, "{what}: {user} was not served: {body}");
    }
}

/// After the fault: a new revocation is acknowledged (bounded retries: the store may
/// need a moment to reopen its file) and enforced.
async fn recovers(client: &reqwest::Client, proxy: &Proxy, what: &str) -> String {
    let user = format!("after-{what}");
    let cutoff = now_unix();
    let token = TokenBuilder::user(&user)
        .issued_at(cutoff - 10)
        .sign(SECRET);
    let (status, body) = get_channels(client, proxy, &token).await;
    assert_eq!(status, 200, "{what}: {body}");
    let mut last = (0, serde_json::Value::Null);
    for _ in 0..40 {
        last = revoke(client, proxy, std::slice::from_ref(&user), cutoff).await;
        if last.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        last.0, 200,
        "{what}: revocations never recovered: {}",
        last.1
    );
    let (status, body) = get_channels(client, proxy, &token).await;
    assert_eq!(
        status, 401,
        "{what}: a revocation made after recovery is not enforced"
    );
    assert_stream_error(&body, 40, 401);
    user
}

/// Kills the proxy (so nothing it buffered can be flushed later) and reads the file as
/// a restart would: every acknowledged user must have its cutoff.
async fn all_durable(proxy: &mut Proxy, db: &Path, acknowledged: &[String]) {
    proxy.stop();
    let store = EmbeddedStore::open(db).expect("the database reopens after kill -9");
    for user in acknowledged {
        assert!(
            store.user_cutoff(KEY, user).await.unwrap().is_some(),
            "{user} was acknowledged but its cutoff is not in the file"
        );
    }
}

#[tokio::test]
async fn a_full_disk_refuses_revocations_with_a_503_keeps_serving_and_recovers() {
    if !root() {
        eprintln!("skipped: a full disk needs root to mount a small tmpfs");
        return;
    }
    let disk = SmallDisk::mount("2m");
    let db = disk.path().join("revocations.db");
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let mut proxy = Proxy::start(ProxyOptions {
        upstreams: vec![upstream.address.to_string()],
        revocation: Some(embedded(&db)),
        ..ProxyOptions::default()
    })
    .await;
    let client = reqwest::Client::new();
    let acknowledged = within(Duration::from_secs(60), async {
        let seen = TokenBuilder::user("seen-before").sign(SECRET);
        assert_eq!(get_channels(&client, &proxy, &seen).await.0, 200);
        let cutoff = now_unix();
        let (status, body) = revoke(&client, &proxy, &batch("ok", 0), cutoff).await;
        assert_eq!(status, 200, "{body}");
        let mut acknowledged = batch("ok", 0);
        let filler = disk.fill();
        let (more, refusal) = revoke_until_refused(&client, &proxy, "full", cutoff, 20).await;
        acknowledged.extend(more);
        let message = assert_stream_error(&refusal, -1, 503);
        assert!(message.contains("revocation store"), "{message}");
        // Nor is the next one answered 2xx while the disk stays full.
        let (status, body) = revoke(&client, &proxy, &batch("full-again", 0), cutoff).await;
        assert_eq!(status, 503, "{body}");
        still_serving(&client, &proxy, "full disk").await;
        std::fs::remove_file(filler).unwrap();
        acknowledged.push(recovers(&client, &proxy, "full-disk").await);
        acknowledged
    })
    .await;
    all_durable(&mut proxy, &db, &acknowledged).await;
}

#[tokio::test]
async fn a_read_only_database_file_refuses_revocations_with_a_503_keeps_serving_and_recovers() {
    if !root() {
        eprintln!("skipped: making an open file read-only needs root (chattr +i)");
        return;
    }
    // On the real disk (ext4), where chattr works; tmpfs has no immutable flag.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let db = dir.path().join("revocations.db");
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let mut proxy = Proxy::start(ProxyOptions {
        upstreams: vec![upstream.address.to_string()],
        revocation: Some(embedded(&db)),
        ..ProxyOptions::default()
    })
    .await;
    let client = reqwest::Client::new();
    struct Mutable<'a>(&'a Path);
    impl Drop for Mutable<'_> {
        fn drop(&mut self) {
            let _ = Command::new("chattr").arg("-i").arg(self.0).status();
        }
    }
    let acknowledged = within(Duration::from_secs(60), async {
        let seen = TokenBuilder::user("seen-before").sign(SECRET);
        assert_eq!(get_channels(&client, &proxy, &seen).await.0, 200);
        let cutoff = now_unix();
        let (status, body) = revoke(&client, &proxy, &batch("ok", 0), cutoff).await;
        assert_eq!(status, 200, "{body}");
        let mut acknowledged = batch("ok", 0);
        run("chattr", &["+i", db.to_str().unwrap()]);
        let guard = Mutable(&db);
        let (more, refusal) = revoke_until_refused(&client, &proxy, "ro", cutoff, 3).await;
        acknowledged.extend(more);
        let message = assert_stream_error(&refusal, -1, 503);
        assert!(message.contains("revocation store"), "{message}");
        still_serving(&client, &proxy, "read-only file").await;
        drop(guard);
        acknowledged.push(recovers(&client, &proxy, "read-only").await);
        acknowledged
    })
    .await;
    all_durable(&mut proxy, &db, &acknowledged).await;
}
