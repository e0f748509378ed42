// The lm-evaluation-harness end-to-end suite (lm-eval.e2e.ts): slow and needs Python packages
// (setup.sh), so it has its own config and npm script (`npm run test:lm-eval`) and is not matched
// by the default `npm test` (test/**/*.test.ts).
import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    root: new URL('../..', import.meta.url).pathname,
    include: ['test/lm-eval/**/*.e2e.ts'],
    testTimeout: 600_000,
    hookTimeout: 600_000,
    maxWorkers: 1,
    env: { OMP_NUM_THREADS: '1', OMP_WAIT_POLICY: 'passive' },
  },
});
