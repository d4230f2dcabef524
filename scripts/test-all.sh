#!/usr/bin/env bash
# Runs every test of the project. Installs what the tests need on a fresh
# Debian machine first (software Vulkan through Mesa lavapipe, the wasm32
# target), then:
#   1. native tests on the GPU adapter wgpu finds (lavapipe on a machine without a GPU):
#      kernel tests against CPU references, golden tests against the official
#      Hymba outputs, loading-error tests, CLI end-to-end tests;
#   2. the engine's WebAssembly build (wasm32-unknown-unknown);
#   3. hymba-web: the golden fixtures in headless Chromium (wasm-bindgen-test), the demo
#      page and Cache API (playwright-core), the npm package in Node (webgpu npm package).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="${HOME:-/root}/.cargo/bin:$PATH"

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

echo "== formatting (cargo fmt --check)"
if cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt >/dev/null 2>&1; then
    cargo fmt --all --check
fi

echo "== native tests (adapter: first Vulkan device; software lavapipe without a GPU)"
cargo test --release --workspace --exclude hymba-web

echo "== WebAssembly build of the engine"
cargo build --release -p hymba-engine --target wasm32-unknown-unknown

# ---- In the browser (hymba-web): wasm golden tests in headless Chromium, demo page, npm package in Node.
echo "== browser/Node test prerequisites (chromium, chromedriver, wasm-bindgen-cli 0.2.130, npm packages)"
need_apt=()
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)
command -v node >/dev/null 2>&1 || need_apt+=(nodejs npm)
if [ ${#need_apt[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
WB_VERSION="$(grep -A1 '^name = "wasm-bindgen"$' Cargo.lock | sed -n 's/^version = "\(.*\)"/\1/p')"
if ! wasm-bindgen --version 2>/dev/null | grep -q "$WB_VERSION"; then
    echo "== installing wasm-bindgen-cli $WB_VERSION (about 3.5 min)"
    # Its own lock file first; where the registry lacks a version it pins (seen here: a
    # webpki-roots release the crates.io mirror does not carry), the newest compatible ones.
    cargo install wasm-bindgen-cli --version "$WB_VERSION" --locked \
        || { echo "== --locked failed: installing wasm-bindgen-cli $WB_VERSION with fresh dependency resolution"; \
             cargo install wasm-bindgen-cli --version "$WB_VERSION"; }
fi
export PATH="${HOME:-/root}/.cargo/bin:$PATH"
export CARGO_TARGET_DIR_WEB="$PWD/target-web"

echo "== golden fixtures in headless Chromium (WebGPU on SwiftShader) through wasm-bindgen-test"
(cd web && CARGO_TARGET_DIR="$CARGO_TARGET_DIR_WEB" CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
    CHROMEDRIVER="$(command -v chromedriver)" WASM_BINDGEN_TEST_TIMEOUT=1200 \
    cargo test -p hymba-web --release --target wasm32-unknown-unknown --test golden) \
    && echo "PASS wasm golden fixtures c1..c5 in Chromium" || { echo "FAIL wasm golden fixtures in Chromium"; exit 1; }

echo "== npm package (web/pkg)"
CARGO_TARGET_DIR="$CARGO_TARGET_DIR_WEB" bash web/build.sh
(cd web/tests-js && npm install --silent --no-audit --no-fund)

echo "== demo page and Cache API in headless Chromium (playwright-core)"
HYMBA_BROWSER_TIMEOUT_MS="${HYMBA_BROWSER_TIMEOUT_MS:-1200000}" node web/tests-js/browser.test.mjs

echo "== npm package in Node (webgpu npm package, SwiftShader Vulkan)"
node web/tests-js/node.test.mjs

echo "== all tests passed"
