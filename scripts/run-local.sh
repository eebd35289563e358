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
# Declare the topology, then a queue that receives every event: events are published
# "mandatory", so with nobody bound to provisioning.events the worker would park commands
# rather than lose their outcome. Watch it with:
#   rabbitmqadmin get queue=sandbox.events count=10 ackmode=ack_requeue_false
target/debug/group-provisioner check --config config/local.toml
if command -v rabbitmqadmin >/dev/null; then
  rabbitmqadmin declare queue name=sandbox.events durable=true >/dev/null
  rabbitmqadmin declare binding source=provisioning.events destination=sandbox.events routing_key='#' >/dev/null
fi
target/debug/group-provisioner run --config config/local.toml
