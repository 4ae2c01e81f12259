#!/usr/bin/env bash
# Exercises the Dockerfile and the systemd unit on a machine with no Docker engine and
# no container registry, only Debian's packages (issue 14, packaging):
#
#   1. podman + runc from Debian; base images made here: debian:bookworm-slim from
#      debootstrap, and a stand-in for rust:1-bookworm (that Debian plus build tools and
#      this machine's Rust toolchain, laid out as the official image lays out rustup's).
#   2. `podman build` of the Dockerfile, then the image run with its shipped config:
#      /healthz, /readyz, a proxied request with a token, one without, SIGHUP, stop.
#   3. packaging/chatgate.service under a real systemd (PID 1 of a container), installed
#      with the commands of its header: start, readiness, a proxied request, the
#      sandbox the process got, `systemctl reload`, `systemctl stop`.
#
#   packaging/podman-check.sh                        # CARGO_PROFILE=perf image build
#   CARGO_PROFILE=release packaging/podman-check.sh  # the shipped profile (fat LTO: long)
#   PREBUILT=target/perf/chatgate packaging/podman-check.sh
#       # `cargo build` replaced by `cargo --version` and that binary (every other
#       # line of the Dockerfile as written): checks the image in minutes
#
# Needs root (apt-get, debootstrap, podman). Ports: 127.0.0.1:28480 and :29490.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
CARGO_PROFILE=${CARGO_PROFILE:-perf}
WORK=${PODMAN_CHECK_DIR:-/var/tmp/chatgate-podman-check}
PROXY_PORT=28480
ADMIN_PORT=29490
mkdir -p "$WORK"

need() { command -v "$1" >/dev/null 2>&1; }
if ! need podman || ! need runc || ! need debootstrap || ! need curl; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap curl >/dev/null
fi

# What this kind of machine needs (a Firecracker VM, cgroup v1 with one controller on
# v2, no CAP_SYS_RESOURCE): crun refuses hybrid cgroups, so runc; podman's default
# rlimits for root (nofile 1048576) exceed the hard limit here and cannot be raised.
cat >"$WORK/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$(ulimit -Hn):$(ulimit -Hn)", "nproc=32768:32768"]
[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF=$WORK/containers.conf

if ! podman image exists localhost/debian-bookworm-debootstrap; then
  rm -rf "$WORK/rootfs"
  debootstrap --variant=minbase bookworm "$WORK/rootfs" >"$WORK/debootstrap.log"
  rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
  tar -C "$WORK/rootfs" -c . | podman import - localhost/debian-bookworm-debootstrap >/dev/null
  rm -rf "$WORK/rootfs"
fi
# The names the Dockerfile uses resolve to these local images: podman pulls only what
# it does not have.
podman tag localhost/debian-bookworm-debootstrap docker.io/library/debian:bookworm-slim

if ! podman image exists docker.io/library/rust:1-bookworm; then
  rm -rf "$WORK/rust"
  mkdir -p "$WORK/rust"
  toolchain=$(rustc --print sysroot)
  cp -a "$toolchain" "$WORK/rust/toolchain"
  rm -rf "$WORK/rust/toolchain/share"
  cat >"$WORK/rust/Containerfile" <<'EOF'
FROM localhost/debian-bookworm-debootstrap
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl git gcc g++ make perl libc6-dev file xz-utils patch \
 && rm -rf /var/lib/apt/lists/*
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
COPY toolchain /usr/local/rustup/toolchains/stable-x86_64-unknown-linux-gnu
RUN mkdir -p /usr/local/cargo/bin \
 && ln -s /usr/local/rustup/toolchains/stable-x86_64-unknown-linux-gnu/bin/* /usr/local/cargo/bin/ \
 && cargo --version
EOF
  podman build -q -t docker.io/library/rust:1-bookworm "$WORK/rust" >/dev/null
  rm -rf "$WORK/rust"
fi

# --- 2. the image ------------------------------------------------------------------
if [ -n "${PREBUILT:-}" ]; then
  # The Dockerfile as written (the build stage's apt-get line, COPY of the context
  # through .dockerignore, the cache mounts, the config rewrite and check, the whole
  # run stage), but for one command: `cargo build` becomes `cargo --version`, and the
  # binary installed is PREBUILT, put in the context for the build's length. (Not
  # `cargo fetch`: where this was written, the crates registry is reached through a
  # TLS-intercepting gateway whose CA the host trusts and a container does not.)
  grep -q 'cargo build --profile "$CARGO_PROFILE" --locked --features cli --bin chatgate' Dockerfile \
    && grep -q '"target/$CARGO_PROFILE/chatgate"' Dockerfile \
    || { echo "FAIL: the Dockerfile's build command changed: update PREBUILT's substitution"; exit 1; }
  sed -e 's|cargo build --profile "$CARGO_PROFILE" --locked --features cli --bin chatgate|cargo --version|' \
    -e 's|"target/$CARGO_PROFILE/chatgate"|.podman-check-chatgate|' Dockerfile >"$WORK/Containerfile"
  cp "$PREBUILT" .podman-check-chatgate
  trap 'rm -f "$REPO/.podman-check-chatgate"' EXIT
  podman build -t localhost/chatgate:check -f "$WORK/Containerfile" .
  rm -f .podman-check-chatgate
else
  podman build -t localhost/chatgate:check --build-arg CARGO_PROFILE="$CARGO_PROFILE" .
fi

cleanup() {
  podman rm -f chatgate-check chatgate-check-systemd >/dev/null 2>&1 || true
  rm -f "$REPO/.podman-check-chatgate"
}
trap cleanup EXIT
cleanup
podman run -d --name chatgate-check -p "127.0.0.1:$PROXY_PORT:8080" -p "127.0.0.1:$ADMIN_PORT:9090" \
  localhost/chatgate:check >/dev/null
code=000
for _ in $(seq 1 100); do
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$ADMIN_PORT/readyz" || true)
  [ "$code" = 200 ] && break
  sleep 0.2
done
[ "$code" = 200 ] || { podman logs chatgate-check; echo "FAIL: /readyz $code"; exit 1; }
expect() { # what status command...
  local got
  got=$(curl -s -o /dev/null -w '%{http_code}' "${@:3}")
  [ "$got" = "$2" ] || { podman logs chatgate-check | tail -20; echo "FAIL: $1: $got, not $2"; exit 1; }
  echo "ok: $1 ($got)"
}
expect "admin /healthz" 200 "http://127.0.0.1:$ADMIN_PORT/healthz"
expect "proxy /healthz (public path)" 200 "http://127.0.0.1:$PROXY_PORT/healthz"
TOKEN=$(podman exec chatgate-check chatgate token create --config /etc/chatgate/config.toml \
  --api-key demo-key --user alice --ttl 1h)
expect "proxied request with a token" 200 -H "Authorization: $TOKEN" -H "stream-auth-type: jwt" \
  "http://127.0.0.1:$PROXY_PORT/channels?api_key=demo-key"
expect "proxied request without one" 401 "http://127.0.0.1:$PROXY_PORT/channels?api_key=demo-key"
echo "ok: runs as $(podman exec chatgate-check id -u):$(podman exec chatgate-check id -g)"
podman kill -s HUP chatgate-check >/dev/null
sleep 1
podman logs chatgate-check 2>&1 | grep -q "config reloaded" || { echo "FAIL: SIGHUP did not reload"; exit 1; }
echo "ok: SIGHUP reloaded the config"
podman stop -t 40 chatgate-check >/dev/null
echo "ok: stopped (exit $(podman inspect chatgate-check --format '{{.State.ExitCode}}'))"

# --- 3. the systemd unit -------------------------------------------------------------
rm -rf "$WORK/systemd"
mkdir -p "$WORK/systemd"
podman cp "chatgate-check:/usr/local/bin/chatgate" "$WORK/systemd/chatgate"
sed -e 's|^path = "chatgate-revocations.db"|path = "/var/lib/chatgate/revocations.db"|' \
  config.toml >"$WORK/systemd/config.toml"
cp packaging/chatgate.service "$WORK/systemd/"
cat >"$WORK/systemd/Containerfile" <<'EOF'
FROM localhost/debian-bookworm-debootstrap
RUN apt-get update && apt-get install -y --no-install-recommends systemd systemd-sysv curl dbus \
 && rm -rf /var/lib/apt/lists/*
COPY chatgate config.toml chatgate.service /tmp/
# The unit file header's install commands.
RUN install -m 0755 /tmp/chatgate /usr/local/bin/chatgate \
 && install -D -m 0644 /tmp/config.toml /etc/chatgate/config.toml \
 && install -m 0644 /tmp/chatgate.service /etc/systemd/system/ \
 && systemctl enable chatgate
CMD ["/sbin/init"]
EOF
podman build -q -t localhost/chatgate-systemd:check "$WORK/systemd" >/dev/null
podman run -d --name chatgate-check-systemd --systemd=always localhost/chatgate-systemd:check >/dev/null
in_unit() { podman exec chatgate-check-systemd sh -c "$1"; }
for _ in $(seq 1 100); do
  [ "$(in_unit 'curl -s -o /dev/null -w %{http_code} http://127.0.0.1:9090/readyz' || true)" = 200 ] && break
  sleep 0.2
done
in_unit 'systemctl is-active chatgate' | grep -qx active || { in_unit 'systemctl status chatgate'; exit 1; }
echo "ok: chatgate.service active under systemd, /readyz 200"
TOKEN=$(in_unit 'chatgate token create --config /etc/chatgate/config.toml --api-key demo-key --user alice --ttl 1h')
got=$(in_unit "curl -s -o /dev/null -w %{http_code} -H 'Authorization: $TOKEN' -H 'stream-auth-type: jwt' 'http://127.0.0.1:8080/channels?api_key=demo-key'")
[ "$got" = 200 ] || { echo "FAIL: proxied request under systemd: $got"; exit 1; }
echo "ok: proxied request under systemd (200)"
in_unit 'P=$(systemctl show -p MainPID --value chatgate)
  echo "sandbox: uid $(awk "/^Uid/ {print \$2}" /proc/$P/status)," \
    "$(grep -E "^(CapEff|NoNewPrivs|Seccomp):" /proc/$P/status | tr -s "\t\n" "  ")"
  echo "sandbox: / mounted $(awk "\$5 == \"/\" {print \$6}" /proc/$P/mountinfo | tail -1)," \
    "state dir $(awk "\$5 == \"/var/lib/private/chatgate\" {print \$6}" /proc/$P/mountinfo | tail -1)"
  systemd-analyze security chatgate --no-pager | tail -1'
in_unit 'systemctl reload chatgate && sleep 1 && journalctl -u chatgate --no-pager | grep -q "config reloaded"'
echo "ok: systemctl reload (SIGHUP) reloaded the config"
start=$(date +%s%N)
in_unit 'systemctl stop chatgate'
echo "ok: systemctl stop in $((($(date +%s%N) - start) / 1000000)) ms:" \
  "$(in_unit 'systemctl show -p Result --value chatgate')"
echo "podman-check: all passed"
