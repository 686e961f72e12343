#!/usr/bin/env bash
# Builds the test cluster's container images locally (no registry is reachable) and prints the
# directory that holds them as docker-archive tars, ready for `ctr images import`:
#   pause.tar   registry.k8s.io/pause:3.10 (the pod sandbox; a static pause, pause.c)
#   ledger.tar  ployz.dev/e2e/ledger:1     (the stateful test app, ledger.c, with busybox)
# The cache key is a hash of the sources, this script and the compiler and busybox versions,
# so a second run builds nothing. The tars are reproducible: fixed mtimes, owners and order.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
CACHE=${PLOYZ_CACHE:-$HOME/.cache/ployz}
key=$( { cat "$here/pause.c" "$here/ledger.c" "$here/mkimage.sh" "$0"; gcc -dumpfullversion; dpkg-query -W busybox-static; } | sha256sum | cut -c1-16)
OUT="$CACHE/images/$key"
if [ -f "$OUT/pause.tar" ] && [ -f "$OUT/ledger.tar" ]; then
  echo "$OUT"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$OUT"

# shellcheck source=tests/images/mkimage.sh
source "$here/mkimage.sh"

mkdir -p "$work/pause/bin" "$work/ledger/bin" "$work/ledger/data" "$work/ledger/tmp"
gcc -O2 -Wall -Wextra -Werror -static -o "$work/pause/bin/pause" "$here/pause.c"
gcc -O2 -Wall -Wextra -Werror -static -o "$work/ledger/bin/ledger" "$here/ledger.c"
cp /bin/busybox "$work/ledger/bin/busybox"
for applet in sh cat ls test wget sleep tail head sync; do ln -s busybox "$work/ledger/bin/$applet"; done
mkimage registry.k8s.io/pause:3.10 "$OUT/pause.tar" "$work/pause" '["/bin/pause"]'
mkimage ployz.dev/e2e/ledger:1 "$OUT/ledger.tar" "$work/ledger" '["/bin/ledger"]'
echo "[build-images] built into $OUT" >&2
echo "$OUT"
