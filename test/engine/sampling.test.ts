// Sampling semantics on the demo model (readable, loops under greedy): seeds, top-k/top-p/min-p,
// penalties, min_tokens, logprobs, and incremental detokenisation.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureDemoModel } from '../../server/demo/demo-model.js';
import { Engine } from '../../server/engine/engine.js';
import type { SamplingParams } from '../../server/engine/sampling-params.js';
import { IncrementalDecoder } from '../../server/engine/tokenizer.js';
import { modelDir } from '../helpers/fixtures.js';

let engine: Engine;
let prompt: number[];

async function gen(params: Partial<SamplingParams>, adapter: string | null = null): Promise<number[]> {
  const out: number[] = [];
  for await (const t of engine.generate(prompt, { maxTokens: 24, ignoreEos: true, ...params }, { adapter })) out.push(t.token);
  return out;
}

beforeAll(async () => {
  const demo = await ensureDemoModel();
  engine = await Engine.create({ model: demo.modelDir, adapterDir: demo.adapterDir, memoryBudget: 64 << 20 });
  prompt = engine.tokenizer.encode('In the morning the');
});
afterAll(async () => engine?.close());

describe('sampling', () => {
  it('is reproducible with a seed, whatever else shares the batch', async () => {
    const alone = await gen({ temperature: 0.9, seed: 7 });
    const crowd = await Promise.all([gen({ temperature: 0.9, seed: 7 }), gen({ temperature: 1, seed: 1 }), gen({ temperature: 0 }), gen({ temperature: 0.9, seed: 7 }, 'pirate')]);
    expect(crowd[0]).toEqual(alone);
    const others = await Promise.all([1, 2, 3, 4].map((s) => gen({ temperature: 1, seed: s })));
    expect(new Set(others.map((o) => o.join(','))).size).toBeGreaterThan(1);
  });

  it('samples at temperature 1 with the model\'s own probabilities', async () => {
    const first: Array<{ token: number; top: Array<[number, number]> | null }> = [];
    for await (const t of engine.generate(prompt, { maxTokens: 1, temperature: 0, logprobs: 3 })) first.push(t);
    const [[id0, lp0], [id1, lp1]] = first[0].top!;
    const N = 400;
    const draws = await Promise.all(Array.from({ length: N }, (_, s) => gen({ temperature: 1, seed: 1000 + s, maxTokens: 1 })));
    for (const [id, lp] of [[id0, lp0], [id1, lp1]]) {
      const p = Math.exp(lp);
      const freq = draws.filter((d) => d[0] === id).length / N;
      expect(Math.abs(freq - p), `token ${id}: p=${p.toFixed(3)} freq=${freq.toFixed(3)}`).toBeLessThan(4 * Math.sqrt((p * (1 - p)) / N) + 1e-3);
    }
  });

  it('top_k 1, a tiny top_p and min_p 1 all reduce to greedy', async () => {
    const greedy = await gen({ temperature: 0 });
    expect(await gen({ temperature: 1, topK: 1, seed: 3 })).toEqual(greedy);
    expect(await gen({ temperature: 1, topP: 1e-6, seed: 3 })).toEqual(greedy);
    expect(await gen({ temperature: 1, minP: 1, seed: 3 })).toEqual(greedy);
  });

  it('penalties break the greedy loop', async () => {
    const greedy = await gen({ temperature: 0 });
    const distinct = (xs: number[]) => new Set(xs).size;
    const freq = await gen({ temperature: 0, frequencyPenalty: 2 });
    const pres = await gen({ temperature: 0, presencePenalty: 2 });
    const rep = await gen({ temperature: 0, repetitionPenalty: 2 });
    for (const o of [freq, pres, rep]) {
      expect(o).not.toEqual(greedy);
      expect(distinct(o)).toBeGreaterThan(distinct(greedy));
    }
  });

  it('reports the chosen token first among the top logprobs under greedy', async () => {
    const evs = [];
    for await (const t of engine.generate(prompt, { maxTokens: 5, temperature: 0, logprobs: 4 })) evs.push(t);
    for (const e of evs) {
      expect(e.top).toHaveLength(4);
      expect(e.top![0][0]).toBe(e.token);
      expect(e.logprob).toBeCloseTo(e.top![0][1], 6);
      const probs = e.top!.map(([, lp]) => Math.exp(lp));
      expect(probs.reduce((a, b) => a + b)).toBeLessThanOrEqual(1 + 1e-5);
    }
  });

  it('suppresses EOS until min_tokens and stops on stop_token_ids after it', async () => {
    const greedy = await gen({ temperature: 0 });
    const stopId = greedy[2];
    const stopped = await gen({ temperature: 0, stopTokenIds: [stopId] });
    expect(stopped).toEqual(greedy.slice(0, 3));
    const later = await gen({ temperature: 0, stopTokenIds: [stopId], minTokens: 5 });
    expect(later.length).toBeGreaterThan(5);
    expect(later.slice(0, 5)).toEqual(greedy.slice(0, 5));
  });
});

describe('incremental detokenisation', () => {
  it('never splits a multi-byte character and concatenates to the full decode', async () => {
    const e = await Engine.create({ model: modelDir('llama-gqa') });
    try {
      const text = 'café naïve 日本 🎉 ok';
      const ids = e.tokenizer.encode(text, false);
      const dec = new IncrementalDecoder(e.tokenizer);
      const parts = ids.map((id) => dec.push([id]));
      parts.push(dec.flush());
      for (const p of parts) expect(p).not.toContain('\uFFFD');
      expect(parts.join('')).toBe(text);
      expect(parts.filter((p) => p === '').length).toBeGreaterThan(0); // some tokens held back
    } finally {
      await e.close();
    }
  });
});
