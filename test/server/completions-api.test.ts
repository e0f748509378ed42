// Completions and chat as evaluation harnesses and the openai client use them: prompt logprobs
// (echo + logprobs, vLLM's prompt_logprobs), max_tokens defaults, and usage on streamed chunks.
// Real HTTP, the official openai client where it can express the request.
import { cpSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { adapterRoot, loadGolden, modelDir } from '../helpers/fixtures.js';
import { startTestServer, type TestServer } from '../helpers/server.js';

const M = 'llama-gqa';
const FP32 = { computeDtype: 'float32', kvCacheDtype: 'float32', loraDtype: 'float32' } as const;
const golden = loadGolden(M);
const ADAPTER = 'r8-all';

let srv: TestServer;
let chunked: TestServer;
let client: OpenAI;
let tmp: string;

beforeAll(async () => {
  tmp = mkdtempSync(join(tmpdir(), 'loraplex-cmpl-api-'));
  srv = await startTestServer({ model: modelDir(M), adapterDir: adapterRoot(M), ...FP32 }, ['--max-n', '8']);
  // The same model with prefill cut into 7-token chunks: prompt logprobs must not depend on it.
  chunked = await startTestServer({ model: modelDir(M), adapterDir: adapterRoot(M), ...FP32, maxBatchTokens: 7 });
  client = new OpenAI({ baseURL: `${srv.url}/v1`, apiKey: 'unused' });
});
afterAll(async () => {
  await srv?.close();
  await chunked?.close();
  rmSync(tmp, { recursive: true, force: true });
});

const post = (url: string, path: string, body: unknown) =>
  fetch(`${url}${path}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });

describe('prompt logprobs', () => {
  it('echo + logprobs covers the prompt (first null) then the generation, with top-N plus the token itself', async () => {
    const c = golden.cases[0];
    const r = await client.completions.create({ model: M, prompt: c.prompt_ids, echo: true, logprobs: 3, max_tokens: 2, temperature: 0 });
    const lp = r.choices[0].logprobs!;
    const P = c.prompt_ids.length;
    expect(lp.tokens).toHaveLength(P + 2);
    expect(lp.token_logprobs![0]).toBeNull();
    expect(lp.top_logprobs![0]).toBeNull();
    for (let i = 1; i < P + 2; i++) {
      expect(typeof lp.token_logprobs![i]).toBe('number');
      const top = lp.top_logprobs![i]!;
      // the token's own logprob is among the entries, and no entry beats the top one
      expect(Object.values(top)).toContain(lp.token_logprobs![i]);
      expect(Object.keys(top).length).toBeGreaterThanOrEqual(3);
      expect(Object.keys(top).length).toBeLessThanOrEqual(4);
    }
    // the generated tokens are the golden greedy ones, scored as the sampler reports them
    expect(lp.token_logprobs![P]).toBeCloseTo(c.steps[0].top[0][1], 3);
    expect(lp.text_offset).toHaveLength(P + 2);
    expect([...lp.text_offset!].sort((a, b) => a - b)).toEqual(lp.text_offset);
    expect(r.choices[0].text.length).toBeGreaterThan(0);
  });

  it('teacher-forced prompt logprobs equal the golden greedy logprobs (base and adapters, one batch)', async () => {
    const cases = golden.cases.slice(0, 6);
    const results = await Promise.all(
      cases.map((c) =>
        client.completions.create({
          model: c.adapter ? c.adapter.split('/').pop()! : M,
          prompt: [...c.prompt_ids, ...c.greedy_ids.slice(0, 8)],
          echo: true,
          logprobs: 1,
          max_tokens: 0,
        }),
      ),
    );
    results.forEach((r, k) => {
      const c = cases[k];
      const lps = r.choices[0].logprobs!.token_logprobs!;
      expect(lps).toHaveLength(c.prompt_ids.length + 8); // max_tokens 0: the prompt only
      for (let i = 0; i < 8; i++) expect(Math.abs(lps[c.prompt_ids.length + i]! - c.steps[i].top[0][1])).toBeLessThan(1e-3);
      expect(r.choices[0].finish_reason).toBe('length');
      expect(r.usage!.completion_tokens).toBe(0);
    });
  });

  it("vLLM's prompt_logprobs: null first, then {id: {logprob, rank, decoded_token}} including the prompt token", async () => {
    const c = golden.cases.find((x) => x.adapter !== null)!;
    const res = await post(srv.url, '/v1/completions', { model: c.adapter!.split('/').pop(), prompt: c.prompt_ids, max_tokens: 1, prompt_logprobs: 2, temperature: 0 });
    expect(res.status).toBe(200);
    const j = (await res.json()) as { choices: Array<{ prompt_logprobs: Array<Record<string, { logprob: number; rank: number; decoded_token: string }> | null> }> };
    const pl = j.choices[0].prompt_logprobs;
    expect(pl).toHaveLength(c.prompt_ids.length);
    expect(pl[0]).toBeNull();
    for (let i = 1; i < pl.length; i++) {
      const e = pl[i]!;
      const own = e[String(c.prompt_ids[i])];
      expect(own, `position ${i}`).toBeDefined();
      expect(own.rank).toBeGreaterThanOrEqual(1);
      const ranks = Object.values(e).map((x) => x.rank);
      expect(ranks).toContain(1);
      for (const x of Object.values(e)) expect(x.logprob).toBeLessThanOrEqual(0);
    }
  });

  it('echo logprobs and prompt_logprobs of different sizes each keep their own size', async () => {
    const res = await post(srv.url, '/v1/completions', { model: M, prompt: golden.cases[0].prompt_ids, max_tokens: 1, echo: true, logprobs: 5, prompt_logprobs: 2, temperature: 0 });
    const j = (await res.json()) as { choices: Array<{ logprobs: { top_logprobs: Array<Record<string, number> | null> }; prompt_logprobs: Array<Record<string, unknown> | null> }> };
    const ch = j.choices[0];
    for (const e of ch.prompt_logprobs.slice(1)) expect(Object.keys(e!).length).toBeLessThanOrEqual(3);
    // (byte tokens that decode to the same string share a key, so some positions show fewer)
    expect(Math.max(...ch.logprobs.top_logprobs.slice(1).map((e) => Object.keys(e!).length))).toBeGreaterThanOrEqual(5);
  });

  it('chunked prefill gives the same prompt logprobs as one chunk', async () => {
    const prompt = golden.cases.flatMap((c) => c.prompt_ids).slice(0, 40);
    const body = { model: ADAPTER, prompt, echo: true, logprobs: 2, max_tokens: 0 };
    const [a, b] = await Promise.all([post(srv.url, '/v1/completions', body), post(chunked.url, '/v1/completions', body)]);
    const la = ((await a.json()) as { choices: Array<{ logprobs: { token_logprobs: Array<number | null> } }> }).choices[0].logprobs.token_logprobs;
    const lb = ((await b.json()) as { choices: Array<{ logprobs: { token_logprobs: Array<number | null> } }> }).choices[0].logprobs.token_logprobs;
    expect(la).toHaveLength(40);
    expect(lb).toHaveLength(40);
    for (let i = 1; i < 40; i++) expect(Math.abs(la[i]! - lb[i]!)).toBeLessThan(1e-4);
  });

  it('text prompts, batched, with n: every choice carries its prompt', async () => {
    const r = await client.completions.create({ model: M, prompt: ['Every morning', 'The river'], echo: true, logprobs: 0, max_tokens: 1, n: 2, temperature: 0 });
    expect(r.choices).toHaveLength(4);
    expect(r.choices[0].text.startsWith('Every morning')).toBe(true);
    expect(r.choices[2].text.startsWith('The river')).toBe(true);
    for (const ch of r.choices) expect(ch.logprobs!.token_logprobs![0]).toBeNull();
  });

  it.each([
    ['max_tokens 0 without echo', { prompt: 'x', max_tokens: 0 }, 'max_tokens'],
    ['echo + logprobs + stream', { prompt: 'x', echo: true, logprobs: 1, stream: true }, 'echo'],
    ['prompt_logprobs + stream', { prompt: 'x', prompt_logprobs: 1, stream: true }, 'prompt_logprobs'],
    ['prompt_logprobs 21', { prompt: 'x', prompt_logprobs: 21 }, 'prompt_logprobs'],
    ['prompt_logprobs -1', { prompt: 'x', prompt_logprobs: -1 }, 'prompt_logprobs'],
  ])('%s: 400 naming the parameter', async (_what, body, param) => {
    const res = await post(srv.url, '/v1/completions', { model: M, ...body });
    expect(res.status).toBe(400);
    const j = (await res.json()) as { error: { param: string } };
    expect(j.error.param).toBe(param);
  });
});

describe('defaults as OpenAI and vLLM', () => {
  it('completions without max_tokens generate at most 16 tokens', async () => {
    const r = await client.completions.create({ model: M, prompt: [592, 5, 6], ignore_eos: true } as OpenAI.CompletionCreateParamsNonStreaming);
    expect(r.usage!.completion_tokens).toBe(16);
    expect(r.choices[0].finish_reason).toBe('length');
  });

  it("chat without max_tokens runs to the end of the context, capped by generation_config's max_new_tokens", async () => {
    const dir = join(tmp, 'capped');
    cpSync(modelDir(M), dir, { recursive: true });
    writeFileSync(join(dir, 'generation_config.json'), JSON.stringify({ bos_token_id: 592, eos_token_id: 596, max_new_tokens: 5 }));
    const capped = await startTestServer({ model: dir });
    const open = await startTestServer({ model: modelDir(M), maxModelLen: 48 });
    try {
      const body = { messages: [{ role: 'user', content: 'hi' }], ignore_eos: true };
      const a = (await (await post(capped.url, '/v1/chat/completions', { model: 'capped', ...body })).json()) as { usage: { prompt_tokens: number; completion_tokens: number } };
      expect(a.usage.completion_tokens).toBe(5);
      const b = (await (await post(open.url, '/v1/chat/completions', { model: M, ...body })).json()) as { usage: { prompt_tokens: number; completion_tokens: number } };
      expect(b.usage.prompt_tokens + b.usage.completion_tokens).toBe(48);
    } finally {
      await capped.close();
      await open.close();
    }
  });
});

describe('stream_options.include_usage', () => {
  it('every chunk carries usage: null and a last chunk with no choices carries the totals', async () => {
    for (const kind of ['completions', 'chat'] as const) {
      const stream =
        kind === 'completions'
          ? await client.completions.create({ model: M, prompt: 'Every morning', max_tokens: 4, stream: true, stream_options: { include_usage: true }, ignore_eos: true } as OpenAI.CompletionCreateParamsStreaming)
          : await client.chat.completions.create({ model: M, messages: [{ role: 'user', content: 'hi' }], max_tokens: 4, stream: true, stream_options: { include_usage: true }, ignore_eos: true } as OpenAI.ChatCompletionCreateParamsStreaming);
      const chunks: Array<{ choices: unknown[]; usage?: { completion_tokens: number } | null }> = [];
      for await (const c of stream as AsyncIterable<{ choices: unknown[]; usage?: { completion_tokens: number } | null }>) chunks.push(c);
      expect(chunks.length).toBeGreaterThan(2);
      const last = chunks[chunks.length - 1];
      expect(last.choices).toEqual([]);
      expect(last.usage!.completion_tokens).toBe(4);
      for (const c of chunks.slice(0, -1)) expect(c.usage, kind).toBeNull();
    }
    // without include_usage no chunk carries a usage key
    const res = await post(srv.url, '/v1/completions', { model: M, prompt: 'x', max_tokens: 2, stream: true });
    expect(await res.text()).not.toMatch(/"usage"/);
  });
});
