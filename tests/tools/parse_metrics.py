"""Parse a /metrics body (stdin) with the Prometheus Python client's own parser for the
format named by argv[1] ("openmetrics" or "classic"), and print what it read as JSON:
{family: {"type": ..., "samples": [[name, labels, value], ...]}}. A body the parser
refuses exits non-zero with its error. Used by tests/it/endpoint.rs."""
import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics
from prometheus_client.parser import text_string_to_metric_families as classic

parse = {"openmetrics": openmetrics, "classic": classic}[sys.argv[1]]
families = {}
for family in parse(sys.stdin.read()):
    families[family.name] = {
        "type": family.type,
        "samples": [[s.name, s.labels, s.value] for s in family.samples],
    }
print(json.dumps(families))
