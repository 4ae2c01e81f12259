# Shared by the benchmark and measurement scripts (sourced, not run): a scratch
# directory whose processes are stopped and which is removed when the script exits,
# and the fixed nginx upstream the proxy comparisons put behind every proxy.

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# start_nginx_upstream PORT CPU: nginx, one worker pinned to CPU, answering every
# request with the same 99-byte JSON body (a typical small chat API answer).
start_nginx_upstream() {
  cat >"$WORK/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $WORK/nginx.pid;
error_log $WORK/nginx.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$1;
    location / {
      default_type application/json;
      return 200 '{"channels":[],"duration":"0.42ms","ok":true,"user":{"id":"bench","role":"user"},"x":"0123456"}';
    }
  }
}
NGINX
  taskset -c "$2" nginx -c "$WORK/nginx.conf" -p "$WORK" &
  PIDS+=($!)
}

# write_haproxy_jwt_cfg FILE BIND SECRET: HAProxy with one thread and the JWT checks it
# can express (alg, HS256 signature, exp) in front of the nginx upstream at
# $UPSTREAM_PORT; BIND is the rest of the `bind` line (address, then e.g. `ssl crt ...`).
# Every comparison uses this one set of rules, so they check the same things.
write_haproxy_jwt_cfg() {
  cat >"$1" <<EOF
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
frontend jwt
  bind $2
  http-request deny deny_status 401 unless { req.hdr(authorization) -m found }
  http-request set-var(txn.token) req.hdr(authorization)
  http-request set-var(txn.alg) var(txn.token),jwt_header_query('\$.alg')
  http-request deny deny_status 401 unless { var(txn.alg) -m str HS256 }
  http-request deny deny_status 401 unless { var(txn.token),jwt_verify(txn.alg,"$3") -m int 1 }
  http-request set-var(txn.exp) var(txn.token),jwt_payload_query('\$.exp','int')
  http-request set-var(txn.now) date()
  http-request deny deny_status 401 if { var(txn.exp),sub(txn.now) -m int le 0 }
  default_backend upstream
backend upstream
  http-reuse always
  server nginx 127.0.0.1:$UPSTREAM_PORT
EOF
}
