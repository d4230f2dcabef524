// Manual measurement (not a CI test): loads a model folder through the hymba-web package in
// Node (the `webgpu` npm package, Dawn; on Debian's Mesa 22.3 the Vulkan device is SwiftShader),
// served over http like a Hugging Face resolve/main/ URL (Node has no Cache API, so the
// download streams straight into the engine), generates a few tokens and prints one JSON line:
// load seconds, peak WebAssembly memory, GPU weight bytes, decode tok/s, adapter and limits.
//
//   node web/tests-js/load-measure.mjs --model DIR [--pkg web/pkg] [--dtype q4] [--tokens 4]
//        [--default-limits] [--max-positions 512] [--prompt-ids 1,2,3]
//
// --default-limits requests the device with WebGPU's default buffer limits
// (maxStorageBufferBindingSize 128 MiB, maxBufferSize 256 MiB) whatever the adapter offers.
// The `webgpu` package is taken from $HYMBA_WEBGPU_DIR/node_modules (npm install webgpu@0.6.2
// there first), default /tmp/hymba-webgpu.
import fs from 'node:fs';
import path from 'node:path';
import { pathToFileURL, fileURLToPath } from 'node:url';
import { startServer } from './server.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const args = process.argv.slice(2);
const arg = (k, d) => { const i = args.indexOf(k); return i >= 0 ? args[i + 1] : d; };
const flag = (k) => args.includes(k);
const modelDir = path.resolve(arg('--model', path.join(here, '../../models/tiny-shakespeare')));
const pkg = path.resolve(arg('--pkg', path.join(here, '../pkg')));
const webgpuDir = process.env.HYMBA_WEBGPU_DIR || '/tmp/hymba-webgpu';
const tokens = Number(arg('--tokens', 4));

if (!process.env.VK_ICD_FILENAMES && fs.existsSync('/usr/lib/chromium/vk_swiftshader_icd.json')) {
  console.error('set VK_ICD_FILENAMES=/usr/lib/chromium/vk_swiftshader_icd.json (Debian Mesa 22.3 has no Vulkan device Dawn accepts)');
}
const { create, globals } = await import(pathToFileURL(path.join(webgpuDir, 'node_modules/webgpu/index.js')).href);
Object.assign(globalThis, globals);
const hw = await import(pathToFileURL(path.join(pkg, 'index.js')).href);
hw.useNodeWebGPU(create([]));

const routes = { m: {} };
for (const f of fs.readdirSync(modelDir)) routes.m[f] = path.join(modelDir, f);
const srv = await startServer(modelDir, routes);
const base = `http://127.0.0.1:${srv.port}/hf/m/resolve/main/`;
const out = { model: modelDir, dtype: arg('--dtype', 'auto'), default_limits: flag('--default-limits') };
try {
  const eopts = flag('--default-limits') ? { maxStorageBufferBindingSize: 134217728, maxBufferSize: 268435456 } : {};
  const engine = await hw.createEngine(eopts);
  const info = engine.info();
  out.adapter = info.adapter;
  out.limits = { maxStorageBufferBindingSize: info.limits.maxStorageBufferBindingSize, maxBufferSize: info.limits.maxBufferSize };
  const memBefore = hw.wasmMemoryBytes ? hw.wasmMemoryBytes() : null;
  const t0 = performance.now();
  let lastLog = 0;
  const model = await engine.loadModel(base, {
    dtype: arg('--dtype', undefined),
    maxPositions: Number(arg('--max-positions', 512)),
    onProgress: (p) => {
      if (process.env.HYMBA_VERBOSE && performance.now() - lastLog > 10000) {
        lastLog = performance.now();
        console.error(`${((lastLog - t0) / 1000).toFixed(0)} s ${p.phase} ${p.loaded}/${p.total}`);
      }
    },
  });
  out.load_s = +((performance.now() - t0) / 1000).toFixed(2);
  out.wasm_memory_before_load = memBefore;
  out.wasm_memory_peak = await wasmMemory(hw);
  const mi = model.info();
  out.weight_bytes = mi.weight_bytes;
  out.parameters = mi.parameters;
  out.stored_dtype = mi.dtype;
  const ids = (arg('--prompt-ids', '') || '').split(',').filter(Boolean).map(Number);
  const r = await model.generate(ids.length ? ids : 'ROMEO:', { max_tokens: tokens, temperature: 0, ignore_eos: true });
  out.generated_ids = r.ids;
  out.prefill_tok_s = r.stats.prefill_tok_s;
  out.decode_tok_s = r.stats.decode_tok_s;
  out.wasm_memory_after_generate = await wasmMemory(hw);
  model.dispose();
} catch (e) {
  out.error = `${e && e.name}: ${e && e.message || e}`;
} finally {
  await srv.close();
}
console.log(JSON.stringify(out));
process.exit(out.error ? 1 : 0);

/** The module's memory size: the package's helper, or (older builds) the wasm-bindgen exports. */
async function wasmMemory(hw) {
  if (hw.wasmMemoryBytes) return hw.wasmMemoryBytes();
  const init = (await import(pathToFileURL(path.join(pkg, 'hymba_web.js')).href)).default;
  const exp = await init();
  return exp.memory.buffer.byteLength;
}
