// The serving benchmark, one command: `npm run bench -- [options]`.
// Generates the SmolLM2-135M-shaped model and rank-16 adapters with the project's own generator
// (no download), starts `loraplex serve`, runs the workload through the OpenAI API for each number
// of distinct adapters (and/or concurrency), prints a table, writes JSON and an SVG chart.
// Point it at any other OpenAI-compatible server with --url (e.g. llama.cpp's, with --lora-field).
//
//   --adapters 0,1,8,64      distinct adapters in the workload (request i uses adapter i mod A)
//   --concurrency 16         concurrent streams (a list sweeps: 1,8,32)
//   --requests 64 --prompt-tokens 128 --max-tokens 64
//   --dtype bf16|f16|f32     weights of the generated model
//   --lora-dtype bfloat16    passed to loraplex serve (adapter rows in the pool; default float32)
//   --compute-dtype bfloat16 passed to loraplex serve (BF16-weight matmuls on BF16 activations)
//   --kv-cache-dtype bfloat16 passed to loraplex serve (KV cache in BF16)
//   --url URL --model NAME   benchmark a running server instead (adapters named <prefix><i>)
//   --adapter-prefix a       adapter names on that server
//   --lora-field             select adapters llama.cpp-style: {"lora":[{"id":i,"scale":1}]}
//   --engine-api             also run the same workload on the Engine API in-process (HTTP overhead)
//   --out bench/out          where JSON and SVG go
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { Engine } from '../server/engine/engine.js';
import { makePrompts, percentile, runLoad, type LoadResult, type Target, type Workload } from './loadgen.js';
import { makeModel } from './make-model.js';

const HERE = dirname(fileURLToPath(import.meta.url));
const ROOT = join(HERE, '..');
const { values: a } = parseArgs({
  options: {
    adapters: { type: 'string', default: '0,1,8,64' },
    concurrency: { type: 'string', default: '16' },
    requests: { type: 'string', default: '64' },
    'prompt-tokens': { type: 'string', default: '128' },
    'max-tokens': { type: 'string', default: '64' },
    dtype: { type: 'string', default: 'bf16' },
    url: { type: 'string' },
    model: { type: 'string' },
    'adapter-prefix': { type: 'string', default: 'a' },
    'lora-field': { type: 'boolean', default: false },
    'engine-api': { type: 'boolean', default: false },
    threads: { type: 'string' },
    'lora-dtype': { type: 'string' },
    'compute-dtype': { type: 'string' },
    'kv-cache-dtype': { type: 'string' },
    out: { type: 'string', default: join(HERE, 'out') },
    label: { type: 'string' },
  },
});
const list = (s: string) => s.split(',').map(Number);
const adapterCounts = list(a.adapters!);
const concurrencies = list(a.concurrency!);
const maxAdapters = Math.max(...adapterCounts);
const base: Omit<Workload, 'adapters' | 'concurrency'> = { requests: Number(a.requests), promptTokens: Number(a['prompt-tokens']), maxTokens: Number(a['max-tokens']), vocab: 49152 };

async function startServer(modelDir: string): Promise<{ url: string; proc: ChildProcess }> {
  const args = ['--import', 'tsx', join(ROOT, 'server', 'main.ts'), 'serve', '--model', modelDir, '--adapter-dir', join(modelDir, 'adapters'),
    '--port', '0', '--memory-budget', '6GiB', '--max-loras', String(Math.max(8, maxAdapters)), '--max-num-seqs', String(Math.max(...concurrencies))];
  if (a.threads) args.push('--threads', a.threads);
  if (a['lora-dtype']) args.push('--lora-dtype', a['lora-dtype']);
  if (a['compute-dtype']) args.push('--compute-dtype', a['compute-dtype']);
  if (a['kv-cache-dtype']) args.push('--kv-cache-dtype', a['kv-cache-dtype']);
  const proc = spawn(process.execPath, args, { cwd: ROOT, stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, LORAPLEX_LOG_LEVEL: 'info' } });
  let log = '';
  return new Promise((res, rej) => {
    proc.stderr!.on('data', (d) => {
      if (log.length < 1 << 16) log += d; // keep draining the pipe; remember only the start
      const m = /"address":"(http:\/\/[^"]+)"/.exec(log);
      if (m) res({ url: m[1], proc });
    });
    proc.on('exit', () => rej(new Error(`server exited:\n${log}`)));
  });
}

/** Same workload through the Engine API, no HTTP: the HTTP layer's overhead is the difference. */
async function engineApiRun(modelDir: string, w: Workload): Promise<LoadResult> {
  const e = await Engine.create({ model: modelDir, adapterDir: join(modelDir, 'adapters'), memoryBudget: 6 * 1024 ** 3, maxLoras: Math.max(8, maxAdapters), maxNumSeqs: w.concurrency, threads: a.threads ? Number(a.threads) : undefined });
  const prompts = makePrompts(w);
  // Same warm-up as the HTTP run: every adapter loaded once, so both measure serving only.
  if (w.adapters > 0)
    await Promise.all(Array.from({ length: w.adapters }, async (_, i) => {
      for await (const _t of e.generate([1, 2, 3, 4, 5, 6, 7, 8], { maxTokens: 1, temperature: 0, ignoreEos: true }, { adapter: `${a['adapter-prefix']}${i}` }));
    }));
  let next = 0;
  let tokens = 0;
  const ttft: number[] = [];
  const itl: number[] = [];
  const t0 = performance.now();
  await Promise.all(Array.from({ length: w.concurrency }, async () => {
    while (next < w.requests) {
      const i = next++;
      const s = performance.now();
      let last = s;
      let first = true;
      for await (const _ of e.generate(prompts[i], { maxTokens: w.maxTokens, temperature: 0, ignoreEos: true }, { adapter: w.adapters ? `${a['adapter-prefix']}${i % w.adapters}` : null })) {
        const now = performance.now();
        if (first) ttft.push(now - s);
        else itl.push(now - last);
        first = false;
        last = now;
        tokens++;
      }
    }
  }));
  const wallS = (performance.now() - t0) / 1000;
  await e.close();
  return { requests: w.requests, concurrency: w.concurrency, adapters: w.adapters, wallS, generatedTokens: tokens, tokensPerS: tokens / wallS, requestsPerS: w.requests / wallS,
    ttftMs: { p50: percentile(ttft, 50), p99: percentile(ttft, 99) }, itlMs: { p50: percentile(itl, 50), p99: percentile(itl, 99) }, errors: 0 };
}

function chart(rows: Array<LoadResult & { via: string }>, title: string): string {
  const W = 640, H = 360, L = 60, B = 40;
  const xs = [...new Set(rows.map((r) => r.adapters))].sort((x, y) => x - y);
  const maxY = Math.max(...rows.map((r) => r.tokensPerS)) * 1.15 || 1;
  const x = (i: number) => L + ((W - L - 20) * (i + 0.5)) / xs.length;
  const y = (v: number) => H - B - ((H - B - 30) * v) / maxY;
  const series = [...new Set(rows.map((r) => `${r.via} c=${r.concurrency}`))];
  const colors = ['#1f77b4', '#d62728', '#2ca02c', '#9467bd'];
  let svg = `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" font-family="sans-serif" font-size="12">\n<rect width="100%" height="100%" fill="white"/>\n<text x="${W / 2}" y="18" text-anchor="middle" font-size="14">${title}</text>\n`;
  svg += `<line x1="${L}" y1="${H - B}" x2="${W - 10}" y2="${H - B}" stroke="black"/><line x1="${L}" y1="30" x2="${L}" y2="${H - B}" stroke="black"/>\n`;
  for (let k = 0; k <= 4; k++) {
    const v = (maxY / 4) * k;
    svg += `<text x="${L - 6}" y="${y(v) + 4}" text-anchor="end">${v.toFixed(0)}</text><line x1="${L}" y1="${y(v)}" x2="${W - 10}" y2="${y(v)}" stroke="#ddd"/>\n`;
  }
  xs.forEach((v, i) => (svg += `<text x="${x(i)}" y="${H - B + 16}" text-anchor="middle">${v === 0 ? 'base' : v}</text>\n`));
  svg += `<text x="${W / 2}" y="${H - 6}" text-anchor="middle">distinct adapters in the workload</text>\n<text x="14" y="${H / 2}" transform="rotate(-90 14 ${H / 2})" text-anchor="middle">generated tokens/s</text>\n`;
  series.forEach((s, k) => {
    const pts = rows.filter((r) => `${r.via} c=${r.concurrency}` === s).map((r) => `${x(xs.indexOf(r.adapters))},${y(r.tokensPerS)}`);
    svg += `<polyline fill="none" stroke="${colors[k % 4]}" stroke-width="2" points="${pts.join(' ')}"/>\n`;
    pts.forEach((p) => (svg += `<circle cx="${p.split(',')[0]}" cy="${p.split(',')[1]}" r="3" fill="${colors[k % 4]}"/>\n`));
    svg += `<text x="${W - 150}" y="${40 + 16 * k}" fill="${colors[k % 4]}">${s}</text>\n`;
  });
  return svg + '</svg>\n';
}

let server: { url: string; proc: ChildProcess } | null = null;
let target: Target;
let modelDir = '';
if (a.url) {
  target = { url: a.url, baseModel: a.model ?? 'base', adapterName: (i) => `${a['adapter-prefix']}${i}` };
  if (a['lora-field']) target.adapterField = (i) => ({ lora: [{ id: i, scale: 1 }] });
} else {
  modelDir = resolve(join(HERE, 'models', `smol-${a.dtype}-${Math.max(64, maxAdapters)}`));
  if (!existsSync(join(modelDir, 'adapters', `a${Math.max(64, maxAdapters) - 1}`))) {
    console.error(`generating ${modelDir} ...`);
    await makeModel({ out: modelDir, dtype: a.dtype as 'bf16', adapters: Math.max(64, maxAdapters), rank: 16, alpha: 32 });
  }
  server = await startServer(modelDir);
  target = { url: server.url, baseModel: `smol-${a.dtype}-${Math.max(64, maxAdapters)}`, adapterName: (i) => `${a['adapter-prefix']}${i}` };
}

const rows: Array<LoadResult & { via: string }> = [];
try {
  // Warm-up: load every adapter once so the runs measure serving, not first loads.
  if (maxAdapters > 0) await runLoad(target, { ...base, requests: maxAdapters, concurrency: Math.min(16, maxAdapters), maxTokens: 1, promptTokens: 8, adapters: maxAdapters });
  for (const c of concurrencies)
    for (const A of adapterCounts) {
      const r = await runLoad(target, { ...base, concurrency: c, adapters: A });
      rows.push({ ...r, via: a.label ?? (a.url ? 'server' : 'loraplex') });
      console.error(`A=${A} c=${c}: ${r.tokensPerS.toFixed(1)} tok/s`);
    }
} finally {
  server?.proc.kill('SIGTERM');
}
if (a['engine-api'] && modelDir)
  for (const c of concurrencies)
    for (const A of adapterCounts) rows.push({ ...(await engineApiRun(modelDir, { ...base, concurrency: c, adapters: A })), via: 'engine-api' });

const fmt = (v: number, d = 1) => (Number.isFinite(v) ? v.toFixed(d) : '-');
console.log(`\nworkload: ${base.requests} requests, ~${base.promptTokens}-token prompts, ${base.maxTokens} generated tokens each, greedy, ignore_eos\n`);
console.log('| via | adapters | concurrency | gen tok/s | req/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | errors |');
console.log('|---|---|---|---|---|---|---|---|---|---|');
for (const r of rows) console.log(`| ${r.via} | ${r.adapters} | ${r.concurrency} | ${fmt(r.tokensPerS)} | ${fmt(r.requestsPerS, 2)} | ${fmt(r.ttftMs.p50, 0)} | ${fmt(r.ttftMs.p99, 0)} | ${fmt(r.itlMs.p50)} | ${fmt(r.itlMs.p99)} | ${r.errors} |`);
mkdirSync(a.out!, { recursive: true });
const stamp = a.label ?? 'loraplex';
writeFileSync(join(a.out!, `bench-${stamp}.json`), JSON.stringify({ workload: base, rows, date: new Date().toISOString() }, null, 2));
writeFileSync(join(a.out!, `bench-${stamp}.svg`), chart(rows, `loraplex serving: ${base.requests} requests, ${base.promptTokens}+${base.maxTokens} tokens`));
console.log(`\nwrote ${join(a.out!, `bench-${stamp}.json`)} and .svg`);
