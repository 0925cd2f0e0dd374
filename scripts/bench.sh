#!/bin/sh
# The bench harness's entry point: scripts/bench.sh [--quick] [--runs N] [--peer-vmm PATH] [SUITE...]
# Builds what it runs, then runs each suite (the paper's set by default), printing a markdown
# table per suite and writing bench/results/<suite>-<timestamp>.json and .png
# (docs/performance.md). matplotlib draws the plots; it is installed here if missing.
set -e
"$(dirname "$0")/ensure-matplotlib.sh"
exec python3 "$(dirname "$0")/bench.py" "$@"
