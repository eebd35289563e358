#!/usr/bin/env bash
# Local sandbox: RabbitMQ + Redis (installed/started if needed), convirza-sim on
# 127.0.0.1:8080 as the API, and the worker, with config/local.toml (key prefix `sandbox`).
# Ctrl-C, SIGINT or SIGTERM sent to this script stops the worker (it drains) and the
# simulator, then the script exits: an IDE, systemd or `kill <pid>` can stop it too.
# In another shell, `export PROVISIONER_CONFIG=config/local.toml` makes every operator
# command read the sandbox (its first line on stderr says what it reads).
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
worker_pid=""
stop() {
  # The worker first (it drains its deliveries), then the simulator it talks to.
  [ -n "$worker_pid" ] && kill -TERM "$worker_pid" 2>/dev/null && wait "$worker_pid" 2>/dev/null
  [ -n "$sim_pid" ] && kill -TERM "$sim_pid" 2>/dev/null && wait "$sim_pid" 2>/dev/null
  return 0
}
trap 'stop; exit 130' INT
trap 'stop; exit 143' TERM
trap stop EXIT

if port_open 8080; then
  echo "run-local: something already listens on 127.0.0.1:8080; using it as the API" >&2
else
  target/debug/convirza-sim --listen 127.0.0.1:8080 &
  sim_pid=$!
  wait_port 8080 10 convirza-sim
fi
# Declare the topology, then a queue that receives every event (without one, events wait
# in provisioning.events.unrouted until `group-provisioner events replay-unrouted`; the
# commands are created all the same). Watch it with:
#   rabbitmqadmin get queue=sandbox.events count=10 ackmode=ack_requeue_false
target/debug/group-provisioner check --config config/local.toml
if command -v rabbitmqadmin >/dev/null; then
  rabbitmqadmin declare queue name=sandbox.events durable=true >/dev/null
  rabbitmqadmin declare binding source=provisioning.events destination=sandbox.events routing_key='#' >/dev/null
fi
echo "run-local: operator commands in another shell: export PROVISIONER_CONFIG=$PWD/config/local.toml" >&2
# In the background, so that this shell runs its traps when a signal comes (a shell
# waiting on a foreground command would not until the command ended).
target/debug/group-provisioner run --config config/local.toml &
worker_pid=$!
# `wait` returns early when a trapped signal arrives; the trap then stops everything.
status=0
wait "$worker_pid" || status=$?
worker_pid=""
exit "$status"
