#!/usr/bin/env bash
# Builds helm from its Go module with the machine's Go, into a cache keyed by version, and
# prints the binary's path. A second run builds nothing.
set -euo pipefail

HELM_VERSION=${HELM_VERSION:-v4.3.2}
CACHE=${PLOYZ_CACHE:-$HOME/.cache/ployz}
BIN="$CACHE/bin/helm-$HELM_VERSION"

if [ -x "$BIN/helm" ]; then
  echo "$BIN/helm"
  exit 0
fi
export GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build" GOFLAGS=-buildvcs=false
export GOTOOLCHAIN=local CGO_ENABLED=0
printf '[build-helm %s] building helm %s into %s\n' "$(date +%H:%M:%S)" "$HELM_VERSION" "$BIN" >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$BIN"
GOBIN="$work" go install -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION" \
  "helm.sh/helm/v4/cmd/helm@$HELM_VERSION"
mv "$work/helm" "$BIN/helm"
echo "$BIN/helm"
