#!/usr/bin/env bash
# Bounded load check of the edge proxy (issue 5): chatgate with a valid token next to a
# Pingora pass-through with no auth (examples/passthrough.rs, tuned the same way), both
# in front of one nginx upstream serving a ~100-byte JSON reply. Loopback only.
# Rounds are interleaved (chatgate, pass-through, chatgate, ...) so drift on a shared
# machine hits both alike; the medians and their ratio are printed at the end.
# Target: auth costs at most 5% of throughput (ratio >= 0.95).
#
#   benches/proxy_load.sh                  # 5 rounds x 8 s per target
#   ROUNDS=3 DURATION=5 benches/proxy_load.sh
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-8}
CONNECTIONS=${CONNECTIONS:-32}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
UPSTREAM_PORT=${UPSTREAM_PORT:-18280}
CHATGATE_PORT=${CHATGATE_PORT:-18281}
PASSTHROUGH_PORT=${PASSTHROUGH_PORT:-18282}
SECRET="load-secret-0123456789abcdef0123456789abcdef"

need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || ! need nginx; then
  echo "installing wrk and nginx-light from Debian's packages"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx-light >/dev/null
fi

cargo build --release --features proxy --bin chatgate --example passthrough
BIN=target/release/chatgate
PASSTHROUGH=target/release/examples/passthrough

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

cat >"$WORK/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $WORK/nginx.pid;
error_log $WORK/nginx.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$UPSTREAM_PORT;
    location / {
      default_type application/json;
      return 200 '{"channels":[],"duration":"0.42ms","ok":true,"user":{"id":"bench","role":"user"},"x":"0123456"}';
    }
  }
}
CONF
taskset -c "$LOAD_CPU" nginx -c "$WORK/nginx.conf" -p "$WORK" &
PIDS+=($!)

cat >"$WORK/chatgate.toml" <<CONF
[server]
listen = "127.0.0.1:$CHATGATE_PORT"
admin_listen = "off"
threads = 1
[upstream]
addresses = ["127.0.0.1:$UPSTREAM_PORT"]
[revocation]
store = "memory"
[[apps]]
api_key = "bench"
secrets = ["$SECRET"]
CONF
taskset -c "$PROXY_CPU" "$BIN" serve --config "$WORK/chatgate.toml" \
  --upgrade-sock "$WORK/upgrade.sock" >"$WORK/chatgate.log" 2>&1 &
PIDS+=($!)
declare -A PID=([chatgate]=$!)
taskset -c "$PROXY_CPU" "$PASSTHROUGH" --listen "127.0.0.1:$PASSTHROUGH_PORT" \
  --upstream "127.0.0.1:$UPSTREAM_PORT" >"$WORK/passthrough.log" 2>&1 &
PIDS+=($!)
PID[passthrough]=$!

TOKEN=$("$BIN" token create --config "$WORK/chatgate.toml" --api-key bench --user bench-user --ttl 2h)
URL_PATH="/channels?api_key=bench"

# Both must answer 200 with the token (at most 10 s to start), and chatgate must refuse
# a request without one: a misconfigured gate would make the comparison meaningless.
for port in $CHATGATE_PORT $PASSTHROUGH_PORT; do
  code=000
  for _ in $(seq 1 100); do
    code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: $TOKEN" \
      "http://127.0.0.1:$port$URL_PATH" || true)
    [ "$code" = 200 ] && break
    sleep 0.1
  done
  [ "$code" = 200 ] || { echo "port $port is not answering 200 (got $code)"; cat "$WORK"/*.log; exit 1; }
done
code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$CHATGATE_PORT$URL_PATH")
[ "$code" = 401 ] || { echo "chatgate let a request without a token through ($code)"; exit 1; }

# CPU time the proxy process spent (user + system), in clock ticks: divided by the
# requests served it is the proxy's cost per request, which other load on the machine
# disturbs less than requests/s do.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICKS=$(getconf CLK_TCK)
RESULTS="$WORK/results.tsv"
: >"$RESULTS"
echo "rounds=$ROUNDS duration=${DURATION}s connections=$CONNECTIONS proxy core=$PROXY_CPU load core=$LOAD_CPU"
printf 'round\ttarget\trequests/s\tproxy CPU µs/req\n'
for round in $(seq 1 "$ROUNDS"); do
  for target in chatgate passthrough; do
    port=$CHATGATE_PORT
    [ "$target" = passthrough ] && port=$PASSTHROUGH_PORT
    before=$(cpu_ticks "${PID[$target]}")
    out=$(taskset -c "$LOAD_CPU" timeout $((DURATION + 30)) wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" \
      -H "Authorization: $TOKEN" -H "stream-auth-type: jwt" "http://127.0.0.1:$port$URL_PATH")
    after=$(cpu_ticks "${PID[$target]}")
    non2xx=$(echo "$out" | awk '/Non-2xx/ {print $4}')
    [ -z "$non2xx" ] || { echo "$target answered $non2xx non-2xx responses"; exit 1; }
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    requests=$(echo "$out" | awk '/requests in/ {print $1}')
    cpu_us=$(awk -v t=$((after - before)) -v hz="$TICKS" -v n="$requests" 'BEGIN { printf "%.2f", t / hz * 1e6 / n }')
    printf '%s\t%s\t%s\t%s\n' "$round" "$target" "$rps" "$cpu_us" | tee -a "$RESULTS"
  done
done

median() { sort -n | awk '{a[NR]=$1} END { if (NR % 2) print a[(NR+1)/2]; else print (a[NR/2] + a[NR/2+1]) / 2 }'; }
CHATGATE=$(awk '$2 == "chatgate" {print $3}' "$RESULTS" | median)
PASS=$(awk '$2 == "passthrough" {print $3}' "$RESULTS" | median)
CHATGATE_CPU=$(awk '$2 == "chatgate" {print $4}' "$RESULTS" | median)
PASS_CPU=$(awk '$2 == "passthrough" {print $4}' "$RESULTS" | median)
echo
printf 'median requests/s  chatgate: %.0f   pass-through (no auth): %.0f\n' "$CHATGATE" "$PASS"
printf 'median proxy CPU   chatgate: %.2f µs/req   pass-through: %.2f µs/req\n' "$CHATGATE_CPU" "$PASS_CPU"
awk -v a="$CHATGATE" -v b="$PASS" 'BEGIN {
  ratio = a / b
  printf "chatgate / pass-through requests/s: %.3f (auth costs %.1f%% of throughput; target <= 5%%)\n", ratio, (1 - ratio) * 100
}'
awk -v a="$CHATGATE_CPU" -v b="$PASS_CPU" 'BEGIN {
  printf "pass-through / chatgate CPU per request: %.3f (the throughput ratio a saturated proxy core would give)\n", b / a
}'
