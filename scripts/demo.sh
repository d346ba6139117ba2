#!/usr/bin/env bash
# Builds Weir (release) and runs `weir demo`: a gateway with its embedded MQTT broker, 100
# simulated 1 kHz sensors publishing over MQTT, and the pipelines of
# examples/gateway/vibration.sql (1-second RMS/peak per sensor, anomaly events), shown live.
# Arguments go to `weir demo`, e.g. --seconds 30 or --json.
source "$(dirname "$0")/env.sh"
cd "$(dirname "$0")/.."
cargo build --release --bin weir
exec "$CARGO_TARGET_DIR/release/weir" demo "$@"
