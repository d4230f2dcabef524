// Browser tests of the demo page (web/demo) and the npm package (web/pkg) in
// Debian's headless Chromium through playwright-core (WebGPU on SwiftShader):
//  1. the default model (tiny-shakespeare, served with the page): greedy continuation
//     of "ROMEO:" equals models/tiny-shakespeare/golden.json;
//  2. the real-vocabulary fixture c5 served like Hugging Face resolve/main URLs:
//     the text equals the reference's greedy continuation (case.json generated_ids,
//     decoded with the tokenizer); then a reload is served from the Cache API
//     (no model request reaches the server);
//  3. Chromium without --enable-unsafe-webgpu shows the no-WebGPU explanation.
// Prints one PASS/FAIL line per check; exits non-zero on any failure.
import { chromium } from 'playwright-core';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { startServer } from './server.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, '../..');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const BASE_FLAGS = ['--no-sandbox', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic', '--disable-dev-shm-usage'];
const TIMEOUT = Number(process.env.HYMBA_BROWSER_TIMEOUT_MS || 300000);

let failures = 0;
const pass = (m) => console.log(`PASS ${m}`);
const fail = (m) => { failures++; console.log(`FAIL ${m}`); };
const skip = (m) => console.log(`SKIP ${m}`);

async function browser(webgpu) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'hymba-chromium-'));
  const ctx = await chromium.launchPersistentContext(dir, { executablePath: CHROMIUM, headless: true, args: [...BASE_FLAGS, ...(webgpu ? ['--enable-unsafe-webgpu'] : [])] });
  return { ctx, close: async () => { await ctx.close(); fs.rmSync(dir, { recursive: true, force: true }); } };
}

/** Opens the demo with automation parameters; resolves to {state, output, ids, error}. */
async function runDemo(page, url) {
  const logs = [];
  page.on('console', (m) => logs.push(`[${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => logs.push(`[pageerror] ${e.message}`));
  await page.goto(url);
  try {
    await page.waitForFunction(() => ['done', 'error'].includes(document.body.dataset.state), null, { timeout: TIMEOUT, polling: 250 });
  } catch (e) {
    logs.forEach((l) => console.log('   ', l));
    throw e;
  }
  const r = await page.evaluate(() => ({
    state: document.body.dataset.state,
    output: document.getElementById('output').textContent,
    ids: JSON.parse(document.getElementById('output').dataset.ids || '[]'),
    error: document.getElementById('error').textContent,
    stats: document.getElementById('stats').textContent,
  }));
  if (r.state === 'error') logs.forEach((l) => console.log('   ', l));
  return r;
}

const eq = (a, b) => JSON.stringify(a) === JSON.stringify(b);

const srvRoutes = {};
const c5dir = path.join(root, 'tests/fixtures/c5_real_vocab_text');
const tokPath = process.env.HYMBA_TOKENIZER_JSON || path.resolve(root, '../shared/fixtures/c5_real_vocab_text/tokenizer.json');
const haveC5 = fs.existsSync(tokPath);
if (haveC5) srvRoutes.c5 = { 'config.json': path.join(c5dir, 'config.json'), 'model.safetensors': path.join(c5dir, 'model.safetensors'), 'tokenizer.json': tokPath };
const srv = await startServer(root, srvRoutes);
const origin = `http://127.0.0.1:${srv.port}`;
const demo = `${origin}/web/demo/index.html`;

try {
  // 1. tiny-shakespeare, the default model.
  {
    const golden = JSON.parse(fs.readFileSync(path.join(root, 'models/tiny-shakespeare/golden.json'), 'utf8')).prompts[0];
    const n = Math.min(64, golden.generated_ids.length);
    const b = await browser(true);
    const page = await b.ctx.newPage();
    const t0 = Date.now();
    const r = await runDemo(page, `${demo}?prompt=${encodeURIComponent(golden.prompt_text)}&max_tokens=${n}&temperature=0&autorun=1`);
    const secs = ((Date.now() - t0) / 1000).toFixed(1);
    if (r.state !== 'done') fail(`demo tiny-shakespeare: ${r.error}`);
    else if (!eq(r.ids, golden.generated_ids.slice(0, n))) fail(`demo tiny-shakespeare: ids differ from golden.json\n  got  ${JSON.stringify(r.ids)}\n  want ${JSON.stringify(golden.generated_ids.slice(0, n))}`);
    else if (n === golden.generated_ids.length && r.output !== golden.generated_text) fail(`demo tiny-shakespeare: text differs\n  got  ${JSON.stringify(r.output)}\n  want ${JSON.stringify(golden.generated_text)}`);
    else pass(`demo page, default model tiny-shakespeare: greedy ${n} tokens after ${JSON.stringify(golden.prompt_text)} equal golden.json (${secs} s; ${r.stats})`);
    await b.close();
  }

  // 2. c5 served like resolve/main/, then a reload from the Cache API.
  if (!haveC5) skip(`real-vocabulary fixture: ${tokPath} is absent (the real tokenizer.json is not redistributed); set HYMBA_TOKENIZER_JSON`);
  else {
    const c = JSON.parse(fs.readFileSync(path.join(c5dir, 'case.json'), 'utf8'));
    const b = await browser(true);
    const page = await b.ctx.newPage();
    const url = `${demo}?model=${encodeURIComponent(`${origin}/hf/c5/resolve/main/`)}&prompt=${encodeURIComponent(c.prompt_text)}&max_tokens=${c.generated_ids.length}&temperature=0&autorun=1`;
    const before = srv.counts.model;
    const r = await runDemo(page, url);
    const fetched = srv.counts.model - before;
    if (r.state !== 'done') fail(`demo c5 from a resolve/main/ URL: ${r.error}`);
    else {
      const want = await page.evaluate((ids) => window.hymbaDemo.model.decode(ids), c.generated_ids);
      if (!eq(r.ids, c.generated_ids)) fail(`demo c5: ids ${JSON.stringify(r.ids)} != reference ${JSON.stringify(c.generated_ids)}`);
      else if (r.output !== want) fail(`demo c5: text ${JSON.stringify(r.output)} != ${JSON.stringify(want)}`);
      else pass(`demo page, c5_real_vocab_text from ${origin}/hf/c5/resolve/main/: text ${JSON.stringify(r.output)} equals the reference's greedy continuation (${fetched} model requests)`);
      const before2 = srv.counts.model;
      const r2 = await runDemo(page, url); // same profile: a reload
      const again = srv.counts.model - before2;
      if (r2.state !== 'done' || r2.output !== want) fail(`demo c5 reload: ${r2.error || JSON.stringify(r2.output)}`);
      else if (again !== 0) fail(`demo c5 reload: ${again} model requests reached the server (${srv.counts.log.slice(-again).join(', ')}); expected the Cache API copy`);
      else pass('demo page reload: the model came from the Cache API (0 model requests reached the server), same text');
    }
    await b.close();
  }

  // 3. No WebGPU: Chromium without --enable-unsafe-webgpu gives no adapter on this machine.
  {
    const b = await browser(false);
    const page = await b.ctx.newPage();
    const r = await runDemo(page, `${demo}?prompt=ROMEO%3A&max_tokens=4&autorun=1`);
    const shown = await page.evaluate(() => {
      const el = document.getElementById('no-webgpu');
      return { visible: getComputedStyle(el).display !== 'none', text: el.innerText };
    });
    if (r.state === 'error' && shown.visible && /WebGPU/.test(shown.text) && /WebGPU is not available/.test(r.error)) pass(`no-WebGPU browser: the explanation is shown (${JSON.stringify(r.error)})`);
    else fail(`no-WebGPU browser: state ${r.state}, explanation visible ${shown.visible}, error ${JSON.stringify(r.error)}`);
    await b.close();
  }
} catch (e) {
  fail(`browser tests crashed: ${e && e.stack || e}`);
} finally {
  await srv.close();
}
console.log(failures ? `browser tests: ${failures} FAILED` : 'browser tests: all passed');
process.exit(failures ? 1 : 0);
