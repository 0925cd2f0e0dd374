#!/usr/bin/env bash
# The VIO demo on a fresh machine, in about a minute: builds everything, then runs the same
# workload on two VMs side by side, each with vdpu (the software DPU, a vfio-user virtio-blk
# device that DMAs straight into guest memory) passed through: one as plain passthrough (all
# guest RAM pinned) and one under VIO (IOPA-Snoop with Lockpage: guest RAM reclaimable, the
# device never takes an I/O page fault). A live table, then a summary: IOPS of each, memory
# given back, errors. `scripts/demo.sh --seconds 300` runs longer; `--help` for the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build-guest.sh >/dev/null
cargo build --workspace --release --locked -q
exec python3 scripts/demo.py "$@"
