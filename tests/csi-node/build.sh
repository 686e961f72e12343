#!/usr/bin/env bash
# Builds the test machines' CSI node plugin (main.go) with the machine's Go, into a cache keyed
# by a hash of its sources, and prints the directory holding `ployz-csi-node`. A second run
# builds nothing. Test infrastructure, like the cluster binaries of tests/env/build-bins.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
CACHE=${PLOYZ_CACHE:-$HOME/.cache/ployz}
export GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build" GOFLAGS=-buildvcs=false
export GOTOOLCHAIN=local CGO_ENABLED=0
key=$( { cat "$here/main.go" "$here/go.mod" "$here/go.sum" "$0"; go version; } | sha256sum | cut -c1-16)
OUT="$CACHE/csi-node/$key"
if [ -x "$OUT/ployz-csi-node" ]; then
  echo "$OUT"
  exit 0
fi
mkdir -p "$OUT"
(cd "$here" && go build -trimpath -ldflags "-s -w" -o "$OUT/ployz-csi-node.tmp" .)
mv "$OUT/ployz-csi-node.tmp" "$OUT/ployz-csi-node"
echo "[csi-node] built into $OUT" >&2
echo "$OUT"
