// Load generator speaking the OpenAI API (streaming completions), usable against loraplex or any
// OpenAI-compatible server (llama.cpp's, vLLM's). Measures generated tokens/s, requests/s, time to
// first token and inter-token latency (gaps between streamed chunks).
import { SeededRandom } from '../server/demo/seeded-random.js';

export interface Workload {
  requests: number;
  concurrency: number;
  promptTokens: number;
  maxTokens: number;
  adapters: number; // request i uses adapter i mod A; 0 = base model only
  vocab: number; // prompt ids are drawn below this
  seed?: number;
}

export interface LoadResult {
  requests: number;
  concurrency: number;
  adapters: number;
  wallS: number;
  generatedTokens: number;
  tokensPerS: number;
  requestsPerS: number;
  ttftMs: { p50: number; p99: number };
  itlMs: { p50: number; p99: number };
  errors: number;
}

export function percentile(xs: number[], p: number): number {
  if (!xs.length) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))];
}

export function makePrompts(w: Workload): number[][] {
  const rng = new SeededRandom(w.seed ?? 1, 'loadgen');
  return Array.from({ length: w.requests }, () => Array.from({ length: w.promptTokens }, () => 10 + Math.floor(rng.uniform() * (w.vocab - 10))));
}

export interface Target {
  url: string; // base URL without /v1
  baseModel: string;
  adapterName: (i: number) => string; // model name for adapter i
  apiKey?: string;
  /** llama.cpp selects adapters per request with a `lora` field instead of `model`. */
  adapterField?: (i: number) => Record<string, unknown>;
}

async function oneRequest(t: Target, prompt: number[], maxTokens: number, adapter: number | null) {
  const body: Record<string, unknown> = {
    model: adapter === null ? t.baseModel : t.adapterName(adapter),
    prompt,
    max_tokens: maxTokens,
    temperature: 0,
    ignore_eos: true,
    stream: true,
    stream_options: { include_usage: true },
    ...(adapter !== null && t.adapterField ? t.adapterField(adapter) : {}),
  };
  if (adapter !== null && t.adapterField) body.model = t.baseModel;
  const t0 = performance.now();
  const res = await fetch(`${t.url}/v1/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...(t.apiKey ? { authorization: `Bearer ${t.apiKey}` } : {}) },
    body: JSON.stringify(body),
  });
  if (!res.ok || !res.body) throw new Error(`HTTP ${res.status}: ${await res.text()}`);
  const times: number[] = [];
  let usageTokens = -1;
  let buf = '';
  const dec = new TextDecoder();
  for await (const part of res.body as unknown as AsyncIterable<Uint8Array>) {
    buf += dec.decode(part, { stream: true });
    let i;
    while ((i = buf.indexOf('\n\n')) >= 0) {
      const ev = buf.slice(0, i).trim();
      buf = buf.slice(i + 2);
      if (!ev.startsWith('data:')) continue;
      const data = ev.slice(5).trim();
      if (data === '[DONE]') continue;
      const j = JSON.parse(data);
      if (j.usage) usageTokens = j.usage.completion_tokens;
      if (j.choices?.length) times.push(performance.now());
    }
  }
  return { t0, times, tokens: usageTokens >= 0 ? usageTokens : times.length };
}

export async function runLoad(t: Target, w: Workload): Promise<LoadResult> {
  const prompts = makePrompts(w);
  let next = 0;
  let errors = 0;
  let tokens = 0;
  const ttft: number[] = [];
  const itl: number[] = [];
  const start = performance.now();
  await Promise.all(
    Array.from({ length: w.concurrency }, async () => {
      while (next < w.requests) {
        const i = next++;
        try {
          const r = await oneRequest(t, prompts[i], w.maxTokens, w.adapters > 0 ? i % w.adapters : null);
          tokens += r.tokens;
          if (r.times.length) ttft.push(r.times[0] - r.t0);
          for (let k = 1; k < r.times.length; k++) itl.push(r.times[k] - r.times[k - 1]);
        } catch (e) {
          errors++;
          if (errors <= 3) console.error(`request ${i}: ${(e as Error).message}`);
        }
      }
    }),
  );
  const wallS = (performance.now() - start) / 1000;
  return {
    requests: w.requests, concurrency: w.concurrency, adapters: w.adapters, wallS,
    generatedTokens: tokens, tokensPerS: tokens / wallS, requestsPerS: (w.requests - errors) / wallS,
    ttftMs: { p50: percentile(ttft, 50), p99: percentile(ttft, 99) },
    itlMs: { p50: percentile(itl, 50), p99: percentile(itl, 99) },
    errors,
  };
}
