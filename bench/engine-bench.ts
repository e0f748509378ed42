// Engine-level benchmarks (no HTTP) on the SmolLM2-135M-shaped random model:
//   decode   tokens/s for 1 and 16 concurrent streams                       (engine core)
//   lora     decode step at batch 32 with 0 / 1 shared / 8 / 32 distinct adapters, prefill
//            8 x 256 tokens with 1 vs 8 adapters, against the memory-bandwidth bound  (batched LoRA)
//   paging   adapter cold-load latency, throughput with 1 / 100 / 1000 distinct adapters, pool use
//   cold     512 requests each on a never-seen adapter against 512 on one resident adapter
//            (16 streams, 64 tokens), then the three many-adapter targets side by side
// Usage: npx tsx bench/engine-bench.ts [--model DIR] [--sections decode,lora,paging,cold] [--out FILE]
//        (other families: make the model with bench/make-model.ts --shape qwen3-0.6b|gemma3-1b
//        [--family llama for the same-shape Llama baseline], then --model DIR --sections decode)
//        [--compute-dtype bfloat16] [--kv-cache-dtype bfloat16] [--lora-dtype bfloat16] (engine options)
import { execFileSync } from 'node:child_process';
import { copyFileSync, existsSync, linkSync, lstatSync, mkdirSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { Engine, type EngineOptions } from '../server/engine/engine.js';
import { makePrompts, percentile } from './loadgen.js';
import { makeModel } from './make-model.js';

const HERE = dirname(fileURLToPath(import.meta.url));
const { values: args } = parseArgs({
  options: {
    model: { type: 'string' }, sections: { type: 'string' }, out: { type: 'string' }, threads: { type: 'string' },
    'compute-dtype': { type: 'string' }, 'kv-cache-dtype': { type: 'string' }, 'lora-dtype': { type: 'string' },
  },
});
const modelDir = resolve(args.model ?? join(HERE, 'models', 'smol-bf16'));
const sections = new Set((args.sections ?? 'decode,lora,paging,cold').split(','));
const GiB = 1024 ** 3;
// The engine's numeric options, as given (the engine validates them).
const dtypes = {
  computeDtype: args['compute-dtype'] as EngineOptions['computeDtype'],
  kvCacheDtype: args['kv-cache-dtype'] as EngineOptions['kvCacheDtype'],
  loraDtype: args['lora-dtype'] as EngineOptions['loraDtype'],
};
const results: Record<string, unknown> = { model: modelDir, date: new Date().toISOString(), ...dtypes };
const med = (xs: number[]) => percentile(xs, 50);

function readBandwidth(): number {
  const exe = [join(HERE, '..', 'build', 'membw'), join(HERE, '..', 'build', 'Release', 'membw')].find(existsSync);
  if (!exe) return NaN;
  return JSON.parse(execFileSync(exe, ['1024'], { encoding: 'utf8' })).read_gb_per_s as number;
}

async function ensureModel(): Promise<void> {
  if (existsSync(join(modelDir, 'config.json')) && existsSync(join(modelDir, 'adapters', 'a31'))) return;
  // A model given with --model (e.g. bench/make-model.ts --shape qwen3-0.6b) is never overwritten:
  // the decode section needs no adapters.
  if (args.model && existsSync(join(modelDir, 'config.json'))) return;
  console.error(`generating ${modelDir} (bf16, 32 rank-16 adapters)...`);
  await makeModel({ out: modelDir, dtype: 'bf16', adapters: 32, rank: 16, alpha: 32 });
}

function dirBytes(dir: string): number {
  return readdirSync(dir).reduce((n, f) => n + statSync(join(dir, f)).size, 0);
}

/** Runs `n` requests (prompt i, adapter fn(i)) at once; returns per-step timings of full-batch steps. */
async function runBatch(e: Engine, prompts: number[][], maxTokens: number, adapter: (i: number) => string | null, stepTokens?: number) {
  const fwd: number[] = [];
  const wall: number[] = [];
  e.onStep = () => {
    if (stepTokens === undefined || e.lastStep.tokens === stepTokens) {
      fwd.push(e.lastStep.forwardMs);
      wall.push(e.lastStep.wallMs);
    }
  };
  const t0 = performance.now();
  let tokens = 0;
  await Promise.all(prompts.map(async (p, i) => {
    for await (const _ of e.generate(p, { maxTokens, temperature: 0, ignoreEos: true }, { adapter: adapter(i) })) tokens++;
  }));
  e.onStep = null;
  return { fwd, wall, wallS: (performance.now() - t0) / 1000, tokens };
}

async function decodeSection(): Promise<void> {
  const e = await Engine.create({ ...dtypes, model: modelDir, memoryBudget: 2 * GiB, maxNumSeqs: 64, threads: args.threads ? Number(args.threads) : undefined });
  const out: Record<string, unknown> = {};
  for (const streams of [1, 16]) {
    const prompts = makePrompts({ requests: streams, concurrency: streams, promptTokens: 128, maxTokens: 64, adapters: 0, vocab: 49152, seed: streams });
    await runBatch(e, prompts, 4, () => null); // warm-up
    const r = await runBatch(e, prompts, 64, () => null, streams);
    const stepMs = med(r.wall);
    out[`streams_${streams}`] = { decode_step_ms: stepMs, forward_ms: med(r.fwd), host_ms: stepMs - med(r.fwd), tokens_per_s: (streams * 1000) / stepMs };
    console.log(`decode ${streams} stream(s): step ${stepMs.toFixed(2)} ms (forward ${med(r.fwd).toFixed(2)}) -> ${((streams * 1000) / stepMs).toFixed(1)} tokens/s`);
  }
  results.decode = out;
  await e.close();
}

async function loraSection(bw: number): Promise<void> {
  const e = await Engine.create({ ...dtypes, model: modelDir, adapterDir: join(modelDir, 'adapters'), memoryBudget: 4 * GiB, maxNumSeqs: 64, maxLoras: 32, maxBatchTokens: 4096 });
  const baseBytes = statSync(join(modelDir, 'model.safetensors')).size;
  const B = 32;
  const prompts = makePrompts({ requests: B, concurrency: B, promptTokens: 64, maxTokens: 32, adapters: 0, vocab: 49152, seed: 7 });
  const cases: Array<[string, (i: number) => string | null, number]> = [
    ['base (0 adapters)', () => null, 0],
    ['1 shared adapter', () => 'a0', 1],
    ['8 distinct adapters', (i) => `a${i % 8}`, 8],
    ['32 distinct adapters', (i) => `a${i % 32}`, 32],
  ];
  const out: Record<string, unknown> = {};
  let baseMs = NaN;
  // Make every adapter resident first, so the steps measure compute, not loading.
  await runBatch(e, prompts, 2, (i) => `a${i % 32}`);
  const poolAdapterBytes = (n: number) => (n === 0 ? 0 : (e.stats().adapterPages / 32) * n * e.paging.pageBytes);
  for (const [name, fn, n] of cases) {
    await runBatch(e, prompts, 2, fn);
    const r = await runBatch(e, prompts, 32, fn, B);
    const ms = med(r.fwd);
    if (n === 0) baseMs = ms;
    const bytes = baseBytes + poolAdapterBytes(n);
    const boundMs = (bytes / (bw * 1e9)) * 1000;
    out[name] = { step_ms: ms, ratio_to_base: ms / baseMs, bytes_moved_mb: bytes / 1e6, bandwidth_bound_ms: boundMs, ratio_to_bound: ms / boundMs };
    console.log(`decode batch ${B}, ${name}: ${ms.toFixed(2)} ms (x${(ms / baseMs).toFixed(2)} base); bandwidth bound ${boundMs.toFixed(2)} ms (x${(ms / boundMs).toFixed(2)})`);
  }
  const pre = makePrompts({ requests: 8, concurrency: 8, promptTokens: 256, maxTokens: 1, adapters: 0, vocab: 49152, seed: 9 });
  const prefill: Record<string, number> = {};
  for (const [name, fn] of [['1 adapter', () => 'a0'], ['8 adapters', (i: number) => `a${i}`], ['base', () => null]] as Array<[string, (i: number) => string | null]>) {
    await runBatch(e, pre, 1, fn); // warm
    const r = await runBatch(e, pre, 1, fn, 8 * 256);
    prefill[name] = med(r.fwd);
  }
  for (const [k, v] of Object.entries(prefill)) console.log(`prefill 8 x 256, ${k}: ${v.toFixed(1)} ms (x${(v / prefill.base).toFixed(2)} base) = ${((8 * 256 * 1000) / v).toFixed(0)} tokens/s`);
  out.prefill_8x256_ms = prefill;
  out.adapter_pool_bytes_each = poolAdapterBytes(1);
  results.lora = out;
  await e.close();
}

async function ensureManyAdapters(): Promise<void> {
  const many = join(modelDir, 'many-adapters');
  if (!existsSync(join(many, 'a999', 'adapter_model.safetensors')) || lstatSync(join(many, 'a999')).isSymbolicLink()) {
    rmSync(many, { recursive: true, force: true });
    mkdirSync(many, { recursive: true });
    // 1000 adapter ids over the 32 generated weight sets: distinct to the server (each is read,
    // validated, converted and paged in on its own, as a distinct file would be: 32 x 19.6 MB is
    // already far beyond the caches, so every load streams from memory), without 19 GB of random
    // files on disk. Hard links, not symlinks: a symlinked folder in --adapter-dir that points
    // elsewhere is not an adapter.
    for (let i = 0; i < 1000; i++) {
      const src = join(modelDir, 'adapters', `a${i % 32}`);
      mkdirSync(join(many, `a${i}`));
      copyFileSync(join(src, 'adapter_config.json'), join(many, `a${i}`, 'adapter_config.json'));
      linkSync(join(src, 'adapter_model.safetensors'), join(many, `a${i}`, 'adapter_model.safetensors'));
    }
  }
}

async function pagingSection(): Promise<void> {
  const many = join(modelDir, 'many-adapters');
  const out: Record<string, unknown> = {};
  // Cold load: disk -> host (parse/validate/convert) -> pool (install) -> first token.
  {
    const e = await Engine.create({ model: modelDir, adapterDir: many, memoryBudget: 2 * GiB, maxLoras: 32 });
    const p = makePrompts({ requests: 1, concurrency: 1, promptTokens: 8, maxTokens: 1, adapters: 0, vocab: 49152, seed: 3 })[0];
    await runBatch(e, [p], 1, () => null);
    const cold: number[] = [];
    const parse: number[] = [];
    const native: number[] = [];
    const warm: number[] = [];
    for (let k = 0; k < 9; k++) {
      const id = `a${100 + k}`;
      let t0 = performance.now();
      const entry = await e.adapters.loadNow(id);
      parse.push(performance.now() - t0);
      native.push(entry.parsed!.parseMs);
      e.adapters.forget(id);
      t0 = performance.now();
      await runBatch(e, [p], 1, () => id);
      cold.push(performance.now() - t0);
      t0 = performance.now();
      await runBatch(e, [p], 1, () => id);
      warm.push(performance.now() - t0);
    }
    // From disk: the file's pages dropped from the page cache first (GNU dd iflag=nocache, which
    // needs no privilege), then one load.
    const fromDisk: number[] = [];
    for (let k = 0; k < 5; k++) {
      const id = `a${200 + k}`;
      const file = join(modelDir, 'adapters', `a${(200 + k) % 32}`, 'adapter_model.safetensors');
      try {
        execFileSync('dd', [`if=${file}`, 'iflag=nocache', 'count=0', 'status=none']);
      } catch {
        break; // no GNU dd: page-cache figures only
      }
      const entry = await e.adapters.loadNow(id);
      fromDisk.push(entry.parsed!.parseMs);
      e.adapters.forget(id);
    }
    const fileMb = statSync(join(modelDir, 'adapters', 'a0', 'adapter_model.safetensors')).size / 1e6;
    if (fromDisk.length) {
      out.cold_load_from_disk = { native_ms: med(fromDisk), gb_per_s: fileMb / med(fromDisk) };
      console.log(`cold load from disk (page cache dropped for the file): ${med(fromDisk).toFixed(1)} ms (${(fileMb / med(fromDisk)).toFixed(2)} GB/s)`);
    }
    out.cold_load = {
      adapter_file_mb: fileMb, load_ms: med(parse), native_ms: med(native), native_gb_per_s: fileMb / med(native), load_gb_per_s: fileMb / med(parse),
      cold_first_token_ms: med(cold), warm_first_token_ms: med(warm), cold_load_ms: med(cold) - med(warm), cold_over_resident: med(cold) / med(warm),
    };
    console.log(`cold load (rank 16, 7 modules, ${fileMb.toFixed(1)} MB from the page cache): ${med(parse).toFixed(1)} ms (${(fileMb / med(parse)).toFixed(2)} GB/s; read+convert+checks ${med(native).toFixed(1)} ms, ${(fileMb / med(native)).toFixed(2)} GB/s); first token cold ${med(cold).toFixed(1)} ms vs resident ${med(warm).toFixed(1)} ms (x${(med(cold) / med(warm)).toFixed(2)})`);
    await e.close();
  }
  const R = 1000;
  const through: Record<string, unknown> = {};
  let one = NaN;
  for (const A of [1, 100, 1000]) {
    const e = await Engine.create({ model: modelDir, adapterDir: many, memoryBudget: 2 * GiB, maxLoras: 32, maxNumSeqs: 32, maxBatchTokens: 2048 });
    const prompts = makePrompts({ requests: R, concurrency: R, promptTokens: 32, maxTokens: 8, adapters: A, vocab: 49152, seed: 11 });
    const use = { kv: 0, adapter: 0, n: 0 };
    e.onStep = () => {
      const s = e.paging.stats();
      use.kv += s.kvPages / s.totalPages;
      use.adapter += s.adapterPages / s.totalPages;
      use.n++;
    };
    const t0 = performance.now();
    let tokens = 0;
    await Promise.all(prompts.map(async (p, i) => {
      for await (const _ of e.generate(p, { maxTokens: 8, temperature: 0, ignoreEos: true }, { adapter: `a${i % A}` })) tokens++;
    }));
    const s = (performance.now() - t0) / 1000;
    const tps = tokens / s;
    if (A === 1) one = tps;
    const st = e.stats();
    through[`adapters_${A}`] = { generated_tokens_per_s: tps, ratio_to_1: tps / one, adapter_loads: st.adapters.loads, evictions: st.adapters.evictions, pool_kv_use: use.kv / use.n, pool_adapter_use: use.adapter / use.n };
    console.log(`${A} distinct adapters: ${tps.toFixed(1)} generated tokens/s (x${(tps / one).toFixed(2)} of 1 adapter); loads ${st.adapters.loads}, evictions ${st.adapters.evictions}; pool use kv ${((use.kv / use.n) * 100).toFixed(1)}% adapters ${((use.adapter / use.n) * 100).toFixed(1)}%`);
    await e.close();
  }
  out.throughput = through;
  results.paging = out;
}

/** Runs `prompts` with at most `streams` in flight (a client that keeps 16 requests open). */
async function runStreams(e: Engine, prompts: number[][], maxTokens: number, streams: number, adapter: (i: number) => string | null) {
  let next = 0;
  let tokens = 0;
  const t0 = performance.now();
  await Promise.all(Array.from({ length: streams }, async () => {
    while (next < prompts.length) {
      const i = next++;
      for await (const _ of e.generate(prompts[i], { maxTokens, temperature: 0, ignoreEos: true }, { adapter: adapter(i) })) tokens++;
    }
  }));
  return tokens / ((performance.now() - t0) / 1000);
}

async function coldSection(): Promise<void> {
  const many = join(modelDir, 'many-adapters');
  const R = 512;
  const prompts = makePrompts({ requests: R, concurrency: 16, promptTokens: 32, maxTokens: 64, adapters: 0, vocab: 49152, seed: 21 });
  const opts = { model: modelDir, adapterDir: many, memoryBudget: 2 * GiB, maxLoras: 32, maxNumSeqs: 32, maxBatchTokens: 2048 };
  // Warm-up run on another engine (page cache, code paths), then one resident adapter, then 512
  // never-seen ones: every request on a fresh engine's adapter a<i> is a cold load.
  {
    const e = await Engine.create(opts);
    await runStreams(e, prompts.slice(0, 32), 8, 16, (i) => `a${600 + i}`);
    await e.close();
  }
  const one = await (async () => {
    const e = await Engine.create(opts);
    await runStreams(e, prompts.slice(0, 1), 1, 1, () => 'a999'); // resident before the clock starts
    const tps = await runStreams(e, prompts, 64, 16, () => 'a999');
    await e.close();
    return tps;
  })();
  const e = await Engine.create(opts);
  const cold = await runStreams(e, prompts, 64, 16, (i) => `a${i}`);
  const st = e.stats().adapters;
  await e.close();
  const paging = results.paging as { cold_load?: { cold_over_resident: number; native_gb_per_s: number }; throughput?: Record<string, { ratio_to_1: number }> } | undefined;
  results.cold = { requests: R, streams: 16, max_tokens: 64, one_resident_tokens_per_s: one, all_cold_tokens_per_s: cold, ratio: cold / one, disk_loads: st.tierLoads.disk, lookups: st.lookups };
  console.log(`512 requests, 16 streams, 64 tokens: one resident adapter ${one.toFixed(1)} tok/s; each on a never-seen adapter ${cold.toFixed(1)} tok/s (x${(cold / one).toFixed(2)}); ${st.tierLoads.disk} disk loads, lookups ${JSON.stringify(st.lookups)}`);
  console.log('targets (same run):');
  console.log(`  512 cold adapters vs one resident:      x${(cold / one).toFixed(2)} (>= 0.8)`);
  if (paging?.throughput?.adapters_1000) console.log(`  1000 adapters vs 1 (paging workload):   x${paging.throughput.adapters_1000.ratio_to_1.toFixed(2)} (>= 0.8)`);
  if (paging?.cold_load) console.log(`  first token cold vs resident:           x${paging.cold_load.cold_over_resident.toFixed(2)} (<= 1.5); cold load ${paging.cold_load.native_gb_per_s.toFixed(2)} GB/s (>= 2)`);
}

await ensureModel();
const bw = readBandwidth();
results.read_bandwidth_gb_s = bw;
console.log(`read bandwidth: ${bw.toFixed(1)} GB/s (build/membw)`);
if (sections.has('decode')) await decodeSection();
if (sections.has('lora')) await loraSection(bw);
if (sections.has('paging') || sections.has('cold')) await ensureManyAdapters();
if (sections.has('paging')) await pagingSection();
if (sections.has('cold')) await coldSection();
const outFile = args.out ?? join(HERE, 'out', 'engine-bench.json');
mkdirSync(dirname(outFile), { recursive: true });
writeFileSync(outFile, JSON.stringify(results, null, 2));
console.log(`wrote ${outFile}`);
