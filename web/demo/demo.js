// Demo page for hymba-web. The engine runs in a Web Worker (createWorkerEngine).
// Automation: ?model=<base URL>&prompt=<text>&max_tokens=<n>&temperature=<t>&autorun=1
// [&mode=chat|completion] [&cache=0] writes the generated text into #output and
// sets data-state="done" (or "error" with the message in #error) on <body>.
import { createWorkerEngine, detectWebGPU, listCachedModels, deleteCachedModel } from '../pkg/index.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const TINY = new URL('../../models/tiny-shakespeare/', location.href).href;
const HUB = 'https://huggingface.co/nvidia/Hymba-1.5B-Instruct/resolve/main/';

let engine = null, model = null, info = null, busy = false;
let messages = [];          // chat mode history
let haveCompletion = false; // completion mode: later sends continue the text

const state = (s) => { document.body.dataset.state = s; };
function fail(e) {
  const msg = (e && e.message) || String(e);
  $('error').textContent = msg;
  state('error');
  console.error('hymba demo:', e);
}
const mb = (b) => (b / 1048576).toFixed(b < 10485760 ? 2 : 0) + ' MiB';

function showProgress(p) {
  const bar = $('progress');
  bar.max = p.total || 1; bar.value = p.loaded;
  if (p.phase === 'upload') { $('progress-text').textContent = `uploading weights to the GPU: ${mb(p.loaded)} / ${mb(p.total)}`; return; }
  const files = Object.entries(p.files || {}).map(([n, f]) => `${n} ${mb(f.loaded)}${f.total ? ' / ' + mb(f.total) : ''}`).join(', ');
  $('progress-text').textContent = `${p.fromCache ? 'from the browser cache' : p.phase === 'read' ? 'reading' : 'downloading'}: ${files}`;
}

function showStats(s) {
  if (!s) return;
  $('stats').textContent = `prefill ${s.prefill_tokens} tok at ${s.prefill_tok_s.toFixed(1)} tok/s · decode ${s.generated_tokens} tok at ${s.decode_tok_s.toFixed(1)} tok/s · ` +
    `GPU memory: ${mb(s.gpu_bytes)} (weights ${mb(s.weight_bytes)} + activations ${mb(s.activation_bytes)} + cache ${mb(s.cache_bytes)}) · context ${s.position}/${s.max_positions}`;
}

async function ensureEngine() {
  if (engine) return engine;
  const d = await detectWebGPU();
  if (!d.ok) { noWebGPU(d.reason); throw Object.assign(new Error(`WebGPU is not available: ${d.reason}`), { name: 'WebGPUUnavailable' }); }
  engine = await createWorkerEngine();
  return engine;
}

function noWebGPU(reason) {
  document.body.dataset.webgpu = 'missing';
  $('no-webgpu-reason').textContent = reason;
}

async function load(source, name) {
  busy = true;
  $('send').disabled = $('reset').disabled = true;
  state('loading');
  try {
    await ensureEngine();
    if (model) { await model.dispose(); model = null; }
    const t0 = performance.now();
    model = await engine.loadModel(source, { onProgress: showProgress, name, cache: params.get('cache') !== '0' });
    info = await model.info();
    messages = []; haveCompletion = false; $('log').textContent = '';
    $('progress-text').textContent = `loaded ${info.name}: ${(info.parameters / 1e6).toFixed(1)}M parameters, ${info.dtype} weights (${mb(info.weight_bytes)}), ` +
      `${info.chat_template ? 'chat' : 'text completion'} mode, ${((performance.now() - t0) / 1000).toFixed(1)} s; adapter: ${engine.info().adapter}`;
    window.hymbaDemo.model = model;
    $('send').disabled = $('reset').disabled = false;
    state('ready');
  } finally { busy = false; }
}

function chatMode() {
  const m = params.get('mode');
  if (m) return m === 'chat';
  return !!(info && info.chat_template);
}

function append(cls, text) {
  const span = document.createElement('span');
  span.className = cls; span.textContent = text;
  $('log').appendChild(span);
  return span;
}

/** Sends `text`; streams into the log; returns {text, ids}. */
async function send(text, opts) {
  busy = true;
  $('send').disabled = true; $('stop').disabled = false;
  state('generating');
  let out = '';
  try {
    if (chatMode()) {
      append('user', (messages.length ? '\n\n' : '') + 'You: ' + text + '\n');
      const span = append('assistant', '');
      messages.push({ role: 'user', content: text });
      const stream = await model.chat.completions.create({ messages, stream: true, ...opts });
      let ids = [], last = null;
      for await (const chunk of stream) {
        const piece = chunk.choices[0].delta.content || '';
        out += piece; span.textContent = out;
        if (chunk.hymba) { last = chunk.hymba; }
      }
      messages.push({ role: 'assistant', content: out.trim() });
      if (last) showStats(last.stats);
      return { text: out.trim(), ids };
    }
    append('user', text);
    const span = append('assistant', '');
    const r = await model.generate(text, { ...opts, continue: haveCompletion }, (piece) => { out += piece; span.textContent = out; });
    haveCompletion = true;
    showStats(r.stats);
    return { text: r.text, ids: r.ids };
  } finally {
    busy = false;
    $('send').disabled = false; $('stop').disabled = true;
  }
}

function genOptions() {
  return { max_tokens: Number($('max-tokens').value) || 64, temperature: Number($('temperature').value) || 0 };
}

window.hymbaDemo = { model: null, get engine() { return engine; } };

$('load').onclick = () => {
  const preset = document.querySelector('input[name=preset]:checked').value;
  let src = TINY, name = 'tiny-shakespeare';
  if (preset === 'hub') { src = HUB; name = 'nvidia/Hymba-1.5B-Instruct'; }
  if (preset === 'url') { src = $('url').value.trim(); name = src; if (!src) return fail(new Error('enter a model URL')); }
  if (preset === 'files') { const f = $('files').files; if (!f.length) return fail(new Error('pick the model files (config.json, model.safetensors, tokenizer.json, …)')); src = { files: f }; name = 'local files'; }
  $('error').textContent = '';
  load(src, name).catch(fail);
};
$('send').onclick = () => {
  const text = $('prompt').value;
  if (!text.trim() || busy || !model) return;
  $('prompt').value = '';
  $('error').textContent = '';
  send(text, genOptions()).then(() => state('ready')).catch(fail);
};
$('stop').onclick = () => model && model.cancel();
$('reset').onclick = async () => { if (busy || !model) return; await model.reset(); messages = []; haveCompletion = false; $('log').textContent = ''; };
$('cached').onclick = async () => {
  const list = await listCachedModels();
  const box = $('cache-list');
  box.textContent = list.length ? '' : 'No models in the browser cache.';
  for (const m of list) {
    const row = document.createElement('div');
    row.textContent = `${m.base} (${mb(m.bytes)}, saved ${m.saved}) `;
    const del = document.createElement('button');
    del.textContent = 'Delete';
    del.onclick = async () => { await deleteCachedModel(m.base); row.remove(); };
    row.appendChild(del); box.appendChild(row);
  }
};

async function autorun() {
  const src = params.get('model') || TINY;
  const prompt = params.get('prompt') ?? 'ROMEO:';
  if (params.get('max_tokens')) $('max-tokens').value = params.get('max_tokens');
  if (params.get('temperature')) $('temperature').value = params.get('temperature');
  await load(src, params.get('model') ? src : 'tiny-shakespeare');
  const r = await send(prompt, { ...genOptions(), seed: params.get('seed') ? Number(params.get('seed')) : undefined });
  const out = $('output');
  out.hidden = false;
  out.textContent = r.text;
  out.dataset.ids = JSON.stringify(r.ids || []);
  state('done');
}

(async () => {
  const d = await detectWebGPU();
  if (!d.ok) {
    noWebGPU(d.reason);
    if (params.get('autorun') === '1') fail(new Error(`WebGPU is not available: ${d.reason}`));
    return;
  }
  if (params.get('autorun') === '1') autorun().catch(fail);
})();
