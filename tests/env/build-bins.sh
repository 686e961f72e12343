#!/usr/bin/env bash
# Builds the test cluster's binaries (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubelet, kubectl, kwok) from Go modules with the machine's Go, into a cache keyed by
# version. A second run with the same versions builds nothing.
#
# Why a wrapper module: k8s.io/kubernetes replaces its staging modules (k8s.io/api, ...) with
# local paths, so `go install k8s.io/kubernetes/cmd/...@v` is refused. A module of our own that
# requires it and replaces every staging module with its published v0.MINOR.PATCH builds fine.
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.36.3}
ETCD_VERSION=${ETCD_VERSION:-v3.6.8}
KWOK_VERSION=${KWOK_VERSION:-v0.8.0}
CACHE=${PLOYZ_CACHE:-$HOME/.cache/ployz}
BIN="$CACHE/bin/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION"

export GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build" GOFLAGS=-buildvcs=false
export GOTOOLCHAIN=local CGO_ENABLED=0

want=(etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl kwok kwok-stages.yaml)
missing=()
for b in "${want[@]}"; do [ -e "$BIN/$b" ] || missing+=("$b"); done
if [ ${#missing[@]} -eq 0 ]; then
  echo "$BIN"
  exit 0
fi
mkdir -p "$BIN"
log() { printf '[build-bins %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
log "building ${missing[*]} into $BIN (first build takes many minutes on 2 cores; cached afterwards)"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

build_k8s() {
  local minor patch mod="$work/k8s"
  minor=$(echo "$K8S_VERSION" | cut -d. -f2); patch=$(echo "$K8S_VERSION" | cut -d. -f3)
  mkdir -p "$mod"
  local gomod
  gomod=$(curl -fsS "${GOPROXY_URL:-https://proxy.golang.org}/k8s.io/kubernetes/@v/$K8S_VERSION.mod")
  {
    echo "module ployz.dev/testcluster"
    echo
    echo "$gomod" | grep -E '^go [0-9]'
    echo "$gomod" | grep -E '^godebug ' || true
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    echo "replace ("
    echo "$gomod" | sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\t\1 => \1 v0.'"$minor.$patch"'#p'
    echo ")"
  } > "$mod/go.mod"
  log "k8s wrapper module: $(grep -c '=> k8s.io' "$mod/go.mod") staging modules pinned to v0.$minor.$patch"
  local pkgs=()
  for b in kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
  (cd "$mod" && go get "${pkgs[@]/%/@$K8S_VERSION}" >&2)
  local ld="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
  done
  for b in kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl; do
    case " ${missing[*]} " in *" $b "*) ;; *) continue ;; esac
    log "go build $b"
    (cd "$mod" && go build -ldflags "$ld" -o "$BIN/$b.tmp" "k8s.io/kubernetes/cmd/$b" && mv "$BIN/$b.tmp" "$BIN/$b")
  done
}

build_etcd() {
  local mod="$work/etcd"
  mkdir -p "$mod"
  printf 'module ployz.dev/testetcd\n\ngo 1.24.0\n' > "$mod/go.mod"
  (cd "$mod" && go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >&2)
  log "go build etcd"
  (cd "$mod" && go build -ldflags "-s -w" -o "$BIN/etcd.tmp" go.etcd.io/etcd/server/v3 && mv "$BIN/etcd.tmp" "$BIN/etcd")
}

build_kwok() {
  log "go build kwok"
  local gobin="$work/kwok-bin"
  GOBIN="$gobin" go install -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
  mv "$gobin/kwok" "$BIN/kwok"
}

# kwok does nothing without Stage objects; its module ships the defaults: nodes turn Ready and
# heartbeat with leases, pods turn Ready, and deleted pods go away.
kwok_stages() {
  local stage
  stage="$(go env GOMODCACHE)/sigs.k8s.io/kwok@$KWOK_VERSION/kustomize/stage"
  [ -d "$stage" ] || GOFLAGS=-mod=mod go mod download "sigs.k8s.io/kwok@$KWOK_VERSION"
  for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
           pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    echo "---"
    cat "$stage/$f"
  done > "$BIN/kwok-stages.yaml.tmp"
  mv "$BIN/kwok-stages.yaml.tmp" "$BIN/kwok-stages.yaml"
}

case " ${missing[*]} " in *" etcd "*) build_etcd ;; esac
case " ${missing[*]} " in *" kwok "*) build_kwok ;; esac
case " ${missing[*]} " in *" kwok-stages.yaml "*) kwok_stages ;; esac
case " ${missing[*]} " in *" kube-"*|*" kubelet "*|*" kubectl "*) build_k8s ;; esac
log "done"
echo "$BIN"
