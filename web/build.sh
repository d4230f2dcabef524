#!/usr/bin/env bash
# Builds the npm package into web/pkg: the wasm32 release build of hymba-web,
# wasm-bindgen --target web, then the hand-written wrapper (web/js).
# Needs wasm-bindgen-cli of the same version as Cargo.lock's wasm-bindgen (0.2.130).
# HYMBA_WASM_OPT=1 also runs wasm-opt from npm's binaryen (never Debian's: it breaks the output).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target-web}"
cargo build -p hymba-web --release --target wasm32-unknown-unknown
rm -rf web/pkg && mkdir -p web/pkg
wasm-bindgen --target web --out-dir web/pkg --out-name hymba_web "$CARGO_TARGET_DIR/wasm32-unknown-unknown/release/hymba_web.wasm"
if [ "${HYMBA_WASM_OPT:-0}" = 1 ]; then
    (cd web && [ -x node_modules/.bin/wasm-opt ] || npm install --no-save --silent binaryen@132.0.0)
    web/node_modules/.bin/wasm-opt -O2 --enable-reference-types --enable-bulk-memory --enable-nontrapping-float-to-int --enable-sign-ext --enable-mutable-globals web/pkg/hymba_web_bg.wasm -o web/pkg/hymba_web_bg.wasm
fi
cp web/js/index.js web/js/index.d.ts web/js/worker.js web/js/package.json web/js/README.md web/pkg/
echo "built web/pkg ($(du -sh web/pkg | cut -f1))"
