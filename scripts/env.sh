# Shared set-up for the project scripts: a build cache outside the checkout, and the system
# packages the build needs, installed once (idempotent).
set -euo pipefail
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/weir-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
mkdir -p "$CARGO_TARGET_DIR"

# Installs Debian packages that are missing; `install_packages pkg...`.
install_packages() {
    [ "$#" -gt 0 ] || return 0
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
    else
        sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
    fi
}

need_packages=()
command -v cc >/dev/null 2>&1 || need_packages+=(build-essential)
command -v pkg-config >/dev/null 2>&1 || need_packages+=(pkg-config)
# RocksDB: bindgen needs libclang, the C++ build needs g++.
command -v g++ >/dev/null 2>&1 || need_packages+=(g++)
compgen -G "/usr/lib/llvm-*/lib/libclang.so*" >/dev/null || need_packages+=(libclang-dev)
install_packages "${need_packages[@]}"
