#!/usr/bin/env bash
# Runs every test of the workspace: unit tests, golden SQL tests, engine tests, doc tests.
source "$(dirname "$0")/env.sh"
cd "$(dirname "$0")/.."
if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install --locked cargo-nextest
fi
cargo nextest run --workspace --all-targets --no-fail-fast
cargo test --workspace --doc
