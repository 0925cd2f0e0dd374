#!/usr/bin/env bash
# Builds everything, makes a tmpfs disk and boots the test guest running blk-verify on a
# VMM-emulated virtio-blk disk, showing its progress lines and the final result.
set -euo pipefail
cd "$(dirname "$0")/.."
OPS=${OPS:-400000}
QD=${QD:-16}

scripts/build-guest.sh >/dev/null
cargo build --release --locked -q
dir=$(mktemp -d /dev/shm/vio-demo.XXXXXX)
trap 'rm -rf "$dir"' EXIT
truncate -s 256M "$dir/disk.img"

echo "Booting the test guest: blk-verify, $OPS ops at queue depth $QD on a tmpfs disk"
target/release/vio-hypervisor -v \
    --kernel guest/target/x86_64-unknown-linux-gnu/release/vio-guest \
    --memory size=512M,shared=on \
    --cpus boot=1 \
    --disk path="$dir/disk.img" \
    --serial tty --console off \
    --cmdline "vio.workload=blk-verify vio.ops=$OPS vio.qd=$QD vio.indirect=1 vio.event_idx=1" \
    2> >(grep --line-buffered -E "boot progress|booted|activated|exited|ERROR" >&2)
