#!/usr/bin/env bash
# A RabbitMQ 4.x node beside the machine's own broker, so the suite can run against both:
# AMQP 127.0.0.1:5673, management API 127.0.0.1:15673, guest/guest, loopback only.
# Debian's RabbitMQ is 3.10; the 4.x node is Debian 13's rabbitmq-server in a minimal
# Debian 13 root under $RABBITMQ4_ROOT (default /opt/rabbitmq4), built with debootstrap from
# the machine's Debian mirror the first time (a few minutes, ~400 MB); later calls only
# start it if it is not running. Idempotent; needs root.
#   Usage: scripts/rabbitmq4.sh [start|stop|status]
set -euo pipefail
ROOT=${RABBITMQ4_ROOT:-/opt/rabbitmq4}
NODE=rabbit4@localhost
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {
  local i
  for ((i = 0; i < $2 * 10; i++)); do port_open "$1" && return 0; sleep 0.1; done
  echo "rabbitmq4: port $1 did not open within $2 s" >&2
  return 1
}
as_rabbitmq() { chroot "$ROOT" su rabbitmq -s /bin/sh -c "HOME=/var/lib/rabbitmq $*"; }

build_root() {
  if ! command -v debootstrap >/dev/null; then
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  fi
  local mirror
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$mirror" ] || mirror=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  [ -n "$mirror" ] || { echo "rabbitmq4: no Debian mirror configured in /etc/apt" >&2; exit 1; }
  echo "rabbitmq4: building a Debian 13 root with rabbitmq-server under $ROOT (once)" >&2
  debootstrap --variant=minbase --include=rabbitmq-server trixie "$ROOT" "$mirror" \
    >"$ROOT.debootstrap.log" 2>&1 \
    || { echo "rabbitmq4: debootstrap failed, see $ROOT.debootstrap.log" >&2; exit 1; }
}

configure() {
  mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
  mountpoint -q "$ROOT/dev" || mount --bind /dev "$ROOT/dev"
  cp /etc/hosts "$ROOT/etc/hosts"
  mkdir -p "$ROOT/etc/rabbitmq"
  printf 'NODENAME=%s\nNODE_PORT=5673\nDIST_PORT=25673\n' "$NODE" >"$ROOT/etc/rabbitmq/rabbitmq-env.conf"
  printf '%s\n' 'listeners.tcp.default = 127.0.0.1:5673' 'management.tcp.ip = 127.0.0.1' \
    'management.tcp.port = 15673' >"$ROOT/etc/rabbitmq/rabbitmq.conf"
  echo '[rabbitmq_management].' >"$ROOT/etc/rabbitmq/enabled_plugins"
  chroot "$ROOT" chown -R rabbitmq:rabbitmq /var/lib/rabbitmq /var/log/rabbitmq /etc/rabbitmq
}

start() {
  [ -x "$ROOT/usr/sbin/rabbitmq-server" ] || build_root
  configure
  if ! port_open 5673; then
    as_rabbitmq "rabbitmq-server -detached" >/dev/null 2>&1 || true
    wait_port 5673 120
  fi
  wait_port 15673 60
  echo "rabbitmq4: $(as_rabbitmq "rabbitmqctl -n $NODE version" 2>/dev/null | tail -1) on 127.0.0.1:5673 (management :15673)"
}

case "${1:-start}" in
  start) start ;;
  stop) as_rabbitmq "rabbitmqctl -n $NODE stop" >/dev/null 2>&1 || true ;;
  status) port_open 5673 && as_rabbitmq "rabbitmqctl -n $NODE status" | head -20 \
    || { echo "rabbitmq4: not running"; exit 1; } ;;
  *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac
