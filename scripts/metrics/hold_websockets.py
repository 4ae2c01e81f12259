#!/usr/bin/env python3
"""Opens N WebSockets through chatgate (the Stream SDKs' /connect, token in the query),
keeps them open for a bounded time while reading what the server pushes, then closes
them. Prints how many upgraded and how many the server closed early (a revoked user's
sessions end with close code 4000). Loopback only; standard library only.

    hold_websockets.py HOST:PORT API_KEY TOKEN COUNT SECONDS
"""
import base64
import os
import select
import socket
import struct
import sys
import time
import urllib.parse

PING_SECONDS = 5


def connect(host, port, api_key, token):
    sock = socket.create_connection((host, port), timeout=5)
    query = urllib.parse.urlencode(
        {"api_key": api_key, "authorization": token, "stream-auth-type": "jwt"}
    )
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /connect?{query} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        head += chunk
    status = head.split(b"\r\n", 1)[0]
    if b" 101 " not in status + b" ":
        raise ConnectionError(status.decode(errors="replace"))
    sock.setblocking(False)
    return sock


def frame(opcode, payload):
    """A masked frame, as a client must send."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


def close(sock):
    try:
        sock.sendall(frame(0x8, struct.pack("!H", 1000)))
    except OSError:
        pass
    sock.close()


def main():
    address, api_key, token, count, seconds = sys.argv[1:6]
    host, port = address.rsplit(":", 1)
    socks = [connect(host, int(port), api_key, token) for _ in range(int(count))]
    print(f"{len(socks)} websockets open", flush=True)
    deadline = time.monotonic() + float(seconds)
    ended = 0
    next_ping = time.monotonic() + PING_SECONDS
    while socks and time.monotonic() < deadline:
        if time.monotonic() >= next_ping:
            # Client traffic, as the SDKs' health checks are: chatgate ends a revoked
            # session on the next bytes in either direction.
            next_ping += PING_SECONDS
            for sock in list(socks):
                try:
                    sock.sendall(frame(0x9, b"hc"))
                except OSError:
                    socks.remove(sock)
                    sock.close()
                    ended += 1
        readable, _, _ = select.select(socks, [], [], 0.5)
        for sock in readable:
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                socks.remove(sock)
                sock.close()
                ended += 1
    for sock in socks:
        close(sock)
    print(f"closed {len(socks)}; the server ended {ended} before that", flush=True)


if __name__ == "__main__":
    main()
