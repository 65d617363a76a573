#!/usr/bin/env bash
# Sourced by the container tests that need an engine (after lib.sh): reuses a running engine or
# starts one through scripts/container (and stops only that one), makes a user-defined bridge
# with its own subnet, and removes everything the test made on every exit path. A test may
# define test_cleanup, run first.
set -euo pipefail

if [ -z "${DOCKER:-}" ]; then
  # Debian docker.io's client speaks the daemon's API version; another may be first on PATH.
  if [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; else DOCKER=docker; fi
fi
export DOCKER # scripts/container uses the same client
export DOCKER_BUILDKIT=0 # the classic builder: no buildx plugin needed
NET=${KV_TEST_NET:-172.31.77}
NETNAME=kvt-$TAG
BRIDGE=kvt$TAG # host-side bridge name: at most 15 bytes
BB_IMAGE=kube-vip-test/busybox:$TAG

# Everything this run creates.
CONTAINERS=()
VOLUMES=()
IMAGES_MADE=()
NETWORK_MADE=0
ENGINE_STARTED=0

dk() { "$DOCKER" "$@"; }

engine_cleanup() {
  local v
  set +e
  if declare -F test_cleanup >/dev/null; then test_cleanup; fi
  if [ ${#CONTAINERS[@]} -gt 0 ]; then dk rm -f -v "${CONTAINERS[@]}" >/dev/null 2>&1; fi
  for v in "${VOLUMES[@]}"; do dk volume rm -f "$v" >/dev/null 2>&1; done
  if [ "$NETWORK_MADE" = 1 ]; then dk network rm "$NETNAME" >/dev/null 2>&1; fi
  for v in "${IMAGES_MADE[@]}"; do dk rmi -f "$v" >/dev/null 2>&1; done
  if [ "$ENGINE_STARTED" = 1 ]; then "$ROOT/scripts/container" engine-stop; fi
  cleanup # tests/lib.sh: namespaces (none here) and $WORK
}
trap engine_cleanup EXIT

# engine_up: an engine that answers, started here if need be.
engine_up() {
  local a engine
  # Refuse a subnet the host already uses: the test bridge would shadow real routes.
  for a in $(ip -o -4 addr show | awk '{print $4}'); do
    case $a in "$NET".*) echo "subnet $NET.0/24 is in use on this host ($a); set KV_TEST_NET"; exit 1 ;; esac
  done
  engine=$("$ROOT/scripts/container" engine-start)
  echo "# $engine"
  case $engine in *started*) ENGINE_STARTED=1 ;; esac
}

# make_network: the test's bridge, $NET.0/24, gateway (the host's side) $NET.1.
make_network() {
  dk network create --driver bridge --subnet "$NET.0/24" --gateway "$NET.1" \
    -o "com.docker.network.bridge.name=$BRIDGE" "$NETNAME" >/dev/null
  NETWORK_MADE=1
}

# build_busybox: $BB_IMAGE, busybox-static in a scratch image (nothing can be pulled). The
# symlinks are made here, so the Dockerfile needs no RUN (and no network at build time).
build_busybox() {
  local ctx=$WORK/bb a
  [ -x /bin/busybox ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends busybox-static >/dev/null
  mkdir -p "$ctx/bin"
  cp /bin/busybox "$ctx/bin/busybox"
  for a in sh httpd sleep mkdir; do ln -s busybox "$ctx/bin/$a"; done
  printf 'FROM scratch\nCOPY bin /bin\n' >"$ctx/Dockerfile"
  IMAGES_MADE+=("$BB_IMAGE")
  dk build -q -t "$BB_IMAGE" "$ctx" >/dev/null
}

# run_c NAME DOCKER-RUN-ARGS...: a detached container, recorded for cleanup. Errors are shown;
# the engine's "IPv4 forwarding is disabled" warning is not: the test bridge needs no
# forwarding (host and containers are on the same segment).
run_c() {
  local name=$1; shift
  CONTAINERS+=("$name")
  dk run -d --name "$name" "$@" >/dev/null 2>"$WORK/run.err" || { cat "$WORK/run.err"; return 1; }
}

# start_backends: three busybox httpd on $NET.21-23:6444, each answering GET / with its name.
start_backends() {
  local i
  for i in 1 2 3; do
    # shellcheck disable=SC2016 # $NAME is expanded by the container's shell
    run_c "kvt-$TAG-b$i" --network "$NETNAME" --ip "$NET.2$i" --cap-drop ALL -e "NAME=backend$i" \
      "$BB_IMAGE" sh -c 'mkdir -p /www && echo "$NAME" >/www/index.html && exec httpd -f -p 6444 -h /www'
  done
  for i in 1 2 3; do
    wait_until 5 answers_as "$NET.2$i:6444" "backend$i" ||
      { not_ok "backend$i answers on $NET.2$i:6444"; exit 1; }
  done
}

get() { curl -s --max-time 1 "http://$1/"; }
answers_as() { [ "$(get "$1")" = "$2" ]; }
no_answer() { ! get "$1" >/dev/null; }

# rr_ok HOST:PORT: six connections from the host; each backend twice, in strict rotation.
rr_ok() {
  local answers=() a b i
  for _ in 1 2 3 4 5 6; do answers+=("$(get "$1")"); done
  echo "#   answers: ${answers[*]}"
  a="${answers[*]}"
  for b in backend1 backend2 backend3; do [ "$(grep -o "$b" <<<"$a" | wc -l)" -eq 2 ] || return 1; done
  for i in 0 1 2 3; do
    [ "$(printf '%s\n' "${answers[@]:$i:3}" | sort -u | wc -l)" -eq 3 ] || return 1
  done
}

# has_vip_in CONTAINER VIP: the VIP is on eth0 in the container's network namespace, seen from
# the host with nsenter (the images have no shell or ip of their own).
has_vip_in() {
  local pid
  pid=$(dk inspect -f '{{.State.Pid}}' "$1")
  [ "$pid" != 0 ] && nsenter -t "$pid" -n ip -o addr show dev eth0 | has -w "inet $2/32"
}
