// Static HTTP server for the browser tests, on 127.0.0.1 (a secure context, so
// WebGPU and the Cache API work):
//   /...                                   files of the repository (web/demo, web/pkg, models/)
//   /hf/<case>/resolve/main/<file>         a fixture laid out like Hugging Face resolve/main URLs
// It counts the requests for model files so a test can check a reload hits the Cache API only.
import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';

const TYPES = { '.html': 'text/html; charset=utf-8', '.js': 'text/javascript; charset=utf-8', '.mjs': 'text/javascript; charset=utf-8', '.wasm': 'application/wasm', '.json': 'application/json', '.css': 'text/css' };

/** routes: {name: {file: absolutePath}} served under /hf/<name>/resolve/main/<file>. */
export function startServer(root, routes = {}) {
  const counts = { model: 0, all: 0, log: [] };
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, 'http://x');
    const p = decodeURIComponent(url.pathname);
    counts.all++;
    let file = null;
    const m = p.match(/^\/hf\/([^/]+)\/resolve\/main\/(.+)$/);
    if (m) {
      counts.model++;
      counts.log.push(p);
      file = routes[m[1]] && routes[m[1]][m[2]];
    } else {
      if (p.startsWith('/models/')) { counts.model++; counts.log.push(p); }
      const abs = path.resolve(root, '.' + p);
      if (abs.startsWith(root)) file = abs;
    }
    if (file && fs.existsSync(file) && fs.statSync(file).isDirectory()) file = path.join(file, 'index.html');
    if (!file || !fs.existsSync(file)) { res.writeHead(404, { 'content-type': 'text/plain' }); res.end('not found'); return; }
    const st = fs.statSync(file);
    res.writeHead(200, { 'content-type': TYPES[path.extname(file)] || 'application/octet-stream', 'content-length': st.size, 'cache-control': 'no-store' });
    fs.createReadStream(file).pipe(res);
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve({ server, counts, port: server.address().port, close: () => new Promise((r) => server.close(r)) })));
}
