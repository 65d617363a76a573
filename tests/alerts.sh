#!/usr/bin/env bash
# The Prometheus alert rules in deploy/: promtool accepts them and their unit tests pass
# (deploy/alerts-test.yaml feeds series and expects each alert to fire, or not, at given times).
# Controls: the same tests against broken copies of the rules must fail, or they prove nothing.
source "$(dirname "$0")/lib.sh"
need promtool

check "promtool check rules deploy/alerts.yaml" quiet promtool check rules "$ROOT/deploy/alerts.yaml"
check "promtool test rules deploy/alerts-test.yaml" quiet promtool test rules "$ROOT/deploy/alerts-test.yaml"

# broken NAME SED_EXPR: the tests fail against the rules edited by SED_EXPR.
broken() {
  mkdir -p "$WORK/$1"
  sed "$2" "$ROOT/deploy/alerts.yaml" >"$WORK/$1/alerts.yaml"
  cp "$ROOT/deploy/alerts-test.yaml" "$WORK/$1/"
  check "control: the tests catch $1" bash -c "! promtool test rules '$WORK/$1/alerts-test.yaml' >/dev/null 2>&1"
}
broken "two-leaders alert on one leader" 's/(kube_vip_is_leader) > 1/(kube_vip_is_leader) >= 1/'
broken "no-holder alert without its 30 s wait" 's/^    for: 30s$/    for: 0s/'
broken "backend-down alert on the wrong value" 's/kube_vip_backend_up == 0/kube_vip_backend_up == 1/'
broken "lease-lapse alert on any lapse" 's/\[10m\]) > 3/[10m]) > 0/'
broken "auth alert on the wrong metric" 's/kube_vip_peer_auth_refused_total/kube_vip_peer_connection_errors_total/'

summary
