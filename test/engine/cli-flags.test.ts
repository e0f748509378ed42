// The command line's flag table (server/flags.ts) against what users see: --help for every
// command, --version, the README's generated flag tables, one-line errors with exit code 2 for
// every kind of bad input (1 stays for runtime errors), and the model-load progress (one JSON
// line per phase off a terminal, a bar on one).
import { spawnSync } from 'node:child_process';
import { readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import pino from 'pino';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { commandHelp, mainHelp, readmeFlagBlock } from '../../server/cli-help.js';
import { main } from '../../server/cli.js';
import { engineOptions, generateConfig, serveConfig } from '../../server/config.js';
import { Engine, type LoadPhase } from '../../server/engine/engine.js';
import { closest, ConfigError, editDistance, FLAGS, flagsOf, parseCommandLine, SERVE_FLAG_NAMES } from '../../server/flags.js';
import { barLine, formatBytes, loadReporter } from '../../server/load-progress.js';
import { modelDir, ROOT } from '../helpers/fixtures.js';
import { startChildServer } from '../helpers/server.js';

function cli(args: string[], env: NodeJS.ProcessEnv = {}) {
  return spawnSync(process.execPath, ['--import', 'tsx', join(ROOT, 'server', 'main.ts'), ...args], {
    cwd: ROOT,
    encoding: 'utf8',
    timeout: 60_000,
    env: { ...process.env, ...env },
  });
}

/** main() in this process: exit code, stdout and stderr. */
async function run(args: string[]): Promise<{ code: number; out: string; err: string }> {
  let out = '';
  let err = '';
  vi.spyOn(process.stdout, 'write').mockImplementation((s) => ((out += String(s)), true));
  vi.spyOn(process.stderr, 'write').mockImplementation((s) => ((err += String(s)), true));
  try {
    const code = await main(args);
    return { code, out, err };
  } finally {
    vi.restoreAllMocks();
  }
}

const VERSION = (JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { version: string }).version;

describe('the flag table', () => {
  it('gives every flag a help line, a LORAPLEX_ variable and a command; names are unique', () => {
    expect(new Set(FLAGS.map((f) => f.name)).size).toBe(FLAGS.length);
    for (const f of FLAGS) {
      expect(f.help.length, f.name).toBeGreaterThan(5);
      expect(f.env).toBe(`LORAPLEX_${f.name.toUpperCase().replace(/-/g, '_')}`);
      expect(f.commands.length, f.name).toBeGreaterThan(0);
      if (f.type !== 'boolean') expect(f.arg, f.name).toBeTruthy();
    }
  });

  it('generate takes every engine flag serve takes, plus its sampling flags', () => {
    const gen = new Set(flagsOf('generate').map((f) => f.name));
    for (const name of ['model', 'memory-budget', 'gpu-memory-utilization', 'enforce-eager', 'max-num-seqs', 'max-batch-tokens', 'max-lora-rank', 'max-loras', 'max-loras-per-batch', 'max-model-len',
      'block-size', 'threads', 'device', 'compute-dtype', 'kv-cache-dtype', 'lora-dtype', 'enable-prefix-caching', 'no-enable-prefix-caching'])
      expect([gen.has(name), SERVE_FLAG_NAMES.includes(name)], name).toEqual([true, true]);
    for (const name of ['prompt', 'adapter', 'max-tokens', 'temperature', 'top-p', 'top-k', 'seed', 'chat', 'ignore-eos']) expect(gen.has(name), name).toBe(true);
  });

  it('matches the README blocks between the flags:*:begin/end markers', () => {
    const readme = readFileSync(join(ROOT, 'README.md'), 'utf8');
    for (const block of ['serve', 'generate'] as const) {
      const m = new RegExp(`<!-- flags:${block}:begin -->\\n([\\s\\S]*?)\\n<!-- flags:${block}:end -->`).exec(readme);
      expect(m, `README.md has no <!-- flags:${block}:begin --> ... end block`).not.toBeNull();
      expect(m![1], `README.md's ${block} flags differ from server/flags.ts: paste readmeFlagBlock('${block}') (server/cli-help.ts)`).toBe(readmeFlagBlock(block));
    }
  });

  it('--help of each command lists each of its flags with the help text', () => {
    for (const cmd of ['serve', 'generate'] as const) {
      const help = commandHelp(cmd);
      for (const f of flagsOf(cmd)) expect(help, `${cmd} --help: --${f.name}`).toMatch(new RegExp(`^  --${f.name}(?![\\w-])`, 'm'));
      for (const f of FLAGS.filter((x) => !x.commands.includes(cmd))) expect(help, `${cmd} --help: --${f.name}`).not.toMatch(new RegExp(`^  --${f.name}(?![\\w-])`, 'm'));
      for (const l of help.split('\n')) if (!/^ {2}--\S+( \S+)?$/.test(l)) expect(l.length, l).toBeLessThanOrEqual(100);
    }
    const top = mainHelp();
    for (const f of FLAGS) expect(top).toContain(`[--${f.name}`);
  });
});

describe('parsing', () => {
  it('reads LORAPLEX_<NAME>, the command line winning, and applies per-command defaults', () => {
    expect(serveConfig(['--port', '9000'], { LORAPLEX_PORT: '7000', LORAPLEX_THREADS: '3' })).toMatchObject({ port: 9000, threads: 3 });
    expect(serveConfig([], {})).toMatchObject({ port: 8000, host: '127.0.0.1', maxNumSeqs: 64, maxLorasPerBatch: 0, shutdownTimeout: 30, loraRoots: [], enablePrefixCaching: true });
    const g = generateConfig(['--prompt', 'x'], {});
    expect(g).toMatchObject({ maxNumSeqs: 1, maxTokens: 64, temperature: 0, topP: 1, topK: -1, seed: null, chat: false, computeDtype: 'auto' });
    expect(generateConfig(['--prompt=--dashes', '--compute-dtype', 'float32', '--device', 'cpu', '--no-enable-prefix-caching'], {}))
      .toMatchObject({ prompt: '--dashes', computeDtype: 'float32', device: 'cpu', enablePrefixCaching: false });
    expect(generateConfig([], { LORAPLEX_PROMPT: 'from env' }).prompt).toBe('from env');
    expect(generateConfig(['--prompt', 'x', '--seed', '9223372036854775807'], {}).seed).toBe(2n ** 63n - 1n);
    expect(generateConfig(['--prompt', 'x', '--seed', '-5'], {}).seed).toBe(-5);
  });

  it('reads booleans from the environment strictly', () => {
    expect(serveConfig([], { LORAPLEX_ENABLE_PREFIX_CACHING: 'false' }).enablePrefixCaching).toBe(false);
    // CUDA sizing and graphs: vLLM's defaults and spellings, through engineOptions to Engine.create.
    expect(serveConfig([], {})).toMatchObject({ gpuMemoryUtilization: 0.92, enforceEager: false });
    expect(engineOptions(serveConfig(['--gpu-memory-utilization', '0.5', '--enforce-eager'], {}), 'm')).toMatchObject({ gpuMemoryUtilization: 0.5, enforceEager: true });
    expect(serveConfig([], { LORAPLEX_GPU_MEMORY_UTILIZATION: '1', LORAPLEX_ENFORCE_EAGER: 'true' })).toMatchObject({ gpuMemoryUtilization: 1, enforceEager: true });
    expect(serveConfig([], { LORAPLEX_NO_UI: 'on' }).ui).toBe(false);
    expect(serveConfig([], { LORAPLEX_NO_UI: '0' }).ui).toBe(true);
    expect(() => serveConfig([], { LORAPLEX_NO_UI: 'maybe' })).toThrow(/--no-ui must be one of .* \(got "maybe" from LORAPLEX_NO_UI\)/);
  });

  it('answers --help and --version before checking the other flags', () => {
    expect(parseCommandLine('serve', ['--port', 'abc', '--help'], {}).help).toBe(true);
    expect(parseCommandLine('generate', ['-h'], {}).help).toBe(true);
    expect(parseCommandLine('generate', ['--version'], {}).version).toBe(true);
  });

  it('suggests the nearest flag within a few edits', () => {
    expect(editDistance('modle', 'model')).toBe(1);
    const serve = flagsOf('serve').map((f) => f.name);
    expect(closest('modle', serve)).toBe('model');
    expect(closest('max_num_seqs', serve)).toBe('max-num-seqs');
    expect(closest('prot', serve)).toBe('port');
    expect(closest('memory', serve)).toBe('memory-budget'); // a unique prefix
    expect(closest('banana', serve)).toBeNull();
  });
});

describe('bad input: one line naming the flag, exit code 2', () => {
  afterEach(() => vi.restoreAllMocks());
  const cases: Array<[string[], RegExp]> = [
    [['serve', '--port', 'abc'], /^--port must be an integer in 0\.\.65535 \(got "abc"\)$/],
    [['serve', '--port', '70000'], /^--port must be an integer in 0\.\.65535 \(got "70000"\)$/],
    [['serve', '--memory-budget', '12XB'], /^--memory-budget must be a size such as 512MiB or 8GiB \(got "12XB"\)$/],
    [['serve', '--memory-budget', '0'], /^--memory-budget must be a size of at least 1 byte/],
    [['serve', '--max-num-seqs', '0'], /^--max-num-seqs must be a positive integer \(got "0"\)$/],
    [['serve', '--device', 'tpu'], /^--device must be cpu or cuda \(got "tpu"\)$/],
    [['serve', '--kv-cache-dtype', 'fp8'], /^--kv-cache-dtype must be auto, float32 or bfloat16 \(got "fp8"\)$/],
    [['serve', '--gpu-memory-utilization', '0'], /^--gpu-memory-utilization must be a number in \(0, 1\] \(got "0"\)$/],
    [['serve', '--gpu-memory-utilization', '1.5'], /^--gpu-memory-utilization must be a number in \(0, 1\]/],
    [['serve', '--gpu-memory-utilization', 'most'], /^--gpu-memory-utilization must be a number in \(0, 1\]/],
    [['serve', '--enforce-eager=no'], /^--enforce-eager takes no value \(got "no"\)$/],
    [['generate', '--prompt', 'x', '--compute-dtype', 'int8'], /^--compute-dtype must be auto, float32 or bfloat16/],
    [['serve', '--allowed-origins', 'notjson'], /^--allowed-origins must be a JSON list of strings/],
    [['serve', '--threads', '1.5'], /^--threads must be a positive integer \(got "1\.5"\)$/],
    [['serve', '--shutdown-timeout', '-1'], /^--shutdown-timeout must be a number >= 0/],
    [['serve', '--log-level', 'loud'], /^--log-level must be fatal, error, warn, info, debug, trace or silent/],
    [['serve', '--modle', 'x'], /^unknown option --modle; did you mean --model\?$/],
    [['serve', '--max-num-seq', '4'], /did you mean --max-num-seqs\?$/],
    [['serve', '--frobnicate'], /^unknown option --frobnicate \(loraplex serve --help lists the flags\)$/],
    [['serve', '-p', '80'], /^unknown option -p/],
    [['serve', '/models/llama'], /^unexpected argument "\/models\/llama": serve takes flags only/],
    [['serve', '--prompt', 'hi'], /^--prompt is a flag of loraplex generate, not of loraplex serve$/],
    [['serve', '--no-ui=yes'], /^--no-ui takes no value \(got "yes"\)$/],
    [['serve', '--model'], /^--model needs a value/],
    [['serve', '--model', '--port', '80'], /^--model needs a value/],
    [['serve', '--model='], /^--model must be a non-empty value/],
    [['generate'], /^--prompt TEXT is required/],
    [['generate', '--prompt', 'x', '--temperature', 'hot'], /^--temperature must be a number in \[0, 2\] \(got "hot"\)$/],
    [['generate', '--prompt', 'x', '--temperature', '3'], /^--temperature must be a number in \[0, 2\]/],
    [['generate', '--prompt', 'x', '--max-tokens', '-1'], /^--max-tokens must be a positive integer \(got "-1"\)$/],
    [['generate', '--prompt', 'x', '--top-p', '0'], /^--top-p must be a number in \(0, 1\]/],
    [['generate', '--prompt', 'x', '--top-k', '0.5'], /^--top-k must be an integer >= -1/],
    [['generate', '--prompt', 'x', '--seed', 'abc'], /^--seed must be an integer in/],
    [['generate', '--prompt', 'x', '--port', '80'], /^--port is a flag of loraplex serve, not of loraplex generate$/],
    [['generate', '--prompt', 'x', '--temprature', '1'], /did you mean --temperature\?$/],
    [['generate', 'hello'], /^unexpected argument "hello": the prompt goes in --prompt$/],
    [['serv'], /^unknown command "serv"; did you mean serve\?/],
    [['--port', '80'], /^a command comes first/],
  ];
  for (const [args, want] of cases) {
    it(args.join(' ') || '(nothing)', async () => {
      const r = await run(args);
      expect(r.code, r.err).toBe(2);
      expect(r.out).toBe('');
      expect(r.err).toMatch(/^loraplex: error: [^\n]+\n$/);
      expect(r.err.slice('loraplex: error: '.length, -1)).toMatch(want);
    });
  }

  it('names the environment variable of a bad value from the environment', () => {
    expect(() => serveConfig([], { LORAPLEX_PORT: 'x' })).toThrow(ConfigError);
    expect(() => serveConfig([], { LORAPLEX_PORT: 'x' })).toThrow('--port must be an integer in 0..65535 (got "x" from LORAPLEX_PORT)');
    expect(() => serveConfig([], { LORAPLEX_MEMORY_BUDGET: 'lots' })).toThrow(/from LORAPLEX_MEMORY_BUDGET\)$/);
    expect(() => generateConfig(['--prompt', 'x'], { LORAPLEX_TEMPERATURE: 'hot' })).toThrow(/from LORAPLEX_TEMPERATURE\)$/);
  });
});

describe('the loraplex process', () => {
  it('serve --help, generate --help, --help, -h and --version answer on stdout with exit code 0', () => {
    const serve = cli(['serve', '--help']);
    expect([serve.status, serve.stderr]).toEqual([0, '']);
    expect(serve.stdout).toBe(commandHelp('serve'));
    expect(serve.stdout).toMatch(/^usage: loraplex serve \[flags\]\n/);
    const gen = cli(['generate', '-h']);
    expect(gen.status).toBe(0);
    expect(gen.stdout).toBe(commandHelp('generate'));
    for (const flag of ['--compute-dtype', '--kv-cache-dtype', '--lora-dtype', '--device', '--threads', '--max-lora-rank', '--prompt', '--seed']) expect(gen.stdout).toContain(flag);
    const top = cli(['--help']);
    expect([top.status, top.stdout]).toEqual([0, mainHelp()]);
    const v = cli(['--version']);
    expect([v.status, v.stdout]).toEqual([0, `loraplex ${VERSION}\n`]);
    expect(cli(['serve', '--version']).stdout).toBe(`loraplex ${VERSION}\n`);
  });

  it('no command prints the usage to stderr with exit code 2', () => {
    const r = cli([]);
    expect(r.status).toBe(2);
    expect(r.stdout).toBe('');
    expect(r.stderr).toBe(mainHelp());
  });

  it('exits 2 with one line for a usage error, naming the environment variable when it came from there', () => {
    const r = cli(['serve', '--modle', 'x']);
    expect([r.status, r.stdout, r.stderr]).toEqual([2, '', 'loraplex: error: unknown option --modle; did you mean --model?\n']);
    const e = cli(['serve'], { LORAPLEX_PORT: 'x' });
    expect([e.status, e.stderr]).toEqual([2, 'loraplex: error: --port must be an integer in 0..65535 (got "x" from LORAPLEX_PORT)\n']);
  });

  it('exits 1 with one line for a model that fails to load', () => {
    const r = cli(['generate', '--model', join(ROOT, 'no-such-model'), '--prompt', 'x']);
    expect(r.status).toBe(1);
    expect(r.stdout).toBe('');
    expect(r.stderr).toMatch(/^loraplex: error: [^\n]*no-such-model[^\n]*not found\n$/);
  });
});

describe('model load progress', () => {
  it('Engine.create reports config, read, pool and pack in order, in bytes, each finished', async () => {
    const snapshots: LoadPhase[][] = [];
    const dir = modelDir('mistral-sharded');
    const e = await Engine.create({ model: dir, memoryBudget: 64 * 2 ** 20, onLoadProgress: (p) => snapshots.push([...p]) });
    await e.close();
    const last = snapshots.at(-1)!;
    expect(last.map((p) => p.phase)).toEqual(['config', 'read', 'pool', 'pack']);
    for (const p of last) expect([p.phase, p.finished, p.done === p.total, p.ms >= 0]).toEqual([p.phase, true, true, true]);
    const files = JSON.parse(readFileSync(join(dir, 'model.safetensors.index.json'), 'utf8')) as { weight_map: Record<string, string> };
    const shards = [...new Set(Object.values(files.weight_map))];
    expect(shards.length).toBeGreaterThan(1);
    expect(last[1].total).toBe(shards.reduce((n, f) => n + statSync(join(dir, f)).size, 0));
    expect(last[2].total).toBeGreaterThanOrEqual(64 * 2 ** 20 - 2 * 2 ** 20);
    expect(last[3].total).toBeGreaterThan(0);
    expect(snapshots[0].map((p) => p.phase)).toEqual(['config']); // before the native load
  });

  it('logs one JSON line per phase off a terminal', () => {
    const lines: Array<Record<string, unknown>> = [];
    const stream = new PassThrough();
    stream.on('data', (d: Buffer) => lines.push(...d.toString().trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>)));
    const log = pino({ level: 'info' }, stream);
    const r = loadReporter({ tty: false, stream: process.stderr, log });
    const phase = (p: LoadPhase['phase'], done: number, total: number): LoadPhase => ({ phase: p, done, total, ms: 5, finished: done === total });
    r.update([phase('config', 10, 10)]);
    r.update([phase('config', 10, 10), phase('read', 100, 100), phase('pool', 0, 4096)]);
    r.update([phase('config', 10, 10), phase('read', 100, 100), phase('pool', 4096, 4096), phase('pack', 50, 100)]);
    r.update([phase('config', 10, 10), phase('read', 100, 100), phase('pool', 4096, 4096), phase('pack', 100, 100)]);
    r.end();
    expect(lines.map((l) => [l.phase, l.bytes])).toEqual([['config', 10], ['read', 100], ['pool', 4096], ['pack', 100]]);
    expect(lines.every((l) => typeof l.msg === 'string' && (l.msg as string).startsWith('load: '))).toBe(true);
  });

  it('draws one bar line on a terminal, redrawn in place and cleared at the end', () => {
    let out = '';
    const stream = { write: (s: string) => ((out += s), true) } as unknown as NodeJS.WritableStream;
    const r = loadReporter({ tty: true, stream, log: null, barDelayMs: 0 });
    r.update([{ phase: 'pack', done: 512 * 2 ** 20, total: 2 ** 30, ms: 100, finished: false }]);
    r.update([{ phase: 'pack', done: 2 ** 30, total: 2 ** 30, ms: 200, finished: true }]);
    r.end();
    expect(out).not.toContain('\n');
    const frames = out.split('\r').filter(Boolean);
    expect(frames[0]).toMatch(/^loading model {2}packing +\[#{12}-{12}\] +50% {2}512 MiB \/ 1\.00 GiB {2}\d+\.\d s\x1b\[K$/);
    expect(frames[1]).toMatch(/\[#{24}\] 100%/);
    expect(frames.at(-1)).toBe('\x1b[K');
    expect(formatBytes(1536)).toBe('1.50 KiB');
    expect(barLine([], 0)).toBe('');
  });

  it('a quick load draws no bar at all', () => {
    let out = '';
    const r = loadReporter({ tty: true, stream: { write: (s: string) => ((out += s), true) } as unknown as NodeJS.WritableStream, log: null, barDelayMs: 60_000 });
    r.update([{ phase: 'read', done: 1, total: 1, ms: 1, finished: true }]);
    r.end();
    expect(out).toBe('');
  });

  it('serve logs each load phase as JSON, then the adapters, listening, the playground URL and a curl', async () => {
    const srv = await startChildServer([]);
    try {
      const logs = srv.logs().split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as { phase?: string; msg: string; adapters?: number });
      const phases = logs.filter((l) => l.phase).map((l) => l.phase);
      expect(phases).toEqual(['config', 'read', 'pool', 'pack', 'adapters', 'listening']);
      expect(logs.find((l) => l.phase === 'adapters')!.adapters).toBe(3); // the demo's pirate, poet, robot
      const msgs = logs.map((l) => l.msg);
      expect(msgs.indexOf('model loaded')).toBeGreaterThan(msgs.findIndex((m) => m.startsWith('load: packed')));
      expect(msgs).toContain(`playground: open ${srv.url} in a browser`);
      expect(msgs.some((m) => m.startsWith(`try: curl ${srv.url}/v1/completions`))).toBe(true);
    } finally {
      expect(await srv.stop()).toBe(0);
    }
  });
});
