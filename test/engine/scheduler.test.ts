// Continuous batching on the unified pool: preemption by recompute and a randomised simulation
// with tiny budgets (no deadlock, no leak, nothing lost). Thousands of adapters through a small
// pool: adapter-tiers.test.ts.
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SeededRandom } from '../../server/demo/seeded-random.js';
import { Engine } from '../../server/engine/engine.js';
import { LoraplexError } from '../../server/engine/errors.js';
import { writeRandomAdapter, type ModelDims } from '../helpers/adapters.js';
import { adapterRoot, modelDir } from '../helpers/fixtures.js';

const FIX_ADAPTERS = adapterRoot('llama-gqa');

const MODEL = modelDir('llama-gqa');
const DIMS: ModelDims = { hidden: 64, intermediate: 176, layers: 2, qDim: 64, kvDim: 32 };
const PAGE = 8192; // llama-gqa: 2 layers x K,V x 16 tokens x 2 kv heads x 16 dims x 4 bytes

async function collect(engine: Engine, prompt: number[], maxTokens: number, adapter: string | null = null): Promise<number[]> {
  const out: number[] = [];
  for await (const t of engine.generate(prompt, { maxTokens, temperature: 0, ignoreEos: true }, { adapter })) out.push(t.token);
  return out;
}

function checkEveryStep(engine: Engine): void {
  engine.onStep = () => engine.paging.checkInvariants();
}

function prompts(n: number, seed: number, maxLen = 30): number[][] {
  const rng = new SeededRandom(seed, 'prompts');
  return Array.from({ length: n }, () => Array.from({ length: 1 + Math.floor(rng.uniform() * maxLen) }, () => Math.floor(rng.uniform() * 590)));
}

describe('preemption by recompute', () => {
  it('returns exactly the output it would have without preemption', async () => {
    const ps = prompts(6, 1, 20).map((p) => p.concat([5, 6, 7]));
    const roomy = await Engine.create({ model: MODEL, memoryBudget: 256 * PAGE });
    const expected = await Promise.all(ps.map((p) => collect(roomy, p, 40)));
    await roomy.close();

    // 10 pages hold any one request (<= 4 pages) but not all six at once: decode must preempt.
    const tight = await Engine.create({ model: MODEL, memoryBudget: 10 * PAGE, maxBatchTokens: 64 });
    checkEveryStep(tight);
    const got = await Promise.all(ps.map((p) => collect(tight, p, 40)));
    expect(tight.stats().preemptions).toBeGreaterThan(0);
    expect(got).toEqual(expected);
    expect(tight.paging.stats().kvPages).toBe(0);
    // Idle: every page is free or a cached prefix block nobody references (reclaimable).
    expect(tight.paging.stats().freePages + tight.prefix.stats().reclaimablePages).toBe(10);
    expect(tight.prefix.stats().reclaimablePages).toBe(tight.paging.stats().prefixPages);
    await tight.close();
  });

  it('rejects at once a request that could never fit the pool or the context window', async () => {
    const e = await Engine.create({ model: MODEL, memoryBudget: 4 * PAGE });
    expect(() => e.submit([1, 2, 3], { maxTokens: 100 })).toThrowError(/KV pages/);
    expect(() => e.submit([1, 2, 3], { maxTokens: 100 })).toThrowError(LoraplexError);
    expect(() => e.submit(new Array(250).fill(1), { maxTokens: 10 })).toThrowError(/maximum context length is 256/);
    expect(e.scheduler.waiting.length).toBe(0);
    await e.close();
  });

  it('serves long prompts through chunked prefill with the same output', async () => {
    const p = prompts(1, 9, 1)[0].concat(Array.from({ length: 90 }, (_, i) => (i * 7) % 590));
    const whole = await Engine.create({ model: MODEL });
    const expected = await collect(whole, p, 10);
    await whole.close();
    const chunked = await Engine.create({ model: MODEL, maxBatchTokens: 7 });
    checkEveryStep(chunked);
    expect(await collect(chunked, p, 10)).toEqual(expected);
    await chunked.close();
  });
});

describe('randomised simulation', () => {
  const dir = mkdtempSync(join(tmpdir(), 'loraplex-sim-'));
  beforeAll(async () => {
    for (let i = 0; i < 12; i++) await writeRandomAdapter(join(dir, `s${i}`), DIMS, { rank: 1 + (i % 8), seed: 100 + i });
  });

  it.each([1, 2, 3])('seed %i: no deadlock, no leak, no lost request', async (seed) => {
    const rng = new SeededRandom(seed, 'sim');
    const engine = await Engine.create({
      model: MODEL, adapterDir: dir,
      memoryBudget: (8 + Math.floor(rng.uniform() * 8)) * PAGE,
      maxBatchTokens: 8 + Math.floor(rng.uniform() * 40),
      maxNumSeqs: 2 + Math.floor(rng.uniform() * 10),
      maxLoras: 2 + Math.floor(rng.uniform() * 4),
    });
    checkEveryStep(engine);
    const total = 600;
    const results: Array<Promise<string>> = [];
    for (let i = 0; i < total; i++) {
      const len = 1 + Math.floor(rng.uniform() * 40);
      const maxTokens = 1 + Math.floor(rng.uniform() * 24);
      const adapter = rng.uniform() < 0.3 ? null : `s${Math.floor(rng.uniform() * 12)}`;
      const prompt = Array.from({ length: len }, () => Math.floor(rng.uniform() * 590));
      const abortAfter = rng.uniform() < 0.1 ? Math.floor(rng.uniform() * 5) : -1;
      const seq = engine.submit(prompt, { maxTokens, temperature: rng.uniform() < 0.5 ? 0 : 0.8, seed: i, ignoreEos: true }, { adapter });
      results.push(
        (async () => {
          let n = 0;
          while (true) {
            const out = await seq.next();
            n += out.tokens.length;
            if (abortAfter >= 0 && n >= abortAfter) engine.abort(seq);
            if (out.finishReason) {
              if (out.finishReason === 'length' && n !== maxTokens) return `wrong length ${n}/${maxTokens}`;
              return out.finishReason;
            }
          }
        })(),
      );
      if (i % 50 === 0) await new Promise((r) => setTimeout(r, 1));
    }
    const reasons = await Promise.all(results);
    expect(reasons.filter((r) => r !== 'length' && r !== 'abort')).toEqual([]);
    expect(reasons.filter((r) => r === 'length').length).toBeGreaterThan(total / 2);
    engine.paging.checkInvariants();
    const st = engine.stats();
    expect(st.kvPages).toBe(0);
    expect(st.waiting + st.running).toBe(0);
    expect(st.freePages + st.prefixPages + st.adapterPages).toBe(st.totalPages);
    expect(st.prefixCache.reclaimablePages).toBe(st.prefixPages);
    await engine.close();
  });
});

afterAll(() => undefined);

describe('engine stats', () => {
  it('counts waiting and running sequences per adapter', async () => {
    const e = await Engine.create({ model: MODEL, adapterDir: join(FIX_ADAPTERS), maxNumSeqs: 2, loraSkipAheadMs: 0 });
    const seqs = [e.submit([1, 2, 3], { maxTokens: 50, ignoreEos: true }, { adapter: 'r8-all' }), e.submit([1, 2], { maxTokens: 50, ignoreEos: true }, { adapter: 'r8-all' }), e.submit([4], { maxTokens: 50, ignoreEos: true }, { adapter: 'r4-mlp' }), e.submit([5], { maxTokens: 50, ignoreEos: true })];
    while (e.stats().running < 2) await seqs[0].next();
    const st = e.stats();
    expect(st.perAdapter['r8-all']).toEqual({ waiting: 0, running: 2 });
    expect(st.perAdapter['r4-mlp']).toEqual({ waiting: 1, running: 0 });
    expect(Object.keys(st.perAdapter).sort()).toEqual(['r4-mlp', 'r8-all']);
    for (const s of seqs) e.abort(s);
    expect(e.stats().perAdapter).toEqual({});
    await e.close();
  });
});

describe('--max-loras-per-batch', () => {
  it('never runs more distinct adapters at once than the cap, and still completes everything', async () => {
    const e = await Engine.create({ model: MODEL, adapterDir: FIX_ADAPTERS, maxLorasPerBatch: 2, maxNumSeqs: 8 });
    let maxDistinct = 0;
    e.onStep = () => {
      e.paging.checkInvariants();
      maxDistinct = Math.max(maxDistinct, new Set(e.scheduler.running.map((s) => s.adapterId).filter((a) => a)).size);
    };
    const ids = ['r8-all', 'r4-mlp', 'r64-qv-rslora', 'r2-attn-named-keys'];
    const outs = await Promise.all(Array.from({ length: 12 }, (_, i) => collect(e, [1, 2, 3 + i], 6, ids[i % 4])));
    expect(maxDistinct).toBe(2);
    expect(outs.every((o) => o.length === 6)).toBe(true);
    await e.close();
  });
});

describe('constrained sequences waiting for their first grammar mask', () => {
  it('are passed over (keeping their place) while the requests behind them are admitted', async () => {
    const { PagingManager } = await import('../../server/engine/paging-manager.js');
    const { Scheduler } = await import('../../server/engine/scheduler.js');
    const { Sequence } = await import('../../server/engine/sequence.js');
    const { makeSamplingParams } = await import('../../server/engine/sampling-params.js');
    const sched = new Scheduler(new PagingManager(64, PAGE, 16), { maxNumSeqs: 8, maxBatchTokens: 256 });
    const constrained = new Sequence(1, [1, 2, 3], makeSamplingParams({ grammar: { key: 'k', spec: { kind: 'json_object' } } }), null, 0);
    const free = new Sequence(2, [4, 5], makeSamplingParams({}), null, 0);
    sched.add(constrained);
    sched.add(free);
    expect(sched.schedule().map((p) => p.seq.id)).toEqual([2]);
    expect(sched.waiting).toEqual([constrained]);
    constrained.grammar!.mask = new Int32Array(1).fill(-1); // its mask arrived
    expect(sched.schedule().map((p) => p.seq.id)).toContain(1);
    expect(sched.waiting).toEqual([]);
  });
});
