#!/usr/bin/env bash
# The soak (not in CI): blk-verify for OPS verified ops (default 10 M) against vdpu passed
# through under --vio while, all at once:
#   - half of guest RAM is reclaimed every 100 ms;
#   - the device is switched between snoop and passthrough every second (vm.vio-mode);
#   - the VM is live-upgraded into a new VMM process once, UPGRADE_AT seconds in (default 30).
# Passes when the guest reports OPS ops with 0 mismatches and 0 io_errors, the device 0 IOPF,
# and every switch and the upgrade succeeded.
#   scripts/soak.sh [OPS]
set -euo pipefail
cd "$(dirname "$0")/.."
OPS=${1:-10000000}
UPGRADE_AT=${UPGRADE_AT:-30}

. scripts/vdpu-env.sh soak

ch() { target/release/ch-remote --api-socket "$api" "$@"; }
start=$(date +%s)
api="$dir/api.sock"
target/release/vio-hypervisor -v \
    --kernel guest/target/x86_64-unknown-linux-gnu/release/vio-guest \
    --memory size=512M,shared=on,reclaim=on --reclaim store="$dir" \
    --vio socket="$dir/vdpu.sock",id=dpu0 \
    --api-socket "$api" --serial file="$dir/serial.log" --console off \
    --cmdline "vio.workload=blk-verify vio.ops=$OPS vio.qd=16 vio.pool_pages=16384 vio.indirect=1 vio.event_idx=1 vio.stall_s=10 vio.seed=$start" \
    2>"$dir/vmm.log" &
vmm=$!
for _ in $(seq 100); do [ -S "$api" ] && break; sleep 0.05; done

passes=0 switches=0 failed_switches=0 upgraded=0 last_switch=$start mode=snoop
log="$dir/vmm.log"
while kill -0 "$vmm" 2>/dev/null; do
    ch reclaim 256M >/dev/null 2>&1 && passes=$((passes + 1))
    now=$(date +%s)
    if ((now > last_switch)); then
        last_switch=$now
        mode=$([ "$mode" = snoop ] && echo passthrough || echo snoop)
        if ch vio-mode dpu0 "$mode" >/dev/null 2>&1; then
            switches=$((switches + 1))
        elif kill -0 "$vmm" 2>/dev/null; then
            failed_switches=$((failed_switches + 1))
        fi
    fi
    if ((upgraded == 0 && now - start >= UPGRADE_AT)); then
        # A new VMM process takes the VM over; the old one exits once it runs there.
        new_api="$dir/api2.sock"
        target/release/vio-hypervisor -v --api-socket "$new_api" 2>"$dir/vmm2.log" &
        new_vmm=$!
        for _ in $(seq 100); do [ -S "$new_api" ] && break; sleep 0.05; done
        target/release/ch-remote --api-socket "$new_api" receive-migration "unix:$dir/upgrade.sock" \
            >"$dir/receive.json" 2>&1 &
        receiver=$!
        for _ in $(seq 100); do [ -S "$dir/upgrade.sock" ] && break; sleep 0.05; done
        if ch send-migration --local "unix:$dir/upgrade.sock" >"$dir/send.json" 2>&1; then
            upgraded=1
            wait "$vmm" || true
            wait "$receiver" || true
            vmm=$new_vmm api=$new_api log="$dir/vmm2.log"
            echo "live upgrade at $((now - start)) s: $(cat "$dir/send.json")"
        else
            upgraded=-1
            echo "live upgrade failed: $(cat "$dir/send.json")"
            kill "$new_vmm" 2>/dev/null || true
        fi
    fi
    sleep 0.1
done
wait "$vmm" || true
end=$(date +%s)
result=$(grep -a VIO-GUEST-RESULT "$dir/serial.log" | cut -d' ' -f2- || true)
counters=$(grep -a "Device dpu0 counters" "$log" | sed 's/.*counters: //' || true)
python3 - "$result" "$counters" "$passes" "$((end - start))" "$OPS" "$switches" "$failed_switches" "$upgraded" <<'PY'
import json, sys
r = json.loads(sys.argv[1]) if sys.argv[1] else {}
c = json.loads(sys.argv[2]) if sys.argv[2] else {}
passes, secs, ops, switches, failed, upgraded = map(int, sys.argv[3:9])
print(f"ops {r.get('ops', 0):,} in {secs} s ({r.get('iops', 0):,} IOPS), mismatches {r.get('mismatches')}, "
      f"io_errors {r.get('io_errors')}, iopf {c.get('iopf')}, fault-ins {c.get('faultins', 0):,}, reclaim passes {passes}, "
      f"mode switches {switches} (failed {failed}), live upgrade {'done' if upgraded == 1 else 'FAILED' if upgraded else 'not reached'}, "
      f"missed_doorbells {c.get('missed_doorbells')}, bad_chains {c.get('bad_chains')}")
ok = (r.get("ops") == ops and r.get("mismatches") == 0 and r.get("io_errors") == 0
      and c.get("iopf") == 0 and failed == 0 and switches > 0 and upgraded == 1)
print("SOAK PASSED" if ok else "SOAK FAILED")
sys.exit(0 if ok else 1)
PY
