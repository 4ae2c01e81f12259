# chatgate in a container: build with the Rust image, run on a slim Debian as a
# non-root user. (Checked without a Docker engine: packaging/podman-check.sh builds
# and runs it with podman; see README, Packaging, for what that run covers.)
#
#   docker build -t chatgate .
#   docker run --rm -p 8080:8080 -p 9090:9090 chatgate                 # the quickstart config
#   docker run --rm -p 8080:8080 -p 9090:9090 \
#       -v "$PWD/chatgate.toml:/etc/chatgate/config.toml:ro" chatgate   # your own
#
# Your config listens on 0.0.0.0 to be reachable through -p.

# --- build -----------------------------------------------------------------------
FROM rust:1-bookworm AS build
# cmake: Pingora's zlib-ng (scripts/cmake says so when it is missing). Pingora's OpenSSL
# is vendored, built from source with the image's perl and make; pkg-config + libssl-dev
# serve only an OPENSSL_NO_VENDOR=1 build against the system's OpenSSL.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake pkg-config libssl-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# release: fat LTO, the shipped build (long: up to 90 min on 2 cores); perf: thin LTO,
# a fraction of that, for trying the image (--build-arg CARGO_PROFILE=perf).
ARG CARGO_PROFILE=release
# BuildKit caches keep the registry and the dependencies' builds between image builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --profile "$CARGO_PROFILE" --locked --features cli --bin chatgate \
 && install -D -m 0755 "target/$CARGO_PROFILE/chatgate" /out/chatgate
# The shipped quickstart config, reachable from outside the container and with its
# embedded store on the volume (the demo API stays on the container's loopback).
RUN sed -e 's/^listen = "127.0.0.1:8080"/listen = "0.0.0.0:8080"/' \
        -e 's/^admin_listen = "127.0.0.1:9090"/admin_listen = "0.0.0.0:9090"/' \
        -e 's|^path = "chatgate-revocations.db"|path = "/var/lib/chatgate/revocations.db"|' \
        config.toml > /out/config.toml \
 && /out/chatgate config check /out/config.toml

# --- run -------------------------------------------------------------------------
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/chatgate --create-home --shell /usr/sbin/nologin chatgate
COPY --from=build /out/chatgate /usr/local/bin/chatgate
COPY --from=build /out/config.toml /etc/chatgate/config.toml
USER 10001:10001
WORKDIR /var/lib/chatgate
# The embedded revocation store: keep it across container restarts.
VOLUME ["/var/lib/chatgate"]
EXPOSE 8080 9090
# SIGTERM drains within the grace period; SIGHUP (docker kill -s HUP) reloads the config.
# No HEALTHCHECK: the image has no HTTP client; point the orchestrator at :9090/readyz.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/chatgate"]
CMD ["serve", "--config", "/etc/chatgate/config.toml", "--upgrade-sock", "/var/lib/chatgate/upgrade.sock"]
