#!/usr/bin/env bash
# `kube-vip sample manifest`, checked offline: schema validation with kubernetes-validate
# (--strict: unknown fields are errors) for every Kubernetes version >= 1.28 its package ships,
# then the fields that matter for a VIP agent: host network, exactly NET_ADMIN + NET_RAW + SYS_NICE, the
# config mounted read-only where `start -c` reads it, persistent Raft state, and an image tag
# that is the crate's version and the tag of the image scripts/container builds.
# shellcheck source=tests/container/lib.sh
source "$(dirname "$0")/lib.sh"

ensure_tools
MIN_K8S=1.28
M=$WORK/manifest.yaml
CONF=/etc/kube-vip/config.yaml
TAR=$ROOT/image/out/kube-vip-image.tar

check "sample manifest exits 0" bash -c "'$KUBE_VIP' sample manifest > '$M'"
check "manifest is one Pod in kube-system" \
  is '["v1","Pod","kube-system","kube-vip"]' "$M" '[d["apiVersion"], d["kind"], d["metadata"]["namespace"], d["metadata"]["name"]]'

# ---------- schema ----------
versions=$("$PY" - "$MIN_K8S" <<'PY'
import sys
from packaging.version import Version
import kubernetes_validate.utils as u
mm = sorted({".".join(v.split(".")[:2]) for v in u.all_versions()}, key=Version)
print(" ".join(v for v in mm if Version(v) >= Version(sys.argv[1])))
PY
)
echo "# kubernetes-validate $("$VENV/bin/kubernetes-validate" --version) ships schemas >= $MIN_K8S: $versions"
check "kubernetes-validate ships at least one version >= $MIN_K8S" test -n "$versions"
validate() { "$VENV/bin/kubernetes-validate" --strict --quiet -k "$1" "$2"; }
# rejects K8S_VERSION FILE [--strict]: the validator fails the file.
rejects() { ! "$VENV/bin/kubernetes-validate" --quiet -k "$1" "$2" ${3:+"$3"} >/dev/null 2>&1; }
for v in $versions; do
  check "validates (strict) against Kubernetes $v" validate "$v" "$M"
done
latest=${versions##* }
# Negative controls: the validator must reject what the API server would, or the checks above
# prove nothing. An unknown field (strict) and a wrongly typed one.
sed 's/^  hostNetwork: true$/  hostNetwork: true\n  hostNetwrok: true/' "$M" >"$WORK/typo.yaml"
check "control: strict validation rejects an unknown field" rejects "$latest" "$WORK/typo.yaml" --strict
sed 's/^      readOnly: true$/      readOnly: "yes"/' "$M" >"$WORK/type.yaml"
check "control: validation rejects a wrongly typed field" rejects "$latest" "$WORK/type.yaml"

# ---------- the fields ----------
C='d["spec"]["containers"][0]'
check "exactly one container" is 1 "$M" 'len(d["spec"]["containers"])'
check "hostNetwork: true (the VIP goes on the node's interface)" is true "$M" 'd["spec"]["hostNetwork"]'
check "capabilities add exactly NET_ADMIN, NET_RAW and SYS_NICE" is '["NET_ADMIN","NET_RAW","SYS_NICE"]' "$M" "sorted(${C}['securityContext']['capabilities']['add'])"
check "capabilities drop ALL" is '["ALL"]' "$M" "${C}['securityContext']['capabilities']['drop']"
check "not privileged, no other securityContext widening" \
  is '["capabilities"]' "$M" "sorted(${C}['securityContext'])"
check "command is /kube-vip start -c $CONF" \
  is "[\"/kube-vip\",\"start\",\"-c\",\"$CONF\"]" "$M" "${C}['command']"
check "no args (the command says it all)" is null "$M" "${C}.get('args')"
# mount_of M MOUNTPATH: [hostPath path, hostPath type, readOnly] for the volume mounted there.
mount_of() {
  q "$1" "[[v['hostPath']['path'], v['hostPath'].get('type'), m.get('readOnly', False)]
           for m in ${C}['volumeMounts'] if m['mountPath'] == '$2'
           for v in d['spec']['volumes'] if v['name'] == m['name']]"
}
check "config: hostPath $CONF (type File) mounted read-only at $CONF" \
  test "$(mount_of "$M" "$CONF")" = "[[\"$CONF\",\"File\",true]]"
check "state: hostPath /var/lib/kube-vip (DirectoryOrCreate) mounted writable at /var/lib/kube-vip" \
  test "$(mount_of "$M" /var/lib/kube-vip)" = '[["/var/lib/kube-vip","DirectoryOrCreate",false]]'
check "exactly those two mounts" is 2 "$M" "len(${C}['volumeMounts'])"
check "livenessProbe: GET http://127.0.0.1:2112/healthz (the default metricsAddress)" \
  is '["HTTP","127.0.0.1","/healthz",2112]' "$M" \
  "[${C}['livenessProbe']['httpGet'][k] for k in ('scheme','host','path','port')]"
check "livenessProbe numbers are kubeadm's (10 s delay and period, 15 s timeout, 8 failures)" \
  is '[10,10,15,8]' "$M" \
  "[${C}['livenessProbe'][k] for k in ('initialDelaySeconds','periodSeconds','timeoutSeconds','failureThreshold')]"
check "no readinessProbe (a follower is not ready to serve the VIP, and must not be restarted for it)" \
  is null "$M" "${C}.get('readinessProbe')"
check "priorityClassName system-node-critical (not evicted under node pressure)" \
  is '"system-node-critical"' "$M" 'd["spec"]["priorityClassName"]'
pull_policy=$(q "$M" "${C}.get('imagePullPolicy')")
check "imagePullPolicy is IfNotPresent or Never (nodes load the image; there is no registry)" \
  test "$pull_policy" = '"IfNotPresent"' -o "$pull_policy" = '"Never"'

# ---------- image and version ----------
check "image is $IMAGE (the crate version, $VERSION)" is "\"$IMAGE\"" "$M" "${C}['image']"
check "binary reports the same version" test "$("$KUBE_VIP" version)" = "kube-vip $VERSION"
check "version label is the crate version" \
  is "\"$VERSION\"" "$M" 'd["metadata"]["labels"]["app.kubernetes.io/version"]'
# The image scripts/container saves: build it unless a tarball newer than the binary exists.
if [ ! -f "$TAR" ] || [ "$TAR" -ot "$KUBE_VIP" ]; then
  echo "# $TAR missing or older than the binary: running scripts/container"
  "$ROOT/scripts/container" >/dev/null
fi
check "saved image is tagged exactly as the manifest's image" is "[\"$IMAGE\"]" "$TAR" 'd["tags"]'
check "saved image's OCI version label is the crate version" \
  is "\"$VERSION\"" "$TAR" 'd["config"]["Labels"]["org.opencontainers.image.version"]'
check "manifest command[0] is the image's entrypoint" \
  test "$(q "$TAR" 'd["config"]["Entrypoint"]')" = "$(q "$M" "${C}['command'][:1]")"

# ---------- flags ----------
"$KUBE_VIP" sample manifest --image registry.example/kv:test >"$WORK/img.yaml"
check "--image sets the image" is '"registry.example/kv:test"' "$WORK/img.yaml" "${C}['image']"
# same_except A B DICT_EXPR KEY: A and B are equal once DICT_EXPR[KEY] is null in both. (The
# expression sets the key, then yields the whole document: `(dict.update(...), d)[1]`.)
same_except() {
  local e="($3.update({'$4': None}), d)[1]"
  [ "$(q "$1" "$e")" = "$(q "$2" "$e")" ]
}
check "--image changes nothing else" same_except "$M" "$WORK/img.yaml" "$C" image
"$KUBE_VIP" sample manifest --config /srv/kube-vip/vip.yaml >"$WORK/cfg.yaml"
check "--config sets the hostPath, the pod still reads $CONF" \
  test "$(mount_of "$WORK/cfg.yaml" "$CONF")" = '[["/srv/kube-vip/vip.yaml","File",true]]'
check "--config leaves the command alone" \
  is "[\"/kube-vip\",\"start\",\"-c\",\"$CONF\"]" "$WORK/cfg.yaml" "${C}['command']"
check "--config changes nothing else" same_except "$M" "$WORK/cfg.yaml" 'd["spec"]["volumes"][0]["hostPath"]' path
check "--config volume is the config volume (first)" \
  is '"config"' "$M" 'd["spec"]["volumes"][0]["name"]'
"$KUBE_VIP" sample manifest --singleNode >"$WORK/single.yaml"
check "--singleNode adds the override to the command (the bootstrap step)" \
  is "[\"/kube-vip\",\"start\",\"-c\",\"$CONF\",\"--singleNode\"]" "$WORK/single.yaml" "${C}['command']"
check "--singleNode changes nothing else" same_except "$M" "$WORK/single.yaml" "$C" command
check "--singleNode: validates (strict) against Kubernetes $latest" validate "$latest" "$WORK/single.yaml"
"$KUBE_VIP" sample manifest --image registry.example/kv:test --config /srv/kube-vip/vip.yaml >"$WORK/both.yaml"
check "with both flags: validates (strict) against Kubernetes $latest" validate "$latest" "$WORK/both.yaml"

summary
