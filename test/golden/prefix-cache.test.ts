// Automatic prefix caching against HF/PEFT: every fixture's cases run twice, each prompt on the base
// model and on every adapter in the same mixed batch (so the base and the adapters share prompts),
// on an engine with the cache and one without. Both passes equal the golden greedy ids and
// logprobs; the second pass reports hits; outputs with and without the cache agree. Small blocks
// (4 tokens) so the short golden prompts have several full blocks to share.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Engine } from '../../server/engine/engine.js';
import type { Sequence, TokenEvent } from '../../server/engine/sequence.js';
import { adapterId, adapterRoot, loadGolden, MODEL_NAMES, modelDir, strictSteps, type GoldenCase } from '../helpers/fixtures.js';

const FP32 = { computeDtype: 'float32', kvCacheDtype: 'float32', loraDtype: 'float32' } as const;
const TOL = 1e-3;

interface Req {
  prompt: number[];
  adapter: string | null;
  golden: GoldenCase | null; // the fixture case this request is, if any
}

async function runAll(engine: Engine, reqs: Req[]): Promise<Array<{ toks: TokenEvent[]; seq: Sequence }>> {
  return Promise.all(
    reqs.map(async (r) => {
      const seq = engine.submit(r.prompt, { maxTokens: 12, temperature: 0, ignoreEos: true, logprobs: 1 }, { adapter: r.adapter });
      const toks: TokenEvent[] = [];
      for (;;) {
        const out = await seq.next();
        toks.push(...out.tokens);
        if (out.finishReason) {
          if (out.error) throw out.error;
          return { toks, seq };
        }
      }
    }),
  );
}

function checkGolden(c: GoldenCase, toks: TokenEvent[], pass: string): void {
  const n = Math.min(strictSteps(c), toks.length);
  const where = `${pass}: ${c.adapter ?? 'base'} / ${JSON.stringify(c.prompt)}`;
  expect(toks.slice(0, n).map((t) => t.token), where).toEqual(c.greedy_ids.slice(0, n));
  for (let i = 0; i < n; i++) expect(Math.abs(toks[i].logprob - c.steps[i].top[0][1]), `${where} step ${i}`).toBeLessThan(TOL);
}

describe.each(MODEL_NAMES)('%s', (name) => {
  const golden = loadGolden(name);
  const adapters = [...new Set(golden.cases.map((c) => (c.adapter ? adapterId(c.adapter) : null)).filter((a): a is string => a !== null))];
  // Every distinct prompt on the base and on every adapter; the golden cases are among them.
  const reqs: Req[] = [];
  for (const prompt of [...new Map(golden.cases.map((c) => [c.prompt_ids.join(','), c.prompt_ids])).values()])
    for (const adapter of [null, ...adapters])
      reqs.push({ prompt, adapter, golden: golden.cases.find((c) => c.prompt_ids.join(',') === prompt.join(',') && (c.adapter ? adapterId(c.adapter) : null) === adapter) ?? null });
  let cached: Engine;
  let plain: Engine;

  beforeAll(async () => {
    const opts = { ...FP32, model: modelDir(name), adapterDir: adapterRoot(name), memoryBudget: 8 << 20, blockSize: 4 };
    cached = await Engine.create({ ...opts, enablePrefixCaching: true });
    plain = await Engine.create({ ...opts, enablePrefixCaching: false });
  });
  afterAll(async () => {
    await cached?.close();
    await plain?.close();
  });

  it('both passes equal HF/PEFT, the second hits the cache, and outputs equal the uncached engine', async () => {
    expect(reqs.filter((r) => r.golden).length).toBe(golden.cases.length);
    const reference = await runAll(plain, reqs);
    const first = await runAll(cached, reqs);
    const hitsAfterFirst = cached.prefix.stats().hits;
    const second = await runAll(cached, reqs);
    reqs.forEach((r, i) => {
      if (r.golden) {
        checkGolden(r.golden, first[i].toks, 'first pass');
        checkGolden(r.golden, second[i].toks, 'second pass');
      }
      const ids = reference[i].toks.map((t) => t.token);
      expect(first[i].toks.map((t) => t.token)).toEqual(ids);
      expect(second[i].toks.map((t) => t.token)).toEqual(ids);
      second[i].toks.forEach((t, k) => expect(Math.abs(t.logprob - reference[i].toks[k].logprob)).toBeLessThan(1e-5));
      // Second pass: every full block before the last token is a hit (its own first-pass blocks).
      expect(second[i].seq.cachedTokens, `${r.adapter ?? 'base'} ${r.prompt.length} tokens`).toBe(Math.floor((r.prompt.length - 1) / 4) * 4);
    });
    expect(cached.prefix.stats().hits).toBeGreaterThan(hitsAfterFirst);
    // The base model and the adapters never share blocks: within a pass, nothing hits across them.
    const byPrompt = new Map<string, number>();
    for (const f of first) byPrompt.set(f.seq.promptIds.join(','), (byPrompt.get(f.seq.promptIds.join(',')) ?? 0) + f.seq.cachedTokens);
    expect([...byPrompt.values()].every((n) => n === 0)).toBe(true);
    cached.checkInvariants();
    expect(plain.paging.stats().prefixPages).toBe(0);
  });
});
