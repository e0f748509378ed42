// The model families of issue #16 (Qwen3, Gemma 2, Gemma 3) through the command line: `loraplex
// generate` on each golden fixture, base and adapter, prints HF's greedy continuation (the engine
// API and HTTP paths run in parity.test.ts, prompt-logprobs.test.ts and server/openai.test.ts).
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { TextTokenizer } from '../../server/engine/tokenizer.js';
import { FIXTURES, loadGolden, modelDir, ROOT, strictSteps } from '../helpers/fixtures.js';

const FAMILIES = ['qwen3-tied', 'gemma2', 'gemma3', 'phi3'] as const;

function cli(args: string[]) {
  return spawnSync(process.execPath, ['--import', 'tsx', join(ROOT, 'server', 'main.ts'), ...args], { cwd: ROOT, encoding: 'utf8', timeout: 60_000 });
}

describe.each(FAMILIES)('loraplex generate on %s', (name) => {
  const golden = loadGolden(name);
  const tok = new TextTokenizer(modelDir(name));
  const cases = [golden.cases.find((c) => c.adapter === null)!, golden.cases.find((c) => c.adapter !== null)!];

  it.each(cases.map((c) => [c.adapter ?? 'base', c] as const))('%s: prints HF greedy text', (_label, c) => {
    const n = strictSteps(c);
    const args = ['generate', '--model', modelDir(name), '--prompt', c.prompt, '--max-tokens', String(n), '--ignore-eos',
      '--compute-dtype', 'float32', '--kv-cache-dtype', 'float32', '--lora-dtype', 'float32', '--device', 'cpu', '--threads', '1'];
    if (c.adapter) args.push('--adapter', join(FIXTURES, c.adapter));
    const r = cli(args);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toBe(tok.decode(c.greedy_ids.slice(0, n), true) + '\n');
  });
});
