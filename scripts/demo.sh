#!/usr/bin/env bash
# The VIO demo on a fresh machine: builds everything, starts vdpu (the software DPU, a vfio-user
# virtio-blk device that DMAs straight into guest memory) on a tmpfs disk, boots the test guest
# with vdpu passed through under VIO (--vio: IOPA-Snoop) and guest memory reclaim on, and shows
# live stats once a second: guest IOPS and verification, host-resident vs reclaimed guest
# memory, memory Lockpage keeps locked (the buffers DMA keeps hitting, within 10% of RAM), pages
# the snoop path faulted in for the device, and the device's I/O page faults (which stay at 0:
# the device never sees a request whose pages are not resident and mapped).
set -euo pipefail
cd "$(dirname "$0")/.."
OPS=${OPS:-3000000}
RATE=${RATE:-100000}

. scripts/vdpu-env.sh demo

echo "Booting the test guest: blk-verify ($OPS ops at up to $RATE/s, queue depth 16) on 1 GiB of"
echo "guest RAM, vdpu passed through under VIO with Lockpage, reclaim on (policy: pages idle for"
echo "1 s, up to 70%)."
target/release/vio-hypervisor \
    --kernel guest/target/x86_64-unknown-linux-gnu/release/vio-guest \
    --memory size=1G,shared=on,reclaim=on \
    --reclaim interval_ms=500,idle_ms=1000,target_pct=70,store="$dir" \
    --vio socket="$dir/vdpu.sock",id=dpu0,lockpage=on \
    --api-socket "$dir/api.sock" \
    --serial file="$dir/serial.log" --console off \
    --cmdline "vio.workload=blk-verify vio.ops=$OPS vio.qd=16 vio.rate=$RATE vio.pool_pages=65536 vio.indirect=1 vio.event_idx=1" &
vmm=$!

printf "\n%6s %10s %8s %7s %13s %14s %11s %10s %9s %6s\n" "time" "guest ops" "IOPS" "errors" "resident MiB" "reclaimed MiB" "locked MiB" "refaults" "faultins" "iopf"
t=0
while kill -0 "$vmm" 2>/dev/null; do
    sleep 1
    t=$((t + 1))
    c=$(target/release/ch-remote --api-socket "$dir/api.sock" counters 2>/dev/null) || continue
    p=$(grep -a VIO-GUEST-PROGRESS "$dir/serial.log" 2>/dev/null | tail -1 | cut -d' ' -f2- || true)
    python3 - "$c" "$p" "$t" <<'PY' || true
import json, sys
c, t = json.loads(sys.argv[1]), sys.argv[3]
try:
    p = json.loads(sys.argv[2])
except ValueError:  # empty, or a line still being written
    p = {}
m, d = c.get("memory", {}), c.get("dpu0", {})
print(f"{t:>5}s {p.get('ops', 0):>10} {p.get('iops', 0):>8} {p.get('io_errors', 0) + p.get('mismatches', 0):>7} "
      f"{m.get('resident_bytes', 0) >> 20:>13} {m.get('reclaimed_bytes', 0) >> 20:>14} {d.get('locked_bytes', 0) >> 20:>11} "
      f"{m.get('cpu_refaults', 0):>10} {d.get('faultins', 0):>9} {d.get('iopf', 0):>6}")
PY
done
wait "$vmm" || true
echo
grep -a -E "VIO-GUEST-(RESULT|ERROR)" "$dir/serial.log"
