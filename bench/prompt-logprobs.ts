// Prompt logprobs' cost: a 1,000-token prompt scored with echo + logprobs against the same prompt
// prefilled plainly (max_tokens 1), on the SmolLM2-135M-shaped model (vocabulary 49,152: the
// lm_head over every prompt position is the extra work), interleaved, medians of N rounds.
// Usage: npx tsx bench/prompt-logprobs.ts [--model DIR] [--tokens 1000] [--rounds 5] [--logprobs 1]
import { existsSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { Engine } from '../server/engine/engine.js';
import { makeModel } from './make-model.js';

const HERE = dirname(fileURLToPath(import.meta.url));
const { values: args } = parseArgs({ options: { model: { type: 'string' }, tokens: { type: 'string' }, rounds: { type: 'string' }, logprobs: { type: 'string' } } });
const modelDir = resolve(args.model ?? join(HERE, 'models', 'smol-bf16'));
const T = Number(args.tokens ?? 1000);
const rounds = Number(args.rounds ?? 5);
const topN = Number(args.logprobs ?? 1);
if (!existsSync(join(modelDir, 'config.json'))) await makeModel({ out: modelDir, dtype: 'bf16', adapters: 32, rank: 16, alpha: 32 });

const e = await Engine.create({ model: modelDir, adapterDir: join(modelDir, 'adapters'), maxBatchTokens: 2048 });
const prompt = Array.from({ length: T }, (_, i) => 100 + ((i * 7919) % 40000));
async function time(promptLogprobs: number | null): Promise<number> {
  const t0 = performance.now();
  const seq = e.submit(prompt, { maxTokens: promptLogprobs === null ? 1 : 0, temperature: 0, promptLogprobs, logprobs: promptLogprobs === null ? null : topN });
  while (!(await seq.next()).finishReason);
  const ms = performance.now() - t0;
  if (promptLogprobs !== null && seq.promptLogprobs.filter(Boolean).length !== T - 1) throw new Error('missing prompt logprobs');
  return ms;
}
await time(null); // warm-up
await time(topN);
const plain: number[] = [];
const scored: number[] = [];
for (let r = 0; r < rounds; r++) {
  plain.push(await time(null));
  scored.push(await time(topN));
}
const med = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
console.log(JSON.stringify({ tokens: T, logprobs: topN, plainMs: +med(plain).toFixed(1), echoMs: +med(scored).toFixed(1), ratio: +(med(scored) / med(plain)).toFixed(3) }));
await e.close();
