#!/usr/bin/env bash
# Runs every test of the workspace: doc tests, then unit, golden SQL and engine tests.
source "$(dirname "$0")/env.sh"
cd "$(dirname "$0")/.."
if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install --locked cargo-nextest
fi
cargo test --workspace --doc
cargo nextest run --workspace --all-targets --no-fail-fast
