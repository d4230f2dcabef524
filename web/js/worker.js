// hymba-web module worker: hosts the engine so the page's main thread never
// blocks. Protocol: {id, op, args} in; {id, type: 'progress'|'token'|'result'|'error', ...} out.
// Generation awaits the GPU between tokens, so a 'cancel' message is handled mid-generation.

import { createEngine, listCachedModels, deleteCachedModel } from './index.js';

let engine = null;
const models = new Map();
let nextHandle = 1;

function model(h) {
  const m = models.get(h);
  if (!m) throw Object.assign(new Error('unknown or disposed model'), { name: 'InvalidStateError' });
  return m;
}

const ops = {
  async create(id, opts) { if (!engine) engine = await createEngine(opts || {}); return true; },
  engineInfo() { return engine.info(); },
  async load(id, source, opts) {
    const m = await engine.loadModel(source, { ...(opts || {}), onProgress: (progress) => postMessage({ id, type: 'progress', progress }) });
    const h = nextHandle++;
    models.set(h, m);
    return h;
  },
  info(id, h) { return model(h).info(); },
  tokenize(id, h, text, add) { return model(h).tokenize(text, add); },
  decode(id, h, ids) { return model(h).decode(ids); },
  generate(id, h, prompt, opts) { return model(h).generate(prompt, opts, (piece, tokenId) => { postMessage({ id, type: 'token', piece, tokenId }); return true; }); },
  chatTurn(id, h, messages, opts) { return model(h).chatTurn(messages, opts, (piece, tokenId) => { postMessage({ id, type: 'token', piece, tokenId }); return true; }); },
  cancel(id, h) { const m = models.get(h); if (m) m.cancel(); return true; },
  reset(id, h) { model(h).reset(); return true; },
  stats(id, h) { return model(h).stats(); },
  dispose(id, h) { const m = models.get(h); if (m) { m.dispose(); models.delete(h); } return true; },
  listCached() { return listCachedModels(); },
  deleteCached(id, base) { return deleteCachedModel(base); },
};

self.onmessage = async (ev) => {
  const { id, op, args } = ev.data;
  const f = ops[op];
  try {
    if (!f) throw new Error(`unknown operation ${op}`);
    const value = await f(id, ...(args || []));
    if (id) postMessage({ id, type: 'result', value });
  } catch (e) {
    if (id) postMessage({ id, type: 'error', name: (e && e.name) || 'Error', message: (e && e.message) || String(e) });
  }
};
