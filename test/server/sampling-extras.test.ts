// Sampling extras (issue #14) over HTTP: seeds anywhere in the signed 64-bit range (exact, even
// where a double cannot tell two apart; seed + k per choice wrapping in int64; out of range is a
// 400 stating the range) and OpenAI's logit_bias (applied in the C++ sampler before any other
// processing, per sequence in mixed batches; reported logprobs stay raw, as vLLM reports them).
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { modelDir } from '../helpers/fixtures.js';
import { startTestServer, type TestServer } from '../helpers/server.js';

const M = 'llama-gqa';
const RANGE = '[-9223372036854775808, 9223372036854775807]';

interface Choice {
  text: string;
  message?: { content: string };
  logprobs: { tokens: string[]; token_logprobs: number[]; top_logprobs: Array<Record<string, number>> } | null;
}

describe('seeds and logit_bias (llama-gqa)', () => {
  let srv: TestServer;
  /** POSTs a raw JSON text (so integer literals reach the server as written). */
  const raw = async (route: string, json: string) => {
    const res = await fetch(`${srv.url}/v1/${route}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: json });
    return { status: res.status, json: (await res.json()) as { choices: Choice[]; error?: { message: string; param: string | null } } };
  };
  const post = (route: string, body: Record<string, unknown>) => raw(route, JSON.stringify(body));
  /** A completion at temperature 1 with a seed written literally into the JSON text. */
  const seeded = (seed: string, extra = '') =>
    raw('completions', `{"model":"${M}","prompt":"Once upon a time","max_tokens":12,"temperature":1,"ignore_eos":true${extra},"seed":${seed}}`);
  const text = async (seed: string, extra = '') => {
    const r = await seeded(seed, extra);
    expect(r.status, JSON.stringify(r.json)).toBe(200);
    return r.json.choices.map((c) => c.text);
  };

  beforeAll(async () => {
    srv = await startTestServer({ model: modelDir(M) });
  });
  afterAll(async () => srv?.close());

  describe('seed', () => {
    it('accepts any int64 seed and samples the same text for the same seed at temperature 1', async () => {
      for (const s of ['9007199254740992', '9223372036854775807', '-9223372036854775808', '-1', '0']) {
        const a = await text(s);
        expect(await text(s), `seed ${s}`).toEqual(a);
      }
      const chat = (seed: string) =>
        raw('chat/completions', `{"model":"${M}","messages":[{"role":"user","content":"Hi"}],"max_tokens":8,"temperature":1,"seed":${seed}}`);
      const c1 = await chat('-9223372036854775808');
      expect(c1.status).toBe(200);
      expect((await chat('-9223372036854775808')).json.choices[0].message!.content).toBe(c1.json.choices[0].message!.content);
    });

    it('keeps seeds apart that one double cannot tell apart', async () => {
      // 2^63 - 1 and 2^63 - 2 parse to the same double (2^63), as do 2^53 and 2^53 + 1.
      expect(await text('9223372036854775807')).not.toEqual(await text('9223372036854775806'));
      expect(await text('9007199254740993')).not.toEqual(await text('9007199254740992'));
      expect(await text('-1')).not.toEqual(await text('1'));
    });

    it('gives choice k the seed + k, wrapping in int64', async () => {
      const [c0, c1] = await text('9223372036854775807', ',"n":2');
      expect(c0).toEqual((await text('9223372036854775807'))[0]);
      expect(c1).toEqual((await text('-9223372036854775808'))[0]);
    });

    it('samples the same with a large seed whatever else shares the batch', async () => {
      const alone = await text('-4611686018427387905');
      const crowd = await Promise.all([text('-4611686018427387905'), text('17'), text('9223372036854775000'), text('-4611686018427387905')]);
      expect(crowd[0]).toEqual(alone);
      expect(crowd[3]).toEqual(alone);
    });

    it('refuses seeds outside the int64 range with a 400 that states the range', async () => {
      for (const s of ['9223372036854775808', '-9223372036854775809', '18446744073709551616', '1e19', '-1e300']) {
        for (const r of [await seeded(s), await raw('chat/completions', `{"model":"${M}","messages":[{"role":"user","content":"Hi"}],"seed":${s}}`)]) {
          expect(r.status, `seed ${s}`).toBe(400);
          expect(r.json.error!.param).toBe('seed');
          expect(r.json.error!.message).toContain(RANGE);
        }
      }
      const frac = await seeded('1.5');
      expect(frac.status).toBe(400);
      expect(frac.json.error!.param).toBe('seed');
    });
  });

  describe('logit_bias', () => {
    let prompt: number[];
    let top: Array<[number, number]>; // unbiased step-0 alternatives [id, raw logprob], best first
    let word: number; // a plain word token outside the top 5
    const str = (id: number) => srv.engine.tokenizer.decode([id], false);

    beforeAll(async () => {
      prompt = srv.engine.tokenizer.encode('Once upon a time');
      for await (const t of srv.engine.generate(prompt, { maxTokens: 1, temperature: 0, logprobs: 5 })) top = t.top!;
      const V = srv.engine.model.spec.vocabSize;
      word = Array.from({ length: V }, (_, i) => i).find((i) => /^ [a-z]{3,}$/.test(str(i)) && !top.some(([id]) => id === i))!;
      expect(word).toBeDefined();
    });

    const completion = (extra: Record<string, unknown>) =>
      post('completions', { model: M, prompt, max_tokens: 6, temperature: 0, ignore_eos: true, ...extra });

    it('forces a token with +100, at temperature 0 and 1', async () => {
      const forced = srv.engine.tokenizer.decode(new Array(6).fill(word), false);
      for (const extra of [{}, { temperature: 1, seed: 3 }, { temperature: 1 }, { temperature: 0.7, top_p: 0.9, top_k: 50, presence_penalty: 2 }]) {
        const r = await completion({ logit_bias: { [word]: 100 }, ...extra });
        expect(r.status, JSON.stringify(r.json)).toBe(200);
        expect(r.json.choices[0].text, JSON.stringify(extra)).toBe(forced);
      }
      const chat = await post('chat/completions', { model: M, messages: [{ role: 'user', content: 'Hi' }], max_tokens: 3, temperature: 1, logit_bias: { [String(word)]: 100 } });
      expect(chat.status).toBe(200);
      expect(chat.json.choices[0].message!.content).toBe(srv.engine.tokenizer.decode([word, word, word], false));
    });

    it('bans the greedy token with -100: greedy takes the runner-up', async () => {
      const plain = await completion({ max_tokens: 1, logprobs: 1 });
      expect(plain.json.choices[0].logprobs!.tokens[0]).toBe(str(top[0][0]));
      const r = await completion({ max_tokens: 1, logprobs: 1, logit_bias: { [top[0][0]]: -100 } });
      expect(r.status).toBe(200);
      expect(r.json.choices[0].logprobs!.tokens[0]).toBe(str(top[1][0]));
    });

    it('reports raw (unbiased) logprobs, as vLLM does', async () => {
      const r = await completion({ max_tokens: 1, logprobs: 2, logit_bias: { [top[1][0]]: 100 } });
      const lp = r.json.choices[0].logprobs!;
      expect(lp.tokens[0]).toBe(str(top[1][0]));
      expect(lp.token_logprobs[0]).toBeCloseTo(top[1][1], 4); // not ~0, which the biased distribution gives
      const alts = lp.top_logprobs[0];
      expect(alts[str(top[1][0])]).toBeCloseTo(top[1][1], 4);
      const chat = await post('chat/completions', { model: M, messages: [{ role: 'user', content: 'Hi' }], max_tokens: 1, temperature: 0, logprobs: true, logit_bias: { [word]: 100 } });
      const c = (chat.json.choices[0] as unknown as { logprobs: { content: Array<{ logprob: number }> } }).logprobs.content[0];
      expect(c.logprob).toBeLessThan(-0.5);
    });

    it('touches only the biased sequence in a mixed batch', async () => {
      const solo = await completion({ max_tokens: 8 });
      const soloSampled = await completion({ max_tokens: 8, temperature: 1, seed: 11 });
      let most = 0;
      srv.engine.onStep = () => (most = Math.max(most, srv.engine.lastStep.seqs));
      const [biased, unbiased, biasedSampled, unbiasedSampled] = await Promise.all([
        completion({ max_tokens: 8, logit_bias: { [word]: 100, [top[0][0]]: -100 } }),
        completion({ max_tokens: 8 }),
        completion({ max_tokens: 8, temperature: 1, seed: 11, logit_bias: { [word]: 100 } }),
        completion({ max_tokens: 8, temperature: 1, seed: 11 }),
      ]);
      srv.engine.onStep = null;
      expect(most).toBeGreaterThanOrEqual(2);
      expect(unbiased.json.choices[0].text).toBe(solo.json.choices[0].text);
      expect(unbiasedSampled.json.choices[0].text).toBe(soloSampled.json.choices[0].text);
      const forced = srv.engine.tokenizer.decode(new Array(8).fill(word), false);
      expect(biased.json.choices[0].text).toBe(forced);
      expect(biasedSampled.json.choices[0].text).toBe(forced);
      expect(solo.json.choices[0].text).not.toBe(forced);
    });

    it('accepts an empty or null logit_bias and a bias of 0 as no bias', async () => {
      const solo = await completion({});
      for (const logit_bias of [{}, null, { [word]: 0 }]) expect((await completion({ logit_bias })).json.choices[0].text).toBe(solo.json.choices[0].text);
    });

    it('refuses bad logit_bias with a 400 naming logit_bias', async () => {
      // 1,025 distinct keys, every one a token id of the vocabulary ("7" and "07" name the same id).
      const tooMany = Object.fromEntries(Array.from({ length: 1025 }, (_, i) => ['0'.repeat(Math.floor(i / 600)) + String(i % 600), 1]));
      const cases: Array<[unknown, RegExp?]> = [
        [{ x: 1 }], [{ '1.5': 1 }], [{ '': 1 }], [{ '-1': 1 }], [{ '600': 1 }], [{ '99999999999999999999': 1 }],
        [{ '5': 100.5 }], [{ '5': -101 }], [{ '5': '1' }], [{ '5': null }], [{ '5': [1] }], [[1, 2]], ['5'], [5],
        [Object.fromEntries(Array.from({ length: 1025 }, (_, i) => [String(i), 1]))], [tooMany, /1024/],
      ];
      for (const [logit_bias, msg] of cases) {
        for (const route of ['completions', 'chat/completions']) {
          const body = route === 'completions' ? { model: M, prompt: 'Hi', logit_bias } : { model: M, messages: [{ role: 'user', content: 'Hi' }], logit_bias };
          const r = await post(route, body);
          expect(r.status, `${route} ${JSON.stringify(logit_bias).slice(0, 60)}`).toBe(400);
          expect(r.json.error!.param).toBe('logit_bias');
          if (msg) expect(r.json.error!.message).toMatch(msg);
        }
      }
      expect(srv.engine.scheduler.waiting.length + srv.engine.scheduler.running.length).toBe(0);
    });
  });
});
