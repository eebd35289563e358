#!/usr/bin/env bash
# Make RabbitMQ (127.0.0.1:5672, management on :15672) and Redis (127.0.0.1:6379) available,
# and Chromium with chromedriver for the console's browser tests.
# Installs them with apt-get when absent (needs root), starts them when stopped, waits until
# they accept connections. Safe to run when they are already up. Source it or run it.
# It changes the machine's broker in one way, and says so when it does: it enables the
# rabbitmq_management plugin (the tests create a vhost per test through its HTTP API;
# `rabbitmq-plugins disable rabbitmq_management` undoes it).
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "services: need root for: $*" >&2; return 1; fi
}

wait_port() { # port seconds name
  local i
  for ((i = 0; i < $2 * 10; i++)); do port_open "$1" && return 0; sleep 0.1; done
  echo "services: $3 did not open port $1 within $2 s" >&2
  return 1
}

ensure_services() {
  if ! command -v redis-server >/dev/null || ! command -v rabbitmq-server >/dev/null; then
    echo "services: installing rabbitmq-server and redis-server with apt-get" >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server redis-server >/dev/null
  fi

  if ! port_open 6379; then
    echo "services: starting redis-server" >&2
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
    wait_port 6379 30 redis
  fi

  if ! port_open 5672; then
    echo "services: starting rabbitmq-server" >&2
    as_root rabbitmq-server -detached >/dev/null 2>&1 || true
    wait_port 5672 120 rabbitmq
  fi

  # The tests give each scenario its own vhost through the management HTTP API.
  if ! port_open 15672; then
    echo "services: enabling the rabbitmq_management plugin on this machine's broker (the tests use its HTTP API on :15672; undo with: rabbitmq-plugins disable rabbitmq_management)" >&2
    as_root rabbitmq-plugins enable --quiet rabbitmq_management >/dev/null
    wait_port 15672 60 rabbitmq_management
  fi
}

# The console's browser tests drive Debian's headless Chromium through chromedriver.
ensure_browser() {
  if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    echo "services: installing chromium and chromium-driver with apt-get (the console's browser tests)" >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  fi
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  ensure_services
  ensure_browser
  echo "services: rabbitmq and redis are up"
fi
