#!/usr/bin/env bash
# Installs what a fresh machine of this kind lacks for the tests and the demo: zfs-fuse (the
# test machines' ZFS), iproute2 (network namespaces), util-linux (unshare, nsenter),
# containerd + runc + the CNI plugins (each test machine's container runtime; runc, not crun,
# which fails on this host's hybrid cgroups), busybox-static and gcc (the locally built
# images), iptables and conntrack (kubelet's host checks), and for the benchmark openssh (the
# baseline) and perf (the engine's CPU profile).
# Idempotent and quiet when everything is there.
set -euo pipefail
need=()
command -v /sbin/zfs-fuse >/dev/null 2>&1 || need+=(zfs-fuse)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v nsenter >/dev/null 2>&1 || need+=(util-linux)
[ -x /usr/bin/containerd ] || need+=(containerd)
[ -x /usr/sbin/runc ] || need+=(runc)
[ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "ok installed" || need+=(busybox-static)
command -v iptables >/dev/null 2>&1 || need+=(iptables)
command -v conntrack >/dev/null 2>&1 || need+=(conntrack)
command -v gcc >/dev/null 2>&1 || need+=(gcc libc6-dev)
# `install-deps.sh bench`: the ssh baseline of the benchmark.
if [ "${1:-}" = bench ]; then
  [ -x /usr/sbin/sshd ] || need+=(openssh-server)
  command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
  command -v perf >/dev/null 2>&1 || need+=(linux-perf)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "[install-deps] apt-get install ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
command -v go >/dev/null 2>&1 || { echo "[install-deps] Go is required to build the test cluster's binaries" >&2; exit 1; }
[ -e /dev/fuse ] || { echo "[install-deps] /dev/fuse is missing: zfs-fuse cannot run here" >&2; exit 1; }
