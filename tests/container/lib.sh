#!/usr/bin/env bash
# Shared by the container tests: the namespace-test harness (tests/lib.sh: counters, check,
# wait_until, summary, $WORK), the image name, and the offline tool venv with
# kubernetes-validate and PyYAML.
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
# Pinned so a new release of the package (new schemas, new rules) cannot change a result
# unnoticed; raise it on purpose.
KV_VALIDATE_PIN=${KV_VALIDATE_PIN:-1.37.0}

# ensure_tools: the venv with kubernetes-validate at the pinned version (it brings PyYAML).
# Quick when all is there; a venv, not the system Python, so nothing Debian owns is touched.
ensure_tools() {
  if [ "$("$VENV/bin/kubernetes-validate" --version 2>/dev/null)" = "$KV_VALIDATE_PIN" ]; then
    return 0
  fi
  if ! /usr/bin/python3 -c 'import ensurepip' 2>/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null ||
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null; }
  fi
  echo "# installing kubernetes-validate==$KV_VALIDATE_PIN into $VENV"
  mkdir -p "$TOOLS"
  # Debian's interpreter, not one first on PATH (pyenv and the like come and go).
  [ -x "$PY" ] || /usr/bin/python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==$KV_VALIDATE_PIN"
}

# q FILE EXPR: EXPR over a YAML file or a docker-save tarball, as compact JSON (see q.py).
q() { "$PY" "$CT/q.py" "$@"; }

# is VALUE_JSON FILE EXPR: the query's answer equals VALUE_JSON exactly (compact, sorted keys).
is() {
  local want=$1 got
  got=$(q "$2" "$3")
  [ "$got" = "$want" ] || { echo "#   $3 = $got, want $want"; return 1; }
}
