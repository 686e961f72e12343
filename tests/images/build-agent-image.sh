#!/usr/bin/env bash
# Builds the ployz agent image offline (no registry is reachable) and prints the path of its
# docker-archive tar, ready for `ctr images import`:
#   build-agent-image.sh AGENT_BINARY [REF]     REF defaults to ployz.dev/agent:dev
# The image holds the agent binary, the guard (ployz-guard, found beside the agent binary), the host's `zfs` userland (the zfs-fuse CLI on the test
# machines) and mount/umount, each with the shared libraries it loads, copied from this machine's packages: the
# userland matches the ZFS of the machines it runs on because both come from the same
# distribution release (see docs/install.md for production images). Cached by a hash of the
# binary, the packages and this script; reproducible like the other test images.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${1:?usage: build-agent-image.sh AGENT_BINARY [REF]}
ref=${2:-ployz.dev/agent:dev}
guard=$(dirname "$bin")/ployz-guard
[ -x "$guard" ] || { echo "build-agent-image: no ployz-guard beside $bin; build it with the agent" >&2; exit 1; }
zfs=${ZFS_USERLAND:-/sbin/zfs}
CACHE=${PLOYZ_CACHE:-$HOME/.cache/ployz}
key=$( { sha256sum < "$bin"; sha256sum < "$guard"; sha256sum < "$zfs"; sha256sum < "$(command -v umount)"; cat "$here/mkimage.sh" "$0"; echo "$ref"; \
         dpkg-query -W libc6 zfs-fuse 2>/dev/null || true; } | sha256sum | cut -c1-16)
OUT="$CACHE/images/agent-$key"
if [ -f "$OUT/agent.tar" ]; then
  echo "$OUT/agent.tar"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# shellcheck source=tests/images/mkimage.sh
source "$here/mkimage.sh"

root="$work/rootfs"
mkdir -p "$root/bin" "$root/sbin" "$root/tmp" "$root/run" "$root/var" "$root/etc"
chmod 1777 "$root/tmp"
ln -s ../run "$root/var/run"
# Without debug sections: a debug build is ten times the size.
strip --strip-debug -o "$root/bin/ployz-controller" "$bin"
chmod 0755 "$root/bin/ployz-controller"
strip --strip-debug -o "$root/bin/ployz-guard" "$guard"
chmod 0755 "$root/bin/ployz-guard"
install -m 0755 "$zfs" "$root/sbin/zfs"
# `zfs unmount` runs umount(8) as a child, in the pod's mount namespace (the chart's
# Bidirectional propagation carries the unmount to the host); mount(8) beside it.
install -m 0755 "$(command -v umount)" "$root/bin/umount"
install -m 0755 "$(command -v mount)" "$root/bin/mount"
# The shared libraries they load, at the paths the dynamic loader looks for them.
ldd "$bin" "$guard" "$zfs" "$root/bin/umount" "$root/bin/mount" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } NF > 1 && $1 ~ /^\// { print $1 }' | sort -u |
  while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
printf 'root:x:0:0:root:/:/sbin/nologin\n' > "$root/etc/passwd"
printf 'root:x:0:\n' > "$root/etc/group"
mkdir -p "$OUT"
mkimage "$ref" "$OUT/agent.tar" "$root" '["/bin/ployz-controller"]' '["PATH=/bin:/sbin"]'
echo "[build-agent-image] $ref built into $OUT/agent.tar" >&2
echo "$OUT/agent.tar"
