// Prefix caching on the SmolLM2-135M-shaped model, the same work with the cache on and off, in
// one process (two engines, runs interleaved):
//   chat        32 sequential requests sharing a ~1,000-token system prompt over 4 adapters (each
//               adapter's first request is a miss): total time, and TTFT of a hit against a
//               request with a 16-token prompt
//   concurrent  16 streams, 64 requests, 8 adapters, a shared 1,000-token prefix per adapter:
//               generated tokens/s, hit rate and pool composition
//   unshared    the same concurrent workload with no shared prefixes: the cache's overhead
// Usage: npx tsx bench/prefix-cache.ts [--model DIR] [--prefix 1000] [--sections chat,concurrent,unshared]
import { existsSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { Engine } from '../server/engine/engine.js';
import type { Sequence } from '../server/engine/sequence.js';
import { SeededRandom } from '../server/demo/seeded-random.js';
import { makeModel } from './make-model.js';

const HERE = dirname(fileURLToPath(import.meta.url));
const { values: args } = parseArgs({ options: { model: { type: 'string' }, prefix: { type: 'string' }, sections: { type: 'string' }, gen: { type: 'string' } } });
const modelDir = resolve(args.model ?? join(HERE, 'models', 'smol-bf16'));
const PREFIX = Number(args.prefix ?? 1000);
const GEN = Number(args.gen ?? 32);
const sections = new Set((args.sections ?? 'chat,concurrent,unshared').split(','));
if (!existsSync(join(modelDir, 'config.json')) || !existsSync(join(modelDir, 'adapters', 'a7')))
  await makeModel({ out: modelDir, dtype: 'bf16', adapters: 32, rank: 16, alpha: 32 });

const rng = new SeededRandom(7, 'prefix-bench');
const tokens = (n: number) => Array.from({ length: n }, () => 10 + Math.floor(rng.uniform() * 40000));
const opts = { model: modelDir, adapterDir: join(modelDir, 'adapters'), maxNumSeqs: 16, memoryBudget: 1 << 30 };
const on = await Engine.create({ ...opts, enablePrefixCaching: true });
const off = await Engine.create({ ...opts, enablePrefixCaching: false });
const results: Record<string, unknown> = { model: modelDir, prefixTokens: PREFIX, generated: GEN };

async function run(e: Engine, prompt: number[], adapter: string | null, maxTokens = GEN): Promise<{ ttft: number; total: number; seq: Sequence }> {
  const t0 = performance.now();
  const seq = e.submit(prompt, { maxTokens, temperature: 0, ignoreEos: true }, { adapter });
  let ttft = NaN;
  for (;;) {
    const out = await seq.next();
    if (out.tokens.length && Number.isNaN(ttft)) ttft = performance.now() - t0;
    if (out.finishReason) return { ttft, total: performance.now() - t0, seq };
  }
}

if (sections.has('chat')) {
  const system = tokens(PREFIX);
  const adapters = ['a0', 'a1', 'a2', 'a3'];
  const reqs = Array.from({ length: 32 }, (_, i) => ({ prompt: [...system, ...tokens(24)], adapter: adapters[i % 4] }));
  const total: Record<string, number> = {};
  const hitTtft: number[] = [];
  for (const [name, e] of [['on', on], ['off', off]] as const) {
    const t0 = performance.now();
    for (const [i, r] of reqs.entries()) {
      const res = await run(e, r.prompt, r.adapter);
      if (name === 'on' && i >= 4) hitTtft.push(res.ttft);
    }
    total[name] = performance.now() - t0;
  }
  const short: number[] = [];
  for (let i = 0; i < 8; i++) short.push((await run(on, tokens(16), 'a0')).ttft);
  const med = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
  results.chat = {
    totalMsCacheOn: Math.round(total.on), totalMsCacheOff: Math.round(total.off), speedup: +(total.off / total.on).toFixed(2),
    hitTtftMs: +med(hitTtft).toFixed(1), shortPromptTtftMs: +med(short).toFixed(1), hitTtftOverShort: +(med(hitTtft) / med(short)).toFixed(2),
  };
  console.log(JSON.stringify({ chat: results.chat }));
}

async function concurrent(e: Engine, shared: boolean): Promise<{ tokPerS: number; hitRate: number; pool: unknown }> {
  const prefixes = Array.from({ length: 8 }, () => tokens(PREFIX));
  const reqs = Array.from({ length: 64 }, (_, i) => ({ prompt: shared ? [...prefixes[i % 8], ...tokens(24)] : tokens(PREFIX + 24), adapter: `a${i % 8}` }));
  const q0 = e.prefix.stats();
  let next = 0;
  let pool: unknown = null;
  const t0 = performance.now();
  const worker = async () => {
    while (next < reqs.length) {
      const r = reqs[next++];
      await run(e, r.prompt, r.adapter);
      if (next === 40) pool = e.paging.stats();
    }
  };
  await Promise.all(Array.from({ length: 16 }, worker));
  const s = (performance.now() - t0) / 1000;
  const q1 = e.prefix.stats();
  return { tokPerS: +((64 * GEN) / s).toFixed(1), hitRate: +((q1.hits - q0.hits) / Math.max(1, q1.queries - q0.queries)).toFixed(3), pool };
}

if (sections.has('concurrent')) {
  const c = { on: await concurrent(on, true), off: await concurrent(off, true) };
  results.concurrent = { ...c, ratio: +(c.on.tokPerS / c.off.tokPerS).toFixed(2) };
  console.log(JSON.stringify({ concurrent: results.concurrent }));
}

if (sections.has('unshared')) {
  // Interleaved twice each, so a drift of the machine's speed does not favour either.
  const a1 = await concurrent(off, false);
  const b1 = await concurrent(on, false);
  const b2 = await concurrent(on, false);
  const a2 = await concurrent(off, false);
  const offT = (a1.tokPerS + a2.tokPerS) / 2;
  const onT = (b1.tokPerS + b2.tokPerS) / 2;
  results.unshared = { cacheOnTokPerS: +onT.toFixed(1), cacheOffTokPerS: +offT.toFixed(1), overheadPct: +((1 - onT / offT) * 100).toFixed(1) };
  console.log(JSON.stringify({ unshared: results.unshared }));
}

await on.close();
await off.close();
