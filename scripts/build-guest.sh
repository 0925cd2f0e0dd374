#!/usr/bin/env bash
# Builds the bare-metal test guest. Output: guest/target/x86_64-unknown-linux-gnu/release/vio-guest
set -euo pipefail
cd "$(dirname "$0")/../guest"
cargo build --release --locked
echo "guest: $(pwd)/target/x86_64-unknown-linux-gnu/release/vio-guest"
