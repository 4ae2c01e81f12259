//! The `chatgate` binary gives the memory of closed sessions back to the OS while it then
//! sits idle (issue 13: "memory is returned once sessions close"; README, "Memory
//! returned after sessions close"). mimalloc purges freed pages only when its collection
//! runs again, which an idle proxy never did: RSS stayed at the peak. The binary's
//! collector thread (`src/bin/chatgate/allocator.rs`) runs it once a second.
//!
//! The check is on the process's RSS, so it fails when nothing purges: run it with
//! `MIMALLOC_PURGE_DELAY=-1` (mimalloc's "never purge", which the proxy inherits) to see
//! it fail. Bounded in sessions and in time; no figure here depends on the machine's
//! speed, only on memory coming back at all.

#[path = "common/proxy_harness.rs"]
mod harness;
#[path = "common/raw_http.rs"]
mod raw_http;

use harness::*;
use raw_http::*;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Sessions in the burst: each is two sockets in the proxy and two in this process
/// (the client's and the test upstream's; see `raise_descriptor_limit`), and enough
/// memory (a few KB each) to stand out from the proxy's baseline.
const SESSIONS: usize = 1500;

/// How long the proxy gets to give the memory back: the binary's purge delay (5 s,
/// `PURGE_DELAY_MS`) plus the collector's period (1 s), with room for a busy machine.
const GIVE_BACK_WITHIN: Duration = Duration::from_secs(15);

/// Raises this process's soft descriptor limit (1,024 on many machines) towards its
/// hard one; the proxy, started after, inherits it. Each session is two descriptors
/// here (client and test upstream) and two in the proxy.
fn raise_descriptor_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let needed = 2 * SESSIONS as u64 + 1024;
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert!(
        hard >= needed,
        "{SESSIONS} sessions need {needed} descriptors; the hard limit is {hard} (raise it, e.g. ulimit -Hn)"
    );
    if soft < needed {
        setrlimit(Resource::RLIMIT_NOFILE, needed, hard).unwrap();
    }
}

fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

/// Opens one relayed WebSocket session and reads the upstream's greeting through it.
async fn open_session(proxy: &Proxy, user: usize) -> TcpStream {
    let token = user_token(&format!("u{}", user % 100));
    let mut stream = TcpStream::connect(proxy.address).await.unwrap();
    let request = upgrade(
        &format!("/connect?api_key={KEY}&authorization={token}&stream-auth-type=jwt"),
        &[],
    );
    stream.write_all(&request).await.unwrap();
    let mut buffer = Vec::new();
    let answer = read_answer(&mut stream, &mut buffer, STEP).await;
    assert!(
        matches!(answer, Answer::WsOpen { .. }),
        "session {user}: {answer:?}"
    );
    stream
}

async fn open_sessions(proxy: &Proxy, range: std::ops::Range<usize>) -> Vec<TcpStream> {
    let mut sessions = Vec::with_capacity(range.len());
    // 50 handshakes at a time: a burst, without a listen backlog's worth of SYNs at once.
    let starts: Vec<usize> = range.clone().step_by(50).collect();
    for start in starts {
        let end = (start + 50).min(range.end);
        let batch = (start..end).map(|user| open_session(proxy, user));
        sessions.extend(futures_util::future::join_all(batch).await);
    }
    sessions
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_of_a_burst_of_closed_websocket_sessions_goes_back_to_the_os_while_idle() {
    raise_descriptor_limit();
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let proxy = Proxy::start(ProxyOptions {
        upstreams: vec![upstream.address.to_string()],
        ..ProxyOptions::default()
    })
    .await;
    let pid = proxy.pid();
    // A first small burst, closed, so that what is allocated once (the runtime's
    // threads, caches of verified tokens, the registry's maps at their size) is in the
    // baseline rather than counted as the burst's.
    drop(open_sessions(&proxy, 0..100).await);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = rss_kb(pid);

    let sessions = open_sessions(&proxy, 0..SESSIONS).await;
    let peak = rss_kb(pid);
    let grown = peak.saturating_sub(before);
    assert!(
        grown >= 4 * 1024,
        "{SESSIONS} open sessions should take some MB of the proxy's memory; RSS {before} -> {peak} KB"
    );
    drop(sessions);

    // Bounded: GIVE_BACK_WITHIN in steps of 200 ms; passes as soon as half of the
    // burst's growth is back (memory still live, such as cached tokens, keeps some).
    let mut now = peak;
    for _ in 0..GIVE_BACK_WITHIN.as_millis() / 200 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        now = rss_kb(pid);
        if now <= before + grown / 2 {
            return;
        }
    }
    panic!(
        "RSS {before} KB before {SESSIONS} sessions, {peak} KB with them open, still {now} KB \
         {GIVE_BACK_WITHIN:?} after they closed: less than half of the {grown} KB came back"
    );
}
