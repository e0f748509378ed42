// The default thread count follows the cgroup CPU quota (v2 cpu.max, v1 CFS quota, tightest along
// the parents) and the affinity mask, read from fake /proc and /sys trees in a temp folder; the
// OpenMP wait-policy default never overrides the user's; an engine without `threads` uses the
// default count. vitest.config.ts sets OMP_NUM_THREADS=1 and OMP_WAIT_POLICY=passive for every
// test, so the counting tests pass an environment without them.
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { availableParallelism, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { Engine } from '../../server/engine/engine.js';
import { applyOpenMpWaitDefault, cpuQuota, DEFAULT_OMP_WAIT_ENV, defaultThreadCount } from '../../server/engine/cpu-threads.js';
import { loadNative, type NativeLoadOptions, type NativeModelSpec, type NativePoolInfo } from '../../server/native/addon.js';
import { modelDir } from '../helpers/fixtures.js';

const roots: string[] = [];
afterEach(() => {
  for (const r of roots.splice(0)) rmSync(r, { recursive: true, force: true });
});

/** A fake filesystem root: `files` maps paths (relative to the root) to contents. */
function fakeRoot(files: Record<string, string>): string {
  const root = mkdtempSync(join(tmpdir(), 'loraplex-cgroup-'));
  roots.push(root);
  for (const [path, text] of Object.entries(files)) {
    mkdirSync(dirname(join(root, path)), { recursive: true });
    writeFileSync(join(root, path), text);
  }
  return root;
}

const V2_MOUNT = '30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n';
const V1_MOUNTS =
  '32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n' +
  '33 31 0:30 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n';

function v2(cpuMax: Record<string, string>, path = '/kubepods/pod1/c1'): string {
  const files: Record<string, string> = { 'proc/self/cgroup': `0::${path}\n`, 'proc/self/mountinfo': V2_MOUNT };
  for (const [dir, text] of Object.entries(cpuMax)) files[join('sys/fs/cgroup', dir, 'cpu.max')] = text;
  return fakeRoot(files);
}

function v1(quotas: Record<string, [string, string]>, path = '/kubepods/pod1/c1'): string {
  const files: Record<string, string> = {
    'proc/self/cgroup': `5:memory:${path}\n4:cpu,cpuacct:${path}\n0::/\n`,
    'proc/self/mountinfo': V1_MOUNTS,
  };
  for (const [dir, [quota, period]] of Object.entries(quotas)) {
    files[join('sys/fs/cgroup/cpu,cpuacct', dir, 'cpu.cfs_quota_us')] = quota;
    files[join('sys/fs/cgroup/cpu,cpuacct', dir, 'cpu.cfs_period_us')] = period;
  }
  return fakeRoot(files);
}

const threadsUnder = (root: string, cpus = 8) => defaultThreadCount({ root, env: {}, cpus });

describe('cpuQuota and defaultThreadCount', () => {
  it('cgroup v2: 1.5 CPUs -> 2 threads, 0.5 -> 1, "max" -> the affinity count', () => {
    const r15 = v2({ '/kubepods/pod1/c1': '150000 100000\n' });
    expect(cpuQuota(r15)).toBe(1.5);
    expect(threadsUnder(r15)).toBe(2);
    const r05 = v2({ '/kubepods/pod1/c1': '50000 100000\n' });
    expect(cpuQuota(r05)).toBe(0.5);
    expect(threadsUnder(r05)).toBe(1);
    const rMax = v2({ '/kubepods/pod1/c1': 'max 100000\n', '/kubepods/pod1': 'max 100000\n' });
    expect(cpuQuota(rMax)).toBeNull();
    expect(threadsUnder(rMax, 6)).toBe(6);
    // The affinity mask caps a larger quota.
    expect(threadsUnder(v2({ '/kubepods/pod1/c1': '800000 100000' }), 3)).toBe(3);
  });

  it('cgroup v2: a tighter parent wins over its child', () => {
    const root = v2({ '/kubepods/pod1/c1': '400000 100000', '/kubepods/pod1': '200000 100000', '/kubepods': 'max 100000' });
    expect(cpuQuota(root)).toBe(2);
    expect(threadsUnder(root)).toBe(2);
    // A container's own cgroup mounted at /sys/fs/cgroup (mount root = its path): read there.
    const ns = fakeRoot({
      'proc/self/cgroup': '0::/kubepods/pod1/c1\n',
      'proc/self/mountinfo': V2_MOUNT.replace(' / /sys/fs/cgroup', ' /kubepods/pod1/c1 /sys/fs/cgroup'),
      'sys/fs/cgroup/cpu.max': '300000 100000',
    });
    expect(cpuQuota(ns)).toBe(3);
  });

  it('cgroup v1: CFS quota and period, -1 = none, the tightest along the parents', () => {
    const root = v1({ '/kubepods/pod1/c1': ['150000', '100000'] });
    expect(cpuQuota(root)).toBe(1.5);
    expect(threadsUnder(root)).toBe(2);
    expect(cpuQuota(v1({ '/kubepods/pod1/c1': ['-1', '100000'], '/': ['-1', '100000'] }))).toBeNull();
    expect(cpuQuota(v1({ '/kubepods/pod1/c1': ['-1', '100000'], '/kubepods': ['50000', '100000'] }))).toBe(0.5);
    expect(threadsUnder(v1({ '/kubepods': ['50000', '100000'] }))).toBe(1);
  });

  it('no limit, never an exception, on missing or garbage files', () => {
    const cpus = availableParallelism();
    const empty = fakeRoot({});
    expect(cpuQuota(empty)).toBeNull();
    expect(threadsUnder(empty, cpus)).toBe(cpus);
    for (const text of ['', 'garbage', '100000', 'max', '-5 100000', '100000 0', '1e5 1e5', '\u0000\u0001'])
      expect(cpuQuota(v2({ '/kubepods/pod1/c1': text }))).toBeNull();
    for (const [quota, period] of [['', '100000'], ['garbage', '100000'], ['max', '100000'], ['1e5', '100000'], ['0', '100000'], ['100000', '0'], ['100000', 'x'], ['100000', '']])
      expect(cpuQuota(v1({ '/kubepods/pod1/c1': [quota, period] }))).toBeNull();
    expect(cpuQuota(fakeRoot({ 'proc/self/cgroup': 'nonsense\n\n::\n', 'proc/self/mountinfo': 'x y z\n' }))).toBeNull();
    // A directory where a file should be.
    expect(cpuQuota(fakeRoot({ 'proc/self/cgroup': '0::/a\n', 'proc/self/mountinfo': V2_MOUNT, 'sys/fs/cgroup/a/cpu.max/x': '1' }))).toBeNull();
    // No mountinfo: the usual /sys/fs/cgroup layout.
    expect(cpuQuota(fakeRoot({ 'proc/self/cgroup': '0::/a\n', 'sys/fs/cgroup/a/cpu.max': '250000 100000' }))).toBe(2.5);
    // The real machine: whatever its limit, at least one thread, at most its affinity mask.
    expect(() => cpuQuota()).not.toThrow();
    const n = defaultThreadCount({ env: {} });
    expect(n).toBeGreaterThanOrEqual(1);
    expect(n).toBeLessThanOrEqual(availableParallelism());
  });

  it('OMP_NUM_THREADS, when the user set it, is the default (as OpenMP itself would)', () => {
    const root = v2({ '/kubepods/pod1/c1': '150000 100000' });
    expect(defaultThreadCount({ root, env: { OMP_NUM_THREADS: '3' }, cpus: 8 })).toBe(3);
    expect(defaultThreadCount({ root, env: { OMP_NUM_THREADS: '4,2' }, cpus: 8 })).toBe(4);
    expect(defaultThreadCount({ root, env: { OMP_NUM_THREADS: 'lots' }, cpus: 8 })).toBe(2);
    expect(defaultThreadCount({ root, env: { OMP_NUM_THREADS: '0' }, cpus: 8 })).toBe(2);
  });
});

describe('applyOpenMpWaitDefault', () => {
  it('sets the default wait policy only when the user chose none', () => {
    const env: NodeJS.ProcessEnv = { PATH: '/bin' };
    expect(applyOpenMpWaitDefault(env)).toEqual(DEFAULT_OMP_WAIT_ENV);
    expect(env).toEqual({ PATH: '/bin', ...DEFAULT_OMP_WAIT_ENV });
    for (const user of [{ OMP_WAIT_POLICY: 'active' }, { OMP_WAIT_POLICY: 'passive' }, { GOMP_SPINCOUNT: '300000' }, { GOMP_SPINCOUNT: '' }]) {
      const e: NodeJS.ProcessEnv = { ...user };
      expect(applyOpenMpWaitDefault(e)).toEqual({});
      expect(e).toEqual(user);
    }
  });

  it('has left the test environment as vitest.config.ts set it', () => {
    loadNative(); // calls applyOpenMpWaitDefault before requiring the addon
    expect(process.env.OMP_WAIT_POLICY).toBe('passive');
    expect(process.env.GOMP_SPINCOUNT).toBeUndefined();
  });
});

describe('Engine thread count', () => {
  it('an engine created without `threads` runs defaultThreadCount() threads', async () => {
    // Record what the engine asks the addon for and what the addon reports.
    const mod = loadNative();
    const Native = mod.Engine;
    const seen: Array<{ asked: number | undefined; pool: NativePoolInfo }> = [];
    mod.Engine = class extends Native {
      override async load(spec: NativeModelSpec, options: NativeLoadOptions): Promise<NativePoolInfo> {
        const pool = await super.load(spec, options);
        seen.push({ asked: options.threads, pool });
        return pool;
      }
    };
    try {
      const e = await Engine.create({ model: modelDir('llama-gqa') });
      await e.close();
      const e2 = await Engine.create({ model: modelDir('llama-gqa'), threads: 1 });
      await e2.close();
    } finally {
      mod.Engine = Native;
    }
    // Here OMP_NUM_THREADS=1 (vitest.config.ts): the default honours it, as OpenMP does.
    expect(defaultThreadCount()).toBe(1);
    expect(seen[0].asked).toBe(defaultThreadCount());
    expect(seen[0].pool.threads).toBe(defaultThreadCount());
    expect(seen[1].asked).toBe(1);
  });
});
