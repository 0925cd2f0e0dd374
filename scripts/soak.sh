#!/usr/bin/env bash
# The IOPA-Snoop soak (not in CI): blk-verify for OPS verified ops (default 10 M) against vdpu
# passed through under --vio, while half of guest RAM is reclaimed every 100 ms. Passes when the
# guest reports 0 mismatches and 0 io_errors and the device 0 IOPF.
set -euo pipefail
cd "$(dirname "$0")/.."
OPS=${1:-10000000}

. scripts/vdpu-env.sh soak

start=$(date +%s)
target/release/vio-hypervisor -v \
    --kernel guest/target/x86_64-unknown-linux-gnu/release/vio-guest \
    --memory size=512M,shared=on,reclaim=on --reclaim store="$dir" \
    --vio socket="$dir/vdpu.sock",id=dpu0 \
    --api-socket "$dir/api.sock" --serial file="$dir/serial.log" --console off \
    --cmdline "vio.workload=blk-verify vio.ops=$OPS vio.qd=16 vio.pool_pages=16384 vio.indirect=1 vio.event_idx=1 vio.stall_s=10 vio.seed=$start" \
    2>"$dir/vmm.log" &
vmm=$!
passes=0
while kill -0 "$vmm" 2>/dev/null; do
    target/release/ch-remote --api-socket "$dir/api.sock" reclaim 256M >/dev/null 2>&1 && passes=$((passes + 1))
    sleep 0.1
done
wait "$vmm"
end=$(date +%s)
result=$(grep -a VIO-GUEST-RESULT "$dir/serial.log" | cut -d' ' -f2- || true)
counters=$(grep -a "Device dpu0 counters" "$dir/vmm.log" | sed 's/.*counters: //')
python3 - "$result" "$counters" "$passes" "$((end - start))" "$OPS" <<'PY'
import json, sys
r = json.loads(sys.argv[1]) if sys.argv[1] else {}
c = json.loads(sys.argv[2]) if sys.argv[2] else {}
passes, secs, ops = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
print(f"ops {r.get('ops', 0):,} in {secs} s ({r.get('iops', 0):,} IOPS), mismatches {r.get('mismatches')}, "
      f"io_errors {r.get('io_errors')}, iopf {c.get('iopf')}, fault-ins {c.get('faultins', 0):,}, "
      f"reclaim passes {passes}, bad_chains {c.get('bad_chains')}")
ok = r.get("ops") == ops and r.get("mismatches") == 0 and r.get("io_errors") == 0 and c.get("iopf") == 0
print("SOAK PASSED" if ok else "SOAK FAILED")
sys.exit(0 if ok else 1)
PY
