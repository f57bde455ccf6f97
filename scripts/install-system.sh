#!/usr/bin/env bash
# Installs the Debian packages vmshift needs. Idempotent: safe to run again.
# QEMU comes from bookworm-backports (10.x): Debian 12's own QEMU 7.2 corrupts TCG guests
# during live migration (see docs/dependencies.md).
set -euo pipefail
if [ "$(id -u)" -ne 0 ]; then
  echo "install-system.sh must run as root (it installs Debian packages)." >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
src=/etc/apt/sources.list.d/vmshift-backports.sources
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  cat > "$src" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  apt-get update -q
fi
need=()
for p in busybox-static cpio gzip iproute2 procps psmisc postgresql gcc libc6-dev make kmod syslinux syslinux-common mtools tgt; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -q || true
  apt-get install -y -q --no-install-recommends "${need[@]}"
fi
# virtinst: the import lab test makes a domain XML with virt-install --print-xml against libvirt's
# in-process test driver (no daemon); mmdebstrap: 'vmshift image build --kind debian' (docs/images.md).
need=()
for p in virtinst mmdebstrap; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -q || true
  apt-get install -y -q --no-install-recommends "${need[@]}"
fi
qv=$(qemu-system-x86_64 --version 2>/dev/null | head -1 | sed -n 's/.*version \([0-9]*\)\..*/\1/p' || true)
if [ -z "$qv" ] || [ "$qv" -lt 10 ]; then
  apt-get update -q || true
  apt-get install -y -q --no-install-recommends -t bookworm-backports qemu-system-x86 qemu-utils
fi
# QEMU's user-space iSCSI initiator (block driver iscsi) must match QEMU 10: the default candidate is 7.2.
if ! dpkg -s qemu-block-extra 2>/dev/null | grep -q '^Version: 1:10\.'; then
  apt-get update -q || true
  apt-get install -y -q --no-install-recommends -t bookworm-backports qemu-block-extra
fi
# The unprivileged user vmshift-agent runs QEMU as (docs/confinement.md).
if ! getent passwd vmshift-qemu >/dev/null; then
  useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin vmshift-qemu
fi
qemu-system-x86_64 --version | head -1
