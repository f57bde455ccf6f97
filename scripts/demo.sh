#!/usr/bin/env bash
# The local lab demo: a 2-host lab, two VMs booted on it, a health check of each.
# The lab stays up afterwards; the last lines say how to tear it down.
set -euo pipefail
cd "$(dirname "$0")/.."
LAB=${1:-demo}
V=.venv/bin/vmshift
if [ "$(id -u)" -ne 0 ]; then echo "The demo builds network namespaces: run it as root." >&2; exit 1; fi

if $V lab list --json 2>/dev/null | grep -q "\"$LAB\""; then
  echo "== lab '$LAB' is already up: tearing it down first"
  $V lab down --name "$LAB"
fi
echo "== bringing up lab '$LAB' with 2 hosts"
$V lab up --name "$LAB" --hosts 2
eval "$($V lab env --name "$LAB")"
$V host list
$V datastore list
$V network list

echo "== creating and booting two VMs"
$V vm create web-1 --host host-1 --cpus 1 --memory 256 --datastore shared-1 --network "VM Network" \
  --disk 64M --image lab-guest --kernel-args "vmshift.memtest=64,50 vmshift.disklog=1" --start
$V vm create web-2 --host host-2 --cpus 1 --memory 256 --datastore shared-1 --network "VM Network" \
  --disk 64M --image lab-guest --kernel-args "vmshift.memtest=64,50 vmshift.disklog=1" --start
$V vm list

echo "== checking each VM from the client namespace (echo, memtest, disklog)"
for vm in web-1 web-2; do
  echo "-- $vm"
  $V lab check "$vm" --name "$LAB" --json
done

echo "== vMotion: web-1 host-1 -> host-2 -> host-1 while a TCP connection and a 1 ms UDP probe run"
$V lab vmotion-demo web-1 --name "$LAB"
$V migration list

cat <<MSG

The lab '$LAB' is still up. Try:
  eval "\$(.venv/bin/vmshift lab env --name $LAB)"
  .venv/bin/vmshift vm show web-1
  .venv/bin/vmshift lab probe web-1 --name $LAB --seconds 3 --json
  .venv/bin/vmshift vm migrate web-1 --host host-2 --dry-run
  .venv/bin/vmshift vm migrate web-1 --host host-2
Tear it down with:
  make demo-down        (or: .venv/bin/vmshift lab down --name $LAB)
MSG
