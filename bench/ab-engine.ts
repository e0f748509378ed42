// A/B of engine options in one process (this machine's speed drifts by up to 2x over minutes, so
// separate runs cannot resolve 10 % effects): the same 16-stream decode workload on two engines,
// alternated, median forward time of full-batch decode steps.
// Usage: npx tsx bench/ab-engine.ts '{"kvCacheDtype":"float32"}' '{"kvCacheDtype":"bfloat16"}' [adapters A[,B]] [rounds]
import { join } from 'node:path';
import { Engine, type EngineOptions } from '../server/engine/engine.js';
import { makePrompts, percentile } from './loadgen.js';

const modelDir = join(import.meta.dirname, 'models', 'smol-bf16');
const [a, b] = [JSON.parse(process.argv[2] ?? '{}'), JSON.parse(process.argv[3] ?? '{}')] as Partial<EngineOptions>[];
const As = (process.argv[4] ?? '0').split(',').map(Number), rounds = Number(process.argv[5] ?? 4);
const nAdapters = [As[0], As[1] ?? As[0]];
const prompts = makePrompts({ requests: 16, concurrency: 16, promptTokens: 128, maxTokens: 64, adapters: 0, vocab: 49152, seed: 7 });
const make = (o: Partial<EngineOptions>) => Engine.create({ model: modelDir, adapterDir: join(modelDir, 'adapters'), memoryBudget: 2 * 1024 ** 3, maxNumSeqs: 16, maxLoras: 16, ...o });
const engines = [await make(a), await make(b)];
const fwd: number[][] = [[], []];
for (let r = 0; r < rounds; r++)
  for (let k = 0; k < 2; k++) {
    const e = engines[k];
    e.onStep = () => { if (r > 0 && e.lastStep.tokens === 16 && e.lastStep.seqs === 16) fwd[k].push(e.lastStep.forwardMs); };
    await Promise.all(prompts.map(async (p, i) => {
      for await (const _ of e.generate(p, { maxTokens: 64, temperature: 0, ignoreEos: true }, { adapter: nAdapters[k] ? `a${i % nAdapters[k]}` : null })) { /* drain */ }
    }));
    e.onStep = null;
  }
for (let k = 0; k < 2; k++) console.log(`${JSON.stringify(k ? b : a)} adapters=${nAdapters[k]}: decode forward p50 ${percentile(fwd[k], 50).toFixed(2)} ms (${fwd[k].length} steps)`);
await Promise.all(engines.map((e) => e.close()));
