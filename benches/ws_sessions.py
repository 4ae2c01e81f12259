#!/usr/bin/env python3
# Usage: python3 benches/ws_sessions.py CHATGATE_BINARY [N] [MESSAGES]
#
# Live WebSocket sessions at the edge (issue 13), chatgate against HAProxy in the same
# run, one proxy after the other (chatgate first), each with one thread:
# - handshakes: N clients upgrade through the proxy (token in the query, checked by
#   each: chatgate's gate, HAProxy's jwt_verify on alg, signature and exp) to one
#   WebSocket upstream; the proxy's CPU time (utime + stime) over those N upgrades;
# - memory: the proxy's RSS before, with the N sessions open and idle for 3 s, and
#   1, 5 and 8 s after they all closed (RSS per session = (open - before) / N);
# - revocation (chatgate only; HAProxy cannot end a live session): one user's sessions
#   (N / 1000 of them: the clients are users u0..u999) are revoked through the proxy
#   (PATCH /users with a server token, as the server SDK does); the time from sending
#   the PATCH to the last of that user's close frames, and how many times relayed
#   sessions' tasks ran meanwhile (`chatgate_websocket_session_runs_total`: only the
#   revoked sessions should run);
# - small frames: 100 of the open sessions each send MESSAGES masked 64-byte frames
#   one at a time, which the upstream echoes; the proxy's CPU time per round trip
#   (two relayed frames).
# Prints each figure per proxy and the ratios chatgate / HAProxy.
# WS_HANDSHAKES_ONLY=1 in the environment measures the handshakes only (no memory,
# revocation or small-frame figures, no waits): a short window, e.g. N = 3000.
# WS_INTERLEAVED=ROUNDS measures the handshakes only, with every proxy running at
# once and the load alternating between them: each round opens N sessions (default
# 500) through each proxy in turn (the order rotates every round), reads the proxy's
# CPU time (nanoseconds, /proc/PID/task/*/schedstat) around its batch, then closes
# them. A slow spell of the machine then falls on every proxy's batches alike; the
# per-round ratios and their median are printed. BASE_BIN=OTHER_CHATGATE adds a
# second chatgate build to the rotation (to compare two builds in one window), and
# PINGORA_BIN (below) Pingora without auth.
# WS_RELAY_INTERLEAVED=ROUNDS measures the small-frame relay the same way: every proxy
# up at once, 100 sessions open through each, then per round each proxy in turn (the
# order rotating) relays MESSAGES (default 50 here) round trips on each of its
# sessions while its CPU is read around that batch. PINGORA_BIN=PASSTHROUGH adds
# Pingora's own WebSocket tunnel to the rotation: the `passthrough` example (a
# Pingora proxy without auth, `cargo build --profile perf --features cli --example
# passthrough`), whose upgrades go through pingora-proxy's tunnel.
# WS_KEEP=1 (with WS_INTERLEAVED) keeps every batch's sessions open to the end instead
# of closing each batch: the proxies fill up as an edge does while users connect
# (ROUNDS x N sessions per proxy, all within the fd limit).
# HAPROXY_DEFER_ACCEPT=1 adds `defer-accept` to HAProxy's bind line: HAProxy's form of
# the TCP_DEFER_ACCEPT that chatgate sets on its listener (off in HAProxy by default).
# ONLY_CHATGATE=1 skips HAProxy (to compare chatgate settings, e.g.
# MIMALLOC_PURGE_DELAY, which chatgate inherits from this script's environment).
#
# Each session is two sockets in each proxy: the fd limit is raised as far as allowed
# (root may raise the hard limit) and N defaults to what fits in it. Loopback only,
# every wait bounded.
import asyncio, base64, datetime, hashlib, hmac, json, os, resource, socket, statistics, subprocess, sys, tempfile, time

if sys.argv[1] == "--upstream":
    # The WebSocket upstream, in a process of its own (its sockets count against its
    # own fd limit, not the clients').
    port = int(sys.argv[2])
    binary, n, messages = None, 0, 0
else:
    binary = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    messages = int(sys.argv[3]) if len(sys.argv) > 3 else 300
INTERLEAVED = int(os.environ.get("WS_INTERLEAVED", "0"))
RELAY_INTERLEAVED = int(os.environ.get("WS_RELAY_INTERLEAVED", "0"))
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
try:
    wanted = max(hard, 4 * n + 4096)
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
except (ValueError, OSError):
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
if binary is not None and INTERLEAVED and n == 0:
    n = 500
if binary is not None and RELAY_INTERLEAVED and n == 0:
    # Only HAProxy's maxconn reads N in this mode: room for the relay's sessions.
    n = 200
if binary is not None:
    # Two sockets per session in the proxy, plus its own descriptors.
    fits = (limit - 100) // 2
    if n == 0 or n > fits:
        if n > fits:
            print(f"N={n} needs more than the fd limit ({limit}) allows: N={fits}", flush=True)
        n = fits
SECRET, KEY = "bench-secret-0123456789abcdef0123", "benchkey"
USERS = 1000
RELAY_SESSIONS = 100
CLK = os.sysconf("SC_CLK_TCK")
HANDSHAKES_ONLY = os.environ.get("WS_HANDSHAKES_ONLY") == "1"
KEEP = INTERLEAVED and os.environ.get("WS_KEEP") == "1"


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(claims):
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(json.dumps(claims).encode())
    signature = hmac.new(SECRET.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(signature)}"


def token(user):
    now = int(time.time())
    return jwt({"user_id": user, "iat": now - 5, "exp": now + 7200})


def free():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))


def cpu_ns(pid):
    """The process's CPU time (all live threads) in nanoseconds, from the scheduler."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:
            pass
    return total


def minor_faults(pid):
    """The process's minor page faults so far (each a page, or a 2 MiB huge page,
    mapped in; a freed range the allocator gave back and touches again faults anew)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def cpu(pid):
    """The process's CPU time (all threads, user + system) in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


async def upstream_session(reader, writer):
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        # A health probe (connect, close).
        writer.close()
        return
    lines = head.split(b"\r\n")
    key = next((l.split(b":", 1)[1].strip() for l in lines if l.lower().startswith(b"sec-websocket-key:")), None)
    try:
        if key is None:
            # An HTTP request (the revocation the proxy forwards): 200 {}.
            length = next((int(l.split(b":", 1)[1]) for l in lines if l.lower().startswith(b"content-length:")), 0)
            if length:
                await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
            await writer.drain()
            writer.close()
            return
        accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        await writer.drain()
        # Echoes what arrives (the small-frame phase); an idle session sends nothing.
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    writer.close()


async def open_sessions(port, count):
    sessions = [None] * count
    tokens = [token(f"u{i}") for i in range(USERS)]
    sem = asyncio.Semaphore(64)

    async def one(i):
        async with sem:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                f"GET /connect?api_key={KEY}&authorization={tokens[i % USERS]}&stream-auth-type=jwt HTTP/1.1\r\n"
                "Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            assert head.startswith(b"HTTP/1.1 101"), head
            sessions[i] = (reader, writer)

    await asyncio.gather(*(one(i) for i in range(count)))
    return sessions


def runs(admin):
    """chatgate_websocket_session_runs_total, from the admin listener."""
    with socket.create_connection(("127.0.0.1", admin), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    line = next((l for l in data.decode().splitlines() if l.startswith("chatgate_websocket_session_runs_total")), None)
    # None: a chatgate from before the counter.
    return None if line is None else int(float(line.split()[1]))


async def revoke_one(port, admin, sessions):
    user = 7
    mine = [sessions[i] for i in range(user, len(sessions), USERS)]
    before = runs(admin)
    cutoff = datetime.datetime.now(datetime.timezone.utc).isoformat()
    body = json.dumps({"users": [{"id": f"u{user}", "set": {"revoke_tokens_issued_before": cutoff}}]}).encode()
    server = jwt({"server": True, "exp": int(time.time()) + 60})
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    writer.write(
        f"PATCH /users?api_key={KEY} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {server}\r\n"
        f"Stream-Auth-Type: jwt\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n".encode() + body)
    status = (await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)).split()[1].decode()
    answered = time.monotonic() - started
    writer.close()

    async def closed(session):
        # The close frame (0x88) is the first thing the relay sends an idle client.
        first = await asyncio.wait_for(session[0].readexactly(2), 10)
        assert first[0] == 0x88, first
        return time.monotonic() - started

    times = await asyncio.gather(*(closed(s) for s in mine))
    await asyncio.sleep(1.5)
    after = runs(admin)
    woken = "n/a" if before is None else f"{after - before} ({(after - before) / len(mine):.1f} per revoked session)"
    print(f"  revoke u{user}: PATCH {status} in {answered * 1000:.1f} ms; its {len(mine)} sessions closed "
          f"{min(times) * 1000:.1f}-{max(times) * 1000:.1f} ms after the PATCH was sent; "
          f"session task runs meanwhile: {woken}, {len(sessions) - len(mine)} other sessions open", flush=True)
    return [i for i in range(len(sessions)) if i % USERS != user]


async def small_frames(pid, sessions, count):
    frame = bytes([0x82, 0x80 | 64]) + os.urandom(4) + os.urandom(64)

    async def pingpong(session):
        reader, writer = session
        for _ in range(count):
            writer.write(frame)
            await asyncio.wait_for(reader.readexactly(len(frame)), 10)

    start = cpu(pid)
    started = time.monotonic()
    await asyncio.gather(*(pingpong(s) for s in sessions))
    elapsed = time.monotonic() - started
    spent = cpu(pid) - start
    total = len(sessions) * count
    return spent / total, total / elapsed


async def measure(name, pid, port, admin=None):
    await asyncio.sleep(1.0)
    before = rss(pid)
    start_cpu = cpu(pid)
    started = time.monotonic()
    sessions = await open_sessions(port, n)
    opened_in = time.monotonic() - started
    per_handshake = (cpu(pid) - start_cpu) / n
    if HANDSHAKES_ONLY:
        for _, writer in sessions:
            writer.close()
        print(f"{name:9} n={n} cpu_per_handshake={per_handshake * 1e6:.1f}us opened_in={opened_in:.1f}s", flush=True)
        await asyncio.sleep(1.0)
        return {"handshake": per_handshake}
    await asyncio.sleep(3.0)
    during = rss(pid)
    open_left = list(range(n))
    if admin is not None:
        open_left = await revoke_one(port, admin, sessions)
    relay_cpu, relay_rate = await small_frames(pid, [sessions[i] for i in open_left[:RELAY_SESSIONS]], messages)
    for _, writer in sessions:
        writer.close()
    await asyncio.sleep(1.0)
    after_1s = rss(pid)
    await asyncio.sleep(4.0)
    after_5s = rss(pid)
    # The chatgate binary's allocator purges freed pages 5 s after they empty
    # (allocator.rs, PURGE_DELAY_MS), checked once a second: "after" is read past that.
    await asyncio.sleep(3.0)
    after = rss(pid)
    per = (during - before) / n
    print(f"{name:9} n={n} rss_kb before={before} open={during} after_close_1s={after_1s} after_close_5s={after_5s} after_close_8s={after} "
          f"per_session={per:.2f}KB cpu_per_handshake={per_handshake * 1e6:.1f}us "
          f"cpu_per_round_trip={relay_cpu * 1e6:.2f}us ({relay_rate:.0f}/s) opened_in={opened_in:.1f}s", flush=True)
    return {"per": per, "handshake": per_handshake, "relay": relay_cpu,
            "before": before, "open": during, "after": after}


def rotated(proxies, r):
    """The proxies in round r's order: each round starts one further along."""
    return proxies[r % len(proxies):] + proxies[:r % len(proxies)]


def report_rounds(title, spent, digits, extra):
    """Prints each proxy's per-round figures (median, range, mean, then extra(name)) and
    the first proxy's per-round ratios to each other one."""
    first = next(iter(spent))
    print(title)
    for name, values in spent.items():
        print(f"  {name:9} {statistics.median(values):7.{digits}f}  ({min(values):.{digits}f}-"
              f"{max(values):.{digits}f})  mean {statistics.mean(values):.{digits}f}{extra(name)}")
    for name, values in spent.items():
        if name == first:
            continue
        ratios = [a / b for a, b in zip(spent[first], values)]
        print(f"  {first} / {name}: median of the rounds' ratios {statistics.median(ratios):.2f}x "
              f"({min(ratios):.2f}-{max(ratios):.2f}), ratio of the means "
              f"{statistics.mean(spent[first]) / statistics.mean(values):.2f}x; "
              f"rounds below 1.0: {sum(1 for x in ratios if x < 1.0)}/{len(ratios)}")


async def interleaved(proxies, rounds):
    """Handshake CPU with the load alternating between the proxies (WS_INTERLEAVED)."""
    spent = {name: [] for name, _, _ in proxies}
    faults = {name: 0 for name, _, _ in proxies}
    kept = []
    for r in range(rounds):
        for name, pid, port in rotated(proxies, r):
            await asyncio.sleep(0.3)
            start, faulted = cpu_ns(pid), minor_faults(pid)
            sessions = await open_sessions(port, n)
            spent[name].append((cpu_ns(pid) - start) / n / 1e3)
            faults[name] += minor_faults(pid) - faulted
            if KEEP:
                kept.extend(sessions)
            else:
                for _, writer in sessions:
                    writer.close()
    for _, writer in kept:
        writer.close()
    # The closes of the last batch settle before the processes are killed.
    await asyncio.sleep(0.5)
    report_rounds(f"interleaved handshakes: {rounds} rounds of {n} per proxy, CPU per handshake in us "
                  f"(median, min-max of the rounds):", spent, 1,
                  lambda name: f"; page faults per 1,000 handshakes {faults[name] * 1000 / (rounds * n):.1f}")


async def relay_interleaved(proxies, rounds, count):
    """Small-frame relay CPU with the load alternating between the proxies."""
    frame = bytes([0x82, 0x80 | 64]) + os.urandom(4) + os.urandom(64)
    opened = {name: await open_sessions(port, RELAY_SESSIONS) for name, _, port in proxies}

    async def pingpong(session):
        reader, writer = session
        for _ in range(count):
            writer.write(frame)
            await asyncio.wait_for(reader.readexactly(len(frame)), 10)

    spent = {name: [] for name, _, _ in proxies}
    for r in range(rounds):
        for name, pid, _ in rotated(proxies, r):
            await asyncio.sleep(0.2)
            start = cpu_ns(pid)
            await asyncio.gather(*(pingpong(session) for session in opened[name]))
            spent[name].append((cpu_ns(pid) - start) / (RELAY_SESSIONS * count) / 1e3)
    for sessions in opened.values():
        for _, writer in sessions:
            writer.close()
    await asyncio.sleep(0.5)
    report_rounds(f"interleaved relay: {rounds} rounds of {RELAY_SESSIONS} sessions x {count} 64-byte round "
                  f"trips per proxy, CPU per round trip (two relayed frames) in us (median, min-max of the "
                  f"rounds):", spent, 2, lambda name: "")


async def serve_upstream(port):
    server = await asyncio.start_server(upstream_session, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


async def main():
    up_port = free()
    upstream = subprocess.Popen([sys.executable, __file__, "--upstream", str(up_port)])
    ha_port = free()

    def start_chatgate(path):
        port, admin = free(), free()
        cfg = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
        cfg.write(f'[server]\nlisten = "127.0.0.1:{port}"\nadmin_listen = "127.0.0.1:{admin}"\nthreads = 1\n'
                  f'[upstream]\naddresses = ["127.0.0.1:{up_port}"]\nconnect_timeout_ms = 10000\n[revocation]\nstore = "memory"\n'
                  f'[[apps]]\napi_key = "{KEY}"\nsecrets = ["{SECRET}"]\n')
        cfg.close()
        process = subprocess.Popen([path, "serve", "--config", cfg.name, "--upgrade-sock", f"/tmp/chatgate-ws-{port}.sock"],
                                   env={**os.environ, "RUST_LOG": os.environ.get("CHATGATE_LOG", "off")},
                                   stdout=open(os.environ.get("CHATGATE_LOG_FILE", os.devnull), "w"), stderr=subprocess.STDOUT)
        return process, port, admin

    chatgate, cg_port, cg_admin = start_chatgate(binary)
    base_bin = os.environ.get("BASE_BIN")
    base, base_port = (None, None)
    if base_bin:
        base, base_port, _ = start_chatgate(base_bin)
    hcfg = tempfile.NamedTemporaryFile("w", suffix=".cfg", delete=False)
    hcfg.write(f"""global
  nbthread 1
  maxconn {(2 if INTERLEAVED else 1) * n * (INTERLEAVED if KEEP else 1) + 20}
defaults
  mode http
  timeout connect 10s
  timeout client 30s
  timeout server 30s
  timeout tunnel 1h
frontend ws
  bind 127.0.0.1:{ha_port}{" defer-accept" if os.environ.get("HAPROXY_DEFER_ACCEPT") == "1" else ""}
  http-request set-var(txn.token) url_param(authorization)
  http-request deny deny_status 401 unless {{ var(txn.token) -m found }}
  http-request set-var(txn.alg) var(txn.token),jwt_header_query('$.alg')
  http-request deny deny_status 401 unless {{ var(txn.alg) -m str HS256 }}
  http-request deny deny_status 401 unless {{ var(txn.token),jwt_verify(txn.alg,"{SECRET}") -m int 1 }}
  http-request set-var(txn.exp) var(txn.token),jwt_payload_query('$.exp','int')
  http-request set-var(txn.now) date()
  http-request deny deny_status 401 if {{ var(txn.exp),sub(txn.now) -m int le 0 }}
  default_backend upstream
backend upstream
  server ws 127.0.0.1:{up_port}
""")
    hcfg.close()
    haproxy = subprocess.Popen(["haproxy", "-db", "-f", hcfg.name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pingora_bin = os.environ.get("PINGORA_BIN")
    pingora, pingora_port = (None, None)
    if pingora_bin:
        pingora_port = free()
        # No upstream read timeout: an idle tunnel is not cut during the run.
        pingora = subprocess.Popen([pingora_bin, "--listen", f"127.0.0.1:{pingora_port}",
                                    "--upstream", f"127.0.0.1:{up_port}", "--read-timeout-ms", "0"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for port in ((up_port, cg_port, ha_port) + ((base_port,) if base else ())
                     + ((pingora_port,) if pingora else ())):
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", port)).close()
                    break
                except OSError:
                    await asyncio.sleep(0.1)
        # The interleaved modes' rotation: (name, pid, port) of every proxy running.
        proxies = [("chatgate", chatgate.pid, cg_port)]
        if base:
            proxies.append(("base", base.pid, base_port))
        if pingora:
            proxies.append(("pingora", pingora.pid, pingora_port))
        if os.environ.get("ONLY_CHATGATE") != "1":
            proxies.append(("haproxy", haproxy.pid, ha_port))
        if RELAY_INTERLEAVED:
            await relay_interleaved(proxies, RELAY_INTERLEAVED, messages if len(sys.argv) > 3 else 50)
            return
        if INTERLEAVED:
            await interleaved(proxies, INTERLEAVED)
            return
        ours = await measure("chatgate", chatgate.pid, cg_port, cg_admin)
        if os.environ.get("ONLY_CHATGATE") == "1":
            if HANDSHAKES_ONLY:
                return
            print(f"chatgate, n={n}: RSS above the start with all open {ours['open'] - ours['before']} KB, "
                  f"8 s after all closed {ours['after'] - ours['before']} KB")
            return
        theirs = await measure("haproxy", haproxy.pid, ha_port)
        print(f"chatgate / HAProxy, n={n}, one thread each:")
        if HANDSHAKES_ONLY:
            print(f"  CPU per upgrade handshake: {ours['handshake'] * 1e6:.1f} us / {theirs['handshake'] * 1e6:.1f} us = "
                  f"{ours['handshake'] / theirs['handshake']:.2f}x")
            return
        print(f"  RSS per idle session: {ours['per']:.2f} KB / {theirs['per']:.2f} KB = {ours['per'] / theirs['per']:.2f}x")
        print(f"  RSS 8 s after all closed, above the start: {ours['after'] - ours['before']} KB / "
              f"{theirs['after'] - theirs['before']} KB (peak above the start: {ours['open'] - ours['before']} KB / "
              f"{theirs['open'] - theirs['before']} KB)")
        print(f"  CPU per upgrade handshake: {ours['handshake'] * 1e6:.1f} us / {theirs['handshake'] * 1e6:.1f} us = "
              f"{ours['handshake'] / theirs['handshake']:.2f}x")
        print(f"  CPU per 64-byte round trip: {ours['relay'] * 1e6:.2f} us / {theirs['relay'] * 1e6:.2f} us = "
              f"{ours['relay'] / theirs['relay']:.2f}x")
    finally:
        chatgate.kill()
        if base:
            base.kill()
        haproxy.kill()
        if pingora:
            pingora.kill()
        upstream.kill()


if binary is None:
    asyncio.run(serve_upstream(port))
else:
    asyncio.run(main())
