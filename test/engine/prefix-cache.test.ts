// The prefix cache's policy: keys by adapter content and cache_salt, one LRU with adapters, drops
// on unload and replace, prompt logprobs never skip positions, and what /metrics and usage report.
import { cpSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Engine } from '../../server/engine/engine.js';
import type { Sequence } from '../../server/engine/sequence.js';
import { writeRandomAdapter } from '../helpers/adapters.js';
import { adapterRoot, modelDir } from '../helpers/fixtures.js';
import { startTestServer, type TestServer } from '../helpers/server.js';

const M = 'llama-gqa';
const DIMS = { hidden: 64, intermediate: 176, layers: 2, qDim: 64, kvDim: 32 };
const PROMPT = Array.from({ length: 40 }, (_, i) => 10 + ((i * 37) % 500)); // 2 full blocks of 16 before the last token

let tmp: string;
beforeAll(() => {
  tmp = mkdtempSync(join(tmpdir(), 'loraplex-prefix-'));
});
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

async function finish(seq: Sequence): Promise<number[]> {
  const ids: number[] = [];
  for (;;) {
    const out = await seq.next();
    ids.push(...out.tokens.map((t) => t.token));
    if (out.finishReason) {
      if (out.error) throw out.error;
      return ids;
    }
  }
}

const greedy = { maxTokens: 4, temperature: 0, ignoreEos: true };

describe('keys', () => {
  let e: Engine;
  let dir: string;
  beforeAll(async () => {
    dir = join(tmp, 'adapters-keys');
    cpSync(adapterRoot(M), dir, { recursive: true });
    e = await Engine.create({ model: modelDir(M), adapterDir: dir, memoryBudget: 8 << 20 });
  });
  afterAll(async () => e?.close());

  it('a prefix computed by the base model is never handed to an adapter request, nor the reverse', async () => {
    const a = e.submit(PROMPT, greedy);
    await finish(a);
    expect(a.cachedTokens).toBe(0);
    for (const adapter of ['r8-all', 'r4-mlp']) {
      const s = e.submit(PROMPT, greedy, { adapter });
      await finish(s);
      expect(s.cachedTokens, adapter).toBe(0);
    }
    const again = e.submit(PROMPT, greedy, { adapter: 'r8-all' });
    await finish(again);
    expect(again.cachedTokens).toBe(32);
    const base = e.submit(PROMPT, greedy);
    await finish(base);
    expect(base.cachedTokens).toBe(32);
    e.checkInvariants();
  });

  it('cache_salt isolates: equal salts share, different salts (or none) do not', async () => {
    const p = PROMPT.map((t) => (t + 3) % 590);
    const a = e.submit(p, greedy, { cacheSalt: 'tenant-a' });
    await finish(a);
    const b = e.submit(p, greedy, { cacheSalt: 'tenant-b' });
    await finish(b);
    const none = e.submit(p, greedy);
    await finish(none);
    const a2 = e.submit(p, greedy, { cacheSalt: 'tenant-a' });
    await finish(a2);
    expect([a.cachedTokens, b.cachedTokens, none.cachedTokens, a2.cachedTokens]).toEqual([0, 0, 0, 32]);
  });

  it('an adapter replaced under the same id never reuses the old KV, and its blocks go on unload', async () => {
    const p = PROMPT.map((t) => (t + 7) % 590);
    const first = e.submit(p, greedy, { adapter: 'r4-mlp' });
    const before = await finish(first);
    const cachedBefore = e.paging.stats().prefixPages;
    expect(cachedBefore).toBeGreaterThan(0);
    await e.adapters.retire('r4-mlp');
    // its unreferenced cached blocks were dropped with it
    expect(e.paging.stats().prefixPages).toBeLessThan(cachedBefore);
    // replace the files with other weights (same id, same shapes)
    rmSync(join(dir, 'r4-mlp'), { recursive: true });
    await writeRandomAdapter(join(dir, 'r4-mlp'), DIMS, { rank: 4, seed: 99, targets: ['gate_proj', 'up_proj', 'down_proj'] });
    const replaced = e.submit(p, greedy, { adapter: 'r4-mlp' });
    const after = await finish(replaced);
    expect(replaced.cachedTokens).toBe(0);
    expect(after).not.toEqual(before);
    // ...and the new content is cached under its own digest
    const again = e.submit(p, greedy, { adapter: 'r4-mlp' });
    expect(await finish(again)).toEqual(after);
    expect(again.cachedTokens).toBe(32);
    e.checkInvariants();
  });

  it('prompt logprobs never skip cached positions, and equal the uncached ones', async () => {
    const p = PROMPT.map((t) => (t + 11) % 590);
    const lp = { maxTokens: 0, promptLogprobs: 1, temperature: 0 };
    const a = e.submit(p, lp);
    await finish(a);
    const b = e.submit(p, lp);
    await finish(b);
    expect(b.cachedTokens).toBe(0);
    expect(b.promptLogprobs.filter(Boolean)).toHaveLength(p.length - 1);
    b.promptLogprobs.forEach((x, i) => i > 0 && expect(Math.abs(x!.logprob - a.promptLogprobs[i]!.logprob)).toBeLessThan(1e-5));
    // its blocks were still cached for others
    const c = e.submit(p, greedy);
    await finish(c);
    expect(c.cachedTokens).toBe(32);
  });
});

describe('chunked prefill', () => {
  it('a hit followed by a prefill cut into 5-token chunks gives the uncached output', async () => {
    const opts = { model: modelDir(M), adapterDir: adapterRoot(M), memoryBudget: 8 << 20, maxBatchTokens: 5 };
    const on = await Engine.create({ ...opts, enablePrefixCaching: true });
    const off = await Engine.create({ ...opts, enablePrefixCaching: false });
    try {
      for (const adapter of [null, 'r8-all']) {
        const long = [...PROMPT, ...PROMPT.slice(0, 13)];
        const want = await finish(off.submit(long, { ...greedy, maxTokens: 8 }, { adapter }));
        await finish(on.submit(PROMPT, greedy, { adapter })); // caches the first 32 tokens
        const s = on.submit(long, { ...greedy, maxTokens: 8 }, { adapter });
        expect(await finish(s)).toEqual(want);
        expect(s.cachedTokens).toBe(32);
        on.checkInvariants();
      }
    } finally {
      await on.close();
      await off.close();
    }
  });
});

describe('one memory policy with adapters', () => {
  it('cached blocks are reclaimed LRU with unpinned adapters when KV needs room, and requests still fit', async () => {
    // 24 pages: one 40-token sequence needs 3 KV pages.
    const e = await Engine.create({ model: modelDir(M), adapterDir: adapterRoot(M), memoryBudget: 24 * 8192, maxNumSeqs: 4 });
    try {
      const outs: number[][] = [];
      for (let i = 0; i < 12; i++) {
        const p = PROMPT.map((t) => (t + 13 * i) % 590);
        outs.push(await finish(e.submit(p, greedy, { adapter: i % 3 === 0 ? 'r8-all' : null })));
        e.checkInvariants();
      }
      const st = e.stats();
      expect(st.prefixPages + st.freePages + st.adapterPages).toBe(st.totalPages);
      expect(st.prefixCache.reclaimablePages).toBe(st.prefixPages);
      // Twelve prompts' blocks (24 cached pages) cannot all stay: the oldest went first.
      expect(st.prefixPages).toBeLessThan(24);
      const newest = e.submit(PROMPT.map((t) => (t + 13 * 11) % 590), greedy);
      await finish(newest);
      expect(newest.cachedTokens).toBe(32);
      const oldest = e.submit(PROMPT.map((t) => (t + 13 * 1) % 590), greedy);
      await finish(oldest);
      expect(oldest.cachedTokens).toBe(0);
    } finally {
      await e.close();
    }
  });

  it('with --no-enable-prefix-caching nothing is cached and nothing hits', async () => {
    const e = await Engine.create({ model: modelDir(M), memoryBudget: 8 << 20, enablePrefixCaching: false });
    try {
      await finish(e.submit(PROMPT, greedy));
      const s = e.submit(PROMPT, greedy);
      await finish(s);
      expect(s.cachedTokens).toBe(0);
      expect(e.paging.stats().prefixPages).toBe(0);
      expect(e.stats().prefixCache.queries).toBe(80);
    } finally {
      await e.close();
    }
  });
});

describe('metrics and usage', () => {
  let srv: TestServer;
  beforeAll(async () => {
    srv = await startTestServer({ model: modelDir(M), adapterDir: adapterRoot(M) });
  });
  afterAll(async () => srv?.close());

  const scrape = async () => (await (await fetch(`${srv.url}/metrics`)).text());
  const value = (text: string, series: string) => {
    const line = text.split('\n').find((l) => l.startsWith(series + ' ') || l.startsWith(series + '{'));
    return line ? Number(line.split(' ').pop()) : NaN;
  };

  it('reports cached_tokens, hit counters in tokens, pool composition, and an idle pool as unused', async () => {
    const body = { model: 'r8-all', prompt: PROMPT, max_tokens: 2, cache_salt: 'm' };
    const post = () => fetch(`${srv.url}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
    const u1 = ((await (await post()).json()) as { usage: { prompt_tokens_details: { cached_tokens: number } } }).usage;
    const u2 = ((await (await post()).json()) as { usage: { prompt_tokens_details: { cached_tokens: number } } }).usage;
    expect(u1.prompt_tokens_details.cached_tokens).toBe(0);
    expect(u2.prompt_tokens_details.cached_tokens).toBe(32);
    const m = await scrape();
    expect(value(m, 'vllm:prefix_cache_queries_total')).toBeGreaterThanOrEqual(80);
    expect(value(m, 'vllm:prefix_cache_hits_total')).toBeGreaterThanOrEqual(32);
    expect(value(m, 'loraplex_pool_pages{kind="prefix_cache"}')).toBeGreaterThan(0);
    expect(value(m, 'loraplex_pool_pages{kind="adapter"}')).toBeGreaterThan(0);
    // Idle: cached prefixes and the unpinned adapter are reclaimable, so nothing counts as used.
    expect(value(m, 'vllm:kv_cache_usage_perc{model_name="llama-gqa"}')).toBe(0);
    const bad = await fetch(`${srv.url}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ ...body, cache_salt: '' }) });
    expect(bad.status).toBe(400);
    expect(((await bad.json()) as { error: { param: string } }).error.param).toBe('cache_salt');
  });
});
