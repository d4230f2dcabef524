#!/usr/bin/env bash
# Runs every test of the project. Installs what the tests need on a fresh
# Debian machine first (software Vulkan through Mesa lavapipe, the wasm32
# target), then:
#   1. native tests on the GPU adapter wgpu finds (lavapipe on a machine without a GPU):
#      kernel tests against CPU references, golden tests against the official
#      Hymba outputs, loading-error tests, CLI end-to-end tests;
#   2. the engine's WebAssembly build (wasm32-unknown-unknown).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v vulkaninfo >/dev/null 2>&1 || need_apt+=(vulkan-tools)
[ -e /usr/share/vulkan/icd.d/lvp_icd.x86_64.json ] || [ -e /usr/share/vulkan/icd.d/lvp_icd.aarch64.json ] || need_apt+=(mesa-vulkan-drivers)
ldconfig -p 2>/dev/null | grep -q libvulkan.so.1 || need_apt+=(libvulkan1)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "== installing ${need_apt[*]}"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if ! rustup target list --installed 2>/dev/null | grep -q wasm32-unknown-unknown; then
    echo "== adding the wasm32-unknown-unknown target"
    rustup target add wasm32-unknown-unknown
fi
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
export HYMBA_BACKEND="${HYMBA_BACKEND:-vulkan}"

echo "== native tests (adapter: first Vulkan device; software lavapipe without a GPU)"
cargo test --release --workspace --exclude hymba-web

echo "== WebAssembly build of the engine"
cargo build --release -p hymba-engine --target wasm32-unknown-unknown

echo "== all tests passed"
