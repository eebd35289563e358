#!/usr/bin/env bash
# The project's benchmark (benches/throughput.rs): the worker against the broker's own
# ceiling, with the API at 0 and 50 ms, a duplicate-heavy mix, latency at half load, CPU
# per command and memory. Prints the table docs/performance.md shows. Needs RabbitMQ and
# Redis on loopback (started here if they are not running); takes a few minutes.
#
#   scripts/bench.sh                    # 15000 commands per run, median of 3 runs
#   BENCH_N=3000 BENCH_RUNS=1 scripts/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
ensure_services
exec cargo bench --locked --bench throughput
