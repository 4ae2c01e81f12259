#!/usr/bin/env bash
# Side-by-side proxy benchmark (issue 7): chatgate with a valid token and a warm
# revocation cache; the same chatgate binary with auth off (every path public), which
# isolates what the auth check costs; a bare Pingora pass-through tuned the same way;
# HAProxy with jwt_verify (HS256 + alg + exp checks); HAProxy pass-through. All in front
# of one nginx upstream serving a ~100-byte JSON reply. Interleaved rounds (each round
# starts at the next target, so no target always runs first), loopback only, bounded.
#
# Proxies are pinned to core 0; nginx and wrk to core 1. Each proxy runs one thread.
# Prints requests/s, p50/p99 latency and proxy CPU µs per request (the proxy core's busy
# time: user + system of the proxy process, divided by requests), then the ratios.
#
#   benches/compare.sh                  # 5 rounds x 8 s per target (~4 min incl. build)
#   ROUNDS=9 DURATION=6 benches/compare.sh
#   TARGETS="chatgate chatgate_forward haproxy_jwt" benches/compare.sh   # a subset
#   TARGETS="chatgate chatgate_noauth" PERF=1 benches/compare.sh   # auth's share by profile
#
# PERF=1 also profiles the proxy (`perf record`, 999 Hz) during each chatgate,
# chatgate_forward and chatgate_noauth run, prints the top symbols of each engine's last
# round, and reports the auth run's share of samples in symbols the no-auth run of the
# same round never hit: the CPU only the check adds (plus what sampling puts there by
# chance, so an upper estimate; work inlined into a function both runs share is not in
# it). FEATURES (default "--features cli") picks the build; PROFILE (default release)
# the cargo profile and so the target/ directory (PROFILE=perf: release without fat LTO,
# target/perf/); SKIP_BUILD=1 uses the binaries already built. chatgate is the
# `[server] engine = "filter"` engine and chatgate_forward the same binary on
# `engine = "forward"` (issue 16), both named in their configs whatever the default.
#
#   BASE_BIN=/tmp/chatgate-main TARGETS="chatgate_base chatgate_forward haproxy_jwt" \
#     SKIP_BUILD=1 PROFILE=perf benches/compare.sh   # another chatgate build alongside
#
# BASE_BIN adds the target chatgate_base: that binary on the forward engine (e.g. main's
# build, to compare a branch with it in the same interleaved rounds). PERF_KEEP=DIR keeps
# the perf.data files there (for `perf report -i`). STRACE=1, after the rounds, counts
# each target's system calls per request: `strace -c -f` attached to the proxy around a
# further wrk run of STRACE_DURATION seconds (default 4; strace slows the proxy, so only
# the counts per request mean anything, not the rate).
#
# Logging is the same on both sides: by default no proxy logs requests (chatgate's
# access log off with RUST_LOG=info,chatgate::access=off; HAProxy's config has no `log`
# line), as benches/tls_compare.sh. LOGS=1 has every proxy log each request to a file:
# chatgate its access log (text, stderr), HAProxy `option httplog` to stdout. Until
# 2026-11-30 16:30 UTC only chatgate logged (one line and one write(2) per request more
# than HAProxy); figures before then carry that.
#
# CHATGATE_ENV (space-separated NAME=value words) is added to the chatgate processes'
# environment only, e.g. CHATGATE_ENV="MIMALLOC_PURGE_DELAY=1000" for mimalloc's own
# purge delay (README, "Memory returned after sessions close"); CHATGATE_BIN runs another
# chatgate binary (an older build to compare with) in place of target/$PROFILE/chatgate.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-8}
CONNECTIONS=${CONNECTIONS:-32}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
SECRET="bench-secret-0123456789abcdef0123456789abcdef"
UPSTREAM_PORT=18180
declare -A PORT=([chatgate]=18181 [chatgate_noauth]=18185 [passthrough]=18182
  [haproxy_jwt]=18183 [haproxy_plain]=18184 [chatgate_forward]=18186 [chatgate_base]=18187)
read -r -a TARGETS <<<"${TARGETS:-chatgate chatgate_forward chatgate_noauth passthrough haproxy_jwt haproxy_plain}"
PERF=${PERF:-0}
FEATURES=${FEATURES:---features cli}
PROFILE=${PROFILE:-release}
LOGS=${LOGS:-0}
if [ "$LOGS" = 1 ]; then
  export RUST_LOG=info
else
  export RUST_LOG=info,chatgate::access=off
fi
read -r -a CHATGATE_ENV <<<"${CHATGATE_ENV:-}"
has_target() { [[ " ${TARGETS[*]} " == *" $1 "* ]]; }

need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || ! need haproxy || ! need nginx; then
  echo "installing wrk, haproxy, nginx-light from Debian's packages"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk haproxy nginx-light >/dev/null
fi

# SKIP_BUILD=1: measure the binaries already in target/$PROFILE as they are.
# shellcheck disable=SC2086 # FEATURES is a list of flags
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --profile "$PROFILE" $FEATURES --bin chatgate --example passthrough
BIN=${CHATGATE_BIN:-target/$PROFILE/chatgate}
PASSTHROUGH=target/$PROFILE/examples/passthrough
echo "binaries: $BIN ($(stat -c %y "$BIN" | cut -d. -f1)), profile $PROFILE; chatgate's added environment: ${CHATGATE_ENV[*]:-(none)}"

# shellcheck source=benches/lib.sh
. benches/lib.sh

# --- upstream: nginx, one worker, a fixed 99-byte JSON reply
start_nginx_upstream "$UPSTREAM_PORT" "$LOAD_CPU"

# --- chatgate: memory store (no file I/O), admin listener off, one thread. The configs
# live in a directory of their own: chatgate watches its config file's directory, and
# the logs and perf.data files written into $WORK would wake its watcher on every write
# (with PERF=1 that showed as ~5% of the proxy's samples in the notify thread).
CONF="$WORK/config"
mkdir "$CONF"
cat >"$CONF/chatgate.toml" <<EOF
[server]
listen = "127.0.0.1:${PORT[chatgate]}"
admin_listen = "off"
threads = 1
engine = "filter"
[upstream]
addresses = ["127.0.0.1:$UPSTREAM_PORT"]
[revocation]
store = "memory"
[[apps]]
api_key = "bench"
secrets = ["$SECRET"]
EOF
taskset -c "$PROXY_CPU" env ${CHATGATE_ENV[@]+"${CHATGATE_ENV[@]}"} "$BIN" serve --config "$CONF/chatgate.toml" >"$WORK/chatgate.log" 2>&1 &
PIDS+=($!)
CHATGATE_PID=$!
# the same proxy on the forward engine (issue 16)
sed -e "s/${PORT[chatgate]}/${PORT[chatgate_forward]}/" -e 's/^engine = "filter"$/engine = "forward"/' \
  "$CONF/chatgate.toml" >"$CONF/forward.toml"
taskset -c "$PROXY_CPU" env ${CHATGATE_ENV[@]+"${CHATGATE_ENV[@]}"} "$BIN" serve --config "$CONF/forward.toml" >"$WORK/forward.log" 2>&1 &
PIDS+=($!)
FORWARD_PID=$!
# the same proxy with every path public: chatgate minus its auth check
sed -e "s/${PORT[chatgate]}/${PORT[chatgate_noauth]}/" "$CONF/chatgate.toml" >"$CONF/noauth.toml"
printf '[auth]\npublic_paths = ["/*"]\n' >>"$CONF/noauth.toml"
taskset -c "$PROXY_CPU" env ${CHATGATE_ENV[@]+"${CHATGATE_ENV[@]}"} "$BIN" serve --config "$CONF/noauth.toml" >"$WORK/noauth.log" 2>&1 &
PIDS+=($!)
NOAUTH_PID=$!
# another build on the forward engine, for a side-by-side of two builds
BASE_PID=
if [ -n "${BASE_BIN:-}" ]; then
  sed -e "s/${PORT[chatgate_forward]}/${PORT[chatgate_base]}/" "$CONF/forward.toml" >"$CONF/base.toml"
  taskset -c "$PROXY_CPU" env ${CHATGATE_ENV[@]+"${CHATGATE_ENV[@]}"} "$BASE_BIN" serve --config "$CONF/base.toml" >"$WORK/base.log" 2>&1 &
  PIDS+=($!)
  BASE_PID=$!
  echo "chatgate_base: $BASE_BIN ($(stat -c %y "$BASE_BIN" | cut -d. -f1))"
elif has_target chatgate_base; then
  echo "chatgate_base needs BASE_BIN"
  exit 1
fi

PASSTHROUGH_PID=
if has_target passthrough; then
  taskset -c "$PROXY_CPU" "$PASSTHROUGH" --listen "127.0.0.1:${PORT[passthrough]}" \
    --upstream "127.0.0.1:$UPSTREAM_PORT" >"$WORK/passthrough.log" 2>&1 &
  PIDS+=($!)
  PASSTHROUGH_PID=$!
fi

# --- HAProxy: the same JWT checks HAProxy can express (alg, HS256 signature, exp)
write_haproxy_jwt_cfg "$WORK/haproxy_jwt.cfg" "127.0.0.1:${PORT[haproxy_jwt]}" "$SECRET"
if [ "$LOGS" = 1 ]; then
  sed -i -e 's/^defaults$/defaults\n  log stdout format raw local0 info\n  option httplog/' "$WORK/haproxy_jwt.cfg"
fi
sed -e "/http-request/d" -e "s/${PORT[haproxy_jwt]}/${PORT[haproxy_plain]}/" \
  "$WORK/haproxy_jwt.cfg" >"$WORK/haproxy_plain.cfg"
taskset -c "$PROXY_CPU" haproxy -db -f "$WORK/haproxy_jwt.cfg" >"$WORK/haproxy_jwt.log" 2>&1 &
PIDS+=($!)
HAPROXY_JWT_PID=$!
taskset -c "$PROXY_CPU" haproxy -db -f "$WORK/haproxy_plain.cfg" >"$WORK/haproxy_plain.log" 2>&1 &
PIDS+=($!)
HAPROXY_PLAIN_PID=$!
declare -A PID=([chatgate]=$CHATGATE_PID [chatgate_forward]=$FORWARD_PID [chatgate_noauth]=$NOAUTH_PID [passthrough]=$PASSTHROUGH_PID \
  [chatgate_base]=$BASE_PID \
  [haproxy_jwt]=$HAPROXY_JWT_PID [haproxy_plain]=$HAPROXY_PLAIN_PID)

TOKEN=$("$BIN" token create --config "$CONF/chatgate.toml" --api-key bench --user bench-user --ttl 2h)
URL_PATH="/channels?api_key=bench"

# --- wait for everything, and check that auth really is enforced where it should be
for target in "${TARGETS[@]}"; do
  for _ in $(seq 1 100); do
    code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: $TOKEN" \
      "http://127.0.0.1:${PORT[$target]}$URL_PATH" || true)
    [ "$code" = 200 ] && break
    sleep 0.1
  done
  [ "$code" = 200 ] || { echo "$target is not answering 200 (got $code)"; cat "$WORK"/*.log; exit 1; }
done
for target in chatgate chatgate_forward chatgate_base haproxy_jwt; do
  has_target "$target" || continue
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:${PORT[$target]}$URL_PATH")
  [ "$code" = 401 ] || { echo "$target let a request without a token through ($code)"; exit 1; }
  # One character inside the signature, not its last: the last base64url character
  # carries 4 padding bits, and a decoder that ignores them (HAProxy's) can read a
  # changed last character as the same signature.
  at=$((${#TOKEN} - 10)); swap=A; [ "${TOKEN:$at:1}" = A ] && swap=B
  bad="${TOKEN:0:$at}$swap${TOKEN:$((at + 1))}"
  code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: $bad" "http://127.0.0.1:${PORT[$target]}$URL_PATH")
  [ "$code" = 401 ] || { echo "$target accepted a bad signature ($code)"; exit 1; }
done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
to_us() { # wrk prints 812.00us, 1.23ms, 2.00s
  awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) print n; else if (v ~ /ms$/) print n * 1000; else if (v ~ /s$/) print n * 1000000; else print n }'
}
TICKS=$(getconf CLK_TCK)
RESULTS="$WORK/results.tsv"
: >"$RESULTS"

echo "rounds=$ROUNDS duration=${DURATION}s connections=$CONNECTIONS proxy core=$PROXY_CPU load core=$LOAD_CPU logs=$LOGS"
echo "load: $(uptime)"
for round in $(seq 1 "$ROUNDS"); do
  for offset in $(seq 0 $((${#TARGETS[@]} - 1))); do
    target=${TARGETS[$(((round - 1 + offset) % ${#TARGETS[@]}))]}
    profiling=
    if [ "$PERF" = 1 ] && [[ $target == chatgate* ]]; then
      perf record -q -F 999 -p "${PID[$target]}" -o "$WORK/perf.$target.$round" -- sleep "$DURATION" \
        >/dev/null 2>&1 &
      profiling=$!
    fi
    before=$(cpu_ticks "${PID[$target]}")
    out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency \
      -H "Authorization: $TOKEN" -H "stream-auth-type: jwt" "http://127.0.0.1:${PORT[$target]}$URL_PATH")
    after=$(cpu_ticks "${PID[$target]}")
    [ -z "$profiling" ] || wait "$profiling" || true
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    requests=$(echo "$out" | awk '/requests in/ {print $1}')
    p50=$(to_us "$(echo "$out" | awk '$1 == "50%" {print $2}')")
    p99=$(to_us "$(echo "$out" | awk '$1 == "99%" {print $2}')")
    non2xx=$(echo "$out" | awk '/Non-2xx/ {print $4}')
    [ -z "$non2xx" ] || { echo "$target answered $non2xx non-2xx responses"; exit 1; }
    cpu_us=$(awk -v t=$((after - before)) -v hz="$TICKS" -v n="$requests" 'BEGIN { printf "%.2f", t / hz * 1e6 / n }')
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$target" "$rps" "$p50" "$p99" "$cpu_us" | tee -a "$RESULTS"
  done
done

echo "load: $(uptime)"
echo
echo "medians over $ROUNDS interleaved rounds:"
printf '| proxy | requests/s | p50 µs | p99 µs | proxy CPU µs/req |\n|---|---:|---:|---:|---:|\n'
median() { sort -n | awk '{a[NR]=$1} END { if (NR % 2) print a[(NR+1)/2]; else print (a[NR/2] + a[NR/2+1]) / 2 }'; }
declare -A MED_RPS MED_P99 MED_CPU
for target in "${TARGETS[@]}"; do
  MED_RPS[$target]=$(awk -v t="$target" '$2 == t {print $3}' "$RESULTS" | median)
  p50=$(awk -v t="$target" '$2 == t {print $4}' "$RESULTS" | median)
  MED_P99[$target]=$(awk -v t="$target" '$2 == t {print $5}' "$RESULTS" | median)
  MED_CPU[$target]=$(awk -v t="$target" '$2 == t {print $6}' "$RESULTS" | median)
  printf '| %s | %.0f | %.0f | %.0f | %.2f |\n' "$target" "${MED_RPS[$target]}" "$p50" "${MED_P99[$target]}" "${MED_CPU[$target]}"
done
echo
# Ratios: the median over rounds of each round's own ratio, so that a noisy round
# (the machine is shared) moves both sides of its ratio together.
ratio() { # numerator denominator column
  awk -v a="$1" -v b="$2" -v c="$3" '$2 == a {x[$1] = $c} $2 == b {y[$1] = $c}
    END { for (r in x) if (r in y && y[r] > 0) print x[r] / y[r] }' "$RESULTS" | median
}
diff_cpu() {
  awk -v a="$1" -v b="$2" '$2 == a {x[$1] = $6} $2 == b {y[$1] = $6}
    END { for (r in x) if (r in y) print x[r] - y[r] }' "$RESULTS" | median
}
ran() { [[ " ${TARGETS[*]} " == *" $1 "* ]] && [[ " ${TARGETS[*]} " == *" $2 "* ]]; }
if ran chatgate_forward chatgate_base; then
  printf 'forward / base build requests/s:         %.3f\n' "$(ratio chatgate_forward chatgate_base 3)"
  printf 'forward / base build p99:                %.3f\n' "$(ratio chatgate_forward chatgate_base 5)"
  printf 'forward / base build CPU per request:    %.3f\n' "$(ratio chatgate_forward chatgate_base 6)"
fi
if ran chatgate_base haproxy_jwt; then
  printf 'base build / HAProxy-jwt requests/s:     %.3f\n' "$(ratio chatgate_base haproxy_jwt 3)"
  printf 'base build / HAProxy-jwt CPU per request: %.3f\n' "$(ratio chatgate_base haproxy_jwt 6)"
fi
if ran chatgate_forward chatgate; then
  printf 'forward / filter requests/s:             %.3f\n' "$(ratio chatgate_forward chatgate 3)"
  printf 'forward / filter p99:                    %.3f\n' "$(ratio chatgate_forward chatgate 5)"
  printf 'forward / filter proxy CPU per request:  %.3f\n' "$(ratio chatgate_forward chatgate 6)"
fi
if ran chatgate_forward haproxy_jwt; then
  printf 'forward / HAProxy-jwt requests/s:        %.3f\n' "$(ratio chatgate_forward haproxy_jwt 3)"
  printf 'forward / HAProxy-jwt p99:               %.3f\n' "$(ratio chatgate_forward haproxy_jwt 5)"
  printf 'forward / HAProxy-jwt CPU per request:   %.3f\n' "$(ratio chatgate_forward haproxy_jwt 6)"
fi
if ran chatgate haproxy_jwt; then
  printf 'chatgate / HAProxy-jwt requests/s:       %.3f\n' "$(ratio chatgate haproxy_jwt 3)"
  printf 'chatgate / HAProxy-jwt p99:              %.3f\n' "$(ratio chatgate haproxy_jwt 5)"
  printf 'chatgate / HAProxy-jwt CPU per request:  %.3f\n' "$(ratio chatgate haproxy_jwt 6)"
fi
if ran chatgate chatgate_noauth; then
  auth=$(ratio chatgate chatgate_noauth 3)
  printf 'chatgate / chatgate without auth req/s:  %.3f (auth costs %.1f%%, %.2f µs CPU/req)\n' \
    "$auth" "$(awk -v r="$auth" 'BEGIN { print (1 - r) * 100 }')" "$(diff_cpu chatgate chatgate_noauth)"
  cpu=$(ratio chatgate chatgate_noauth 6)
  printf 'chatgate / chatgate without auth, proxy CPU per request: %.3f (auth adds %.1f%%)\n' \
    "$cpu" "$(awk -v r="$cpu" 'BEGIN { print (r - 1) * 100 }')"
fi
if ran chatgate passthrough; then
  printf 'chatgate / Pingora pass-through req/s: %.3f (%.2f µs CPU/req)\n' \
    "$(ratio chatgate passthrough 3)" "$(diff_cpu chatgate passthrough)"
fi
if ran chatgate_noauth passthrough; then
  printf 'chatgate without auth / Pingora pass-through req/s: %.3f\n' "$(ratio chatgate_noauth passthrough 3)"
fi
if ran passthrough haproxy_jwt; then
  printf 'Pingora pass-through / HAProxy-jwt req/s: %.3f\n' "$(ratio passthrough haproxy_jwt 3)"
fi

if [ "$PERF" = 1 ]; then
  symbols() { # percent<TAB>symbol, for one profile
    perf report -i "$1" --no-children --sort sym -F overhead,sym --stdio 2>/dev/null |
      awk -F'  +' '/^ +[0-9.]+%/ { gsub(/%/, "", $2); print $2 "\t" $3 }'
  }
  for target in chatgate chatgate_forward chatgate_base; do
    [ -f "$WORK/perf.$target.$ROUNDS" ] || continue
    echo
    echo "--- perf: $target, round $ROUNDS (self time, top symbols)"
    perf report -i "$WORK/perf.$target.$ROUNDS" --no-children --stdio --percent-limit 1.5 2>/dev/null |
      grep -v '^#' | grep -v '^$' | head -25 || true
  done
  echo
  echo "auth's share of the proxy core (perf: samples in symbols only the auth run hit), per round:"
  shares=()
  for round in $(seq 1 "$ROUNDS"); do
    [ -f "$WORK/perf.chatgate.$round" ] && [ -f "$WORK/perf.chatgate_noauth.$round" ] || continue
    symbols "$WORK/perf.chatgate_noauth.$round" | cut -f2 | sort -u >"$WORK/noauth.symbols"
    share=$(symbols "$WORK/perf.chatgate.$round" |
      awk -F'\t' 'NR == FNR { seen[$1] = 1; next } !($2 in seen) { s += $1 } END { printf "%.2f", s }' \
        "$WORK/noauth.symbols" -)
    echo "  round $round: $share%"
    shares+=("$share")
  done
  if [ "${#shares[@]}" -gt 0 ]; then
    printf 'median: %s%%\n' "$(printf '%s\n' "${shares[@]}" | median)"
    echo "the auth-only symbols of the last round, largest first:"
    symbols "$WORK/perf.chatgate.$ROUNDS" |
      awk -F'\t' 'NR == FNR { seen[$1] = 1; next } !($2 in seen)' "$WORK/noauth.symbols" - | head -15
  fi
fi

if [ -n "${PERF_KEEP:-}" ] && [ "$PERF" = 1 ]; then
  mkdir -p "$PERF_KEEP"
  cp "$WORK"/perf.* "$PERF_KEEP"/ 2>/dev/null || true
  echo "perf data kept in $PERF_KEEP"
fi

if [ "${STRACE:-0}" = 1 ]; then
  echo
  echo "system calls per request (strace -c -f attached around a ${STRACE_DURATION:-4} s wrk run):"
  for target in "${TARGETS[@]}"; do
    strace -c -f -p "${PID[$target]}" -o "$WORK/strace.$target" 2>/dev/null &
    tracer=$!
    sleep 0.5
    out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d"${STRACE_DURATION:-4}s" \
      -H "Authorization: $TOKEN" -H "stream-auth-type: jwt" "http://127.0.0.1:${PORT[$target]}$URL_PATH")
    sleep 0.2
    kill -INT "$tracer" 2>/dev/null || true
    wait "$tracer" 2>/dev/null || true
    requests=$(echo "$out" | awk '/requests in/ {print $1}')
    echo "--- $target: $requests requests"
    awk -v n="$requests" '$1 ~ /^[0-9.]+$/ && NF >= 5 && $NF != "total" {
        calls = $4; name = $NF; errors = (NF == 6) ? $5 : 0
        printf "  %-16s %6.2f calls/req %6.2f errors/req\n", name, calls / n, errors / n
      } $NF == "total" { printf "  %-16s %6.2f calls/req\n", "total", $4 / n }' "$WORK/strace.$target"
  done
fi
