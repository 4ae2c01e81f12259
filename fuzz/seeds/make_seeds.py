#!/usr/bin/env python3
"""Writes the checked-in seed corpora, fuzz/seeds/<target>/, from the inputs the
crate's tests use (src/token/verify.rs, tests/token_differential.rs, src/gate.rs,
src/normalize.rs, tests/hostile.rs, src/revocation/update.rs, src/time.rs,
config.toml and the config module's tests, src/ws.rs). Deterministic: file names are
the SHA-1 of the content, as libFuzzer names its own corpus entries. Crash inputs the
runs found are kept next to these under their own names (regression-*)."""

import hashlib
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
NOW = 1_795_860_000  # the targets' fixed clock, 2026-11-28T10:00:00Z


def write(target, data):
    if isinstance(data, str):
        data = data.encode()
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, hashlib.sha1(data).hexdigest()), "wb") as f:
        f.write(data)


def token_seeds():
    go = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJ1c2VyX2lkIjoidG9tbWFzbyJ9.v-x-jt3ZnBXXbQ0GoWloIZtVnat2IE74U1a4Yuxd63M"
    go_expired = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJleHAiOjE1NjY5NDEyNzIsImlhdCI6MTU2Njk0MTI3MiwidXNlcl9pZCI6InRvbW1hc28ifQ.3HY2O_7o5ZjZ-6KCXLzyPpHZOlNEDy6_m3iNb5DKAMY"
    dev = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJ1c2VyX2lkIjoiYmVuZGVyIn0.devtoken"
    # flags: bit 0 developer tokens, bit 1 padding, bits 2.. leeway (5 s = 0x14)
    for flags in (0x14, 0x15):
        for raw in (go, go_expired, dev, go.replace("-", "+"), go + "=", "a.b", "..", "a.b.c.d"):
            write("token_verify", bytes([flags]) + b"R" + raw.encode())
    standard = '{"alg":"HS256","typ":"JWT"}'
    headers = [
        standard,
        '{"typ":"JWT","alg":"HS256"}',
        '{"alg":"none"}',
        '{"alg":"HS512","typ":"JWT"}',
        '{"alg":"hs256"}',
        '{"typ":"JWT"}',
        '{"alg":"HS256","alg":"none"}',
        '{"alg":"HS256","kid":"k1","typ":5}',
        "not json",
    ]
    payloads = [
        '{"user_id":"tommaso"}',
        '{"user_id":"alice","iat":%d,"exp":%d}' % (NOW - 60, NOW + 3600),
        '{"user_id":"alice","exp":%d}' % (NOW - 5),
        '{"user_id":"alice","exp":%d}' % (NOW + 5),
        '{"user_id":"alice","nbf":%d}' % (NOW + 6),
        '{"user_id":"alice","iat":%d}' % (NOW + 6),
        '{"user_id":"alice","iat":%d.75,"exp":%d.5}' % (NOW, NOW + 10),
        '{"user_id":"alice","exp":18446744073709551616,"nbf":-1,"iat":null}',
        '{"user_id":"alice","exp":"tomorrow"}',
        '{"user_id":7}',
        '{"user_id":""}',
        '{"user_id":" alice"}',
        '{"user_id":"a\\u0000b"}',
        '{"user_id":"a","user_id":"b"}',
        '{"server":true}',
        '{}',
        '[]',
        '{"user_id":"\u00e9\u00e8"}',
    ]
    for h in headers:
        for p in payloads:
            write("token_verify", bytes([0x14]) + b"S" + f"{h}\n{p}\nL0".encode())
    for choice in ("L1", "U", "D", "devtoken", "", "AAAA", "v-x-jt3ZnBXXbQ0GoWloIZtVnat2IE74U1a4Yuxd63M"):
        for flags in (0x14, 0x15, 0x16, 0x17):
            write("token_verify", bytes([flags]) + b"S" + f"{standard}\n{payloads[1]}\n{choice}".encode())


def gate_seeds():
    heads = [
        "GET /channels?api_key=key\nAuthorization: {user}",
        "GET /channels?api_key=key\nAuthorization: Bearer {user}\nstream-auth-type: jwt",
        "GET /channels?api_key=key\nAuthorization: bearer  {server}",
        "GET /channels?api_key=key\nAuthorization: {dev}",
        "GET /channels?api_key=key\nAuthorization: {expired}",
        "GET /channels?api_key=key\nAuthorization: {revoked}",
        "GET /channels?api_key=key\nAuthorization: {forged}",
        "GET /channels?api_key=key2\nAuthorization: {other}",
        "GET /channels?api_key=key\nAuthorization: {other}",
        "GET /channels?api_key=key2\nstream-auth-type: anonymous",
        "GET /channels?api_key=key\nstream-auth-type: anonymous",
        "GET /channels?api_key=nope\nAuthorization: {user}",
        "GET /channels\nAuthorization: {user}",
        "GET /channels?api_key=key",
        "GET /channels?api_key=key\nAuthorization: {user}\nAuthorization: {server}",
        "GET /channels?api_key=key&api_key=key2\nAuthorization: {user}",
        "GET /channels?api_key=key;api_key=key2\nAuthorization: {user}",
        "GET /channels?api%5Fkey=key&api_key=key2\nAuthorization: {user}",
        "GET /channels?api_key=key&user_id=alice&connection_id=c1&stream-auth-type=jwt&json={}\nAuthorization: {user}",
        "GET /connect?api_key=key&authorization={user}&stream-auth-type=jwt&json=%7B%22user_id%22%3A%22alice%22%7D\nUpgrade: websocket\nConnection: Upgrade\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\nSec-WebSocket-Version: 13",
        "GET /connect?api_key=key&authorization={user}&json=%7B%22user_details%22%3A%7B%22id%22%3A%22mallory%22%7D%7D\nUpgrade: websocket\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "GET /connect?api_key=key&authorization={user}\nUpgrade: websocket\nAuthorization: {server}",
        "GET /connect?api_key=key2&stream-auth-type=anonymous\nUpgrade: WebSocket",
        "GET /connect?api_key=key&authorization={user}",
        "PATCH /users?api_key=key\nAuthorization: {server}",
        "PATCH /users/?api_key=key\nAuthorization: {server}",
        "PATCH /app?api_key=key\nAuthorization: {server}",
        "PATCH /users?api_key=key\nAuthorization: {user}",
        "PATCH /%75sers?api_key=key\nAuthorization: {user}",
        "PATCH //users/.?api_key=key\nAuthorization: {server}",
        "PATCH /users?api_key=key2\nstream-auth-type: anonymous",
        "patch /users?api_key=key\nAuthorization: {server}",
        "Patch /app?api_key=key\nAuthorization: {server}",
        "OPTIONS *",
        "POST /channels/messaging/general/message?api_key=key\nAuthorization: {user}\nContent-Type: application/json",
        "DELETE /channels?api_key=key\nAuthorization: {user}\nX-Chatgate-User-Id: bob\nX_Chatgate_Auth: server",
        "GET http://127.0.0.1:8080/channels?api_key=key\nAuthorization: {user}",
        "GET /channels?api_key=key\nAuthorization: {user}\nX-Forwarded-For: 10.0.0.1, 10.0.0.2",
        "GET /healthz",
        "GET /healthz?api_key=nope",
    ]
    paths = [
        "/static/../channels", "/static/%2e%2e/channels", "/static/%2E%2E/channels",
        "/static/.%2e/channels", "/static/%2e./channels", "/static/./../channels",
        "/static/%2e/../channels", "//static/../channels", "/static//../../channels",
        "/static/x/../../channels", "/static/../../../channels", "/static/%2e%2e/%2e%2e/channels",
        "/static/../connect", "/static/x", "/%73tatic/x", "/%73%74%61%74%69%63/x", "//static///x",
        "/static/./x", "/static/y/../x", "/static/%2e/x", "/%68ealthz", "//healthz",
        "/static/%7Euser", "/static/..%2Fchannels", "/channels%2F..", "/static/..%5Cchannels",
        "/static/..\\channels", "/channels%00", "/chan%09nels", "/channels%0D%0AX-Injected:%201",
        "/static/%%32%65%%32%65/channels", "/channels%zz", "/static/..;/channels", "/users;x=1",
        "/static/%252e%252e/x", "/static/%25%32%65/x", "/a%3Fb/./c", "/users/..", "/app/%2e",
        "/a/./b/../c/", "/x/..", "/static/\u00e9/../channels",
    ]
    for p in paths:
        heads.append(f"GET {p}?api_key=key\nAuthorization: {{user}}")
        heads.append(f"GET {p}")
    for h in heads:
        write("gate_request", h)


def revocation_seeds():
    bodies = [
        '{"users":[{"id":"alice","set":{"revoke_tokens_issued_before":"2026-11-28T10:00:00Z"}}]}',
        '{"users":[{"id":"alice","set":{"revoke_tokens_issued_before":null}}]}',
        '{"users":[{"id":"alice","unset":["revoke_tokens_issued_before"]}]}',
        '{"users":[{"id":"alice","set":{"name":"Alice"}},{"id":"bob","set":{"revoke_tokens_issued_before":%d}}]}' % NOW,
        '{"users":[{"id":"a","set":{"revoke_tokens_issued_before":%d000}}]}' % NOW,
        '{"users":[{"id":"a","set":{"revoke_tokens_issued_before":%d.5}}]}' % (NOW + 300),
        '{"users":[{"id":"a","set":{"revoke_tokens_issued_before":"2026-11-28T10:05:00.5Z"}}]}',
        '{"users":[{"id":"a","set":{"revoke_tokens_issued_before":"2026-11-28 10:00:00.5+00:00"}}]}',
        '{"users":[{"id":"a","set":{"revoke_tokens_issued_before":"2026-11-28T10:00"}}]}',
        '{"users":[{"id":"a","set":{"revoke_tokens_issued_before":"2026-11-28"}}]}',
        '{"users":[{"id":"a","set":{"revoke_tokens_issued_before":"2026-11-28T11:00:00+01:00"}}]}',
        '{"users":[{"id":"a","set":{"revoke_tokens_issued_before":"2026-11-28T10:00:00.1234567+00:00"}}]}',
        '{"users":[{"id":"u","set":{"revoke_tokens_issued_before":"someday"}}]}',
        '{"users":[{"id":"u","set":{"revoke_tokens_issued_before":"2999-01-01T00:00:00Z"}}]}',
        '{"users":[{"set":{"revoke_tokens_issued_before":null}}]}',
        '{"users":[{"id":"","set":{}}]}',
        '{"users":[{"id":"u","set":[]}]}',
        '{"users":[{"id":"u","unset":"x"}]}',
        '{"users":{}}',
        'not json',
        '{"revoke_tokens_issued_before":"2026-11-28T10:00:00Z"}',
        '{"revoke_tokens_issued_before":null}',
        '{"revoke_tokens_issued_before":%d}' % NOW,
        '{"revoke_tokens_issued_before":-1.5}',
        '{"revoke_tokens_issued_before":0.25}',
        '{"revoke_tokens_issued_before":1e10}',
        '{"revoke_tokens_issued_before":true}',
        '{"disable_auth_checks":false}',
        '[]',
    ]
    bodies.append(json.dumps({"users": [{"id": f"u{i}", "set": {"revoke_tokens_issued_before": None}} for i in range(101)]}))
    for b in bodies:
        write("revocation_body", b)


def config_seeds():
    with open(os.path.join(ROOT, "config.toml")) as f:
        write("config_parse", f.read())
    texts = [
        '[[apps]]\napi_key = "k"\nsecrets = ["a-secret-of-thirty-two-bytes-ok!"]\n',
        '[[apps]]\napi_key = "k"\nsecret_env = "FUZZ_SECRET"\n',
        '[[apps]]\napi_key = "k"\nsecret_env = ["FUZZ_A", "FUZZ_B"]\n',
        '[[apps]]\napi_key = "k"\nsecret_env = "FUZZ_EMPTY"\n',
        '[[apps]]\napi_key = "k"\nsecret_env = "UNSET_VARIABLE"\n',
        '[[apps]]\napi_key = "k"\nsecret_file = "missing.txt"\n',
        '[[apps]]\napi_key = "k"\nsecrets = []\n',
        '[[apps]]\napi_key = ""\nsecrets = ["x"]\n',
        '[[apps]]\napi_key = "demo-key"\nsecrets = ["a"]\n[[apps]]\napi_key = "demo-key"\nsecrets = ["b"]\n',
        '[[apps]]\napi_key = "k"\nsecrets = ["s"]\nrevoke_tokens_issued_before = "2026-01-01T00:00:00Z"\n',
        '[[apps]]\napi_key = "k"\nsecrets = ["s"]\nrevoke_tokens_issued_before = "soon"\n',
        '[[apps]]\napi_key = "k"\nsecrets = ["s"]\nallow_anonymous = true\ndisable_auth_checks = "yes"\n',
        '[server]\nlisten = "127.0.0.1:8080"\nheader_timeout_ms = 0\nmax_header_bytes = 10\n',
        '[server]\nlisten = "not an address"\n',
        '[auth]\nleeway_seconds = -5\nmax_token_bytes = 0\npublic_paths = ["/healthz", "/static/*", "relative"]\n',
        '[revocation]\nstore = "redis"\nredis_url = "rediss://user:pass@redis.example:6380/0"\nsentinels = ["10.0.0.7:26379"]\nsentinel_master = "m"\nmin_replicas_acked = 1\n',
        '[revocation]\nstore = "memory"\non_store_error = "allow"\nstore_timeout_ms = 0\ncache_ttl_seconds = 0\ncache_capacity = 0\n',
        '[revocation]\nstore = "tape"\n',
        '[limits]\nfailed_auth_per_minute = 30\ntrusted_proxies = ["10.0.0.0/8", "::1", "300.0.0.1", "10.0.0.0/33"]\n',
        '[log]\nformat = "json"\nuser_ids = false\n',
        '[log]\nformat = "xml"\n',
        '[upstream]\naddresses = []\ntls = true\nsni = ""\nconnect_timeout_ms = 0\n',
        '[upstream]\naddresses = ["127.0.0.1:3030", "::1"]\n',
        '[unknown]\nkey = 1\n',
        '[server\nlisten = 1',
        'apps = "x"',
        '[[apps]]\napi_key = "k"\napi_key = "k"\n',
        '[[apps]]\napi_key = "\u00e9\u00e8"\nsecrets = ["\u00e9"]\n  bogus = 1\n',
    ]
    for t in texts:
        write("config_parse", t)


def ws_seeds():
    text = b"\x81\x02hi"
    masked = b"\x81\x82" + b"\x01\x02\x03\x04" + b"ij"
    medium = b"\x81\x7e\x01\x2c" + b"a" * 300
    close = b"\x88\x02\x03\xe8"
    long_header = b"\x82\x7f" + (70000).to_bytes(8, "big")
    huge = b"\x82\x7f\xff\xff\xff\xff\xff\xff\xff\xff"
    ping = b"\x89\x00"
    streams = [text, masked, medium[:50], text + masked + close, ping + ping + text, long_header, huge, text[:1], close + text]
    for seed, s in enumerate(streams):
        write("ws_frames", bytes([seed]) + s)
    payloads = [b"", b'{"error":{"code":40}}', b"a" * 200, "\u00e9".encode() * 70, b"\xff\xfe", b"x" * 126]
    for p in payloads:
        write("ws_frames", b"\x83" + p)


if __name__ == "__main__":
    for fn in (token_seeds, gate_seeds, revocation_seeds, config_seeds, ws_seeds):
        fn()
    for t in sorted(os.listdir(HERE)):
        if os.path.isdir(os.path.join(HERE, t)):
            print(t, len(os.listdir(os.path.join(HERE, t))), file=sys.stderr)
