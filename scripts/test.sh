#!/usr/bin/env bash
# Runs every test on a fresh machine: installs what is missing, builds, lints, tests.
# Integration tests boot real VMs and need /dev/kvm; without it they print SKIPPED.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v python3 >/dev/null || need_apt+=(python3)
# The userfaultfd crate generates its bindings with bindgen, which needs libclang.
dpkg -s libclang-dev >/dev/null 2>&1 || need_apt+=(libclang-dev)
if ((${#need_apt[@]})); then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi
# The bench's plots (tests/bench.rs runs scripts/bench.sh --quick).
scripts/ensure-matplotlib.sh
for c in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c"
done
[ -e /dev/kvm ] || echo "*** WARNING: /dev/kvm is missing: integration tests will be SKIPPED ***"

echo "== build"
scripts/build-guest.sh
# The Linux guest's initramfs (Debian's busybox-static, our linux-verify); its tests skip
# loudly when the shared kernel (../shared/linux/vmlinux) is absent.
scripts/build-initramfs.sh
cargo build --workspace --release --locked

echo "== format and lint"
cargo fmt --all -- --check
(cd guest && cargo fmt -- --check)
(cd guest/linux-verify && cargo fmt -- --check)
cargo clippy --workspace --all-targets --release --locked -- -D warnings
(cd guest && cargo clippy --release --locked -- -D warnings)
(cd guest/linux-verify && cargo clippy --release --locked -- -D warnings)

echo "== tests"
cargo test --workspace --release --locked

echo "== fuzz (each target briefly, from its seeds)"
scripts/fuzz.sh 20
