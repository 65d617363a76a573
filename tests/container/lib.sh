#!/usr/bin/env bash
# Shared by the container tests: the namespace-test harness (tests/lib.sh: counters, check,
# wait_until, summary, $WORK, need), the image name, and the tool venv with kubernetes-validate
# and PyYAML (made by scripts/deps test).
set -euo pipefail
# shellcheck source=tests/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

CT=$ROOT/tests/container
IMAGE=$("$ROOT/scripts/container" image)
# shellcheck disable=SC2034 # used by the tests that source this file
VERSION=${IMAGE##*:}
TOOLS=/usr/local/lib/kube-vip-tools
VENV=$TOOLS/venv
PY=$VENV/bin/python

# ensure_tools: the venv with kubernetes-validate (it brings PyYAML), at the version pinned in
# scripts/deps (pinned so a new release, with new schemas or rules, cannot change a result
# unnoticed; raise it there on purpose), which installs it.
ensure_tools() { need kubernetes-validate python3; }

# q FILE EXPR: EXPR over a YAML file or a docker-save tarball, as compact JSON (see q.py).
q() { "$PY" "$CT/q.py" "$@"; }

# is VALUE_JSON FILE EXPR: the query's answer equals VALUE_JSON exactly (compact, sorted keys).
is() {
  local want=$1 got
  got=$(q "$2" "$3")
  [ "$got" = "$want" ] || { echo "#   $3 = $got, want $want"; return 1; }
}
