#!/usr/bin/env bash
# Checks of what is not Rust, each with the tool its own ecosystem trusts:
# - the alert rules: `promtool check rules` and `promtool test rules` (Debian's prometheus
#   package; the cases are deploy/prometheus/prometheus-rules.test.yaml);
# - the Kubernetes manifests against the Kubernetes schemas (kubernetes-validate, PyPI);
# - the KEDA and PrometheusRule objects against their CRDs' schemas, and docs/asyncapi.yaml
#   with the official AsyncAPI parser (npm; scripts/deploy-check/).
# Tools are installed once per machine (apt, pip, and npm into ~/.cache). Run by
# scripts/test.sh before the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
source scripts/services.sh # as_root

KUBERNETES_VALIDATE_VERSION=1.31.0
KUBERNETES_VERSION=1.31.0

if ! command -v promtool >/dev/null; then
  echo "check-deploy: installing promtool (Debian package prometheus)" >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
if ! python3 -c "import kubernetes_validate, yaml" 2>/dev/null \
  || [ "$(python3 -c 'import kubernetes_validate; print(kubernetes_validate.__version__)' 2>/dev/null)" != "$KUBERNETES_VALIDATE_VERSION" ]; then
  echo "check-deploy: installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION" >&2
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" pyyaml
fi
tools="${XDG_CACHE_HOME:-$HOME/.cache}/group-provisioner/deploy-check"
if ! cmp -s scripts/deploy-check/package-lock.json "$tools/package-lock.json"; then
  echo "check-deploy: installing the npm packages of scripts/deploy-check (once per version)" >&2
  mkdir -p "$tools"
  cp scripts/deploy-check/package.json scripts/deploy-check/package-lock.json "$tools/"
  (cd "$tools" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi
cp scripts/deploy-check/check.mjs "$tools/"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Alert rules: the PrometheusRule's groups as a plain rules file (annotations left out:
# the cases test when each alert fires, not its texts).
python3 - "$root/deploy/kubernetes/prometheus-rules.yaml" "$work/rules.yaml" <<'PY'
import sys, yaml
rule = yaml.safe_load(open(sys.argv[1]))
groups = rule["spec"]["groups"]
for g in groups:
    for r in g["rules"]:
        r.pop("annotations", None)
yaml.safe_dump({"groups": groups}, open(sys.argv[2], "w"), sort_keys=False)
PY
cp deploy/prometheus/prometheus-rules.test.yaml "$work/"
promtool check rules "$work/rules.yaml"
(cd "$work" && promtool test rules prometheus-rules.test.yaml)

# Kubernetes objects against the Kubernetes schemas (strict: no unknown field); the
# operators' kinds are checked against their CRDs below.
manifests=$(ls deploy/kubernetes/*.yaml deploy/kubernetes/examples/*.yaml | grep -v kustomization.yaml)
# shellcheck disable=SC2086
out=$(kubernetes-validate --strict --kubernetes-version "$KUBERNETES_VERSION" $manifests 2>&1) || {
  echo "$out" >&2
  exit 1
}
echo "$out" | grep -v "^WARN .*Couldn't find schema for kind \(ScaledObject\|TriggerAuthentication\|PrometheusRule\) " || true
if echo "$out" | grep -q "^ERROR"; then
  exit 1
fi

node "$tools/check.mjs" "$root"
echo "check-deploy: passed"
