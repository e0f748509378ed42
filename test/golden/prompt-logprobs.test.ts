// Prompt logprobs against HF transformers + PEFT: `/v1/completions` with echo + logprobs (OpenAI's
// legacy shape) and vLLM's `prompt_logprobs`, on every golden fixture, base and every adapter,
// every case of a fixture in one concurrent batch (mixed adapters), the engine pinned to fp32.
// The reference is fixtures/<name>.prompt-logprobs.json (make_golden.py --prompt-logprobs-only):
// the fp32 log-softmax of HF's teacher-forced logits over the prompt ids and the case's 16 greedy
// ids. Positions must agree within 1e-3, and top-1 ids wherever HF's top-2 margin exceeds 1e-3.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import OpenAI from 'openai';
import type { Completion, CompletionCreateParamsNonStreaming } from 'openai/resources/completions';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { adapterId, adapterRoot, FIXTURES, MODEL_NAMES, modelDir } from '../helpers/fixtures.js';
import { startTestServer, type TestServer } from '../helpers/server.js';

const TOL = 1e-3;
const K = 5; // top-N asked for, and recorded by make_golden.py
const FP32 = { computeDtype: 'float32', kvCacheDtype: 'float32', loraDtype: 'float32' } as const;

interface RefPosition {
  logprob: number;
  rank: number;
  top: Array<[number, number]>;
  margin: number;
}
interface RefCase {
  adapter: string | null;
  prompt: string;
  n_prompt: number;
  ids: number[]; // prompt ids (with BOS) + the case's greedy ids
  positions: Array<RefPosition | null>;
}
interface RefFile {
  model: string;
  weights_dtype: string;
  cases: RefCase[];
}

/** vLLM's prompt_logprobs entry: token id -> {logprob, rank, decoded_token}; null for the first token. */
type VllmPromptLogprobs = Array<Record<string, { logprob: number; rank: number; decoded_token: string }> | null>;
type Choice = Completion['choices'][number] & { prompt_logprobs?: VllmPromptLogprobs };

function loadRef(name: string): RefFile {
  return JSON.parse(readFileSync(join(FIXTURES, `${name}.prompt-logprobs.json`), 'utf8')) as RefFile;
}

describe.each(MODEL_NAMES)('%s', (name) => {
  const ref = loadRef(name);
  let srv: TestServer;
  let client: OpenAI;
  let worst = 0; // largest |server - HF| over every logprob compared in this fixture
  let compared = 0;
  const tokenStr = (id: number) => srv.engine.tokenizer.decode([id], false);
  const model = (c: RefCase) => (c.adapter ? adapterId(c.adapter) : name);

  beforeAll(async () => {
    srv = await startTestServer({ ...FP32, model: modelDir(name), adapterDir: adapterRoot(name), memoryBudget: 16 << 20, device: 'cpu' });
    client = new OpenAI({ baseURL: `${srv.url}/v1`, apiKey: 'unused', maxRetries: 0 });
  });
  afterAll(async () => {
    console.log(`${name}: worst |prompt logprob - HF| = ${worst.toExponential(2)} over ${compared} logprobs`);
    await srv?.close();
  });

  const near = (got: number, want: number, what: string) => {
    const d = Math.abs(got - want);
    worst = Math.max(worst, d);
    compared++;
    expect(d, `${what}: ${got} vs HF ${want}`).toBeLessThan(TOL);
  };

  /** All cases at once (one mixed batch), each with its own prompt; returns each case's choice. */
  // LongRoPE (phi3): a forward over L tokens rotates with the long factors iff L is past the
  // original context, so the reference (one forward over prompt + continuation) describes the
  // prompt alone only where both lengths are on the same side of it. The other cases are checked
  // by the teacher-forced test over all ids and by the greedy parity suite.
  const cfg = JSON.parse(readFileSync(join(modelDir(name), 'config.json'), 'utf8')) as Record<string, unknown>;
  const rs = (cfg.rope_scaling ?? cfg.rope_parameters ?? {}) as Record<string, unknown>;
  const orig = rs.type === 'longrope' || rs.rope_type === 'longrope' ? Number(rs.original_max_position_embeddings ?? cfg.original_max_position_embeddings) : 0;
  const promptOnly = ref.cases.filter((c) => !(orig > 0 && c.n_prompt <= orig && c.ids.length > orig));

  async function batch(body: (c: RefCase) => Record<string, unknown>, cases: RefCase[] = ref.cases): Promise<Choice[]> {
    const rs = await Promise.all(
      cases.map((c) =>
        client.completions.create({ model: model(c), temperature: 0, ...body(c) } as unknown as CompletionCreateParamsNonStreaming),
      ),
    );
    return rs.map((r) => {
      expect(r.choices).toHaveLength(1);
      return r.choices[0] as Choice;
    });
  }

  /** OpenAI's logprobs object over ids[0..n): first null, then HF's logprob and top-N at each position. */
  function checkEchoLogprobs(c: RefCase, ch: Choice, n: number, where: string) {
    const lp = ch.logprobs!;
    const tokens = lp.tokens!;
    const tlp = lp.token_logprobs as Array<number | null>;
    const top = lp.top_logprobs as Array<Record<string, number> | null>;
    expect(tokens.length, `${where}: tokens`).toBeGreaterThanOrEqual(n);
    expect(tlp).toHaveLength(tokens.length);
    expect(top).toHaveLength(tokens.length);
    expect(lp.text_offset).toHaveLength(tokens.length);
    // vLLM's text_offset: the running length of the token strings, from 0.
    expect(lp.text_offset![0]).toBe(0);
    for (let i = 1; i < tokens.length; i++) expect(lp.text_offset![i], `${where}: text_offset[${i}]`).toBe(lp.text_offset![i - 1] + tokens[i - 1].length);
    expect(tlp[0], `${where}: first token's logprob`).toBeNull();
    expect(top[0], `${where}: first token's top_logprobs`).toBeNull();
    for (let i = 0; i < n; i++) expect(tokens[i], `${where}: token ${i}`).toBe(tokenStr(c.ids[i]));
    for (let i = 1; i < n; i++) {
      const r = c.positions[i]!;
      const w = `${where} position ${i}`;
      near(tlp[i]!, r.logprob, `${w} logprob`);
      // top_logprobs: the top N and the token itself (N or N + 1 entries), keyed by token text. Byte
      // tokens of a split character share a text ("\ufffd"), so an entry matches any HF logprob of
      // its text; an id HF ranks 6th or lower may stand in only where it ties HF's 5th.
      const entries = Object.entries(top[i]!);
      expect(entries.length, `${w}: top_logprobs size`).toBeLessThanOrEqual(K + 1);
      const byText = new Map<string, number[]>();
      for (const [id, l] of [...r.top, [c.ids[i], r.logprob] as [number, number]]) byText.set(tokenStr(id), [...(byText.get(tokenStr(id)) ?? []), l]);
      expect(entries.map(([t]) => t), `${w}: the token itself is listed`).toContain(tokens[i]);
      for (const [t, l] of entries) {
        const want = byText.get(t) ?? [r.top[K - 1][1]];
        const best = want.reduce((a, b) => (Math.abs(b - l) < Math.abs(a - l) ? b : a));
        near(l, best, `${w} top_logprobs[${JSON.stringify(t)}]`);
      }
      // The best entry is HF's top 1, unless a lower-ranked token with the same text took its key
      // (a later entry of the same text wins, as in vLLM's dict).
      const t1 = tokenStr(r.top[0][0]);
      if (byText.get(t1)!.length === 1) {
        const best = entries.reduce((a, b) => (b[1] > a[1] ? b : a));
        near(best[1], r.top[0][1], `${w} best of top_logprobs`);
        if (r.margin > TOL) expect(best[0], `${w}: top-1 text`).toBe(t1);
      }
    }
  }

  /** vLLM's prompt_logprobs: None first, then {id: {logprob, rank, decoded_token}} per position. */
  function checkVllmPromptLogprobs(c: RefCase, ch: Choice, n: number, k: number, where: string) {
    const pl = ch.prompt_logprobs;
    expect(Array.isArray(pl), `${where}: prompt_logprobs is a list`).toBe(true);
    expect(pl!).toHaveLength(n);
    expect(pl![0], `${where}: prompt_logprobs[0]`).toBeNull();
    for (let i = 1; i < n; i++) {
      const r = c.positions[i]!;
      const w = `${where} prompt_logprobs[${i}]`;
      const e = pl![i]!;
      const ids = Object.keys(e).map(Number);
      // The top k, plus the prompt token when it is not among them (vLLM).
      expect(ids.length, `${w}: entries`).toBeGreaterThanOrEqual(k);
      expect(ids.length, `${w}: entries`).toBeLessThanOrEqual(k + 1);
      expect(ids, `${w}: the prompt token is listed`).toContain(c.ids[i]);
      for (const [key, v] of Object.entries(e)) {
        expect(Object.keys(v).sort(), `${w}[${key}]`).toEqual(['decoded_token', 'logprob', 'rank']);
        expect(Number.isInteger(v.rank) && v.rank >= 1, `${w}[${key}].rank`).toBe(true);
        expect(v.decoded_token, `${w}[${key}].decoded_token`).toBe(tokenStr(Number(key)));
      }
      const mine = e[String(c.ids[i])];
      near(mine.logprob, r.logprob, `${w} prompt token logprob`);
      expect(mine.logprob, `${w}: the same number as token_logprobs`).toBe((ch.logprobs?.token_logprobs as Array<number | null> | undefined)?.[i] ?? mine.logprob);
      // The prompt token's rank: 1 + the tokens scored strictly higher, up to ties within the tolerance.
      if (r.rank <= K) expect(mine.rank, `${w}: prompt token rank`).toBe(r.rank);
      else expect(mine.rank, `${w}: prompt token rank`).toBeGreaterThan(K - 1);
      for (const [id, l] of Object.entries(e).map(([key, v]) => [Number(key), v.logprob] as const)) {
        const hfRank = r.top.findIndex(([t]) => t === id);
        if (hfRank >= 0) {
          near(l, r.top[hfRank][1], `${w}[${id}] logprob`);
          // Ranks agree where HF's neighbours are more than the tolerance away.
          const sep = (hfRank === 0 || r.top[hfRank - 1][1] - r.top[hfRank][1] > TOL) && (hfRank === K - 1 || r.top[hfRank][1] - r.top[hfRank + 1][1] > TOL);
          if (sep) expect(e[String(id)].rank, `${w}[${id}] rank`).toBe(hfRank + 1);
        } else if (id !== c.ids[i]) {
          near(l, r.top[K - 1][1], `${w}[${id}]: not in HF's top ${K}, so tied with HF's ${K}th`);
        }
      }
      if (r.margin > TOL) {
        const first = Object.entries(e).find(([, v]) => v.rank === 1);
        expect(first?.[0], `${w}: top-1 id`).toBe(String(r.top[0][0]));
      }
    }
  }

  it('echo + logprobs 5 + max_tokens 0: the prompt alone, every position as HF (one mixed batch)', async () => {
    expect(ref.cases.some((c) => c.adapter)).toBe(true);
    const out = await batch((c) => ({ prompt: c.prompt, echo: true, logprobs: K, max_tokens: 0 }), promptOnly);
    expect(promptOnly.length).toBeGreaterThan(0);
    promptOnly.forEach((c, j) => {
      const ch = out[j];
      const where = `${c.adapter ?? 'base'} / ${JSON.stringify(c.prompt)}`;
      expect(ch.text, `${where}: echoed text`).toBe(c.prompt);
      expect(ch.logprobs!.tokens, `${where}: the prompt tokens only`).toHaveLength(c.n_prompt);
      expect(ch.prompt_logprobs, `${where}: prompt_logprobs only when asked`).toBeUndefined();
      expect(ch.finish_reason, `${where}: finish_reason`).toBe('length');
      checkEchoLogprobs(c, ch, c.n_prompt, where);
    });
  });

  it('echo + logprobs 5 + max_tokens 1 + prompt_logprobs 5: the prompt, then the greedy token (one mixed batch)', async () => {
    const out = await batch((c) => ({ prompt: c.prompt, echo: true, logprobs: K, max_tokens: 1, prompt_logprobs: K }), promptOnly);
    promptOnly.forEach((c, j) => {
      const ch = out[j];
      const where = `${c.adapter ?? 'base'} / ${JSON.stringify(c.prompt)}`;
      const lp = ch.logprobs!;
      expect(lp.tokens, `${where}: prompt + 1 generated`).toHaveLength(c.n_prompt + 1);
      checkEchoLogprobs(c, ch, c.n_prompt, where);
      checkVllmPromptLogprobs(c, ch, c.n_prompt, K, where);
      // The generated token: HF's greedy first step (the teacher-forced position n_prompt).
      const g = c.positions[c.n_prompt]!;
      near(lp.token_logprobs![c.n_prompt], g.top[0][1], `${where}: generated token's logprob`);
      if (g.margin > TOL) {
        expect(lp.tokens![c.n_prompt], `${where}: generated token`).toBe(tokenStr(c.ids[c.n_prompt]));
        // An EOS (as the greedy token) ends the choice and, as in vLLM, is not part of the text;
        // nor is any other special token (skip_special_tokens, vLLM's default).
        const eos = srv.engine.model.eosTokenIds.includes(c.ids[c.n_prompt]);
        const special = srv.engine.tokenizer.specialIds.has(c.ids[c.n_prompt]);
        expect(ch.text, `${where}: echo + generated text`).toBe(c.prompt + (eos || special ? '' : tokenStr(c.ids[c.n_prompt])));
        expect(ch.finish_reason, `${where}: finish_reason`).toBe(eos ? 'stop' : 'length');
      }
    });
  });

  it('prompt + greedy continuation as token ids, max_tokens 0: teacher-forced over all of it (one mixed batch)', async () => {
    const out = await batch((c) => ({ prompt: c.ids, echo: true, logprobs: K, max_tokens: 0, prompt_logprobs: K }));
    ref.cases.forEach((c, j) => {
      const ch = out[j];
      const where = `${c.adapter ?? 'base'} / ${JSON.stringify(c.prompt)} + greedy`;
      expect(ch.logprobs!.tokens).toHaveLength(c.ids.length);
      checkEchoLogprobs(c, ch, c.ids.length, where);
      checkVllmPromptLogprobs(c, ch, c.ids.length, K, where);
    });
  });
});
