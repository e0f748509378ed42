// Upload-to-first-token latency for a rank-16 all-module adapter on the SmolLM2-135M-shaped model:
// on the replica that received the upload, and on another replica that learns of it through Redis.
// Usage: npx tsx bench/upload-latency.ts [--model DIR] [--runs 5]
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { percentile } from './loadgen.js';

const HERE = dirname(fileURLToPath(import.meta.url));
const ROOT = join(HERE, '..');
const { values: a } = parseArgs({ options: { model: { type: 'string' }, runs: { type: 'string', default: '5' } } });
const modelDir = resolve(a.model ?? join(HERE, 'models', 'smol-bf16'));
const adapterSrc = join(modelDir, 'adapters', 'a0');

async function freePort(): Promise<number> {
  return new Promise((res) => {
    const s = createServer().listen(0, '127.0.0.1', () => {
      const p = (s.address() as { port: number }).port;
      s.close(() => res(p));
    });
  });
}

async function serve(extra: string[]): Promise<{ url: string; proc: ChildProcess }> {
  const proc = spawn(process.execPath, ['--import', 'tsx', join(ROOT, 'server', 'main.ts'), 'serve', '--model', modelDir, '--port', '0',
    '--adapter-dir', mkdtempSync(join(tmpdir(), 'lp-up-')), '--memory-budget', '2GiB', ...extra], { cwd: ROOT, stdio: ['ignore', 'ignore', 'pipe'] });
  let log = '';
  return new Promise((res, rej) => {
    proc.stderr!.on('data', (d) => {
      log += d;
      const m = /"address":"(http:\/\/[^"]+)"/.exec(log);
      if (m) res({ url: m[1], proc });
    });
    proc.on('exit', () => rej(new Error(log)));
  });
}

async function firstToken(url: string, model: string): Promise<boolean> {
  const r = await fetch(`${url}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ model, prompt: [1, 2, 3, 4], max_tokens: 1 }) });
  return r.status === 200;
}

async function upload(url: string, id: string): Promise<number> {
  const fd = new FormData();
  fd.set('id', id);
  for (const f of ['adapter_config.json', 'adapter_model.safetensors']) fd.set(f, new Blob([readFileSync(join(adapterSrc, f))]), f);
  return (await fetch(`${url}/v1/adapters`, { method: 'POST', body: fd })).status;
}

const redisPort = await freePort();
const redis = spawn('redis-server', ['--port', String(redisPort), '--save', '', '--appendonly', 'no'], { stdio: 'ignore' });
await new Promise((r) => setTimeout(r, 300));
const redisUrl = `redis://127.0.0.1:${redisPort}`;
const A = await serve(['--redis-url', redisUrl]);
const B = await serve(['--redis-url', redisUrl]);
const same: number[] = [];
const other: number[] = [];
try {
  await firstToken(A.url, 'smol-bf16');
  await firstToken(B.url, 'smol-bf16');
  for (let k = 0; k < Number(a.runs); k++) {
    const id = `up${k}`;
    const t0 = performance.now();
    const st = await upload(A.url, id);
    if (st !== 201) throw new Error(`upload ${st}`);
    if (!(await firstToken(A.url, id))) throw new Error('no first token on A');
    same.push(performance.now() - t0);
    while (!(await firstToken(B.url, id))) await new Promise((r) => setTimeout(r, 5));
    other.push(performance.now() - t0);
  }
} finally {
  A.proc.kill('SIGTERM');
  B.proc.kill('SIGTERM');
  redis.kill('SIGTERM');
}
const size = ['adapter_config.json', 'adapter_model.safetensors'].reduce((n, f) => n + readFileSync(join(adapterSrc, f)).length, 0);
console.log(`adapter ${(size / 1e6).toFixed(1)} MB (rank 16, q/k/v/o/gate/up/down, fp32)`);
console.log(`upload -> first token, same replica:        p50 ${percentile(same, 50).toFixed(0)} ms  (runs: ${same.map((x) => x.toFixed(0)).join(', ')})`);
console.log(`upload -> first token, other replica (Redis): p50 ${percentile(other, 50).toFixed(0)} ms  (runs: ${other.map((x) => x.toFixed(0)).join(', ')})`);
