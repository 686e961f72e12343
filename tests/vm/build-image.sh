#!/usr/bin/env bash
# Builds, once, the QEMU guest image in which the OpenZFS conformance suite runs: Debian
# bookworm, its kernel, and zfs-dkms + zfsutils-linux from bookworm-backports (contrib), whose
# DKMS module is compiled for the guest's kernel. About 10 minutes on 2 cores; afterwards a
# no-op. The image is cached under $PLOYZ_CACHE/vm, keyed by the versions it holds, and never
# modified by a run (each boot writes to a throwaway overlay). Prints the image directory.
#
# Usage: tests/vm/build-image.sh            (progress on stderr, the directory on stdout)
set -euo pipefail

CACHE=${PLOYZ_CACHE:-$HOME/.cache/ployz}
MIRROR=${PLOYZ_DEBIAN_MIRROR:-http://deb.debian.org/debian}
ZFS_SERIES=${PLOYZ_ZFS_SERIES:-2.3}
started=$(date +%s)

say() { printf '[vm-image %4ss] %s\n' "$(( $(date +%s) - started ))" "$*" >&2; }

# Runs a long step with its output in $LOG and a progress line every 15 s (the last line of
# the log), so a 7-minute DKMS build does not look like a hang.
step() {
    local what=$1; shift
    say "$what"
    "$@" >>"$LOG" 2>&1 &
    local pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        for _ in $(seq 15); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
        if kill -0 "$pid" 2>/dev/null; then
            say "  ... $(tail -n1 "$LOG" | cut -c1-100)"
        fi
    done
    if ! wait "$pid"; then
        say "FAILED: $what; last lines of $LOG:"
        tail -n 30 "$LOG" >&2
        exit 1
    fi
}

backports_sources() {
    cat <<EOF
Types: deb
URIs: $MIRROR
Suites: bookworm-backports
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
}

host_packages() {
    local missing=()
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
    if [ ${#missing[@]} -gt 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
    fi
    if ! command -v qemu-system-x86_64 >/dev/null || ! command -v qemu-img >/dev/null; then
        # bookworm's qemu-system 7.2 does not match the qemu-utils this machine may already
        # have from backports: take both from backports.
        backports_sources >/etc/apt/sources.list.d/ployz-backports.sources
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q -t bookworm-backports \
            qemu-system-x86 qemu-utils
    fi
}

[ "$(id -u)" = 0 ] || { echo "error: building the VM image needs root (debootstrap, chroot)" >&2; exit 1; }
mkdir -p "$CACHE/vm"
LOG=$CACHE/vm/build.log
: >"$LOG"
host_packages >>"$LOG" 2>&1 || { tail -n 20 "$LOG" >&2; exit 1; }

# The key: the guest kernel ABI and the zfs version the archive offers now.
if [ ! -f /etc/apt/sources.list.d/ployz-backports.sources ] \
    || ! apt-cache madison zfs-dkms 2>/dev/null | grep -q "| $ZFS_SERIES"; then
    backports_sources >/etc/apt/sources.list.d/ployz-backports.sources
    apt-get update -q >>"$LOG" 2>&1
fi
kernel=$(apt-cache show --no-all-versions linux-image-amd64 | sed -n 's/^Depends: linux-image-\([^ ,]*\).*/\1/p' | head -n1)
zfs=$(apt-cache madison zfs-dkms | awk -v s="$ZFS_SERIES" '$3 ~ "^" s {print $3; exit}')
[ -n "$kernel" ] && [ -n "$zfs" ] || { echo "error: cannot find linux-image-amd64 or zfs-dkms $ZFS_SERIES in the archive" >&2; exit 1; }
OUT=$CACHE/vm/bookworm-$kernel-zfs-$zfs
if [ -f "$OUT/done" ]; then
    echo "$OUT"
    exit 0
fi
say "building the OpenZFS $zfs guest (kernel $kernel) into $OUT; log: $LOG"

WORK=$(mktemp -d "$CACHE/vm/build.XXXXXX")
ROOT=$WORK/rootfs
cleanup() {
    for m in dev/pts dev proc sys; do umount "$ROOT/$m" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

step "1/5 debootstrap bookworm (minbase)" \
    debootstrap --variant=minbase --include=systemd-sysv,udev,kmod,iproute2,ca-certificates \
    bookworm "$ROOT" "$MIRROR"

backports_sources >"$ROOT/etc/apt/sources.list.d/backports.sources"
# The guest sees the archive as the host does (updates and security included), so the kernel
# the key names is the one it installs.
for f in /etc/apt/sources.list.d/*.sources; do
    case $f in */ployz-backports.sources) ;; *) cp "$f" "$ROOT/etc/apt/sources.list.d/" ;; esac
done
[ -f /etc/apt/sources.list ] && cp /etc/apt/sources.list "$ROOT/etc/apt/sources.list"
printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
chmod +x "$ROOT/usr/sbin/policy-rc.d"
for m in proc sys dev dev/pts; do mount --bind "/$m" "$ROOT/$m"; done
in_root() { chroot "$ROOT" env DEBIAN_FRONTEND=noninteractive LC_ALL=C "$@"; }

step "2/5 kernel, headers and compiler" \
    in_root sh -c "apt-get update -q && apt-get install -y -q --no-install-recommends \
        linux-image-$kernel linux-headers-$kernel build-essential"
step "3/5 zfs-dkms and zfsutils-linux $zfs (DKMS builds the module for the guest kernel; the long step)" \
    in_root apt-get install -y -q --no-install-recommends -t bookworm-backports \
        "zfs-dkms=$zfs" "zfsutils-linux=$zfs"
[ -e "$ROOT/lib/modules/$kernel/updates/dkms/zfs.ko" ] || [ -e "$ROOT/lib/modules/$kernel/updates/dkms/zfs.ko.xz" ] || {
    echo "error: the zfs module was not built for $kernel; see $LOG" >&2; exit 1; }

# The guest's init: mount the share, run the suite's script from it, power off. It is part
# of the image, so a run only ever writes to its overlay and its share.
cat >"$ROOT/sbin/ployz-init" <<'EOF'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
modprobe 9pnet_virtio
mkdir -p /share && mount -t 9p -o trans=virtio,version=9p2000.L,msize=1048576 share /share
modprobe zfs
ip link set lo up
echo "[guest] up; running /share/run.sh"
sh /share/run.sh
echo "[guest] done ($?)"
sync
echo o >/proc/sysrq-trigger
sleep 30
EOF
chmod +x "$ROOT/sbin/ployz-init"
rm -f "$ROOT/usr/sbin/policy-rc.d"
in_root apt-get clean
for m in dev/pts dev proc sys; do umount "$ROOT/$m"; done

mkdir -p "$WORK/out"
cp "$ROOT/boot/vmlinuz-$kernel" "$WORK/out/vmlinuz"
cp "$ROOT/boot/initrd.img-$kernel" "$WORK/out/initrd.img"
step "4/5 root filesystem image" \
    sh -c "truncate -s 3G '$WORK/root.raw' && mkfs.ext4 -q -d '$ROOT' '$WORK/root.raw'"
step "5/5 compressed qcow2 for the cache" \
    qemu-img convert -c -O qcow2 "$WORK/root.raw" "$WORK/out/root.qcow2"
printf 'kernel=%s\nzfs=%s\nbuilt=%s\n' "$kernel" "$zfs" "$(date -u +%FT%TZ)" >"$WORK/out/versions"
touch "$WORK/out/done"
rm -rf "$OUT"
mv "$WORK/out" "$OUT"
say "done: $OUT"
echo "$OUT"
