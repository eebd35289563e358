#!/usr/bin/env bash
# A 3-node RabbitMQ 4.x cluster on loopback, for the failover tests (tests/it/cluster.rs):
# nodes rabbit-c1..c3@localhost, AMQP 127.0.0.1:5681..5683, management 15681..15683,
# guest/guest. They run in the Debian 13 root scripts/rabbitmq4.sh builds (each with its
# own name, ports and data directory, sharing that root's Erlang cookie), beside its single
# node. Idempotent: nodes already running are left as they are; a node that runs but has
# left the cluster is joined again. Needs root.
#   Usage: scripts/rabbitmq-cluster.sh [start|stop|status]
#   Node control for tests: scripts/rabbitmq-cluster.sh ctl <node 1-3> <rabbitmqctl args…>
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${RABBITMQ4_ROOT:-/opt/rabbitmq4}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
in_root() { chroot "$ROOT" su rabbitmq -s /bin/sh -c "HOME=/var/lib/rabbitmq $*"; }
node() { echo "rabbit-c$1@localhost"; }
ctl() { local n=$1; shift; in_root "rabbitmqctl -n $(node "$n") $*"; }

start_node() {
  local n=$1 dir=/var/lib/rabbitmq/cluster/c$1
  port_open $((5680 + n)) && return 0
  mkdir -p "$ROOT$dir" "$ROOT/etc/rabbitmq/cluster"
  printf '%s\n' "listeners.tcp.default = 127.0.0.1:$((5680 + n))" 'management.tcp.ip = 127.0.0.1' \
    "management.tcp.port = $((15680 + n))" >"$ROOT/etc/rabbitmq/cluster/c$n.conf"
  chroot "$ROOT" chown -R rabbitmq:rabbitmq /var/lib/rabbitmq /etc/rabbitmq
  in_root "RABBITMQ_NODENAME=$(node "$n") RABBITMQ_NODE_PORT=$((5680 + n)) \
    RABBITMQ_DIST_PORT=$((25680 + n)) RABBITMQ_MNESIA_BASE=$dir/mnesia RABBITMQ_LOG_BASE=$dir/log \
    RABBITMQ_CONFIG_FILE=/etc/rabbitmq/cluster/c$n.conf RABBITMQ_PID_FILE=$dir/pid \
    rabbitmq-server -detached" >/dev/null 2>&1 || true
}

wait_up() {
  local n=$1 i
  for ((i = 0; i < 1200; i++)); do port_open $((15680 + n)) && return 0; sleep 0.1; done
  echo "rabbitmq-cluster: node c$n did not come up within 120 s" >&2
  return 1
}

start() {
  scripts/rabbitmq4.sh start >/dev/null
  for n in 1 2 3; do start_node "$n"; done
  for n in 1 2 3; do wait_up "$n"; done
  for n in 2 3; do
    if ! ctl "$n" cluster_status 2>/dev/null | grep -q "$(node 1)"; then
      ctl "$n" stop_app >/dev/null
      ctl "$n" join_cluster "$(node 1)" >/dev/null
      ctl "$n" start_app >/dev/null
      wait_up "$n"
    fi
  done
  local running
  running=$(ctl 1 cluster_status --formatter json | python3 -c \
    'import json,sys; print(len(json.load(sys.stdin)["running_nodes"]))')
  [ "$running" = 3 ] || { echo "rabbitmq-cluster: $running of 3 nodes running" >&2; exit 1; }
  echo "rabbitmq-cluster: 3 nodes on 127.0.0.1:5681-5683 (management :15681-15683)"
}

case "${1:-start}" in
  start) start ;;
  stop) for n in 1 2 3; do ctl "$n" stop >/dev/null 2>&1 || true; done ;;
  status) ctl 1 cluster_status ;;
  ctl) shift; ctl "$@" ;;
  *) echo "usage: $0 [start|stop|status|ctl N args…]" >&2; exit 2 ;;
esac
