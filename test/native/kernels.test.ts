// Runs the C++ kernel tests (test/native/kernel_tests.cc: optimised CPU kernels vs their plain-loop
// references) built by cmake-js next to the addon, and fails with the binary's output if any case fails.
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');

// Ninja (cmake-js's default here) puts executables in build/; multi-config generators use build/<Config>/.
const candidates = ['build/kernel_tests', 'build/Release/kernel_tests', 'build/Debug/kernel_tests'].map((p) =>
  join(root, p),
);

// All cores (vitest.config.ts pins OMP_NUM_THREADS=1 for the engine suites, but the parallel splits
// are part of what is tested here) and passive waiting: spinning OpenMP workers make the run many
// times slower when other test workers share the cores.
function kernelTestEnv(): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, OMP_WAIT_POLICY: process.env.OMP_WAIT_POLICY ?? 'passive' };
  delete env.OMP_NUM_THREADS;
  return env;
}

function cpuFlags(): string {
  try {
    return readFileSync('/proc/cpuinfo', 'utf8');
  } catch {
    return '';
  }
}

// Every SIMD build of the dispatched kernels that this CPU can run (kernels/cpu/dispatch.cc).
const flags = cpuFlags();
const ISAS = [
  ['avx512', /\bavx512bw\b/.test(flags) && /\bavx512vl\b/.test(flags)],
  ['avx2', /\bavx2\b/.test(flags) && /\bfma\b/.test(flags)],
  ['generic', true],
] as const;

describe('C++ kernels', () => {
  it.each(ISAS.filter(([, ok]) => ok).map(([isa]) => isa))('optimised kernels match their references (%s build)', (isa) => {
    const bin = candidates.find((p) => existsSync(p));
    if (!bin) throw new Error(`kernel_tests not built (looked for ${candidates.join(', ')}): run \`npm run build\``);
    const run = spawnSync(bin, [], {
      encoding: 'utf8',
      timeout: 120_000,
      maxBuffer: 64 * 1024 * 1024,
      env: { ...kernelTestEnv(), LORAPLEX_ISA: isa },
    });
    const output = `${run.stdout ?? ''}${run.stderr ?? ''}${run.error ? `\n${run.error.message}` : ''}`;
    const last = output.trim().split('\n').at(-1) ?? '';
    expect(run.status, `${bin} exited with ${run.status} (signal ${run.signal})\n${output}`).toBe(0);
    expect(last, output).toMatch(/^\d+ passed, 0 failed$/);
    expect(Number(last.split(' ')[0]), output).toBeGreaterThan(0);
  }, 150_000);
});
