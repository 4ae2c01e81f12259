#!/usr/bin/env bash
# The README's metrics picture (issue 14 item 5): a real load run through the release
# proxy with the shipped config.toml (its demo upstream, embedded revocation store),
# scraped by Prometheus every second, with a config reload, a revocation, a failed
# reload and WebSockets in it; then the key series are read back through Prometheus's
# HTTP API and plotted (scripts/metrics/plot.py, matplotlib) into docs/metrics-run.png.
#
# Timeline (s after the load starts, for the default LOAD_SECONDS=150; scaled with it): 10 WebSockets for alice and 10 for bob open at
# 10; 40: a reload that adds an app; 70: `chatgate revoke user bob` (bob's requests
# turn 401 and the proxy ends his WebSockets); 100: a broken config (reload fails, the
# running config stays); 110: the file fixed (reload succeeds); 130: alice's WebSockets
# close; 150: the load ends. Bounded (~3 min), loopback only.
#
#   scripts/metrics_picture.sh                  # builds the release binary if needed
#   BIN=target/release/chatgate OUT=/tmp/x.png scripts/metrics_picture.sh
#
# Needs: prometheus (Debian: apt-get install prometheus), wrk, python3 with matplotlib.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-target/release/chatgate}
OUT=${OUT:-docs/metrics-run.png}
LOAD_SECONDS=${LOAD_SECONDS:-150}
# Pacing per wrk connection (ms between its requests): 8 connections at 5 ms keep the
# rate near 1,000 requests/s, a steady load that leaves a shared machine usable.
DELAY_MS=${DELAY_MS:-5}
PROXY_PORT=${PROXY_PORT:-18480}
ADMIN_PORT=${ADMIN_PORT:-18490}
DEMO_PORT=${DEMO_PORT:-18430}
PROM_PORT=${PROM_PORT:-18495}

for tool in prometheus wrk python3 curl; do
  command -v "$tool" >/dev/null || { echo "missing: $tool (Debian: apt-get install -y prometheus wrk curl)"; exit 1; }
done
python3 -c 'import matplotlib' 2>/dev/null || { echo "missing: matplotlib (pip install matplotlib)"; exit 1; }
[ -x "$BIN" ] || cargo build --release --features cli --bin chatgate

# shellcheck source=benches/lib.sh
. benches/lib.sh

# The shipped config, on ports of its own so that it cannot collide with a running
# quickstart; everything else as shipped.
CONFIG="$WORK/config.toml"
sed -e "s/127.0.0.1:8080/127.0.0.1:$PROXY_PORT/" -e "s/127.0.0.1:9090/127.0.0.1:$ADMIN_PORT/" \
  -e "s/127.0.0.1:3030/127.0.0.1:$DEMO_PORT/" config.toml >"$CONFIG"
grep -q "127.0.0.1:$PROXY_PORT" "$CONFIG" && grep -q "127.0.0.1:$ADMIN_PORT" "$CONFIG" &&
  grep -q "127.0.0.1:$DEMO_PORT" "$CONFIG" || { echo "config.toml's addresses changed: update this script"; exit 1; }
cp "$CONFIG" "$WORK/config.orig"

cat >"$WORK/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: chatgate
    static_configs:
      - targets: ["127.0.0.1:$ADMIN_PORT"]
EOF
prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/tsdb" \
  --web.listen-address="127.0.0.1:$PROM_PORT" >"$WORK/prometheus.log" 2>&1 &
PIDS+=($!)

RUST_LOG=warn "$BIN" serve --config "$CONFIG" >"$WORK/chatgate.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null && break
  sleep 0.1
done
curl -sf "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null || { echo "chatgate not ready"; cat "$WORK/chatgate.log"; exit 1; }
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$PROM_PORT/-/ready" >/dev/null && break
  sleep 0.1
done
curl -sf "http://127.0.0.1:$PROM_PORT/-/ready" >/dev/null || { echo "prometheus not ready"; cat "$WORK/prometheus.log"; exit 1; }
# A scrape of the live proxy, kept for the monitoring examples' check.
curl -sf "http://127.0.0.1:$ADMIN_PORT/metrics" >"$WORK/metrics-before.txt"

token() { "$BIN" token create --config "$CONFIG" --api-key demo-key --user "$1" --ttl 1h; }
TOKEN_A=$(token alice)
TOKEN_B=$(token bob)
URL="http://127.0.0.1:$PROXY_PORT/channels?api_key=demo-key"
code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: $TOKEN_B" -H 'stream-auth-type: jwt' "$URL")
[ "$code" = 200 ] || { echo "bob's request got $code"; exit 1; }

EVENTS="$WORK/events.tsv"
: >"$EVENTS"
event() { printf '%s\t%s\n' "$(date +%s.%N)" "$1" >>"$EVENTS"; echo "$(date +%T) $1"; }
sleep 3 # a few idle scrapes first
START=$(date +%s)
at() { # sleep until $1 of 150 parts of the load's duration have passed
  local wait=$((START + $1 * LOAD_SECONDS / 150 - $(date +%s)))
  [ "$wait" -le 0 ] || sleep "$wait"
}

TOKEN_A=$TOKEN_A TOKEN_B=$TOKEN_B DELAY_MS=$DELAY_MS \
  wrk -t1 -c8 -d"${LOAD_SECONDS}s" -s scripts/metrics/load.lua "$URL" >"$WORK/wrk.txt" 2>&1 &
WRK=$!
PIDS+=($WRK)
event "load starts (alice and bob)"

at 10
WS_SECONDS=$((120 * LOAD_SECONDS / 150))
python3 scripts/metrics/hold_websockets.py "127.0.0.1:$PROXY_PORT" demo-key "$TOKEN_A" 10 "$WS_SECONDS" >"$WORK/ws-alice.txt" 2>&1 &
PIDS+=($!)
python3 scripts/metrics/hold_websockets.py "127.0.0.1:$PROXY_PORT" demo-key "$TOKEN_B" 10 "$WS_SECONDS" >"$WORK/ws-bob.txt" 2>&1 &
PIDS+=($!)
event "20 WebSockets open"

at 40
printf '\n[[apps]]\napi_key = "second-app"\nsecrets = ["second-app-secret-0123456789abcdef0123"]\n' >>"$CONFIG"
event "reload: app added"

at 70
"$BIN" revoke user bob --api-key demo-key --config "$CONFIG" >"$WORK/revoke.txt" 2>&1 ||
  { echo "revoke failed:"; cat "$WORK/revoke.txt"; exit 1; }
event "bob revoked"

at 100
printf '\n[[apps]]\napi_key = "demo-key"\nsecrets = ["duplicate-0123456789abcdef0123456789ab"]\n' >>"$CONFIG"
event "broken config: reload fails"

at 110
cp "$WORK/config.orig" "$CONFIG"
event "config fixed: reload"

wait "$WRK" || true
END=$(date +%s)
event "load ends"
sleep 4 # the last scrapes
curl -sf "http://127.0.0.1:$ADMIN_PORT/metrics" >"$WORK/metrics-after.txt"

echo "--- wrk"
cat "$WORK/wrk.txt"
echo "--- websockets"
cat "$WORK/ws-alice.txt" "$WORK/ws-bob.txt"
echo "--- revoke"
cat "$WORK/revoke.txt"

# Every series the monitoring examples query must exist in a real scrape (the picture
# is made either way; the exit status says whether the check passed).
checked=0
python3 scripts/metrics/check_examples.py "$WORK/metrics-after.txt" \
  examples/monitoring/grafana-dashboard.json examples/monitoring/alerts.yml || checked=$?

mkdir -p "$(dirname "$OUT")"
python3 scripts/metrics/plot.py "http://127.0.0.1:$PROM_PORT" "$((START - 5))" "$((END + 4))" "$EVENTS" "$OUT"
ls -l "$OUT"
exit "$checked"
