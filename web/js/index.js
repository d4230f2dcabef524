// hymba-web: the hand-written ESM wrapper over the wasm-bindgen module.
// - init(): loads the WebAssembly module (browser: fetch beside this file; Node: fs);
// - createEngine(): WebGPU adapter + device + kernels, in this thread;
// - createWorkerEngine(): the same API, running in a module Web Worker;
// - engine.loadModel(base URL | {files}) with per-file progress and the Cache API;
// - model.generate / model.chat / model.chat.completions.create (OpenAI-shaped);
// - listCachedModels / deleteCachedModel.

import wasmInit, * as wasm from './hymba_web.js';

export const CACHE_NAME = 'hymba-models-v1';
const MANIFEST = '.hymba-manifest.json';
const isNode = typeof process !== 'undefined' && !!(process.versions && process.versions.node) && typeof window === 'undefined' && typeof WorkerGlobalScope === 'undefined';

let initPromise = null;

/** Loads the WebAssembly module once. `source`: optional URL, Response, bytes or WebAssembly.Module. */
export function init(source) {
  if (!initPromise) {
    initPromise = (async () => {
      let src = source;
      if (src === undefined && isNode) {
        const fs = await import('node:fs/promises');
        src = await fs.readFile(new URL('./hymba_web_bg.wasm', import.meta.url));
      }
      await wasmInit(src === undefined ? undefined : { module_or_path: src });
    })();
    initPromise.catch(() => { initPromise = null; });
  }
  return initPromise;
}

/** Bytes of the engine's WebAssembly memory (it only grows: the peak so far); 0 before init(). */
export function wasmMemoryBytes() {
  try { return wasm.wasmMemoryBytes(); } catch (_) { return 0; }
}

/** Makes a Node WebGPU implementation (e.g. the `webgpu` npm package's `create([])`) visible to the engine. */
export function useNodeWebGPU(gpu) {
  globalThis.__hymbaGpu = gpu; // keep it referenced (dawn.node crashes if it is collected)
  if (typeof globalThis.Window === 'undefined') globalThis.Window = class Window {};
  const nav = globalThis.navigator;
  if (nav && !nav.gpu) {
    try { Object.defineProperty(nav, 'gpu', { value: gpu, configurable: true }); return; } catch (_) { /* fall through */ }
  }
  if (!nav || !nav.gpu) Object.defineProperty(globalThis, 'navigator', { value: { gpu }, configurable: true, writable: true });
}

/**
 * Checks WebGPU without creating the engine: {ok, reason, adapter}.
 * `reason` says why not (no navigator.gpu, insecure page, no adapter, limit too small).
 */
export async function detectWebGPU() {
  if (typeof isSecureContext !== 'undefined' && !isSecureContext)
    return { ok: false, reason: 'WebGPU needs a secure page (https:// or http://localhost); this page is not one.' };
  const gpu = globalThis.navigator && globalThis.navigator.gpu;
  if (!gpu) return { ok: false, reason: 'This browser does not expose WebGPU (navigator.gpu is missing). Use a recent Chrome or Edge (113+), Safari 26+, or Firefox 141+ on Windows.' };
  let adapter = null;
  try { adapter = await gpu.requestAdapter({ powerPreference: 'high-performance' }); } catch (e) { return { ok: false, reason: `requestAdapter failed: ${e && e.message || e}` }; }
  if (!adapter) return { ok: false, reason: 'WebGPU is present but gave no adapter: the browser blocks this GPU (or a software renderer), or WebGPU is disabled. In Chrome see chrome://gpu; chrome://flags/#enable-unsafe-webgpu allows blocklisted adapters.' };
  const need = { maxComputeInvocationsPerWorkgroup: 256, maxComputeWorkgroupSizeX: 256, maxComputeWorkgroupStorageSize: 16384, maxStorageBuffersPerShaderStage: 8 };
  for (const [k, v] of Object.entries(need)) {
    if ((adapter.limits[k] || 0) < v) return { ok: false, reason: `This WebGPU adapter has ${k} = ${adapter.limits[k]}; the Hymba kernels need at least ${v}.` };
  }
  const info = adapter.info || {};
  return { ok: true, reason: '', adapter: { vendor: info.vendor, architecture: info.architecture, description: info.description, isFallbackAdapter: !!info.isFallbackAdapter, features: [...adapter.features], maxStorageBufferBindingSize: adapter.limits.maxStorageBufferBindingSize, maxBufferSize: adapter.limits.maxBufferSize } };
}

function errorFrom(e) {
  if (e instanceof Error) return e;
  const err = new Error(e && e.message ? e.message : String(e));
  if (e && e.name) err.name = e.name;
  return err;
}

// ---------------------------------------------------------------- fetching & caching

function normBase(url) {
  let u = String(url);
  if (typeof location !== 'undefined') u = new URL(u, location.href).href;
  return u.endsWith('/') ? u : u + '/';
}

async function openCache(useCache) {
  if (!useCache || typeof caches === 'undefined') return null;
  try { return await caches.open(CACHE_NAME); } catch (_) { return null; }
}

async function readBody(resp, name, onFile) {
  const total = Number(resp.headers.get('content-length')) || 0;
  if (!resp.body || !resp.body.getReader) {
    const b = new Uint8Array(await resp.arrayBuffer());
    onFile(name, b.length, b.length);
    return b;
  }
  const reader = resp.body.getReader();
  let chunks = [], loaded = 0, last = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    loaded += value.length;
    if (loaded - last > (1 << 20) || loaded === total) { onFile(name, loaded, total || loaded); last = loaded; }
  }
  const out = new Uint8Array(loaded);
  let off = 0;
  for (const c of chunks) { out.set(c, off); off += c.length; }
  chunks = null;
  onFile(name, loaded, loaded);
  return out;
}

// Fetches one model file: the Response, or null for a missing optional file; a clear error
// naming the URL otherwise.
async function fetchModelFile(url, fetchOptions, optional) {
  let resp;
  try { resp = await fetch(url, fetchOptions); } catch (e) {
    if (optional) return null;
    throw new Error(`cannot download ${url}: ${e && e.message || e} (offline, or the server does not allow cross-origin requests)`);
  }
  if (!resp.ok) {
    if (optional) return null;
    throw new Error(`cannot download ${url}: HTTP ${resp.status} ${resp.statusText}`);
  }
  return resp;
}

/**
 * Downloads (or reads from the Cache API) the files of a model at `base`
 * (a Hugging Face `.../resolve/main/` URL or any folder URL with the same file names).
 */
export async function fetchModelFiles(base, { cache: useCache = true, onProgress, fetchOptions } = {}) {
  base = normBase(base);
  const cache = await openCache(useCache);
  const progress = { files: {}, loaded: 0, total: 0, fromCache: false };
  const report = () => onProgress && onProgress({ ...progress, files: { ...progress.files } });
  const onFile = (name, loaded, total) => {
    progress.files[name] = { loaded, total };
    progress.loaded = Object.values(progress.files).reduce((a, f) => a + f.loaded, 0);
    progress.total = Object.values(progress.files).reduce((a, f) => a + f.total, 0);
    report();
  };
  // A complete cached copy: serve everything from the cache, no network at all.
  if (cache) {
    const m = await cache.match(base + MANIFEST);
    if (m) {
      const manifest = await m.json();
      const got = {};
      let complete = true;
      for (const name of manifest.files) {
        const r = await cache.match(base + name);
        if (!r) { complete = false; break; }
        got[name] = await readBody(r, name, onFile);
      }
      if (complete) { progress.fromCache = true; report(); return { base, files: got, fromCache: true }; }
    }
  }
  const files = {};
  const get = async (name, optional) => {
    const resp = await fetchModelFile(base + name, fetchOptions, optional);
    if (!resp) return null;
    const bytes = await readBody(resp, name, onFile);
    files[name] = bytes;
    return bytes;
  };
  await get('config.json', false);
  const single = await get('model.safetensors', true);
  if (!single) {
    const idx = await get('model.safetensors.index.json', true);
    if (!idx) throw new Error(`${base} has neither model.safetensors nor model.safetensors.index.json`);
    await init();
    const shards = wasm.shardNames(new TextDecoder().decode(idx));
    for (const s of shards) await get(s, false);
  }
  await get('tokenizer.json', true);
  await get('tokenizer_config.json', true);
  if (cache) {
    try {
      for (const [name, bytes] of Object.entries(files))
        await cache.put(base + name, new Response(bytes, { headers: { 'content-type': 'application/octet-stream', 'content-length': String(bytes.length) } }));
      const manifest = { base, files: Object.keys(files), bytes: Object.values(files).reduce((a, b) => a + b.length, 0), saved: new Date().toISOString() };
      await cache.put(base + MANIFEST, new Response(JSON.stringify(manifest), { headers: { 'content-type': 'application/json' } }));
    } catch (e) {
      console.warn(`hymba-web: could not keep ${base} in the Cache API (${e && e.message || e}); it will be downloaded again next time`);
    }
  }
  return { base, files, fromCache: false };
}

/** Models kept in the Cache API: [{base, files, bytes, saved}]. */
export async function listCachedModels() {
  if (typeof caches === 'undefined') return [];
  const cache = await caches.open(CACHE_NAME);
  const out = [];
  for (const req of await cache.keys()) {
    if (!req.url.endsWith(MANIFEST)) continue;
    const r = await cache.match(req);
    if (r) out.push(await r.json());
  }
  return out;
}

/** Deletes one cached model (by its base URL), or all of them when `base` is omitted. */
export async function deleteCachedModel(base) {
  if (typeof caches === 'undefined') return false;
  if (base === undefined) return caches.delete(CACHE_NAME);
  base = normBase(base);
  const cache = await caches.open(CACHE_NAME);
  let any = false;
  for (const req of await cache.keys()) if (req.url.startsWith(base)) any = (await cache.delete(req)) || any;
  return any;
}

// ---------------------------------------------------------------- streamed model sources
// A source opens each file as an async iterable of Uint8Array chunks, so loadModel never holds
// a whole weights file: bytes go from the network, the Cache API or a picked File straight to
// the engine, which uploads each tensor as soon as it is complete.

async function* streamChunks(stream) {
  const reader = stream.getReader();
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) return;
      yield value;
    }
  } finally {
    reader.releaseLock();
  }
}

function* byteChunks(bytes, size = 1 << 20) {
  for (let o = 0; o < bytes.length; o += size) yield bytes.subarray(o, Math.min(o + size, bytes.length));
}

async function readAll(chunks) {
  const parts = [];
  let n = 0;
  for await (const c of chunks) { parts.push(c); n += c.length; }
  const out = new Uint8Array(n);
  let o = 0;
  for (const c of parts) { out.set(c, o); o += c.length; }
  return out;
}

/** Picked files (File / Blob with .stream(), or {name, data}). */
function pickedSource(list) {
  const byName = new Map();
  for (const f of list) byName.set((f.name || '').split('/').pop(), f);
  return {
    name: 'local files',
    has: (n) => byName.has(n),
    size: (n) => { const f = byName.get(n); return f ? (f.data ? (f.data.byteLength ?? f.data.length) : f.size) : 0; },
    open: (n) => {
      const f = byName.get(n);
      if (!f) throw new Error(`the model files have no ${n}`);
      if (f.data) return byteChunks(f.data instanceof Uint8Array ? f.data : new Uint8Array(f.data));
      return streamChunks(f.stream());
    },
    names: () => [...byName.keys()],
  };
}

/**
 * A model folder URL. With the Cache API, every file is first stored in the cache as it
 * downloads (streamed into the cache, never held whole), then read back from it in chunks;
 * a complete cached copy is used without any network request. Without the Cache API (Node,
 * or cache: false) the download streams straight into the engine.
 */
async function urlSource(base, { cache: useCache = true, onProgress, fetchOptions } = {}) {
  base = normBase(base);
  const cache = await openCache(useCache);
  const progress = { files: {}, loaded: 0, total: 0, fromCache: false };
  const report = () => onProgress && onProgress({ ...progress, files: { ...progress.files } });
  const onFile = (name, loaded, total) => {
    progress.files[name] = { loaded, total };
    progress.loaded = Object.values(progress.files).reduce((a, f) => a + f.loaded, 0);
    progress.total = Object.values(progress.files).reduce((a, f) => a + f.total, 0);
    report();
  };
  const sizes = new Map();
  const fromCache = (name) => cache.match(base + name);
  const cachedSource = (names) => ({
    name: base,
    fromCache: true,
    has: (n) => names.includes(n),
    size: (n) => sizes.get(n) || 0,
    open: async function* (n) {
      const r = await fromCache(n);
      if (!r) throw new Error(`${base + n} disappeared from the Cache API while loading; load the model again`);
      yield* streamChunks(r.body);
    },
    names: () => names,
  });
  if (cache) {
    const m = await fromCache(MANIFEST);
    if (m) {
      const manifest = await m.json();
      let complete = true;
      for (const name of manifest.files) {
        const r = await fromCache(name);
        if (!r) { complete = false; break; }
        sizes.set(name, Number(r.headers.get('content-length')) || 0);
      }
      if (complete) { progress.fromCache = true; report(); return cachedSource(manifest.files); }
    }
  }
  const fetchFile = async (name, optional) => {
    return fetchModelFile(base + name, fetchOptions, optional);
  };
  // Which files exist: config, weights (single file or index + shards), tokenizer files.
  const small = {};
  const smallFile = async (name, optional) => {
    const r = await fetchFile(name, optional);
    if (!r) return null;
    const b = new Uint8Array(await r.arrayBuffer());
    onFile(name, b.length, b.length);
    small[name] = b;
    sizes.set(name, b.length);
    return b;
  };
  await smallFile('config.json', false);
  let weights = [];
  const single = await fetchFile('model.safetensors', true);
  const pendingResp = new Map();
  if (single) {
    weights = ['model.safetensors'];
    pendingResp.set('model.safetensors', single);
  } else {
    const idx = await smallFile('model.safetensors.index.json', true);
    if (!idx) throw new Error(`${base} has neither model.safetensors nor model.safetensors.index.json`);
    await init();
    weights = wasm.shardNames(new TextDecoder().decode(idx));
  }
  await smallFile('tokenizer.json', true);
  await smallFile('tokenizer_config.json', true);
  const openNet = async (name) => {
    let r = pendingResp.get(name);
    pendingResp.delete(name);
    if (!r) r = await fetchFile(name, false);
    sizes.set(name, Number(r.headers.get('content-length')) || 0);
    return r;
  };
  const names = [...Object.keys(small), ...weights];
  if (cache) {
    // Download every weights file into the cache (streamed: the body goes to disk as it comes).
    try {
      for (const [name, bytes] of Object.entries(small))
        await cache.put(base + name, new Response(bytes, { headers: { 'content-type': 'application/octet-stream', 'content-length': String(bytes.length) } }));
      for (const name of weights) {
        const r = await openNet(name);
        const total = sizes.get(name);
        let loaded = 0, last = 0;
        const counted = r.body.pipeThrough(new TransformStream({
          transform(chunk, ctl) {
            loaded += chunk.length;
            if (loaded - last > (1 << 20) || loaded === total) { onFile(name, loaded, total || loaded); last = loaded; }
            ctl.enqueue(chunk);
          },
        }));
        const headers = { 'content-type': 'application/octet-stream' };
        if (total) headers['content-length'] = String(total);
        await cache.put(base + name, new Response(counted, { headers }));
        onFile(name, loaded, loaded);
        sizes.set(name, loaded);
      }
      const manifest = { base, files: names, bytes: names.reduce((a, n) => a + (sizes.get(n) || 0), 0), saved: new Date().toISOString() };
      await cache.put(base + MANIFEST, new Response(JSON.stringify(manifest), { headers: { 'content-type': 'application/json' } }));
      return cachedSource(names);
    } catch (e) {
      console.warn(`hymba-web: could not keep ${base} in the Cache API (${e && e.message || e}); loading it straight from the network, it will be downloaded again next time`);
      pendingResp.clear();
    }
  }
  return {
    name: base,
    fromCache: false,
    has: (n) => names.includes(n),
    size: (n) => sizes.get(n) || 0,
    open: async function* (n) {
      if (small[n]) { yield small[n]; return; }
      const r = await openNet(n);
      let loaded = 0;
      for await (const c of streamChunks(r.body)) { loaded += c.length; onFile(n, loaded, sizes.get(n) || loaded); yield c; }
    },
    names: () => names,
  };
}

// ---------------------------------------------------------------- engine & model (in this thread)

/** Creates the engine in this thread. Rejects with name "WebGPUUnavailable" or "LimitTooSmall" and a reason. */
export async function createEngine(options = {}) {
  await init(options.wasm);
  let eng;
  try { eng = await wasm.Engine.create(JSON.stringify({ allow_shader_f16: options.allowShaderF16, maxStorageBufferBindingSize: options.maxStorageBufferBindingSize, maxBufferSize: options.maxBufferSize })); } catch (e) { throw errorFrom(e); }
  return new Engine(eng);
}

export class Engine {
  constructor(eng) { this._e = eng; }
  /** Adapter name, backend, shader-f16 and limits. */
  info() { return JSON.parse(this._e.info()); }
  /**
   * Loads a model. `source`: a base URL string, or {files: File[] | {name, data}[]}.
   * options: {onProgress({phase, file, files, loaded, total, fromCache}), cache (default true), dtype, maxPositions, name}.
   */
  async loadModel(source, options = {}) {
    const onProgress = options.onProgress || (() => {});
    let src;
    if (typeof source === 'string' || source instanceof URL) {
      src = await urlSource(String(source), { cache: options.cache !== false, onProgress: (p) => onProgress({ phase: 'download', ...p }) });
    } else if (source && source.files) {
      src = pickedSource(Array.from(source.files));
    } else throw new TypeError('loadModel: give a base URL or {files}');
    const name = options.name || src.name;
    const td = new TextDecoder();
    const text = async (n) => (src.has(n) ? td.decode(await readAll(src.open(n))) : undefined);
    const config = await text('config.json');
    if (config === undefined) throw new Error('the model files have no config.json');
    let weights;
    if (src.has('model.safetensors')) weights = ['model.safetensors'];
    else if (src.has('model.safetensors.index.json')) {
      weights = wasm.shardNames(await text('model.safetensors.index.json'));
      for (const s of weights) if (!src.has(s)) throw new Error(`missing shard ${s} (listed in model.safetensors.index.json)`);
    } else weights = src.names().filter((n) => n.endsWith('.safetensors'));
    if (!weights.length) throw new Error('the model files have no model.safetensors (or index and shards)');
    const tokenizer = src.has('tokenizer.json') ? await readAll(src.open('tokenizer.json')) : undefined;
    const tokCfg = await text('tokenizer_config.json');
    const opts = JSON.stringify({ dtype: options.dtype, max_positions: options.maxPositions, name });
    let loader = null;
    try {
      loader = this._e.beginLoad(config, tokenizer, tokCfg, opts);
      const total = weights.reduce((a, n) => a + src.size(n), 0);
      let done = 0, last = 0;
      for (const file of weights) {
        loader.beginFile(file);
        for await (const chunk of src.open(file)) {
          loader.push(chunk);
          done += chunk.length;
          if (done - last > (4 << 20)) { onProgress({ phase: 'upload', file, loaded: done, total: Math.max(total, done) }); last = done; }
        }
        loader.endFile();
      }
      onProgress({ phase: 'upload', loaded: done, total: Math.max(total, done) });
      const m = await loader.finish();
      return new Model(m);
    } catch (e) {
      throw errorFrom(e);
    } finally {
      if (loader) loader.free();
    }
  }
  dispose() { if (this._e) { this._e.free(); this._e = null; } }
}

function genOpts(o = {}) {
  return JSON.stringify({
    max_tokens: o.max_tokens ?? o.maxTokens ?? 128,
    temperature: o.temperature ?? 0,
    top_k: o.top_k ?? o.topK ?? 0,
    top_p: o.top_p ?? o.topP ?? 1,
    repetition_penalty: o.repetition_penalty ?? o.repetitionPenalty ?? 1,
    seed: o.seed ?? null,
    stop: o.stop == null ? [] : Array.isArray(o.stop) ? o.stop : [o.stop],
    ignore_eos: !!(o.ignore_eos ?? o.ignoreEos),
    continue: !!o.continue,
    add_special_tokens: o.add_special_tokens ?? o.addSpecialTokens ?? null,
  });
}

export class Model {
  constructor(m) { this._m = m; this.chat = makeChat(this); }
  info() { return JSON.parse(this._m.info()); }
  tokenize(text, addSpecial = true) { return Array.from(this._m.tokenize(text, addSpecial)); }
  decode(ids) { return this._m.decode(Uint32Array.from(ids)); }
  /** Raw completion; onToken(piece, id) streams (return false to cancel). */
  async generate(prompt, options = {}, onToken) {
    try { return JSON.parse(await this._m.generate(Array.isArray(prompt) ? Uint32Array.from(prompt) : prompt, genOpts(options), onToken)); } catch (e) { throw errorFrom(e); }
  }
  /** One assistant reply to [{role, content}] (Hymba Instruct template), continuing the cached conversation when it can. */
  async chatTurn(messages, options = {}, onToken) {
    try { return JSON.parse(await this._m.chat(JSON.stringify(messages), genOpts(options), onToken)); } catch (e) { throw errorFrom(e); }
  }
  cancel() { this._m && this._m.cancel(); }
  reset() { this._m.reset(); }
  stats() { return JSON.parse(this._m.stats()); }
  dispose() { if (this._m) { this._m.dispose(); if (!this._m.busy()) this._m.free(); this._m = null; } }
}

// ---------------------------------------------------------------- OpenAI-shaped API

let completionCounter = 0;

/** `chat.completions.create` over anything with chatTurn(messages, opts, onToken) and cancel(). */
export function makeChat(target) {
  return {
    completions: {
      create(req = {}) {
        const id = `chatcmpl-hymba-${Date.now().toString(36)}-${++completionCounter}`;
        const created = Math.floor(Date.now() / 1000);
        const modelName = req.model || 'hymba';
        const usageOf = (r) => ({ prompt_tokens: r.usage.prompt_tokens, completion_tokens: r.usage.completion_tokens, total_tokens: r.usage.prompt_tokens + r.usage.completion_tokens });
        if (!req.stream) {
          return target.chatTurn(req.messages, req).then((r) => ({
            id, object: 'chat.completion', created, model: modelName,
            choices: [{ index: 0, message: { role: 'assistant', content: r.text }, finish_reason: r.finish_reason }],
            usage: usageOf(r), hymba: { stats: r.stats, continued: r.continued },
          }));
        }
        const queue = [];
        let wake = null, finished = false, failure = null, stopped = false;
        const push = (x) => { queue.push(x); if (wake) { wake(); wake = null; } };
        const chunk = (delta, finish_reason = null, extra = {}) => ({ id, object: 'chat.completion.chunk', created, model: modelName, choices: [{ index: 0, delta, finish_reason }], ...extra });
        push(chunk({ role: 'assistant', content: '' }));
        target.chatTurn(req.messages, req, (piece) => { if (piece) push(chunk({ content: piece })); return !stopped; })
          .then((r) => { push(chunk({}, r.finish_reason, { usage: usageOf(r), hymba: { stats: r.stats, continued: r.continued } })); finished = true; push(null); })
          .catch((e) => { failure = e; finished = true; push(null); });
        const iter = {
          async next() {
            for (;;) {
              if (queue.length) {
                const x = queue.shift();
                if (x === null) { if (failure) throw failure; return { done: true, value: undefined }; }
                return { done: false, value: x };
              }
              if (finished && !queue.length) { if (failure) throw failure; return { done: true, value: undefined }; }
              await new Promise((r) => { wake = r; });
            }
          },
          async return() { stopped = true; target.cancel(); return { done: true, value: undefined }; },
          [Symbol.asyncIterator]() { return this; },
        };
        const p = Promise.resolve(iter);
        p.controller = { abort() { stopped = true; target.cancel(); } };
        return p;
      },
    },
  };
}

// ---------------------------------------------------------------- worker client

/**
 * The same API as createEngine(), with the engine in a module Web Worker so the
 * page's main thread never blocks. options.workerUrl overrides the worker script.
 */
export async function createWorkerEngine(options = {}) {
  const url = options.workerUrl || new URL('./worker.js', import.meta.url);
  const worker = new Worker(url, { type: 'module' });
  let next = 1;
  const pending = new Map();
  worker.onmessage = (ev) => {
    const { id, type } = ev.data;
    const p = pending.get(id);
    if (!p) return;
    if (type === 'progress') p.onProgress && p.onProgress(ev.data.progress);
    else if (type === 'token') { if (p.onToken && p.onToken(ev.data.piece, ev.data.tokenId) === false) call('cancel', [p.modelId]); }
    else if (type === 'result') { pending.delete(id); p.resolve(ev.data.value); }
    else if (type === 'error') { pending.delete(id); const e = new Error(ev.data.message); e.name = ev.data.name || 'Error'; p.reject(e); }
  };
  worker.onerror = (ev) => { for (const p of pending.values()) p.reject(new Error(`hymba worker failed: ${ev.message || 'script error'}`)); pending.clear(); };
  function call(op, args = [], extra = {}) {
    return new Promise((resolve, reject) => {
      const id = next++;
      pending.set(id, { resolve, reject, ...extra });
      const files = [];
      worker.postMessage({ id, op, args }, files);
    });
  }
  await call('create', [{ allowShaderF16: options.allowShaderF16, maxStorageBufferBindingSize: options.maxStorageBufferBindingSize, maxBufferSize: options.maxBufferSize }]);
  const engineInfo = await call('engineInfo');
  class WorkerModel {
    constructor(handle) { this.handle = handle; this.chat = makeChat(this); }
    info() { return call('info', [this.handle]); }
    tokenize(text, addSpecial = true) { return call('tokenize', [this.handle, text, addSpecial]); }
    decode(ids) { return call('decode', [this.handle, Array.from(ids)]); }
    generate(prompt, options = {}, onToken) { return call('generate', [this.handle, prompt, options], { onToken, modelId: this.handle }); }
    chatTurn(messages, options = {}, onToken) { return call('chatTurn', [this.handle, messages, options], { onToken, modelId: this.handle }); }
    cancel() { worker.postMessage({ id: 0, op: 'cancel', args: [this.handle] }); }
    reset() { return call('reset', [this.handle]); }
    stats() { return call('stats', [this.handle]); }
    dispose() { return call('dispose', [this.handle]); }
  }
  return {
    worker,
    info: () => engineInfo,
    async loadModel(source, options = {}) {
      const { onProgress, ...rest } = options;
      let src = source;
      // Files (structured-cloneable) go to the worker as they are; it streams them.
      if (source && source.files) src = { files: Array.from(source.files).map((f) => (f.data ? { name: f.name, data: f.data } : f)) };
      else src = String(source instanceof URL ? source.href : normBase(source));
      const handle = await call('load', [src, rest], { onProgress });
      return new WorkerModel(handle);
    },
    listCachedModels: () => call('listCached'),
    deleteCachedModel: (base) => call('deleteCached', [base]),
    dispose() { worker.terminate(); for (const p of pending.values()) p.reject(new Error('engine disposed')); pending.clear(); },
  };
}
