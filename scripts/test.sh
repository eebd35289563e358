#!/usr/bin/env bash
# The whole test suite: makes sure RabbitMQ and Redis run, then runs every test.
# This is the command the README documents and .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
ensure_services
# Tests are I/O-bound (broker, Redis, simulator); 4 threads keep a 2-core machine busy
# without crowding the broker.
exec cargo test --locked -- --test-threads "${TEST_THREADS:-4}"
