// Decode throughput on a shared CPU: tokens/s of 1 (or N) greedy streams on the SmolLM2-135M-shaped
// model while B busy processes (`node -e 'for(;;){}'`) compete for the cores, per thread-count /
// OpenMP-wait-policy configuration. libgomp reads its environment once, when the addon loads it,
// so every (configuration, case) runs in a fresh child process.
//
//   node --import tsx bench/threads-contention.ts [--configs before,after,passive,spin1000]
//        [--cases 1x0,16x0,1x2] [--seconds 4] [--rounds 1] [--max-other C] [--model DIR] [--out FILE]
//
// A configuration is a preset, optionally with `@T` to force T threads (e.g. `passive@1`):
//   before   the behaviour before cpu-threads.ts: threads = all host cores,
//            no wait-policy variable (libgomp's default: ~300k spins at each barrier, then sleep)
//   after    the engine's defaults: threads = defaultThreadCount(), applyOpenMpWaitDefault()
//   passive  OMP_WAIT_POLICY=passive (no spinning), default thread count
//   active   OMP_WAIT_POLICY=active (spin without end), default thread count
//   spinN    GOMP_SPINCOUNT=N, default thread count
// A case is `STREAMSxBUSY`. Each run warms up, then streams 64-token requests (32-token prompts)
// for --seconds; the figure is tokens received over that wall time, as a client sees it. Step
// times (p50, p99) are of pure-decode steps. Each run also reports the cores that processes outside
// the benchmark used meanwhile; on a shared machine `--max-other 0.1` keeps only the runs during
// which others used under 0.1 core in the medians (take more rounds).
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { cpus, loadavg } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { makePrompts, percentile } from './loadgen.js';

const HERE = dirname(fileURLToPath(import.meta.url));
const OMP_VARS = ['OMP_NUM_THREADS', 'OMP_WAIT_POLICY', 'GOMP_SPINCOUNT'];

interface ChildJob {
  model: string;
  threads: number | null; // null: the engine's default
  raw: boolean; // load the addon before anything sets the wait-policy default (the "before" case)
  streams: number;
  seconds: number;
}

interface RunResult {
  threads: number;
  tokensPerS: number; // tokens the streams received / wall time of the window (a user's view)
  stepMsP50: number;
  stepMsP99: number;
  steps: number;
  cpuS?: number; // the child's CPU time, load included
  otherCores?: number; // parent: average cores used by processes outside this benchmark during the run
}

/** Child: one engine, one configuration (already in its environment), one case. */
async function child(job: ChildJob): Promise<void> {
  // Static imports are hoisted: the engine (and with it the wait-policy default) loads only after
  // this, so `raw` sees libgomp initialised from the untouched environment.
  if (job.raw) createRequire(import.meta.url)(join(HERE, '..', 'build', 'Release', 'loraplex_native.node'));
  const { Engine } = await import('../server/engine/engine.js');
  const { defaultThreadCount } = await import('../server/engine/cpu-threads.js');
  const e = await Engine.create({ model: job.model, memoryBudget: 1024 ** 3, maxNumSeqs: 64, threads: job.threads ?? undefined });
  const prompts = makePrompts({ requests: job.streams, concurrency: job.streams, promptTokens: 32, maxTokens: 64, adapters: 0, vocab: 49152, seed: job.streams });
  // Requests of up to 64 tokens, all streams at once, until `end`: a stream stops mid-request at
  // the deadline (the engine aborts it), so a starved configuration cannot overrun the run.
  let tokens = 0;
  const batch = (maxTokens: number, end: number) =>
    Promise.all(prompts.map(async (p) => {
      for await (const _ of e.generate(p, { maxTokens, temperature: 0, ignoreEos: true })) {
        tokens++;
        if (performance.now() > end) break;
      }
    }));
  await batch(4, performance.now() + job.seconds * 1000); // warm-up: thread pool started, pages touched
  const steps: number[] = [];
  e.onStep = () => {
    if (e.lastStep.tokens === job.streams && e.lastStep.seqs === job.streams) steps.push(e.lastStep.wallMs);
  };
  tokens = 0;
  const t0 = performance.now(), end = t0 + job.seconds * 1000;
  while (performance.now() < end) await batch(64, end);
  const wallS = (performance.now() - t0) / 1000;
  e.onStep = null;
  await e.close();
  const out: RunResult = {
    threads: job.threads ?? defaultThreadCount(),
    tokensPerS: tokens / wallS,
    stepMsP50: percentile(steps, 50),
    stepMsP99: percentile(steps, 99),
    steps: steps.length,
    cpuS: (process.cpuUsage().user + process.cpuUsage().system) / 1e6,
  };
  process.stdout.write(`RESULT ${JSON.stringify(out)}\n`);
}

/** A configuration's child environment and thread count. */
function configure(spec: string, baseEnv: NodeJS.ProcessEnv): { env: NodeJS.ProcessEnv; threads: number | null; raw: boolean } {
  const [name, forced] = spec.split('@');
  const env = { ...baseEnv };
  for (const k of OMP_VARS) delete env[k];
  let threads: number | null = forced ? Number(forced) : null;
  let raw = false;
  if (name === 'before') {
    threads ??= cpus().length;
    raw = true;
  } else if (name === 'passive') env.OMP_WAIT_POLICY = 'passive';
  else if (name === 'active') env.OMP_WAIT_POLICY = 'active';
  else if (/^spin\d+$/.test(name)) env.GOMP_SPINCOUNT = name.slice(4);
  else if (name !== 'after') throw new Error(`unknown configuration ${spec}: before, after, passive, active, spinN (optionally @threads)`);
  return { env, threads, raw };
}

/** Busy processes, each spinning one core; each also ends itself after `maxS`, even if we die. */
const busyProcs = new Set<ChildProcess>();
const killBusy = () => {
  for (const p of busyProcs) if (p.exitCode === null && p.signalCode === null) p.kill('SIGKILL');
  busyProcs.clear();
};
process.once('exit', killBusy);
process.once('SIGINT', () => process.exit(130));
process.once('SIGTERM', () => process.exit(143));

function startBusy(n: number, maxS: number): void {
  const spin = `const end = Date.now() + ${maxS * 1000}; for (let i = 0; ; i++) if ((i & 0xffffff) === 0 && Date.now() > end) break;`;
  for (let k = 0; k < n; k++) busyProcs.add(spawn(process.execPath, ['-e', spin], { stdio: 'ignore' }));
}

/** Non-idle CPU seconds of the whole machine so far (/proc/stat, USER_HZ = 100). */
function machineBusyS(): number {
  // cpu  user nice system idle iowait irq softirq steal ...
  const f = (readText('/proc/stat') ?? '').split('\n')[0].trim().split(/\s+/).slice(1).map(Number);
  return f.length < 7 ? NaN : (f[0] + f[1] + f[2] + f[5] + f[6]) / 100;
}

/** CPU seconds of a running process (/proc/PID/stat utime + stime). */
function processCpuS(pid: number | undefined): number {
  const st = pid ? readText(`/proc/${pid}/stat`) : null;
  if (!st) return 0;
  const f = st.slice(st.lastIndexOf(')') + 2).split(' ');
  return (Number(f[11]) + Number(f[12])) / 100;
}

function readText(path: string): string | null {
  try {
    return readFileSync(path, 'utf8');
  } catch {
    return null;
  }
}

/**
 * One child run with `busy` competing processes. Also measures the cores other processes on the
 * machine used meanwhile (everything but this benchmark): on a shared machine that is the noise.
 */
function runChild(job: ChildJob, env: NodeJS.ProcessEnv, busy: number): Promise<RunResult> {
  const limitS = job.seconds + 300; // model load and warm-up, even when starved
  const t0 = performance.now(), m0 = machineBusyS(), p0 = process.cpuUsage();
  startBusy(busy, limitS);
  return new Promise<RunResult>((resolveRun) => {
    const c = spawn(process.execPath, ['--import', 'tsx', fileURLToPath(import.meta.url), '--child', JSON.stringify(job)], { env, stdio: ['ignore', 'pipe', 'inherit'], timeout: limitS * 1000, killSignal: 'SIGKILL' });
    let out = '';
    c.stdout!.on('data', (d: Buffer) => (out += d.toString()));
    c.on('close', (code) => {
      const busyS = [...busyProcs].reduce((n, p) => n + processCpuS(p.pid), 0);
      killBusy();
      const p = process.cpuUsage(p0), wallS = (performance.now() - t0) / 1000;
      const line = out.split('\n').find((l) => l.startsWith('RESULT '));
      const res: RunResult = line
        ? (JSON.parse(line.slice(7), (_, v: unknown) => (v === null ? NaN : v)) as RunResult)
        : { threads: job.threads ?? NaN, tokensPerS: NaN, stepMsP50: NaN, stepMsP99: NaN, steps: 0 };
      if (!line) console.error(`child exited ${code} without a result`);
      res.otherCores = (machineBusyS() - m0 - (res.cpuS ?? 0) - busyS - (p.user + p.system) / 1e6) / wallS;
      resolveRun(res);
    });
  });
}

const fmt = (x: number | null | undefined, digits = 1) => (x === null || x === undefined || Number.isNaN(x) ? '-' : x.toFixed(digits));

async function ensureModel(dir: string | undefined): Promise<string> {
  if (dir) return resolve(dir);
  // Its own copy (no adapters): engine-bench may regenerate bench/models/smol-bf16 meanwhile.
  const base = join(HERE, 'models', 'smol-bf16-base');
  if (!existsSync(join(base, 'config.json'))) {
    console.error(`generating ${base} (bf16, no adapters)...`);
    const { makeModel } = await import('./make-model.js');
    await makeModel({ out: base, dtype: 'bf16', adapters: 0 });
  }
  return base;
}

async function main(): Promise<void> {
  const { values: a } = parseArgs({
    options: {
      child: { type: 'string' }, configs: { type: 'string' }, cases: { type: 'string' }, seconds: { type: 'string' },
      rounds: { type: 'string' }, model: { type: 'string' }, out: { type: 'string' }, 'max-other': { type: 'string' },
    },
  });
  if (a.child) return child(JSON.parse(a.child) as ChildJob);
  const model = await ensureModel(a.model);
  const configs = (a.configs ?? 'before,after').split(',');
  const cases = (a.cases ?? '1x0,16x0,1x2').split(',').map((c) => {
    const [s, b] = c.split('x').map(Number);
    if (!(s >= 1) || !(b >= 0)) throw new Error(`case ${c}: STREAMSxBUSY, e.g. 1x2`);
    return { name: c, streams: s, busy: b };
  });
  const seconds = Number(a.seconds ?? 4), rounds = Number(a.rounds ?? 1), maxOther = Number(a['max-other'] ?? Infinity);
  const runs: Record<string, Record<string, RunResult[]>> = {};
  console.log(`model ${model}; host cores ${cpus().length}; ${seconds} s per run, ${rounds} round(s); load ${loadavg()[0].toFixed(2)}`);
  // Rounds outermost, configurations alternated: a drift in the machine's speed hits all alike.
  for (let r = 0; r < rounds; r++)
    for (const c of cases)
      for (const spec of configs) {
        const { env, threads, raw } = configure(spec, process.env);
        const res = await runChild({ model, threads, raw, streams: c.streams, seconds }, env, c.busy);
        ((runs[spec] ??= {})[c.name] ??= []).push(res);
        console.log(`round ${r + 1} ${spec.padEnd(12)} streams ${c.streams} busy ${c.busy}: ${fmt(res.tokensPerS)} tok/s (threads ${res.threads}, step p50 ${fmt(res.stepMsP50)} ms p99 ${fmt(res.stepMsP99)} ms, ${res.steps} steps; other processes ${fmt(res.otherCores, 2)} cores)`);
      }
  const kept = (xs: RunResult[]) => xs.filter((x) => !Number.isNaN(x.tokensPerS) && !((x.otherCores ?? 0) >= maxOther));
  console.log(`\nmedian tok/s over ${rounds} round(s)${maxOther < Infinity ? ` (runs while others used < ${maxOther} cores; how many)` : ''}, streams x busy processes:`);
  console.log(`${'config'.padEnd(14)}${cases.map((c) => c.name.padStart(12)).join('')}`);
  const summary: Record<string, Record<string, number>> = {};
  for (const spec of configs) {
    summary[spec] = Object.fromEntries(cases.map((c) => [c.name, percentile(kept(runs[spec][c.name]).map((x) => x.tokensPerS), 50)]));
    const cell = (c: { name: string }) => `${fmt(summary[spec][c.name])}${maxOther < Infinity ? ` (${kept(runs[spec][c.name]).length})` : ''}`;
    console.log(`${spec.padEnd(14)}${cases.map((c) => cell(c).padStart(12)).join('')}`);
  }
  const outFile = a.out ?? join(HERE, 'out', 'threads-contention.json');
  mkdirSync(dirname(outFile), { recursive: true });
  writeFileSync(outFile, JSON.stringify({ date: new Date().toISOString(), model, hostCores: cpus().length, seconds, rounds, maxOther, summary, runs }, null, 2));
}

await main();
