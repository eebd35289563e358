#!/usr/bin/env bash
# The whole test suite: makes sure RabbitMQ and Redis run, then runs every test against the
# machine's RabbitMQ (3.x), then every broker-facing (integration) test again against a
# RabbitMQ 4.x node (scripts/rabbitmq4.sh), and the failover tests on a 3-node 4.x cluster
# (scripts/rabbitmq-cluster.sh); GP_TEST_RABBITMQ4=skip leaves both out.
# This is the command the README documents and .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
ensure_services
ensure_browser
# The contract's Python example publisher is run by the tests, and the Prometheus client's
# parsers read /metrics in both formats.
python3 -c 'import pika, prometheus_client' 2>/dev/null \
  || python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    'pika==1.4.4' 'prometheus_client==0.23.1'
# What is not Rust: alert rules, manifests, CRD objects, the AsyncAPI document.
scripts/check-deploy.sh
# Tests are I/O-bound (broker, Redis, simulator); 4 threads keep a 2-core machine busy
# without crowding the broker.
threads=${TEST_THREADS:-4}
# The tests get a temporary directory of their own, which must be empty when they end:
# what they write there (exports of dead letters, keys) must not outlive them.
test_tmp=$(mktemp -d)
export TMPDIR="$test_tmp"
leftovers() {
  local left
  left=$(find "$test_tmp" -mindepth 1 -maxdepth 1 -printf '%f\n' | head -20)
  if [ -n "$left" ]; then
    echo "test: the tests left files in their temporary directory:" >&2
    echo "$left" >&2
    return 1
  fi
}
echo "test: every test, against RabbitMQ on 127.0.0.1:5672"
cargo test --locked -- --test-threads "$threads"
leftovers
if [ "${GP_TEST_RABBITMQ4:-}" = skip ]; then
  echo "test: RabbitMQ 4.x run skipped (GP_TEST_RABBITMQ4=skip)"
  rmdir "$test_tmp"
  exit 0
fi
scripts/rabbitmq4.sh start
echo "test: integration tests again, against RabbitMQ 4.x on 127.0.0.1:5673"
GP_TEST_RABBITMQ=4 cargo test --locked --test integration -- --test-threads "$threads"
leftovers
# Failover on a 3-node RabbitMQ 4.x cluster: these tests stop and kill nodes, so they run
# one at a time, and only here (elsewhere they are ignored).
scripts/rabbitmq-cluster.sh start
echo "test: failover tests on a 3-node RabbitMQ 4.x cluster (127.0.0.1:5681-5683)"
GP_TEST_AMQP_HOST=127.0.0.1:5681 GP_TEST_MANAGEMENT=http://127.0.0.1:15681 \
  cargo test --locked --test integration cluster:: -- --ignored --test-threads 1
leftovers
rmdir "$test_tmp"
