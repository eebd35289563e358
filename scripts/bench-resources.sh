#!/usr/bin/env bash
# Peak memory and CPU of one worker process under load — the figures behind the
# Kubernetes requests/limits in deploy/kubernetes/deployment.yaml.
#
# Release build; convirza-sim with API latency LATENCY_MS; N commands pre-loaded into a
# fresh vhost with `group-provisioner send`; the worker drains them. Prints wall time,
# throughput, peak RSS (VmHWM) and CPU seconds (utime+stime from /proc).
#
#   scripts/bench-resources.sh               # N=5000 LATENCY_MS=20 PREFETCH=64
#   N=20000 LATENCY_MS=50 PREFETCH=128 scripts/bench-resources.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
ensure_services

N=${N:-5000}
LATENCY_MS=${LATENCY_MS:-20}
PREFETCH=${PREFETCH:-64}
cargo build --release --locked --bins >&2
BIN=target/release

vhost="gp-bench-$(date +%s)-$$"
prefix="gp-bench-$$"
mgmt=(curl -sf -u guest:guest -H 'content-type: application/json')
"${mgmt[@]}" -X PUT "http://127.0.0.1:15672/api/vhosts/$vhost" >/dev/null
"${mgmt[@]}" -X PUT -d '{"configure":".*","write":".*","read":".*"}' "http://127.0.0.1:15672/api/permissions/$vhost/guest" >/dev/null

sim_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
$BIN/convirza-sim --listen "127.0.0.1:$sim_port" --latency-ms "$LATENCY_MS" --log-format json >/dev/null 2>&1 &
sim_pid=$!
worker_pid=""
cleanup() {
  [ -n "$worker_pid" ] && kill "$worker_pid" 2>/dev/null || true
  kill "$sim_pid" 2>/dev/null || true
  "${mgmt[@]}" -X DELETE "http://127.0.0.1:15672/api/vhosts/$vhost" >/dev/null || true
  redis-cli --scan --pattern "$prefix:*" | xargs -r redis-cli del >/dev/null
}
trap cleanup EXIT
wait_port "$sim_port" 10 convirza-sim

export PROVISIONER__AMQP__URL="amqp://guest:guest@127.0.0.1:5672/$vhost"
export PROVISIONER__AMQP__PREFETCH="$PREFETCH"
export PROVISIONER__REDIS__KEY_PREFIX="$prefix"
export PROVISIONER__API__BASE_URL="http://127.0.0.1:$sim_port/v3"
export PROVISIONER__API__TOKEN=sim-token
export PROVISIONER__METRICS__LISTEN=127.0.0.1:0
export PROVISIONER__LOG__LEVEL=warn

# Topology, and a queue bound to the events so they are routable.
$BIN/group-provisioner check >/dev/null
"${mgmt[@]}" -X PUT -d '{"durable":true}' "http://127.0.0.1:15672/api/queues/$vhost/bench.events" >/dev/null
"${mgmt[@]}" -X POST -d '{"routing_key":"#"}' "http://127.0.0.1:15672/api/bindings/$vhost/e/provisioning.events/q/bench.events" >/dev/null

python3 - "$N" > /tmp/gp-bench-$$.jsonl <<'PY'
import json, sys
for i in range(int(sys.argv[1])):
    print(json.dumps({"org_unit_ext_id": f"BENCH-{i}", "org_unit_name": f"Bench team {i}", "org_unit_parent_id": 1000 + i % 2}))
PY
$BIN/group-provisioner send /tmp/gp-bench-$$.jsonl >&2
rm -f /tmp/gp-bench-$$.jsonl

start=$(date +%s.%N)
$BIN/group-provisioner run >/dev/null &
worker_pid=$!
while :; do
  created=$(curl -sf "http://127.0.0.1:$sim_port/_sim/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["groups_created"])')
  [ "$created" -ge "$N" ] && break
  kill -0 "$worker_pid" || { echo "worker died" >&2; exit 1; }
  sleep 0.2
done
end=$(date +%s.%N)
hwm_kb=$(awk '/VmHWM/ {print $2}' "/proc/$worker_pid/status")
rss_kb=$(awk '/VmRSS/ {print $2}' "/proc/$worker_pid/status")
read -r utime stime < <(awk '{print $14, $15}' "/proc/$worker_pid/stat")
tck=$(getconf CLK_TCK)
python3 - "$N" "$LATENCY_MS" "$PREFETCH" "$start" "$end" "$hwm_kb" "$rss_kb" "$utime" "$stime" "$tck" <<'PY'
import sys
n, lat, pf = int(sys.argv[1]), sys.argv[2], sys.argv[3]
start, end = float(sys.argv[4]), float(sys.argv[5])
hwm, rss, ut, st, tck = int(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8]), int(sys.argv[9]), int(sys.argv[10])
wall = end - start
cpu = (ut + st) / tck
print(f"n={n} latency={lat}ms prefetch={pf}: {wall:.2f} s, {n / wall:.0f} commands/s, "
      f"peak RSS {hwm / 1024:.1f} MiB (now {rss / 1024:.1f} MiB), CPU {cpu:.2f} s = {cpu / wall:.2f} cores on average")
PY
