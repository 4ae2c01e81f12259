#!/usr/bin/env bash
# TLS side by side (issue 14): chatgate with [server.tls] (both engines) vs HAProxy
# with `ssl` and jwt_verify, the same certificate (ECDSA P-256), TLS 1.3,
# TLS_AES_128_GCM_SHA256 and X25519 for all (the client offers nothing else), ALPN
# http/1.1, in front of one
# nginx upstream. Three loads, each with the token check on every request:
#   full       a new connection per request, full handshake (no resumption)
#   resumed    a new connection per request, TLS 1.3 resumption from session tickets
#   keepalive  requests over open TLS connections
# Proxies pinned to core 0 with one thread each; nginx and the load generator
# (examples/tls_load.rs, rustls) to core 1. Interleaved rounds. Reports operations/s
# and the proxy's CPU time per operation (utime + stime from /proc/PID/stat over the
# run, divided by operations: on 2 cores the load generator may saturate first, and
# then CPU per operation is the fair figure), then chatgate / HAProxy ratios.
#
#   benches/tls_compare.sh                      # perf profile, 3 rounds x 6 s
#   PROFILE=perf SKIP_BUILD=1 ROUNDS=3 DURATION=6 benches/tls_compare.sh   # built before
#   PROFILE=release benches/tls_compare.sh      # the shipped profile (fat LTO: long build)
#   PROFILE=debug benches/tls_compare.sh        # quick to build, says little about speed
#   PERF_RECORD="full keepalive" PERF_OUT=/tmp/tls benches/tls_compare.sh
#       # after the rounds, one more run of each load named against chatgate under
#       # `perf record` of the proxy (reports in PERF_OUT.TARGET.MODE.txt, data in
#       # .data); PERF_TARGETS="chatgate haproxy" profiles both, ROUNDS=0 only profiles
#   BASE_BIN=/tmp/main-chatgate TARGETS="base_forward chatgate_forward haproxy" \
#     PROFILE=perf SKIP_BUILD=1 benches/tls_compare.sh
#       # another chatgate binary (e.g. main's, copied first) as one more target,
#       # base_forward (its forward engine), interleaved with the others, with the
#       # forward / base_forward ratios per load
#   MODES=keepalive TARGETS="chatgate_forward haproxy" benches/tls_compare.sh   # a subset
# PROFILE names a cargo profile (debug = dev); chatgate and the load generator are
# built in it (`cargo build --profile perf --features cli --bin chatgate --example
# tls_load`), so a slow client does not hide the proxies' rates. SKIP_BUILD=1 runs
# what target/PROFILE holds: build first, then measure in a quiet window.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-6}
CONNECTIONS=${CONNECTIONS:-16}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
PROFILE=${PROFILE:-perf}
SECRET="bench-secret-0123456789abcdef0123456789abcdef"
UPSTREAM_PORT=18280
declare -A PORT=([chatgate]=18281 [chatgate_forward]=18282 [haproxy]=18283 [base_forward]=18284)
# chatgate is `[server] engine = "filter"`, chatgate_forward the same binary and config
# on `engine = "forward"` (issue 16's engine, the default since; HTTP/1.1 over TLS is
# its, HTTP/2 stays the filter's); both named in their configs whatever the default.
read -r -a TARGETS <<<"${TARGETS:-chatgate chatgate_forward haproxy}"
read -r -a MODES <<<"${MODES:-full resumed keepalive}"

need() { command -v "$1" >/dev/null 2>&1; }
if ! need haproxy || ! need nginx; then
  echo "installing haproxy, nginx-light from Debian's packages"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy nginx-light >/dev/null
fi

case "$PROFILE" in
  debug | dev) PROFILE=debug; PROFILE_ARGS=() ;;
  *) PROFILE_ARGS=(--profile "$PROFILE") ;;
esac
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  cargo build "${PROFILE_ARGS[@]}" --features cli --bin chatgate --example tls_load
fi
BIN=${CARGO_TARGET_DIR:-target}/$PROFILE/chatgate
LOAD=${CARGO_TARGET_DIR:-target}/$PROFILE/examples/tls_load
for built in "$BIN" "$LOAD"; do
  [ -x "$built" ] || { echo "$built is missing: build it, or run without SKIP_BUILD=1"; exit 1; }
done

# shellcheck source=benches/lib.sh
. benches/lib.sh

"$LOAD" cert "$WORK"

start_nginx_upstream "$UPSTREAM_PORT" "$LOAD_CPU"

cat >"$WORK/chatgate.toml" <<EOF
[server]
listen = "127.0.0.1:${PORT[chatgate]}"
admin_listen = "off"
threads = 1
engine = "filter"
[server.tls]
cert_file = "cert.pem"
key_file = "key.pem"
[upstream]
addresses = ["127.0.0.1:$UPSTREAM_PORT"]
[revocation]
store = "memory"
[log]
user_ids = false
[[apps]]
api_key = "bench"
secrets = ["$SECRET"]
EOF
RUST_LOG=warn taskset -c "$PROXY_CPU" "$BIN" serve --config "$WORK/chatgate.toml" \
  --upgrade-sock "$WORK/upgrade.sock" >"$WORK/chatgate.log" 2>&1 &
PIDS+=($!)
CHATGATE_PID=$!
sed -e "s/${PORT[chatgate]}/${PORT[chatgate_forward]}/" -e 's/^engine = "filter"$/engine = "forward"/' \
  "$WORK/chatgate.toml" >"$WORK/forward.toml"
RUST_LOG=warn taskset -c "$PROXY_CPU" "$BIN" serve --config "$WORK/forward.toml" \
  --upgrade-sock "$WORK/upgrade-forward.sock" >"$WORK/forward.log" 2>&1 &
PIDS+=($!)
FORWARD_PID=$!
BASE_PID=
if [ -n "${BASE_BIN:-}" ]; then
  sed -e "s/${PORT[chatgate_forward]}/${PORT[base_forward]}/" "$WORK/forward.toml" >"$WORK/base.toml"
  RUST_LOG=warn taskset -c "$PROXY_CPU" "$BASE_BIN" serve --config "$WORK/base.toml" \
    --upgrade-sock "$WORK/upgrade-base.sock" >"$WORK/base.log" 2>&1 &
  PIDS+=($!)
  BASE_PID=$!
fi

# The JWT checks HAProxy can express (alg, HS256 signature, exp), as benches/compare.sh.
write_haproxy_jwt_cfg "$WORK/haproxy.cfg" \
  "127.0.0.1:${PORT[haproxy]} ssl crt $WORK/combined.pem alpn h2,http/1.1" "$SECRET"
taskset -c "$PROXY_CPU" haproxy -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 &
PIDS+=($!)
HAPROXY_PID=$!
declare -A PID=([chatgate]=$CHATGATE_PID [chatgate_forward]=$FORWARD_PID [haproxy]=$HAPROXY_PID [base_forward]=$BASE_PID)

TOKEN=$("$BIN" token create --config "$WORK/chatgate.toml" --api-key bench --user bench-user --ttl 2h)
URL_PATH="/channels?api_key=bench"

for target in "${TARGETS[@]}"; do
  for _ in $(seq 1 150); do
    code=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$WORK/ca.pem" -H "Authorization: $TOKEN" \
      -H "stream-auth-type: jwt" "https://localhost:${PORT[$target]}$URL_PATH" || true)
    [ "$code" = 200 ] && break
    sleep 0.1
  done
  [ "$code" = 200 ] || { echo "$target is not answering 200 over TLS (got $code)"; cat "$WORK"/*.log; exit 1; }
  code=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$WORK/ca.pem" "https://localhost:${PORT[$target]}$URL_PATH")
  [ "$code" = 401 ] || { echo "$target let a request without a token through ($code)"; exit 1; }
done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICKS=$(getconf CLK_TCK)
RESULTS="$WORK/results.tsv"
: >"$RESULTS"

echo "profile=$PROFILE rounds=$ROUNDS duration=${DURATION}s connections=$CONNECTIONS proxy core=$PROXY_CPU load core=$LOAD_CPU"
for round in $(seq 1 "$ROUNDS"); do
  for mode in "${MODES[@]}"; do
    for offset in $(seq 0 $((${#TARGETS[@]} - 1))); do
      target=${TARGETS[$(((round - 1 + offset) % ${#TARGETS[@]}))]}
      before=$(cpu_ticks "${PID[$target]}")
      out=$(taskset -c "$LOAD_CPU" "$LOAD" run "127.0.0.1:${PORT[$target]}" "$WORK/ca.pem" "$mode" \
        "$CONNECTIONS" "$DURATION" "$URL_PATH" "$TOKEN")
      after=$(cpu_ticks "${PID[$target]}")
      ops=$(echo "$out" | sed -E 's/.*ops=([0-9]+).*/\1/')
      failed=$(echo "$out" | sed -E 's/.*failed=([0-9]+).*/\1/')
      resumed=$(echo "$out" | sed -E 's/.*resumed=([0-9]+).*/\1/')
      [ "$ops" -gt 0 ] || { echo "$target $mode: no operation ($out)"; cat "$WORK"/*.log; exit 1; }
      rate=$(awk -v n="$ops" -v d="$DURATION" 'BEGIN { printf "%.1f", n / d }')
      cpu_us=$(awk -v t=$((after - before)) -v hz="$TICKS" -v n="$ops" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }')
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$mode" "$target" "$rate" "$cpu_us" "$failed" "$resumed" \
        "$(echo "$out" | grep -o 'suite=.*')" | tee -a "$RESULTS"
    done
  done
done

if [ -n "${PERF_RECORD:-}" ]; then
  # Where a proxy's CPU goes under each load named: a sampled profile of the proxy
  # process (cpu-clock: no hardware counters needed), flat by symbol, and the raw data.
  PERF_OUT=${PERF_OUT:-tls_compare.perf}
  for target in ${PERF_TARGETS:-chatgate}; do
    for mode in $PERF_RECORD; do
      perf record -e cpu-clock -F 1999 ${PERF_CALLGRAPH:+--call-graph "$PERF_CALLGRAPH"} \
        -o "$PERF_OUT.$target.$mode.data" -p "${PID[$target]}" -- sleep "$DURATION" 2>"$WORK/perf.err" &
      recorder=$!
      out=$(taskset -c "$LOAD_CPU" "$LOAD" run "127.0.0.1:${PORT[$target]}" "$WORK/ca.pem" "$mode" \
        "$CONNECTIONS" "$DURATION" "$URL_PATH" "$TOKEN")
      wait "$recorder" || { cat "$WORK/perf.err"; exit 1; }
      perf report -i "$PERF_OUT.$target.$mode.data" --no-children --sort dso,symbol --percent-limit 0.3 \
        --stdio >"$PERF_OUT.$target.$mode.txt" 2>/dev/null
      echo "perf record of $target under $mode ($out): $PERF_OUT.$target.$mode.txt"
    done
  done
fi
[ "$ROUNDS" -gt 0 ] || exit 0

echo
median() { sort -n | awk '{a[NR]=$1} END { if (NR % 2) print a[(NR+1)/2]; else print (a[NR/2] + a[NR/2+1]) / 2 }'; }
# Ratios: the median over rounds of each round's own TARGET / HAProxy ratio.
ratio() { # target mode column
  awk -v t="$1" -v m="$2" -v c="$3" '$2 == m && $3 == t {x[$1] = $c} $2 == m && $3 == "haproxy" {y[$1] = $c}
    END { for (r in x) if (r in y && y[r] > 0) print x[r] / y[r] }' "$RESULTS" | median
}
column() { awk -v t="$1" -v m="$2" -v c="$3" '$2 == m && $3 == t {print $c}' "$RESULTS" | median; }
echo "medians over $ROUNDS interleaved rounds ($PROFILE build of chatgate):"
printf '| load | proxy | ops/s | CPU µs/op | HAProxy ops/s | HAProxy CPU µs/op | ops/s ratio | CPU/op ratio |\n'
printf '|---|---|---:|---:|---:|---:|---:|---:|\n'
for mode in "${MODES[@]}"; do
  for target in "${TARGETS[@]}"; do
    [ "$target" != haproxy ] || continue
    printf '| %s | %s | %.0f | %.1f | %.0f | %.1f | %.2f | %.2f |\n' "$mode" "$target" \
      "$(column "$target" "$mode" 4)" "$(column "$target" "$mode" 5)" \
      "$(column haproxy "$mode" 4)" "$(column haproxy "$mode" 5)" \
      "$(ratio "$target" "$mode" 4)" "$(ratio "$target" "$mode" 5)"
  done
done
if [[ " ${TARGETS[*]} " == *" base_forward "* ]] && [[ " ${TARGETS[*]} " == *" chatgate_forward "* ]]; then
  for mode in "${MODES[@]}"; do
    for column in 4 5; do
      awk -v m="$mode" -v c="$column" '$2 == m && $3 == "chatgate_forward" {x[$1] = $c}
        $2 == m && $3 == "base_forward" {y[$1] = $c}
        END { for (r in x) if (r in y && y[r] > 0) print x[r] / y[r] }' "$RESULTS" | median |
        awk -v m="$mode" -v c="$column" '{ printf "forward / base build, %s, %s: %.3f\n", m, (c == 4 ? "ops/s" : "CPU per op"), $1 }'
    done
  done
fi
failures=$(awk '{s += $6} END {print s + 0}' "$RESULTS")
echo "failed operations: $failures"
awk '$2 == "resumed" {printf "resumed handshakes (%s, round %s): %s\n", $3, $1, $7}' "$RESULTS"
