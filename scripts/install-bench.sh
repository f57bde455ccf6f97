#!/usr/bin/env bash
# Installs what `make bench` needs beyond `make install`: libvirt 11 from bookworm-backports, a peer
# that live-migrates the same lab guest with its own defaults (bench/suite/libvirt_peer.py).
# Idempotent and quiet: run it again and it only checks. See docs/performance-libvirt.md.
#
# Each package is pinned to backports BY NAME (pkg/bookworm-backports). `-t bookworm-backports`
# would make backports the default for every dependency and upgrade systemd/udev too; by name,
# only libvirt comes from backports and its other dependencies from bookworm itself.
set -euo pipefail

die() { echo "install-bench.sh: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (it installs Debian packages)."
grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/ ||
  die "no bookworm-backports apt source: run scripts/install-system.sh (make install) first."
command -v qemu-system-x86_64 >/dev/null ||
  die "qemu-system-x86_64 is missing: run scripts/install-system.sh (make install) first."

# libvirtd (monolithic daemon; Debian's 11.3 backport ships no modular daemons), its QEMU driver,
# virtlogd (libvirt-daemon-log: QEMU's stdout/stderr go through it) and virsh (libvirt-clients).
# No libvirt-daemon-system: it only adds init scripts and users, and there is no init to run them;
# bench/suite/libvirt_peer.py starts the daemons itself, one per lab host namespace.
pkgs=(libvirt0 libvirt-common libvirt-daemon-common libvirt-daemon-log libvirt-daemon
      libvirt-daemon-driver-qemu libvirt-clients)
want=11

have_version() {  # major version of an installed package, empty when it is not installed
  dpkg-query -W -f='${db:Status-Abbrev} ${Version}\n' "$1" 2>/dev/null |
    awk '$1 == "ii" { split($2, v, "."); print v[1] }' || true
}

need=()
for p in "${pkgs[@]}"; do
  v=$(have_version "$p")
  if [ -z "$v" ] || [ "$v" -lt "$want" ]; then need+=("$p/bookworm-backports"); fi
done

if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  log=$(mktemp /tmp/install-bench.XXXXXX.log)
  apt-get update -q >"$log" 2>&1 || die "apt-get update failed; see $log"
  if ! apt-get install -y -q --no-install-recommends "${need[@]}" >>"$log" 2>&1; then
    tail -n 20 "$log" >&2
    die "installing ${need[*]} failed; full log in $log"
  fi
  rm -f "$log"
fi

for p in "${pkgs[@]}"; do
  v=$(have_version "$p")
  [ -n "$v" ] && [ "$v" -ge "$want" ] || die "$p $want.x is not installed after apt-get (got '${v:-none}')."
done
for bin in libvirtd virtlogd virsh; do
  command -v "$bin" >/dev/null || die "$bin is missing although libvirt is installed."
done
echo "libvirt $(libvirtd --version | awk '{print $NF}'), $(qemu-system-x86_64 --version | head -1)"
