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
