#!/usr/bin/env bash
# Local sandbox: RabbitMQ + Redis (installed/started if needed), convirza-sim on
# 127.0.0.1:8080 as the API, and the worker in the foreground. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
ensure_services

cargo build --locked --bins
# The simulator starts empty, so the sandbox's dedup records must start empty too.
if command -v redis-cli >/dev/null; then
  redis-cli --scan --pattern 'sandbox:*' | xargs -r redis-cli del >/dev/null
fi
sim_pid=""
if port_open 8080; then
  echo "run-local: something already listens on 127.0.0.1:8080; using it as the API" >&2
else
  target/debug/convirza-sim --listen 127.0.0.1:8080 &
  sim_pid=$!
  trap '[ -n "$sim_pid" ] && kill "$sim_pid" 2>/dev/null || true' EXIT
  wait_port 8080 10 convirza-sim
fi
target/debug/group-provisioner run --config config/local.toml
