#!/usr/bin/env bash
# Builds the Linux test guest's initramfs: Debian's static busybox, our static linux-verify and
# the init script. Output: build/linux-initramfs.cpio
set -euo pipefail
cd "$(dirname "$0")/.."
if ! dpkg -s busybox-static >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static
fi
(cd guest/linux-verify && cargo build --release --locked)
bin=guest/linux-verify/target/x86_64-unknown-linux-gnu/release/linux-verify
mkdir -p build
python3 scripts/mkinitramfs.py build/linux-initramfs.cpio \
    init=guest/linux-init.sh \
    bin/busybox=/bin/busybox \
    bin/linux-verify="$bin"
echo "initramfs: $(pwd)/build/linux-initramfs.cpio"
