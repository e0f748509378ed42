// Constrained decoding cost on the SmolLM2-135M-shaped model (49,152-token vocabulary), in one
// process: 16 JSON-schema streams against 16 unconstrained ones (alternated rounds, same prompts,
// greedy, 64 tokens each), the grammar worker's mask time per step at 1 and 16 constrained
// streams, and the compile time of a typical tool schema, cold and cached.
//
// Masks follow the forward (the engine defers them): mask_wait is the time from a step's start
// until its masks were handed over, mask_exposed the part of it the forward did not hide.
//
// The generated model's tokenizer has ~600 real tokens padded to 49,152 ids (XGrammar skips the
// padding as special tokens), so a `synthetic` section also measures compile and mask time with a
// 49,152-token byte-level vocabulary of distinct strings, the size of SmolLM2's real one.
//
//   npx tsx bench/structured.ts [--rounds 2] [--tokens 64] [--sections engine,synthetic]
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { Engine } from '../server/engine/engine.js';
import { GrammarService, type GrammarSpec } from '../server/engine/grammar.js';
import { prepareJsonSchema } from '../server/engine/json-schema-support.js';
import { SeededRandom } from '../server/demo/seeded-random.js';
import { makePrompts, percentile } from './loadgen.js';
import { makeModel } from './make-model.js';

const HERE = dirname(fileURLToPath(import.meta.url));
const { values: args } = parseArgs({ options: { model: { type: 'string' }, rounds: { type: 'string' }, tokens: { type: 'string' }, sections: { type: 'string' }, out: { type: 'string' } } });
const modelDir = resolve(args.model ?? join(HERE, 'models', 'smol-bf16'));
const rounds = Number(args.rounds ?? 2);
const maxTokens = Number(args.tokens ?? 64);
const sections = new Set((args.sections ?? 'engine,synthetic').split(','));
const med = (xs: number[]) => percentile(xs, 50);
const results: Record<string, unknown> = { model: modelDir, date: new Date().toISOString() };

/** A typical tool's parameters (what an OpenAI function-calling request carries). */
const toolSchema = {
  type: 'object',
  properties: {
    city: { type: 'string', description: 'City name' },
    unit: { type: 'string', enum: ['celsius', 'fahrenheit'] },
    days: { type: 'integer', minimum: 1, maximum: 14 },
    include: { type: 'array', items: { type: 'string', enum: ['wind', 'rain', 'uv', 'humidity'] }, maxItems: 4 },
  },
  required: ['city', 'unit'],
  additionalProperties: false,
};
const toolSchema2 = { ...toolSchema, properties: { ...toolSchema.properties, country: { type: 'string', maxLength: 2 } } };
/** The streams' schema: a list of records that 64 tokens never finish, so every stream runs to max_tokens. */
const streamSchema = {
  type: 'object',
  properties: {
    records: {
      type: 'array',
      minItems: 40,
      items: {
        type: 'object',
        properties: { id: { type: 'integer', minimum: 0, maximum: 1_000_000 }, label: { type: 'string', maxLength: 12 }, ok: { type: 'boolean' } },
        required: ['id', 'label', 'ok'],
        additionalProperties: false,
      },
    },
  },
  required: ['records'],
  additionalProperties: false,
};

async function ensureModel(): Promise<void> {
  if (existsSync(join(modelDir, 'config.json'))) return;
  console.error(`generating ${modelDir} (bf16, 32 rank-16 adapters)...`);
  await makeModel({ out: modelDir, dtype: 'bf16', adapters: 32, rank: 16, alpha: 32 });
}

async function timed<T>(f: () => Promise<T>): Promise<[T, number]> {
  const t0 = performance.now();
  const r = await f();
  return [r, performance.now() - t0];
}

async function engineSection(): Promise<void> {
  await ensureModel();
  const e = await Engine.create({ model: modelDir, maxNumSeqs: 32 });
  const spec = (s: object): GrammarSpec => ({ kind: 'json_schema', schema: prepareJsonSchema(s, 'bench') });
  // Compile times: the first includes starting both workers (WASM, the 49,152-token TokenizerInfo).
  const [, firstMs] = await timed(() => e.grammars.prepare(spec(toolSchema), 'bench'));
  const [, coldMs] = await timed(() => e.grammars.prepare(spec(toolSchema2), 'bench'));
  const [, cachedMs] = await timed(() => e.grammars.prepare(spec(toolSchema), 'bench'));
  const compile = { first_with_worker_start_ms: firstMs, cold_ms: coldMs, cached_ms: cachedMs };
  results.compile_tool_schema = compile;
  console.log(`tool schema compile: first (workers start) ${firstMs.toFixed(1)} ms, cold ${coldMs.toFixed(1)} ms, cached ${cachedMs.toFixed(3)} ms`);

  const ref = await e.grammars.prepare(spec(streamSchema), 'bench');
  const V = e.model.spec.vocabSize;
  const prompts = makePrompts({ requests: 16, promptTokens: 32, vocab: Math.min(V, 590), seed: 3 } as never);
  const run = async (n: number, constrained: boolean) => {
    const walls: number[] = [];
    const fwd: number[] = [];
    const m0 = { ...e.maskStats };
    let steps = 0;
    e.onStep = () => {
      if (e.lastStep.seqs === n && e.lastStep.tokens === n) {
        walls.push(e.lastStep.wallMs);
        fwd.push(e.lastStep.forwardMs);
      }
      steps++;
    };
    let tokens = 0;
    const t0 = performance.now();
    await Promise.all(prompts.slice(0, n).map(async (p) => {
      for await (const _ of e.generate(p, { maxTokens, temperature: 0, ignoreEos: !constrained, grammar: constrained ? ref : null })) tokens++;
    }));
    const wall = performance.now() - t0;
    e.onStep = null;
    const waits = e.maskStats.waits - m0.waits;
    return {
      mask_exposed_ms_per_step: constrained ? (e.maskStats.exposedMs - m0.exposedMs) / steps : 0,
      tokens, tok_s: (tokens / wall) * 1000, steps,
      decode_step_wall_ms_p50: med(walls), decode_forward_ms_p50: med(fwd),
      decode_tok_s: (n / med(walls)) * 1000,
      mask_wait_ms_per_step: waits ? (e.maskStats.waitMs - m0.waitMs) / waits : 0,
    };
  };
  await run(16, false); // warm-up
  const rows: Array<Record<string, number | string>> = [];
  for (let r = 0; r < rounds; r++) {
    rows.push({ round: r, kind: 'unconstrained x16', ...(await run(16, false)) });
    rows.push({ round: r, kind: 'json_schema x16', ...(await run(16, true)) });
  }
  rows.push({ round: 0, kind: 'json_schema x1', ...(await run(1, true)) });
  rows.push({ round: 0, kind: 'unconstrained x1', ...(await run(1, false)) });
  console.table(rows.map((x) => Object.fromEntries(Object.entries(x).map(([k, v]) => [k, typeof v === 'number' ? Number(v.toFixed(2)) : v]))));
  const pick = (kind: string, k: string) => med(rows.filter((x) => x.kind === kind).map((x) => x[k] as number));
  const summary = {
    tok_s_unconstrained_16: pick('unconstrained x16', 'tok_s'),
    tok_s_json_schema_16: pick('json_schema x16', 'tok_s'),
    ratio_tok_s: pick('json_schema x16', 'tok_s') / pick('unconstrained x16', 'tok_s'),
    ratio_decode_step: pick('unconstrained x16', 'decode_step_wall_ms_p50') / pick('json_schema x16', 'decode_step_wall_ms_p50'),
    mask_wait_ms_per_step_1: pick('json_schema x1', 'mask_wait_ms_per_step'),
    mask_wait_ms_per_step_16: pick('json_schema x16', 'mask_wait_ms_per_step'),
    mask_exposed_ms_per_step_1: pick('json_schema x1', 'mask_exposed_ms_per_step'),
    mask_exposed_ms_per_step_16: pick('json_schema x16', 'mask_exposed_ms_per_step'),
  };
  console.log(summary);
  results.engine = { rows, summary };
  await e.close();
}

/** A 49,152-token byte-level vocabulary: the 256 byte tokens, then distinct letter/digit/punctuation strings, half with a leading space (Ġ). */
function syntheticVocab(V: number): string[] {
  const bytes: string[] = [];
  // GPT-2's bytes_to_unicode: printable bytes stand for themselves, the rest map to U+0100 + n.
  let n = 0;
  for (let b = 0; b < 256; b++) {
    const printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    bytes.push(printable ? String.fromCharCode(b) : String.fromCharCode(256 + n++));
  }
  const rng = new SeededRandom(7, 'vocab');
  const alphabet = 'etaoinshrdlucmfwypvbgkjqxz';
  const punct = ['"', ':', ',', '{', '}', '[', ']', '":', '",', '{"', '"}', '":"', '"]', '["', '.', '_', '-'];
  const seen = new Set(bytes);
  const out = [...bytes];
  while (out.length < V - 2) {
    const r = rng.uniform();
    let s = '';
    if (r < 0.05) s = punct[Math.floor(rng.uniform() * punct.length)] + punct[Math.floor(rng.uniform() * punct.length)];
    else if (r < 0.1) s = String(Math.floor(rng.uniform() * 10000));
    else {
      const len = 2 + Math.floor(rng.uniform() * 7);
      for (let i = 0; i < len; i++) s += alphabet[Math.min(25, Math.floor(-Math.log(1 - rng.uniform() * 0.999) * 6))];
      if (rng.uniform() < 0.3) s = s[0].toUpperCase() + s.slice(1);
    }
    if (rng.uniform() < 0.5) s = 'Ġ' + s;
    if (!seen.has(s)) (seen.add(s), out.push(s));
  }
  out.push('', ''); // two special tokens (EOS is the last)
  return out;
}

async function syntheticSection(): Promise<void> {
  const V = 49_152;
  const g = new GrammarService({ vocab: syntheticVocab(V), vocabType: 'byte_level', vocabSize: V, stopIds: [V - 1] });
  const spec = (s: object): GrammarSpec => ({ kind: 'json_schema', schema: prepareJsonSchema(s, 'bench') });
  const [, firstMs] = await timed(() => g.prepare(spec(toolSchema), 'bench'));
  const [, coldMs] = await timed(() => g.prepare(spec(toolSchema2), 'bench'));
  const [, cachedMs] = await timed(() => g.prepare(spec(toolSchema), 'bench'));
  const ref = await g.prepare(spec(streamSchema), 'bench');
  const rng = new SeededRandom(11, 'masks');
  const maskTimes = async (n: number, steps: number) => {
    const seqs = Int32Array.from({ length: n }, (_, i) => 100_000 + n * 1000 + i);
    for (const s of seqs) g.open(s, ref);
    let tokens = new Int32Array(n).fill(-1);
    const times: number[] = [];
    for (let k = 0; k < steps; k++) {
      const [r, ms] = await timed(() => g.masks(seqs, tokens));
      times.push(ms);
      // Next token: a random allowed one per sequence (as sampling would pick).
      tokens = Int32Array.from(seqs, (_, i) => {
        const allowed: number[] = [];
        for (let w = 0; w < r.words; w++) {
          const bits = r.masks[i * r.words + w];
          if (bits) for (let b = 0; b < 32; b++) if ((bits >>> b) & 1) allowed.push(w * 32 + b);
        }
        const nonStop = allowed.filter((t) => t !== V - 1);
        const pool = nonStop.length ? nonStop : allowed;
        return pool[Math.floor(rng.uniform() * pool.length)];
      });
    }
    g.release([...seqs]);
    const t = times.slice(2);
    const mean = t.reduce((a, b) => a + b, 0) / t.length;
    return { mean_ms: mean, p50_ms: med(t), p90_ms: percentile(t, 90), max_ms: Math.max(...t), mean_per_stream_ms: mean / n };
  };
  const m1 = await maskTimes(1, 64);
  const m16 = await maskTimes(16, 64);
  const out = { compile_tool_schema: { first_with_worker_start_ms: firstMs, cold_ms: coldMs, cached_ms: cachedMs }, mask_round_trip_1: m1, mask_round_trip_16: m16 };
  console.log('synthetic 49,152-token vocabulary:', JSON.stringify(out, null, 1));
  results.synthetic_vocab = out;
  g.close();
}

if (sections.has('engine')) await engineSection();
if (sections.has('synthetic')) await syntheticSection();
const outFile = args.out ?? join(HERE, 'out', 'structured.json');
mkdirSync(dirname(outFile), { recursive: true });
writeFileSync(outFile, JSON.stringify(results, null, 2));
console.log(`wrote ${outFile}`);
