#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/) for SECONDS each (default 20) from its committed seeds,
# as a regression check: any crash, panic or hang fails. Long runs (docs/testing.md) pass a
# larger SECONDS, or TARGETS to pick some.
#   scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-20}
shift || true
targets=("$@")
((${#targets[@]})) || targets=(snoop http_api vm_config vfio_user_server vfio_user_client blk_engine net_engine)

# cargo-fuzz drives libFuzzer through flags only nightly rustc takes; RUSTC_BOOTSTRAP lets the
# stable toolchain take them (no sanitizer: the code under test is safe Rust).
export RUSTC_BOOTSTRAP=1
# libfuzzer-sys builds libFuzzer itself, which is C++.
if ! command -v c++ >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2

cd fuzz
cargo fuzz build -s none 2>&1 | tail -n 3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for t in "${targets[@]}"; do
    mkdir -p "$work/$t"
    echo "== fuzz $t (${secs}s)"
    # New inputs go to a scratch corpus; the committed seeds are only read.
    if ! cargo fuzz run -s none "$t" "$work/$t" "corpus/$t" -- \
        -max_total_time="$secs" -timeout=10 -print_final_stats=1 >"$work/$t.log" 2>&1; then
        tail -n 60 "$work/$t.log"
        echo "*** fuzz target $t failed (reproducer in fuzz/artifacts/$t) ***"
        exit 1
    fi
    grep -E "^Done|stat::number_of_executed_units" "$work/$t.log" | tr '\n' ' '
    echo
done
