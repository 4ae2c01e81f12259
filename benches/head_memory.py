#!/usr/bin/env python3
# Usage: python3 benches/head_memory.py target/debug/chatgate CONNECTIONS HEAD_BYTES HEADER_TIMEOUT_MS
# RSS of a chatgate process before, during and after N connections that each send a
# partial request head of SIZE bytes and then stall (contract §6 rule 6).
import socket, subprocess, sys, time, os, tempfile
binary, n, size, timeout_ms = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def free():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p
port, admin = free(), free()
cfg = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
cfg.write(f'[server]\nlisten = "127.0.0.1:{port}"\nadmin_listen = "127.0.0.1:{admin}"\nthreads = 1\nheader_timeout_ms = {timeout_ms}\n'
          f'[upstream]\naddresses = ["127.0.0.1:9"]\n[revocation]\nstore = "memory"\n[[apps]]\napi_key = "k"\nsecrets = ["s"]\n')
cfg.close()
proc = subprocess.Popen([binary, "serve", "--config", cfg.name, "--upgrade-sock", f"/tmp/chatgate-head-{port}.sock"],
                        env={**os.environ, "RUST_LOG": "off"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
def rss():
    with open(f"/proc/{proc.pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))
for _ in range(100):
    try:
        socket.create_connection(("127.0.0.1", port)).close(); break
    except OSError: time.sleep(0.1)
time.sleep(0.5)
before = rss()
for wave in range(2):
  socks = []
  head = b"GET /channels?api_key=k HTTP/1.1\r\nX-Pad: " + b"a" * size
  for _ in range(n):
      s = socket.create_connection(("127.0.0.1", port)); s.sendall(head); socks.append(s)
  time.sleep(1.0)
  during = rss()
  time.sleep(timeout_ms / 1000 + 2)
  open_after = 0
  for s in socks:
      s.setblocking(False)
      try:
          d = s.recv(100)
          if d == b"" or d.startswith((b"HTTP/1.1 408", b"HTTP/1.1 431")): pass
          else: open_after += 1
      except BlockingIOError: open_after += 1
      except OSError: pass
      s.close()
  time.sleep(1.0)
  after = rss()
  print(f"wave={wave} n={n} head={size}B timeout={timeout_ms}ms rss_kb before={before} during={during} after={after} per_conn_during={(during-before)/n:.1f}KB still_open={open_after}")
proc.kill()
