#!/usr/bin/env bash
# Runs every test of the workspace: doc tests, then unit, golden SQL, engine, MQTT (embedded
# broker and Mosquitto) and gateway tests.
source "$(dirname "$0")/env.sh"
cd "$(dirname "$0")/.."
# The MQTT tests run the same cases against Mosquitto, which they start themselves on a free
# loopback port; only the binary is needed (the package's own service is not used).
# The TLS test makes its certificates with openssl.
test_packages=()
if [ ! -x /usr/sbin/mosquitto ] || ! command -v mosquitto_pub >/dev/null 2>&1; then
    test_packages+=(mosquitto mosquitto-clients)
fi
command -v openssl >/dev/null 2>&1 || test_packages+=(openssl)
install_packages "${test_packages[@]}"
# Results in an object store are tested against moto's S3 server (PyPI).
if ! command -v moto_server >/dev/null 2>&1; then
    python3 -m pip install --quiet --disable-pip-version-check "moto[server]==5.2.5"
fi
if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install --locked cargo-nextest
fi
cargo test --workspace --doc
cargo nextest run --workspace --all-targets --no-fail-fast
