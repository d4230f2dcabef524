// Node test of the packed npm package: `npm pack` web/pkg, install the tarball and
// webgpu@0.6.2 (Dawn for Node) into a temporary folder, and generate with it
// (tiny-shakespeare, greedy, checked against golden.json). On Debian's Mesa 22.3 the
// Vulkan device Dawn accepts is SwiftShader: VK_ICD_FILENAMES=/usr/lib/chromium/vk_swiftshader_icd.json.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, '../..');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'hymba-npm-'));
try {
  const tgz = execFileSync('npm', ['pack', '--silent', '--pack-destination', tmp, path.join(root, 'web/pkg')], { encoding: 'utf8' }).trim().split('\n').pop();
  fs.writeFileSync(path.join(tmp, 'package.json'), JSON.stringify({ name: 'hymba-npm-test', private: true, type: 'module' }));
  execFileSync('npm', ['install', '--silent', '--no-audit', '--no-fund', path.join(tmp, tgz), 'webgpu@0.6.2'], { cwd: tmp, stdio: 'inherit' });
  const golden = JSON.parse(fs.readFileSync(path.join(root, 'models/tiny-shakespeare/golden.json'), 'utf8')).prompts[0];
  const n = Number(process.env.HYMBA_NODE_TOKENS || 16);
  const script = `
import { create, globals } from 'webgpu';
import { createEngine, useNodeWebGPU } from 'hymba-web';
import fs from 'node:fs';
Object.assign(globalThis, globals);
useNodeWebGPU(create([]));
const dir = ${JSON.stringify(path.join(root, 'models/tiny-shakespeare'))};
const engine = await createEngine();
const files = ['config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json'].map((name) => ({ name, data: fs.readFileSync(dir + '/' + name) }));
const model = await engine.loadModel({ files });
let streamed = '';
const r = await model.generate(${JSON.stringify(golden.prompt_text)}, { max_tokens: ${n}, temperature: 0 }, (piece) => { streamed += piece; });
console.log(JSON.stringify({ adapter: engine.info().adapter, ids: r.ids, text: r.text, streamed, stats: r.stats }));
model.dispose();
process.exit(0);
`;
  fs.writeFileSync(path.join(tmp, 'run.mjs'), script);
  const env = { ...process.env };
  if (!env.VK_ICD_FILENAMES && fs.existsSync('/usr/lib/chromium/vk_swiftshader_icd.json')) env.VK_ICD_FILENAMES = '/usr/lib/chromium/vk_swiftshader_icd.json';
  const out = execFileSync('node', ['run.mjs'], { cwd: tmp, env, encoding: 'utf8', timeout: Number(process.env.HYMBA_NODE_TIMEOUT_MS || 600000) });
  const r = JSON.parse(out.trim().split('\n').pop());
  const want = golden.generated_ids.slice(0, n);
  if (JSON.stringify(r.ids) !== JSON.stringify(want)) throw new Error(`ids ${JSON.stringify(r.ids)} != golden ${JSON.stringify(want)}`);
  if (r.streamed !== r.text) throw new Error(`streamed text ${JSON.stringify(r.streamed)} != result text ${JSON.stringify(r.text)}`);
  console.log(`PASS npm package in Node (webgpu@0.6.2, ${r.adapter}): greedy ${n} tokens of tiny-shakespeare equal golden.json; decode ${r.stats.decode_tok_s.toFixed(1)} tok/s`);
} catch (e) {
  console.log(`FAIL npm package in Node: ${e && e.message || e}`);
  process.exitCode = 1;
} finally {
  fs.rmSync(tmp, { recursive: true, force: true });
}
