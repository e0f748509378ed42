// The CPU engine's default thread count and OpenMP wait policy: how many CPUs this process may
// really use (the affinity mask and the cgroup CPU quota, v2 cpu.max or v1 cfs_quota_us, not the
// host's cores) and how OpenMP threads wait between parallel regions. Both matter on a shared or
// limited CPU: an OpenMP thread that spins while its peer is descheduled (by a competing process
// or by the cgroup's CFS throttling) stalls every barrier of every kernel of the step.
import { readFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { posix } from 'node:path';

/** A cgroup hierarchy as mounted: where its files are, and which cgroup path the mount shows. */
interface CgroupMount {
  mountPoint: string; // absolute, e.g. /sys/fs/cgroup or /sys/fs/cgroup/cpu,cpuacct
  mountRoot: string; // the cgroup path at the mount point ("/" unless bind-mounted from inside)
}

function readText(path: string): string | null {
  try {
    return readFileSync(path, 'utf8');
  } catch {
    return null;
  }
}

/** cgroup v2 `cpu.max`: "max 100000" = no limit, "150000 100000" = 1.5 CPUs. */
function parseCpuMax(text: string | null): number | null {
  const m = text?.trim().match(/^(\d+|max)\s+(\d+)$/);
  if (!m || m[1] === 'max') return null;
  const quota = Number(m[1]), period = Number(m[2]);
  return quota > 0 && period > 0 ? quota / period : null;
}

/** cgroup v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`: quota -1 = no limit. */
function parseCfs(quotaText: string | null, periodText: string | null): number | null {
  const q = quotaText?.trim(), p = periodText?.trim();
  if (!q || !p || !/^-?\d+$/.test(q) || !/^\d+$/.test(p)) return null;
  const quota = Number(q), period = Number(p);
  return quota > 0 && period > 0 ? quota / period : null;
}

/**
 * The mounts of the cgroup v2 hierarchy and of the v1 hierarchy holding the `cpu` controller,
 * from /proc/self/mountinfo (fields: id parent dev root mountpoint opts ... - fstype source super).
 * Falls back to the usual /sys/fs/cgroup layout when mountinfo is unreadable.
 */
function cgroupMounts(root: string): { v2: CgroupMount[]; v1: CgroupMount[] } {
  const v2: CgroupMount[] = [], v1: CgroupMount[] = [];
  const unescape = (s: string) => s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
  for (const line of (readText(posix.join(root, 'proc/self/mountinfo')) ?? '').split('\n')) {
    const f = line.split(' ');
    const dash = f.indexOf('-');
    if (dash < 6 || f.length < dash + 3) continue;
    const mount = { mountRoot: unescape(f[3]), mountPoint: unescape(f[4]) };
    if (f[dash + 1] === 'cgroup2') v2.push(mount);
    else if (f[dash + 1] === 'cgroup' && f[dash + 3].split(',').includes('cpu')) v1.push(mount);
  }
  if (v2.length === 0 && v1.length === 0) {
    v2.push({ mountPoint: '/sys/fs/cgroup', mountRoot: '/' });
    for (const d of ['cpu,cpuacct', 'cpu']) v1.push({ mountPoint: `/sys/fs/cgroup/${d}`, mountRoot: '/' });
  }
  return { v2, v1 };
}

/**
 * The tightest limit along `cgroupPath` and its parents, up to the mount point: a parent's
 * quota caps every cgroup below it, and inside a container the mount point is the container's
 * own cgroup (its parents are not visible, nor needed: the container's limit is set there).
 */
function tightestAlong(root: string, mount: CgroupMount, cgroupPath: string, read: (dir: string) => number | null): number | null {
  const base = mount.mountRoot === '/' ? '' : mount.mountRoot;
  // A path outside the mount's root (a cgroup namespace mismatch) leaves only the mount itself.
  const rel = cgroupPath === base || cgroupPath.startsWith(`${base}/`) ? cgroupPath.slice(base.length) : '';
  let best: number | null = null;
  for (let dir = posix.join('/', rel); ; dir = posix.dirname(dir)) {
    const cpus = read(posix.join(root, mount.mountPoint, dir));
    if (cpus !== null && (best === null || cpus < best)) best = cpus;
    if (dir === '/') return best;
  }
}

/**
 * The CPU limit of this process's cgroup, in CPUs (1.5 = 150 ms of CPU time per 100 ms), or null
 * when there is none: cgroup v2 `cpu.max` and v1 CFS quota, this cgroup and its parents, the
 * tightest wins. `root` is the filesystem root to read under (tests point it at a fake tree).
 * Never throws: a missing or unreadable file means no limit.
 */
export function cpuQuota(root = '/'): number | null {
  const mounts = cgroupMounts(root);
  let best: number | null = null;
  const consider = (cpus: number | null) => {
    if (cpus !== null && (best === null || cpus < best)) best = cpus;
  };
  // /proc/self/cgroup: "0::/path" (v2) and "N:cpu,cpuacct:/path" (v1), one line per hierarchy.
  for (const line of (readText(posix.join(root, 'proc/self/cgroup')) ?? '').split('\n')) {
    const m = line.match(/^(\d+):([^:]*):(\/.*)$/);
    if (!m) continue;
    const [, id, controllers, path] = m;
    if (id === '0' && controllers === '') {
      for (const mount of mounts.v2) consider(tightestAlong(root, mount, path, (d) => parseCpuMax(readText(posix.join(d, 'cpu.max')))));
    } else if (controllers.split(',').includes('cpu')) {
      for (const mount of mounts.v1)
        consider(tightestAlong(root, mount, path, (d) => parseCfs(readText(posix.join(d, 'cpu.cfs_quota_us')), readText(posix.join(d, 'cpu.cfs_period_us')))));
    }
  }
  return best;
}

export interface ThreadCountOptions {
  root?: string; // filesystem root for cpuQuota (tests)
  env?: NodeJS.ProcessEnv; // where OMP_NUM_THREADS is read (default process.env)
  cpus?: number; // the affinity mask's size (default os.availableParallelism())
}

/**
 * The default compute thread count (no `--threads`): OMP_NUM_THREADS when the user set it (as
 * OpenMP itself would), else min(CPUs in the affinity mask, ceil(cgroup CPU quota)), at least 1.
 * More threads than the quota only buys CFS throttling: every thread runs its share of each
 * kernel, then the step waits for the slowest, which is parked until the next quota period.
 * os.availableParallelism() is libuv's count of sched_getaffinity's mask on Linux (`taskset -c 0`
 * gives 1), so a cpuset-pinned container is covered too.
 */
export function defaultThreadCount(options: ThreadCountOptions = {}): number {
  const fromEnv = Number((options.env ?? process.env).OMP_NUM_THREADS?.split(',')[0]?.trim());
  if (Number.isInteger(fromEnv) && fromEnv > 0) return fromEnv;
  const cpus = options.cpus ?? availableParallelism();
  const quota = cpuQuota(options.root);
  return Math.max(1, quota === null ? cpus : Math.min(cpus, Math.ceil(quota)));
}

/**
 * The OpenMP wait policy the engine runs with unless the user chose one: spin 1000 iterations
 * (~20 us: one iteration is a PAUSE, ~21 ns on the Sapphire Rapids we measured) at a barrier, then
 * sleep. libgomp's default spins 300k (~6 ms here) before sleeping: when another process holds the
 * core a peer thread needs, a decode step waits out most of its hundreds of barriers. Measured
 * with bench/threads-contention.ts on 2 cores, one stream: with 2 busy processes 13-15 tok/s
 * (libgomp's default), 28-34 (1000), 18-40 (passive); on idle cores ~71 for both the default and
 * 1000 but 51-63 passive, which pays a futex wake (in a VM a vCPU wake-up) per region (16
 * streams: 220-276 with 1000, 244-282 default, 147-212 passive). 300 was slower at 16 streams on idle cores; 3000 was half as fast as
 * 1000 while another process held a core, where passive is best (1.3-1.6x 1000): set
 * OMP_WAIT_POLICY=passive where the CPU is always shared.
 */
export const DEFAULT_OMP_WAIT_ENV: Readonly<Record<string, string>> = { GOMP_SPINCOUNT: '1000' };

/**
 * Sets the default OpenMP wait policy in `env` (process.env: the C environment libgomp reads)
 * unless the user set OMP_WAIT_POLICY or GOMP_SPINCOUNT. libgomp reads these once, when it is
 * loaded with the addon, so this must run before the addon is required (loadNative does).
 * Returns the variables it set (empty when the user's choice stands).
 */
export function applyOpenMpWaitDefault(env: NodeJS.ProcessEnv = process.env): Record<string, string> {
  if (env.OMP_WAIT_POLICY !== undefined || env.GOMP_SPINCOUNT !== undefined) return {};
  Object.assign(env, DEFAULT_OMP_WAIT_ENV);
  return { ...DEFAULT_OMP_WAIT_ENV };
}
