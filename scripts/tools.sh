#!/usr/bin/env bash
# Tools the checks need, installed once per machine into ~/.cargo/bin (a later run finds
# them there and installs nothing). Source it or run it.
set -euo pipefail

# The dependency-policy checker (bans, licenses, sources; see deny.toml). Pinned, so a
# new release cannot change what CI accepts overnight.
CARGO_DENY_VERSION=0.20.2

ensure_cargo_deny() {
  if cargo deny --version 2>/dev/null | grep -qx "cargo-deny $CARGO_DENY_VERSION"; then
    return 0
  fi
  echo "tools: installing cargo-deny $CARGO_DENY_VERSION (once per machine; a few minutes)" >&2
  cargo install --locked --quiet --version "$CARGO_DENY_VERSION" cargo-deny
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  ensure_cargo_deny
  cargo deny --version
fi
