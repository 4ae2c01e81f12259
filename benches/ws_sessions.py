#!/usr/bin/env python3
# Usage: python3 benches/ws_sessions.py CHATGATE_BINARY N
#
# Memory per idle proxied WebSocket (issue 13), chatgate against HAProxy in the same
# run: N clients upgrade through each proxy (token in the query, checked by each:
# chatgate's gate, HAProxy's jwt_verify) to one idle WebSocket upstream, stay idle,
# then close. Prints each proxy's RSS before, with the N sessions open, and after they
# closed, and the RSS per session side by side.
#
# Raises the fd limit (each session is two sockets in each proxy) as far as allowed;
# N above ~14,000 may need more ephemeral ports or source addresses than loopback gives.
import asyncio, base64, hashlib, hmac, json, os, resource, socket, subprocess, sys, tempfile, time

if sys.argv[1] == "--upstream":
    # The idle WebSocket upstream, in a process of its own (its sockets count against
    # its own fd limit, not the clients').
    port = int(sys.argv[2])
    binary, n = None, 0
else:
    binary, n = sys.argv[1], int(sys.argv[2])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
try:
    # The proxies inherit it and each holds two sockets per session (root may raise
    # the hard limit).
    wanted = max(hard, 4 * n + 4096)
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
except (ValueError, OSError):
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
SECRET, KEY = "bench-secret-0123456789abcdef0123", "benchkey"


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(user):
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    now = int(time.time())
    payload = b64(json.dumps({"user_id": user, "iat": now - 5, "exp": now + 7200}).encode())
    signature = hmac.new(SECRET.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(signature)}"


def free():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))


async def upstream_session(reader, writer):
    head = await reader.readuntil(b"\r\n\r\n")
    key = next((l.split(b":", 1)[1].strip() for l in head.split(b"\r\n") if l.lower().startswith(b"sec-websocket-key:")), None)
    if key is None:
        writer.close()
        return
    accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
    await writer.drain()
    # Idle until the proxy closes.
    while await reader.read(4096):
        pass
    writer.close()


async def open_sessions(port, count):
    sessions = []
    tokens = [token(f"u{i % 1000}") for i in range(1000)]
    sem = asyncio.Semaphore(64)

    async def one(i):
        async with sem:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                f"GET /connect?api_key={KEY}&authorization={tokens[i % 1000]}&stream-auth-type=jwt HTTP/1.1\r\n"
                "Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            assert head.startswith(b"HTTP/1.1 101"), head
            sessions.append((reader, writer))

    await asyncio.gather(*(one(i) for i in range(count)))
    return sessions


async def measure(name, pid, port):
    await asyncio.sleep(1.0)
    before = rss(pid)
    started = time.time()
    sessions = await open_sessions(port, n)
    await asyncio.sleep(3.0)
    during = rss(pid)
    for _, writer in sessions:
        writer.close()
    await asyncio.sleep(3.0)
    after = rss(pid)
    per = (during - before) / n
    print(f"{name:9} n={n} rss_kb before={before} open={during} after_close={after} "
          f"per_session={per:.2f}KB opened_in={time.time() - started:.1f}s", flush=True)
    return per


async def serve_upstream(port):
    server = await asyncio.start_server(upstream_session, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


async def main():
    up_port = free()
    upstream = subprocess.Popen([sys.executable, __file__, "--upstream", str(up_port)])
    cg_port, cg_admin, ha_port = free(), free(), free()
    cfg = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    cfg.write(f'[server]\nlisten = "127.0.0.1:{cg_port}"\nadmin_listen = "127.0.0.1:{cg_admin}"\nthreads = 1\n'
              f'[upstream]\naddresses = ["127.0.0.1:{up_port}"]\nconnect_timeout_ms = 10000\n[revocation]\nstore = "memory"\n'
              f'[[apps]]\napi_key = "{KEY}"\nsecrets = ["{SECRET}"]\n')
    cfg.close()
    chatgate = subprocess.Popen([binary, "serve", "--config", cfg.name, "--upgrade-sock", f"/tmp/chatgate-ws-{cg_port}.sock"],
                                env={**os.environ, "RUST_LOG": os.environ.get("CHATGATE_LOG", "off")},
                                stdout=open(os.environ.get("CHATGATE_LOG_FILE", os.devnull), "w"), stderr=subprocess.STDOUT)
    hcfg = tempfile.NamedTemporaryFile("w", suffix=".cfg", delete=False)
    hcfg.write(f"""global
  nbthread 1
  maxconn {n + 200}
defaults
  mode http
  timeout connect 10s
  timeout client 30s
  timeout server 30s
  timeout tunnel 1h
frontend ws
  bind 127.0.0.1:{ha_port}
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
    try:
        for port in (up_port, cg_port, ha_port):
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", port)).close()
                    break
                except OSError:
                    await asyncio.sleep(0.1)
        ours = await measure("chatgate", chatgate.pid, cg_port)
        theirs = await measure("haproxy", haproxy.pid, ha_port)
        print(f"RSS per idle session, chatgate / HAProxy: {ours:.2f} KB / {theirs:.2f} KB = {ours / theirs:.2f}x")
    finally:
        chatgate.kill()
        haproxy.kill()
        upstream.kill()


if binary is None:
    asyncio.run(serve_upstream(port))
else:
    asyncio.run(main())
