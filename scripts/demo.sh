#!/usr/bin/env bash
# Builds Weir (release) and runs the vibration example: simulated 1 kHz sensors ->
# 1-second RMS/peak per sensor on stdout, anomaly events in anomalies.jsonl.
source "$(dirname "$0")/env.sh"
cd "$(dirname "$0")/.."
cargo build --release --bin weir
"$CARGO_TARGET_DIR/release/weir" compile examples/vibration.sql
exec "$CARGO_TARGET_DIR/release/weir" run examples/vibration.sql "$@"
