// Adapter tiers (disk -> host -> pool): prefetch of queued requests' adapters, skip-ahead past a
// request whose adapter is not ready (and its age bound), tier counters, host-tier bounds, LRU
// eviction, 2,000 adapters through a small pool, and loads that fail (files gone, truncated,
// replaced, failing halfway).
import { copyFileSync, cpSync, mkdtempSync, readFileSync, renameSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SeededRandom } from '../../server/demo/seeded-random.js';
import { Engine } from '../../server/engine/engine.js';
import { PagingManager } from '../../server/engine/paging-manager.js';
import { makeSamplingParams } from '../../server/engine/sampling-params.js';
import { Scheduler } from '../../server/engine/scheduler.js';
import { Sequence } from '../../server/engine/sequence.js';
import { writeRandomAdapter, type ModelDims } from '../helpers/adapters.js';
import { adapterRoot, modelDir } from '../helpers/fixtures.js';
import { startTestServer } from '../helpers/server.js';

const MODEL = modelDir('llama-gqa');
const DIMS: ModelDims = { hidden: 64, intermediate: 176, layers: 2, qDim: 64, kvDim: 32 };
const PAGE = 8192; // llama-gqa: 2 layers x K,V x 16 tokens x 2 kv heads x 16 dims x 4 bytes
const ALL = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'];

let dir: string;
beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'loraplex-tiers-'));
  for (let i = 0; i < 24; i++) await writeRandomAdapter(join(dir, `t${i}`), DIMS, { rank: 4, seed: 100 + i, targets: ALL });
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

async function collect(engine: Engine, prompt: number[], maxTokens: number, adapter: string | null = null): Promise<number[]> {
  const out: number[] = [];
  for await (const t of engine.generate(prompt, { maxTokens, temperature: 0, ignoreEos: true }, { adapter })) out.push(t.token);
  return out;
}

async function finish(seq: Sequence): Promise<number[]> {
  const toks: number[] = [];
  while (true) {
    const o = await seq.next();
    toks.push(...o.tokens.map((t) => t.token));
    if (o.finishReason) {
      if (o.error) throw o.error;
      return toks;
    }
  }
}

/** Waits until no adapter load is in flight. */
async function loadsSettled(e: Engine): Promise<void> {
  while (e.adapters.stats().loading > 0) await e.adapters.waitForProgress();
}

describe('prefetch', () => {
  it('loads the adapters of the first 2 x max-num-seqs queued requests, in arrival order, and no more', async () => {
    const e = await Engine.create({ model: MODEL, adapterDir: dir, memoryBudget: 400 * PAGE, maxNumSeqs: 2, maxLoras: 4 });
    // Two long base-model requests fill the running set; adapter requests queue behind them.
    const base = [e.submit([1, 2, 3], { maxTokens: 200, ignoreEos: true }), e.submit([4, 5, 6], { maxTokens: 200, ignoreEos: true })];
    const queued = Array.from({ length: 10 }, (_, i) => e.submit([7, 8, i], { maxTokens: 2, ignoreEos: true }, { adapter: `t${i}` }));
    while (e.scheduler.running.length < 2) await base[0].next();
    await loadsSettled(e);
    // window = 2 x max-num-seqs = 4 requests behind the running ones
    const host = (i: number) => e.adapters.lookup(`t${i}`)!.parsed !== null;
    expect(Array.from({ length: 10 }, (_, i) => host(i))).toEqual([true, true, true, true, false, false, false, false, false, false]);
    expect(e.adapters.stats().tierLoads.disk).toBe(4);
    for (const s of base) e.abort(s);
    await Promise.all(queued.map(finish));
    // every one of them was loaded once, and found in host memory or the pool at admission
    const st = e.adapters.stats();
    expect(st.tierLoads.disk).toBe(10);
    expect(st.lookups.miss + st.lookups.host_hit + st.lookups.pool_hit).toBe(10);
    expect(st.lookups.host_hit).toBeGreaterThanOrEqual(4);
    await e.close();
  });

  it('keeps adapters of queued requests in host memory beyond --max-cpu-loras only for the oldest one', async () => {
    const e = await Engine.create({ model: MODEL, adapterDir: dir, memoryBudget: 400 * PAGE, maxNumSeqs: 1, maxLoras: 2, maxCpuLoras: 2 });
    const base = e.submit([1, 2, 3], { maxTokens: 200, ignoreEos: true });
    const queued = Array.from({ length: 6 }, (_, i) => e.submit([7, 8, i], { maxTokens: 2, ignoreEos: true }, { adapter: `t${i}` }));
    while (e.scheduler.running.length < 1) await base.next();
    await loadsSettled(e);
    expect(e.adapters.stats().hostCached).toBe(2);
    e.abort(base);
    await Promise.all(queued.map(finish));
    await e.idle();
    expect(e.adapters.stats().hostCached).toBeLessThanOrEqual(2);
    expect(e.adapters.stats().hostEvictions).toBeGreaterThan(0);
    await e.close();
  });
});

describe('skip-ahead', () => {
  // One slot: t0 pinned by running requests, so a request on t1 cannot be installed. Requests on
  // t0 keep arriving behind it.
  async function scenario(skipAheadMs: number) {
    const e = await Engine.create({ model: MODEL, adapterDir: dir, memoryBudget: 400 * PAGE, maxNumSeqs: 3, maxLoras: 1, loraSkipAheadMs: skipAheadMs });
    await e.adapters.loadNow('t0');
    await e.adapters.loadNow('t1');
    const first = e.submit([1, 2], { maxTokens: 30, ignoreEos: true }, { adapter: 't0' });
    while (e.scheduler.running.length < 1) await first.next();
    const head = e.submit([3, 4], { maxTokens: 4, ignoreEos: true }, { adapter: 't1' });
    let headPassedSince: number | null = null;
    e.onStep = () => {
      if (head.passedOverSince !== null) headPassedSince ??= head.passedOverSince;
    };
    const behind: Sequence[] = [];
    const feeder = (async () => {
      // a steady stream of t0 requests for up to ~3 s, stopping once the head is admitted
      for (let k = 0; k < 600 && head.admittedAt === null && !head.isFinished; k++) {
        behind.push(e.submit([5, k % 500], { maxTokens: 60, ignoreEos: true }, { adapter: 't0' }));
        await new Promise((r) => setTimeout(r, 5));
      }
    })();
    await finish(head);
    await feeder;
    await Promise.all([first, ...behind].map(finish));
    await e.close();
    return { head, headPassedSince, behind };
  }

  it('admits later requests whose adapter is resident, but none more than --lora-skip-ahead-ms after passing one over', async () => {
    const bound = 300;
    const { head, headPassedSince, behind } = await scenario(bound);
    const ahead = behind.filter((s) => s.admittedAt! < head.admittedAt!);
    expect(ahead.length).toBeGreaterThan(0); // skip-ahead happened
    expect(headPassedSince).not.toBeNull();
    for (const s of ahead) expect(s.admittedAt! - headPassedSince!).toBeLessThanOrEqual(bound);
    expect(head.admittedAt! - headPassedSince!).toBeGreaterThanOrEqual(bound); // it was held back only as long as allowed
  }, 30_000);

  it('--lora-skip-ahead-ms 0 is strict FCFS: nobody submitted behind it runs first', async () => {
    const { head, behind } = await scenario(0);
    expect(behind.filter((s) => s.admittedAt! < head.admittedAt!)).toEqual([]);
  }, 30_000);

  it('waiting deep in the queue is not being passed over: the bound starts when someone behind it is admitted', async () => {
    const ready = new Set<number>();
    const sched = new Scheduler(new PagingManager(64, PAGE, 16), { maxNumSeqs: 2, maxBatchTokens: 512, skipAheadMs: 20 }, (q) => ready.has(q.id));
    const seq = (id: number) => new Sequence(id, [1, 2, 3], makeSamplingParams({ maxTokens: 4 }), `x${id}`, 0);
    const [a, b, c] = [seq(1), seq(2), seq(3)];
    ready.add(1);
    sched.add(a);
    sched.add(b); // not ready, nobody behind it
    expect(sched.schedule().map((p) => p.seq.id)).toEqual([1]);
    expect(b.passedOverSince).toBeNull();
    await new Promise((r) => setTimeout(r, 40)); // longer than the bound
    ready.add(3);
    sched.add(c);
    expect(sched.schedule().map((p) => p.seq.id)).toEqual([1, 3]); // b never was passed over before now
    expect(b.passedOverSince).toBe(c.admittedAt);
    await new Promise((r) => setTimeout(r, 40));
    sched.remove(a);
    sched.remove(c);
    const d = seq(4);
    ready.add(4);
    sched.add(d);
    expect(sched.schedule().map((p) => p.seq.id)).toEqual([]); // b has now been passed over too long: d waits
    ready.add(2);
    expect(sched.schedule().map((p) => p.seq.id)).toEqual([2, 4]);
  });

  it('a request behind one whose adapter is still loading runs first', async () => {
    const e = await Engine.create({ model: MODEL, adapterDir: dir, memoryBudget: 400 * PAGE, maxNumSeqs: 4 });
    const cold = e.submit([1, 2, 3], { maxTokens: 2, ignoreEos: true }, { adapter: 't5' });
    const base = e.submit([4, 5, 6], { maxTokens: 2, ignoreEos: true });
    await Promise.all([finish(cold), finish(base)]);
    expect(base.admittedAt!).toBeLessThan(cold.admittedAt!);
    await e.close();
  });
});

describe('tiers and their counters', () => {
  it('counts disk loads, host -> pool copies, and where each request found its adapter; evicts LRU', async () => {
    const e = await Engine.create({ model: MODEL, adapterDir: dir, memoryBudget: 400 * PAGE, maxLoras: 2 });
    const p = [9, 8, 7];
    const out = await collect(e, p, 3, 't10'); // miss: disk -> host -> pool
    expect(await collect(e, p, 3, 't10')).toEqual(out); // pool hit
    await collect(e, p, 3, 't11');
    await collect(e, p, 3, 't10'); // t10 is now the most recently used
    await collect(e, p, 3, 't12'); // needs a slot: t11 (least recently used) goes
    const tier = (id: string) => e.adapters.lookup(id)!.tier;
    expect([tier('t10'), tier('t11'), tier('t12')]).toEqual(['pool', 'host', 'pool']);
    expect(await collect(e, p, 3, 't11')).toHaveLength(3); // host hit: copied back into the pool
    const st = e.adapters.stats();
    expect(st.tierLoads).toEqual({ disk: 3, host: 4 });
    expect(st.lookups).toEqual({ miss: 3, host_hit: 1, pool_hit: 2 });
    expect(st.evictions).toBe(2);
    await e.close();
  });

  it('serves the same tokens from every tier', async () => {
    const e = await Engine.create({ model: MODEL, adapterDir: dir, memoryBudget: 400 * PAGE, maxLoras: 1, maxCpuLoras: 1 });
    const p = [11, 12, 13, 14];
    const cold = await collect(e, p, 5, 't13');
    const resident = await collect(e, p, 5, 't13');
    await collect(e, p, 5, 't14'); // t13 out of the pool, and (max-cpu-loras 1) out of host memory
    expect(e.adapters.lookup('t13')!.tier).toBe('disk');
    const reloaded = await collect(e, p, 5, 't13');
    expect([resident, reloaded]).toEqual([cold, cold]);
    await e.close();
  });

  it('exposes the counters and the load-time histogram in /metrics', async () => {
    const srv = await startTestServer({ model: MODEL, adapterDir: dir, memoryBudget: 400 * PAGE });
    try {
      for (let k = 0; k < 2; k++) {
        const res = await fetch(`${srv.url}/v1/completions`, {
          method: 'POST', headers: { 'content-type': 'application/json' },
          body: JSON.stringify({ model: 't15', prompt: [1, 2, 3], max_tokens: 2, temperature: 0 }),
        });
        expect(res.status).toBe(200);
      }
      const text = await (await fetch(`${srv.url}/metrics`)).text();
      const value = (prefix: string) => Number(text.split('\n').find((l) => l.startsWith(prefix))?.split(' ').pop());
      expect(value('loraplex_adapter_loads_total{tier="disk"}')).toBe(1);
      expect(value('loraplex_adapter_loads_total{tier="host"}')).toBe(1);
      expect(value('loraplex_adapter_lookups_total{result="miss"}')).toBe(1);
      expect(value('loraplex_adapter_lookups_total{result="pool_hit"}')).toBe(1);
      expect(value('loraplex_adapter_load_seconds_count{tier="disk"}')).toBe(1);
      expect(value('loraplex_host_adapter_bytes')).toBeGreaterThan(0);
    } finally {
      await srv.close();
    }
  });
});

describe('loads that fail', () => {
  // A fresh --adapter-dir holding a copy of fixture adapter `src` as `id` (removed after the block).
  const temps: string[] = [];
  afterAll(() => temps.forEach((t) => rmSync(t, { recursive: true, force: true })));
  function adapterDirWith(src: string, id: string): string {
    const d = mkdtempSync(join(tmpdir(), 'loraplex-fail-'));
    temps.push(d);
    cpSync(join(dir, src), join(d, id), { recursive: true });
    return d;
  }

  it('files gone between registration and load: 404, nothing held; back again: the next request loads them', async () => {
    const d = adapterDirWith('t16', 'g');
    const e = await Engine.create({ model: MODEL, adapterDir: d, memoryBudget: 400 * PAGE });
    e.adapters.lookup('g'); // registered (found in --adapter-dir)...
    renameSync(join(d, 'g'), join(d, 'g.away')); // ...then gone before its first load
    const seq = e.submit([1, 2], { maxTokens: 2 }, { adapter: 'g' });
    await expect(finish(seq)).rejects.toMatchObject({ status: 404, code: 'model_not_found' });
    expect(e.paging.stats().adapterPages).toBe(0);
    renameSync(join(d, 'g.away'), join(d, 'g'));
    expect(await collect(e, [1, 2], 2, 'g')).toHaveLength(2);
    e.checkInvariants();
    await e.close();
  });

  it('a file truncated after registration: 400 invalid_adapter, others unaffected, the next request retries', async () => {
    const d = adapterDirWith('t17', 'x');
    const file = join(d, 'x', 'adapter_model.safetensors');
    const good = readFileSync(file);
    const e = await Engine.create({ model: MODEL, adapterDir: d, memoryBudget: 400 * PAGE });
    e.adapters.lookup('x'); // registered while whole
    truncateSync(file, good.length - 100);
    const other = collect(e, [3, 4], 4);
    const bad = e.submit([1, 2], { maxTokens: 2 }, { adapter: 'x' });
    await expect(finish(bad)).rejects.toMatchObject({ status: 400, code: 'invalid_adapter' });
    expect(await other).toHaveLength(4);
    expect(e.paging.stats().adapterPages).toBe(0);
    writeFileSync(file, good);
    expect(await collect(e, [1, 2], 2, 'x')).toHaveLength(2);
    e.checkInvariants();
    await e.close();
  });

  it('a load that fails halfway (a non-finite value in a late module) returns its host memory and holds no pages', async () => {
    const d = adapterDirWith('t18', 'h');
    const file = join(d, 'h', 'adapter_model.safetensors');
    const buf = readFileSync(file);
    // The last tensor's last float becomes NaN: every earlier module is converted first.
    buf.writeFloatLE(Number.NaN, buf.length - 4);
    writeFileSync(file, buf);
    const e = await Engine.create({ model: MODEL, adapterDir: d, memoryBudget: 400 * PAGE });
    const before = (e as unknown as { native: { adapterImageStats(): { liveBytes: number } } }).native.adapterImageStats().liveBytes;
    const bad = e.submit([1, 2], { maxTokens: 2 }, { adapter: 'h' });
    await expect(finish(bad)).rejects.toMatchObject({ status: 400, code: 'invalid_adapter', message: expect.stringMatching(/non-finite/) });
    const after = (e as unknown as { native: { adapterImageStats(): { liveBytes: number } } }).native.adapterImageStats().liveBytes;
    expect(after).toBe(before);
    expect(e.adapters.stats().hostBytes).toBe(0);
    expect(e.paging.stats().adapterPages).toBe(0);
    e.checkInvariants();
    await e.close();
  });

  it('a file replaced between registration and load: the new content is what runs, and the prefix cache tells them apart', async () => {
    const d = adapterDirWith('t19', 'r');
    const e = await Engine.create({ model: MODEL, adapterDir: d, memoryBudget: 400 * PAGE });
    const p = Array.from({ length: 40 }, (_, i) => (i * 7 + 3) % 500);
    const first = await collect(e, p, 4, 'r');
    await e.adapters.retire('r'); // out of host memory and the pool; its id stays findable
    // atomically replace the weights with t20's (same shapes) - a new inode
    copyFileSync(join(dir, 't20', 'adapter_model.safetensors'), join(d, 'r', 'new.safetensors'));
    renameSync(join(d, 'r', 'new.safetensors'), join(d, 'r', 'adapter_model.safetensors'));
    const seq = e.submit(p, { maxTokens: 4, temperature: 0, ignoreEos: true }, { adapter: 'r' });
    const replaced = await finish(seq);
    expect(seq.cachedTokens).toBe(0);
    const ref = await Engine.create({ model: MODEL, adapterDir: dir, memoryBudget: 400 * PAGE });
    expect(replaced).toEqual(await collect(ref, p, 4, 't20'));
    expect(replaced).not.toEqual(first);
    await ref.close();
    await e.close();
  });
});

describe('2,000 adapters through a pool that holds a few dozen', () => {
  const big = mkdtempSync(join(tmpdir(), 'loraplex-2000-'));
  const N = 2000;
  beforeAll(async () => {
    for (let i = 0; i < N; i++)
      await writeRandomAdapter(join(big, `a${i}`), DIMS, { rank: 1 + (i % 4), seed: 5000 + i, std: 0.5, targets: i % 2 ? ['q_proj', 'v_proj'] : ['o_proj', 'down_proj'] });
  }, 120_000);
  afterAll(() => rmSync(big, { recursive: true, force: true }));

  it('every request equals its adapter run alone; no leak; LRU eviction among unpinned adapters', async () => {
    const rng = new SeededRandom(7, 'prompts');
    const ps = Array.from({ length: N }, () => Array.from({ length: 2 + Math.floor(rng.uniform() * 5) }, () => Math.floor(rng.uniform() * 590)));
    // Reference: each adapter alone on an engine with room for all of them (one request at a time).
    const alone = await Engine.create({ model: MODEL, adapterDir: big, memoryBudget: 3000 * PAGE, maxLoras: N, maxNumSeqs: 1 });
    const expected: number[][] = [];
    for (let i = 0; i < N; i++) expected.push(await collect(alone, ps[i], 2, `a${i}`));
    await alone.close();
    // Adapters must matter, or this would not test which adapter ran.
    expect(new Set(expected.map((x) => x.join(','))).size).toBeGreaterThan(N / 4);

    // 24 slots, a 40-page pool, host tier of 64: all 2,000 at once.
    const small = await Engine.create({ model: MODEL, adapterDir: big, memoryBudget: 40 * PAGE, maxLoras: 24, maxNumSeqs: 16, maxCpuLoras: 64 });
    let maxResident = 0;
    small.onStep = () => {
      small.checkInvariants();
      maxResident = Math.max(maxResident, small.adapters.stats().resident);
    };
    const got = await Promise.all(ps.map((p, i) => collect(small, p, 2, `a${i}`)));
    expect(got).toEqual(expected);
    const st = small.stats();
    expect(maxResident).toBeLessThanOrEqual(24);
    expect(st.adapters.hostCached).toBeLessThanOrEqual(64);
    expect(st.adapters.tierLoads.disk).toBe(N);
    expect(st.adapters.evictions).toBeGreaterThan(N - 30);
    expect(st.kvPages).toBe(0);
    small.checkInvariants();
    await small.close();
  }, 240_000);
});
