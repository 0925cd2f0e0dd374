#!/bin/sh
# The bench harness's entry point: scripts/bench.sh [--quick] [--runs N] [SUITE...]
# Builds what it runs, then runs each suite (all by default), printing a markdown table per
# suite and writing bench/results/<suite>-<timestamp>.json (docs/performance.md).
exec python3 "$(dirname "$0")/bench.py" "$@"
