// `loraplex generate`: prints only the generated text on stdout; the demo model and its adapters
// work with no download.
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ensureDemoModel } from '../../server/demo/demo-model.js';
import { ROOT } from '../helpers/fixtures.js';

function cli(args: string[]) {
  return spawnSync(process.execPath, ['--import', 'tsx', join(ROOT, 'server', 'main.ts'), ...args], { cwd: ROOT, encoding: 'utf8', timeout: 60_000 });
}

describe('loraplex generate', () => {
  it('prints the demo model text, and an adapter visibly changes it', async () => {
    const demo = await ensureDemoModel();
    const base = cli(['generate', '--prompt', 'The', '--max-tokens', '12']);
    expect(base.status, base.stderr).toBe(0);
    expect(base.stdout.trim().length).toBeGreaterThan(10);
    expect(base.stdout).toMatch(/^[\x20-\x7e\n]+$/); // readable text, not byte soup
    const pirate = cli(['generate', '--prompt', 'The', '--max-tokens', '12', '--adapter', join(demo.adapterDir, 'pirate')]);
    expect(pirate.status, pirate.stderr).toBe(0);
    expect(pirate.stdout).not.toBe(base.stdout);
    const again = cli(['generate', '--prompt', 'The', '--max-tokens', '12']);
    expect(again.stdout).toBe(base.stdout); // greedy by default: deterministic
  });

  it('takes the engine flags serve takes: the exact fp32 path equals the default on the fp32 demo model', () => {
    const base = cli(['generate', '--prompt', 'The', '--max-tokens', '10']);
    const fp32 = cli(['generate', '--prompt', 'The', '--max-tokens', '10', '--compute-dtype', 'float32', '--kv-cache-dtype', 'float32', '--lora-dtype', 'float32',
      '--device', 'cpu', '--threads', '1', '--max-lora-rank', '8', '--max-loras', '2', '--block-size', '8', '--memory-budget', '64MiB', '--no-enable-prefix-caching']);
    expect(fp32.status, fp32.stderr).toBe(0);
    expect(fp32.stdout).toBe(base.stdout);
    const bf16kv = cli(['generate', '--prompt', 'The', '--max-tokens', '4', '--kv-cache-dtype', 'bfloat16']);
    expect(bf16kv.status, bf16kv.stderr).toBe(0);
    expect(bf16kv.stderr).toBe(''); // off a terminal: no progress output, stderr is for errors
  });

  it('fails with a one-line error and exit code 1 on a bad adapter', () => {
    const r = cli(['generate', '--prompt', 'x', '--adapter', join(ROOT, 'test', 'golden', 'fixtures', 'adapters', 'llama-gqa', 'r8-all')]);
    expect(r.status).toBe(1);
    expect(r.stdout).toBe('');
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/^loraplex: error: .*shape/);
  });
});
