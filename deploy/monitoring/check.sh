#!/usr/bin/env bash
# Checks deploy/monitoring against the real tools and the real binary.
#
#   bash deploy/monitoring/check.sh
#
# 1. Installs Prometheus (Debian's package `prometheus`: prometheus and promtool) with
#    apt-get when either is missing (needs root).
# 2. prometheusrule.yaml is what gen-prometheusrule.py makes of alerts.yaml;
#    `promtool check rules` on both; `promtool test rules alerts.test.yaml`.
# 3. Builds the binary; starts a fake Segment (US accepts, EU answers 503), a worker
#    and an intake (two Jebbit sources) on free loopback ports, on queues of their own
#    at the RabbitMQ on 127.0.0.1:5672, and a Prometheus of its own (scrape every 1 s,
#    alerts.yaml loaded) scraping both side ports. Sends signed webhooks (and a few bad
#    ones) so that sessions flow intake -> queue -> worker -> Segment, with retries,
#    hand-backs and a dead letter.
# 4. check_queries.py: every dashboard query and every alert expression runs without
#    error, and names only metrics the two /metrics endpoints export.
# Everything it starts (processes, queues, the temp dir) is removed on exit, failed or not.
# Needs bash, curl, python3 (standard library), cargo, and rabbitmqctl (root) or
# rabbitmqadmin to delete its queues.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
start=$(date +%s)
say() { printf '== %s\n' "$*"; }

# ------------------------------------------------------------------ tools
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  say "installing prometheus and promtool with apt-get"
  if [[ $(id -u) != 0 ]]; then
    echo "promtool/prometheus are missing and this is not root: apt-get install prometheus" >&2
    exit 2
  fi
  # Keep the package's service from starting (as in a container): it would take :9090.
  made_policy=""
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    made_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  installed=0
  apt-get install -y --no-install-recommends prometheus >/dev/null ||
    { apt-get update >/dev/null && apt-get install -y --no-install-recommends prometheus >/dev/null; } ||
    installed=$?
  if [[ -n "$made_policy" ]]; then rm -f /usr/sbin/policy-rc.d; fi
  if [[ $installed != 0 ]]; then echo "apt-get install prometheus failed" >&2; exit 2; fi
fi
promtool --version 2>&1 | head -1

# ------------------------------------------------------------------ static checks
say "rules: source of truth, syntax, unit tests"
# The static checks go on after a failure, so that one run reports every problem; the
# script fails at the end.
failed=()
python3 "$here/gen-prometheusrule.py" --check || failed+=("prometheusrule.yaml is out of date")
promtool check rules "$here/alerts.yaml" || { echo "alerts.yaml is invalid" >&2; exit 1; }
tmp="$(mktemp -d)"
queue="segment-bridge.monitoring-check.$$.$RANDOM"
pids=()
cleanup() {
  local rc=$?
  set +e
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  if [[ $rc != 0 && -d "$tmp" ]]; then
    for log in "$tmp"/*.log; do
      [[ -s "$log" ]] && { echo "--- $(basename "$log") (last lines)"; tail -n 15 "$log"; }
    done
  fi
  for q in "$queue" "$queue.dead"; do
    if command -v rabbitmqctl >/dev/null && [[ $(id -u) == 0 ]]; then
      rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1
    elif command -v rabbitmqadmin >/dev/null; then
      rabbitmqadmin -q delete queue name="$q" >/dev/null 2>&1
    fi
  done
  rm -rf "$tmp"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# PrometheusRule's spec, back out of the manifest, is valid rules too.
sed -n '/^spec:$/,$p' "$here/prometheusrule.yaml" | tail -n +2 | sed 's/^  //' >"$tmp/from-prometheusrule.yaml"
promtool check rules "$tmp/from-prometheusrule.yaml" || failed+=("promtool check rules prometheusrule.yaml")
promtool test rules "$here/alerts.test.yaml" || failed+=("promtool test rules alerts.test.yaml")

# ------------------------------------------------------------------ the binary
say "building"
(cd "$repo" && cargo build --locked --quiet)
bin="${CARGO_TARGET_DIR:-$repo/target}/debug/segment-bridge"
[[ -x "$bin" ]] || { echo "no binary at $bin" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { # url seconds
  for _ in $(seq 1 $(($2 * 10))); do curl -fsS --max-time 5 -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "$1 did not answer 200 within $2 s" >&2
  return 1
}
worker_port=$(free_port); intake_side=$(free_port); intake_http=$(free_port)
prom_port=$(free_port); segment_port=$(free_port)
secret="monitoring-check-secret-$RANDOM"

say "fake Segment on :$segment_port, worker on :$worker_port, intake on :$intake_http (side :$intake_side), queue $queue"
python3 - "$segment_port" >"$tmp/segment.log" 2>&1 <<'PY' &
# A fake Segment: /us/... accepts every batch, /eu/... answers 503 (retried, held, handed back).
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        ok = self.path.startswith("/us/")
        body = b'{"success":true}' if ok else b'{"error":"down for the check"}'
        self.send_response(200 if ok else 503)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
PY
pids+=($!)

common=(
  SEGMENT_BRIDGE__AMQP__URL="amqp://guest:guest@127.0.0.1:5672/%2f"
  SEGMENT_BRIDGE__AMQP__QUEUE="$queue"
  SEGMENT_BRIDGE__AMQP__DEAD_LETTER_QUEUE="$queue.dead"
  SEGMENT_BRIDGE__SHUTDOWN__GRACE_PERIOD_S=3
  RUST_LOG=warn
)
# Run from the temp dir: no config.toml there, the environment is the whole configuration.
(cd "$tmp" && exec env "${common[@]}" \
  SEGMENT_BRIDGE__SERVER__LISTEN="127.0.0.1:$worker_port" \
  SEGMENT_BRIDGE__SEGMENT__US__ENDPOINT="http://127.0.0.1:$segment_port/us/v1/batch" \
  SEGMENT_BRIDGE__SEGMENT__US__WRITE_KEY=check-us \
  SEGMENT_BRIDGE__SEGMENT__EU__ENDPOINT="http://127.0.0.1:$segment_port/eu/v1/batch" \
  SEGMENT_BRIDGE__SEGMENT__EU__WRITE_KEY=check-eu \
  SEGMENT_BRIDGE__SEGMENT__FLUSH_INTERVAL_MS=100 \
  SEGMENT_BRIDGE__RETRY__MAX_HOLD_S=1 \
  "$bin" run >"$tmp/worker.log" 2>&1) &
pids+=($!)
(cd "$tmp" && exec env "${common[@]}" \
  SEGMENT_BRIDGE__SERVER__LISTEN="127.0.0.1:$intake_side" \
  SEGMENT_BRIDGE__INTAKE__LISTEN="127.0.0.1:$intake_http" \
  SEGMENT_BRIDGE__INTAKE__SOURCES__JEBBIT_US__KIND=jebbit \
  SEGMENT_BRIDGE__INTAKE__SOURCES__JEBBIT_US__REGION=us \
  SEGMENT_BRIDGE__INTAKE__SOURCES__JEBBIT_US__SECRET="$secret" \
  SEGMENT_BRIDGE__INTAKE__SOURCES__JEBBIT_EU__KIND=jebbit \
  SEGMENT_BRIDGE__INTAKE__SOURCES__JEBBIT_EU__REGION=eu \
  SEGMENT_BRIDGE__INTAKE__SOURCES__JEBBIT_EU__SECRET="$secret" \
  "$bin" intake >"$tmp/intake.log" 2>&1) &
pids+=($!)

cat >"$tmp/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - $here/alerts.yaml
scrape_configs:
  - job_name: segment-bridge
    static_configs: [{targets: ["127.0.0.1:$worker_port"]}]
  - job_name: segment-bridge-intake
    static_configs: [{targets: ["127.0.0.1:$intake_side"]}]
EOF
prometheus --config.file="$tmp/prometheus.yml" --storage.tsdb.path="$tmp/data" \
  --web.listen-address="127.0.0.1:$prom_port" --log.level=warn >"$tmp/prometheus.log" 2>&1 &
pids+=($!)

wait_http "http://127.0.0.1:$worker_port/readyz" 30
wait_http "http://127.0.0.1:$intake_side/readyz" 30
wait_http "http://127.0.0.1:$prom_port/-/ready" 30

# ------------------------------------------------------------------ traffic
say "sending webhooks"
send_webhooks() {
  python3 - "http://127.0.0.1:$intake_http" "$secret" "$1" <<'PY'
# Signed Jebbit webhooks (HMAC-SHA256, base64, over "<t>.<body>"), and a few bad requests.
import base64, hashlib, hmac, json, sys, time, urllib.error, urllib.request

url, secret, round_ = sys.argv[1], sys.argv[2].encode(), sys.argv[3]

def post(path, body, signed=True):
    headers = {"content-type": "application/json"}
    if signed:
        t = str(int(time.time()))
        sig = base64.b64encode(hmac.new(secret, f"{t}.".encode() + body, hashlib.sha256).digest())
        headers["x-jebbit-signature"] = f"t={t},v1={sig.decode()}"
    req = urllib.request.Request(url + path, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code

def session(source, i):
    return json.dumps({
        "data": {"email": f"check-{round_}-{i}@example.com", "opt_in": "true",
                 "outcome": "monitoring check"},
        "event": {"event_number": i},
    }).encode()

got = {}
for i in range(5):
    for source in ("jebbit_us", "jebbit_eu"):
        code = post(f"/webhooks/{source}", session(source, i))
        got.setdefault(f"{source} session", []).append(code)
got["unsigned"] = [post("/webhooks/jebbit_us", session("x", 0), signed=False)]
got["not json"] = [post("/webhooks/jebbit_us", b"not json")]
got["no session id"] = [post("/webhooks/jebbit_us", b'{"x":1}')]
got["no such source"] = [post("/webhooks/nope", b"{}")]
print(" ".join(f"{k}: {v}" for k, v in got.items()))
want = {"jebbit_us session": 200, "jebbit_eu session": 200, "unsigned": 401,
        "not json": 400, "no session id": 200, "no such source": 404}
bad = {k: v for k, v in got.items() if any(c != want[k] for c in v)}
sys.exit(f"unexpected answers: {bad}" if bad else 0)
PY
}
send_webhooks 1

metric_value() { # url metric-line-prefix -> the sum of matching samples
  curl -fsS --max-time 5 "$1" | python3 -c '
import sys
prefix = sys.argv[1]
print(sum(float(l.rsplit(" ", 1)[1]) for l in sys.stdin if l.startswith(prefix)))' "$2"
}
wait_metric() { # url prefix minimum seconds
  for _ in $(seq 1 $(($4 * 5))); do
    python3 -c 'import sys; sys.exit(0 if float(sys.argv[1]) >= float(sys.argv[2]) else 1)' \
      "$(metric_value "$1" "$2")" "$3" && return 0
    sleep 0.2
  done
  echo "$2 did not reach $3 within $4 s (at $1)" >&2
  return 1
}
w="http://127.0.0.1:$worker_port/metrics"
wait_metric "$w" 'segment_bridge_sessions_total{outcome="delivered"}' 5 30
wait_metric "$w" 'segment_bridge_dead_letters_total' 1 30
wait_metric "$w" 'segment_bridge_deliveries_requeued_total{cause="max_hold"}' 1 30
wait_metric "$w" 'segment_bridge_retries_total' 1 30
sleep 3
send_webhooks 2
wait_metric "$w" 'segment_bridge_sessions_total{outcome="delivered"}' 10 30

# Let Prometheus scrape the second round and fill a few rate windows.
say "waiting for scrapes"
for _ in $(seq 1 100); do
  n=$(curl -fsS --max-time 5 "http://127.0.0.1:$prom_port/api/v1/query" \
    --data-urlencode 'query=sum(segment_bridge_sessions_total{outcome="delivered"})' |
    python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else 0)')
  python3 -c 'import sys; sys.exit(0 if float(sys.argv[1]) >= 10 else 1)' "$n" && break
  sleep 0.2
done
sleep 12

# ------------------------------------------------------------------ queries
say "dashboard and alert queries against Prometheus"
curl -fsS --max-time 5 "http://127.0.0.1:$worker_port/metrics" >"$tmp/worker.metrics"
curl -fsS --max-time 5 "http://127.0.0.1:$intake_side/metrics" >"$tmp/intake.metrics"
python3 "$here/check_queries.py" "http://127.0.0.1:$prom_port" "$tmp/worker.metrics" "$tmp/intake.metrics" ||
  failed+=("check_queries.py")

if ((${#failed[@]})); then
  printf 'FAILED: %s\n' "${failed[@]}" >&2
  exit 1
fi
say "OK in $(($(date +%s) - start)) s"
