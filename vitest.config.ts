import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    // Two cores: two test files at a time, each engine on one OpenMP thread so they do not
    // oversubscribe (the kernel test runs its own binary with both threads).
    maxWorkers: 2,
    // Every engine in every test checks the pool's invariants after each step (engine.ts).
    env: { OMP_NUM_THREADS: '1', OMP_WAIT_POLICY: 'passive', LORAPLEX_CHECK_INVARIANTS: '1' },
  },
});
