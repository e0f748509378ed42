// The Redis adapter registry across replicas: a real redis-server on a free loopback port and two
// loraplex replicas (child processes) with their own --adapter-dir and one --redis-url. An upload
// on A serves on B within a second or two (golden parity over HTTP); racing uploads of one id on
// two replicas: exactly one wins; a delete on A makes B answer 404; a new replica with an empty
// disk gets every adapter from Redis; Redis killed mid-run: writes answer 503 while cached
// adapters keep serving; Redis back on the same port: the replicas reconnect by themselves.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TextTokenizer } from '../../server/engine/tokenizer.js';
import { adapterId, adapterRoot, loadGolden, modelDir, strictSteps, type GoldenCase } from '../helpers/fixtures.js';
import { startChildServer, type ChildServer } from '../helpers/server.js';

const MODEL = 'llama-gqa';
const golden = loadGolden(MODEL);
const tok = new TextTokenizer(modelDir(MODEL));
// Token strings are not always unique (byte tokens decode to U+FFFD): those steps are pinned by id.
const VOCAB = (JSON.parse(readFileSync(join(modelDir(MODEL), 'config.json'), 'utf8')) as { vocab_size: number }).vocab_size;
const stringCount = new Map<string, number>();
for (let i = 0; i < VOCAB; i++) stringCount.set(tok.decode([i], false), (stringCount.get(tok.decode([i], false)) ?? 0) + 1);
const ambiguous = (id: number) => (stringCount.get(tok.decode([id], false)) ?? 0) > 1;
const ROOT = adapterRoot(MODEL);
const PROPAGATION_MS = 2000; // "within a second or two"
const HAVE_REDIS = spawnSync('redis-server', ['--version']).status === 0;

let tmp: string;
let redisPort: number;
let redisUrl: string;
let redis: ChildProcess | null = null;
let redisLog = '';
let A: ChildServer;
let B: ChildServer;
const dirA = () => join(tmp, 'replica-a');
const dirB = () => join(tmp, 'replica-b');

// ---------------------------------------------------------------------------------------------
// redis-server and replicas

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const a = s.address();
      const port = typeof a === 'object' && a ? a.port : 0;
      s.close(() => resolve(port));
    });
  });
}

async function startRedis(): Promise<void> {
  const proc = spawn('redis-server', [
    '--port', String(redisPort), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no',
    '--dir', tmp, '--daemonize', 'no', '--loglevel', 'notice',
  ], { stdio: ['ignore', 'pipe', 'pipe'] });
  redis = proc;
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`redis-server did not start:\n${redisLog}`)), 10_000);
    const onData = (d: Buffer) => {
      redisLog += d;
      if (/Ready to accept connections/.test(redisLog.split('--- start ---').pop()!)) {
        clearTimeout(timer);
        resolve();
      }
    };
    redisLog += '\n--- start ---\n';
    proc.stdout!.on('data', onData);
    proc.stderr!.on('data', onData);
    proc.on('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`redis-server exited (${code}):\n${redisLog}`));
    });
  });
}

async function killRedis(): Promise<void> {
  const proc = redis;
  redis = null;
  if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
  const exited = new Promise((r) => proc.once('exit', r));
  proc.kill('SIGKILL');
  await exited;
}

function replicaArgs(dir: string): string[] {
  return ['--model', modelDir(MODEL), '--adapter-dir', dir, '--redis-url', redisUrl, '--memory-budget', '16MiB', '--threads', '1', '--max-num-seqs', '8'];
}

async function startReplica(dir: string): Promise<ChildServer> {
  mkdirSync(dir, { recursive: true });
  return startChildServer(replicaArgs(dir), {}, 45_000);
}

beforeAll(async () => {
  if (!HAVE_REDIS) return;
  tmp = mkdtempSync(join(tmpdir(), 'loraplex-redis-'));
  redisPort = await freePort();
  redisUrl = `redis://127.0.0.1:${redisPort}`;
  await startRedis();
  [A, B] = await Promise.all([startReplica(dirA()), startReplica(dirB())]);
}, 60_000);

afterAll(async () => {
  await Promise.all([A?.stop(), B?.stop()]);
  await killRedis();
  if (tmp) rmSync(tmp, { recursive: true, force: true });
}, 30_000);

// ---------------------------------------------------------------------------------------------
// HTTP helpers

interface Files {
  config: Buffer;
  model: Buffer;
}

function goldenFiles(name: string): Files {
  return {
    config: readFileSync(join(ROOT, name, 'adapter_config.json')),
    model: readFileSync(join(ROOT, name, 'adapter_model.safetensors')),
  };
}

const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');

async function upload(url: string, id: string, f: Files): Promise<Response> {
  const fd = new FormData();
  fd.append('id', id);
  fd.append('adapter_config.json', new Blob([new Uint8Array(f.config)]), 'adapter_config.json');
  fd.append('adapter_model.safetensors', new Blob([new Uint8Array(f.model)]), 'adapter_model.safetensors');
  return fetch(`${url}/v1/adapters`, { method: 'POST', body: fd });
}

async function complete(url: string, model: string, prompt: number[], extra: Record<string, unknown> = {}): Promise<Response> {
  return fetch(`${url}/v1/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ model, prompt, max_tokens: 16, temperature: 0, ignore_eos: true, ...extra }),
  });
}

async function expectOpenAIError(res: Response, status: number): Promise<{ message: string; type: string; param: string | null; code: string | null }> {
  const text = await res.text();
  expect(res.status, text).toBe(status);
  const body = JSON.parse(text) as { error: { message: string; type: string; param: string | null; code: string | null } };
  expect(Object.keys(body)).toEqual(['error']);
  expect(Object.keys(body.error).sort()).toEqual(['code', 'message', 'param', 'type']);
  expect(body.error.message.length).toBeGreaterThan(0);
  return body.error;
}

async function expectBaseServes(url: string): Promise<void> {
  const res = await complete(url, MODEL, [592, 458, 88, 442], { max_tokens: 4 });
  expect(res.status, await res.clone().text()).toBe(200);
  expect(((await res.json()) as { usage: { completion_tokens: number } }).usage.completion_tokens).toBe(4);
}

function bestCase(name: string): GoldenCase {
  const cases = golden.cases.filter((c) => c.adapter !== null && adapterId(c.adapter) === name);
  return cases.reduce((best, c) => (strictSteps(c) > strictSteps(best) ? c : best));
}

async function expectParity(url: string, model: string, c: GoldenCase): Promise<number> {
  const res = await complete(url, model, c.prompt_ids, { logprobs: 0 });
  const text = await res.text();
  expect(res.status, text).toBe(200);
  const body = JSON.parse(text) as { choices: Array<{ text: string; logprobs: { tokens: string[] } }>; usage: { completion_tokens: number } };
  expect(body.usage.completion_tokens).toBe(16);
  const n = strictSteps(c);
  expect(body.choices[0].logprobs.tokens.slice(0, n)).toEqual(c.greedy_ids.slice(0, n).map((id) => tok.decode([id], false)));
  if (n === c.greedy_ids.length) expect(body.choices[0].text).toBe(tok.decode(c.greedy_ids, true));
  return 1 + await pinAmbiguousSteps(c, n, (extra) => complete(url, model, c.prompt_ids, extra));
}

/**
 * Steps whose token string is shared by several ids are checked by id: the same greedy run with
 * stop_token_ids [g_k] must stop exactly at step k (the stop token is counted).
 */
async function pinAmbiguousSteps(c: GoldenCase, n: number, run: (extra: Record<string, unknown>) => Promise<Response>): Promise<number> {
  let runs = 0;
  for (let k = 0; k < n; k++) {
    const g = c.greedy_ids[k];
    if (!ambiguous(g) || c.greedy_ids.slice(0, k).includes(g)) continue;
    const res = await run({ stop_token_ids: [g] });
    runs++;
    const text = await res.text();
    expect(res.status, text).toBe(200);
    const body = JSON.parse(text) as { choices: Array<{ finish_reason: string }>; usage: { completion_tokens: number } };
    expect({ step: k, id: g, finish: body.choices[0].finish_reason, tokens: body.usage.completion_tokens }).toEqual({ step: k, id: g, finish: 'stop', tokens: k + 1 });
  }
  return runs;
}

async function getAdapter(url: string, id: string): Promise<Response> {
  return fetch(`${url}/v1/adapters/${id}`);
}

/** Polls `probe` until it returns true; returns the milliseconds it took (throws past `ms`). */
async function within(ms: number, what: string, probe: () => Promise<boolean>): Promise<number> {
  const t0 = Date.now();
  while (true) {
    if (await probe()) return Date.now() - t0;
    if (Date.now() - t0 > ms) throw new Error(`${what}: not within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

const entries = (dir: string) => readdirSync(dir).sort();

/** The registry's keys in Redis, with blob keys reduced to their file name (upload ids vary).
 *  `loraplex:epoch` (the registry's lifetime marker) is always there and left out. */
function redisKeys(): string[] {
  const r = spawnSync('redis-cli', ['-h', '127.0.0.1', '-p', String(redisPort), '--scan', '--pattern', 'loraplex:*'], { encoding: 'utf8' });
  expect(r.status, r.stderr).toBe(0);
  return r.stdout.split('\n').filter((k) => k && k !== 'loraplex:epoch').map((k) => k.replace(/^loraplex:blob:[^:]+:/, 'loraplex:blob:*:')).sort();
}

const blobKeys = (n: number) => [...Array(n)].flatMap(() => ['loraplex:blob:*:adapter_config.json:0', 'loraplex:blob:*:adapter_model.safetensors:0']);

// ---------------------------------------------------------------------------------------------

describe.skipIf(!HAVE_REDIS)('Redis adapter registry across replicas', () => {
  it('an upload on replica A serves on replica B within a second or two, with golden parity', async () => {
    expect(entries(dirA())).toEqual([]);
    expect(entries(dirB())).toEqual([]);
    const f = goldenFiles('r8-all');
    const res = await upload(A.url, 'r8-all', f);
    const text = await res.text();
    expect(res.status, text).toBe(201);
    const meta = JSON.parse(text) as { sha256: Record<string, string> };
    expect(meta.sha256).toEqual({ 'adapter_config.json': sha(f.config), 'adapter_model.safetensors': sha(f.model) });
    await within(PROPAGATION_MS, 'B knows r8-all', async () => (await getAdapter(B.url, 'r8-all')).status === 200);
    const onB = (await (await getAdapter(B.url, 'r8-all')).json()) as Record<string, unknown>;
    expect(onB).toMatchObject({ id: 'r8-all', rank: 8, alpha: 16, sha256: meta.sha256 });
    // B has its own copy on its own disk (no shared disk), byte-identical, and nothing else.
    expect(entries(dirB())).toEqual(['r8-all']);
    expect(readFileSync(join(dirB(), 'r8-all', 'adapter_model.safetensors')).equals(f.model)).toBe(true);
    expect(entries(dirA())).toEqual(['r8-all']);
    await expectParity(B.url, 'r8-all', bestCase('r8-all'));
    await expectParity(A.url, 'r8-all', bestCase('r8-all'));
    const models = (await (await fetch(`${B.url}/v1/models`)).json()) as { data: Array<{ id: string }> };
    expect(models.data.map((d) => d.id)).toContain('r8-all');
    // In Redis: the id set, the metadata and one chunk per file (both are under 1 MiB).
    expect(redisKeys()).toEqual(['loraplex:adapter:r8-all', 'loraplex:adapters', ...blobKeys(1)].sort());
  }, 20_000);

  it('a rejected upload leaves nothing in Redis or on either disk', async () => {
    const keys = redisKeys();
    const [a, b] = [entries(dirA()), entries(dirB())];
    const cfg = { ...(JSON.parse(goldenFiles('r8-all').config.toString()) as Record<string, unknown>), use_dora: true };
    const res = await upload(B.url, 'dora', { config: Buffer.from(JSON.stringify(cfg)), model: goldenFiles('r8-all').model });
    const err = await expectOpenAIError(res, 400);
    expect(err.param).toBe('use_dora');
    await expectOpenAIError(await upload(A.url, 'r8-all', goldenFiles('r4-mlp')), 409);
    await expectOpenAIError(await upload(A.url, '../x', goldenFiles('r4-mlp')), 400);
    expect(redisKeys()).toEqual(keys);
    expect(entries(dirA())).toEqual(a);
    expect(entries(dirB())).toEqual(b);
    await expectBaseServes(A.url);
    await expectBaseServes(B.url);
  }, 20_000);

  it('racing uploads of one id on two replicas: exactly one 201 and one 409', async () => {
    const [ra, rb] = await Promise.all([upload(A.url, 'race', goldenFiles('r4-mlp')), upload(B.url, 'race', goldenFiles('r2-attn-named-keys'))]);
    expect([ra.status, rb.status].sort()).toEqual([201, 409]);
    await expectOpenAIError(ra.status === 409 ? ra : rb, 409);
    const winner = (await (ra.status === 201 ? ra : rb).json()) as { rank: number; sha256: Record<string, string> };
    const name = winner.rank === 4 ? 'r4-mlp' : 'r2-attn-named-keys';
    // Both replicas converge on the winner's files.
    for (const s of [A, B])
      await within(PROPAGATION_MS, `race on ${s.url}`, async () => {
        const r = await getAdapter(s.url, 'race');
        return r.status === 200 && ((await r.json()) as { sha256: Record<string, string> }).sha256['adapter_model.safetensors'] === winner.sha256['adapter_model.safetensors'];
      });
    for (const d of [dirA(), dirB()]) {
      await within(PROPAGATION_MS, `race on disk in ${d}`, async () => entries(d).join() === 'r8-all,race');
      expect(readFileSync(join(d, 'race', 'adapter_model.safetensors')).equals(goldenFiles(name).model)).toBe(true);
    }
    await expectParity(A.url, 'race', bestCase(name));
    await expectParity(B.url, 'race', bestCase(name));
    // The loser's chunks were dropped: only the two adapters' blobs remain.
    expect(redisKeys()).toEqual(['loraplex:adapter:r8-all', 'loraplex:adapter:race', 'loraplex:adapters', ...blobKeys(2)].sort());
  }, 20_000);

  it('a delete on A makes B answer 404 within a second or two, and frees B\'s copy', async () => {
    const res = await fetch(`${A.url}/v1/adapters/r8-all`, { method: 'DELETE' });
    expect(res.status, await res.clone().text()).toBe(200);
    await expectOpenAIError(await complete(A.url, 'r8-all', [592, 1, 2]), 404);
    await within(PROPAGATION_MS, 'B answers 404 for r8-all', async () => (await complete(B.url, 'r8-all', [592, 1, 2], { max_tokens: 1 })).status === 404);
    await expectOpenAIError(await complete(B.url, 'r8-all', [592, 1, 2]), 404);
    await expectOpenAIError(await getAdapter(B.url, 'r8-all'), 404);
    await within(PROPAGATION_MS, "B's disk copy is removed", async () => !existsSync(join(dirB(), 'r8-all')));
    const listed = (await (await fetch(`${B.url}/v1/adapters`)).json()) as { data: Array<{ id: string }> };
    expect(listed.data.map((d) => d.id)).toEqual(['race']);
    expect(entries(dirA())).toEqual(['race']);
    await within(PROPAGATION_MS, 'B holds only race', async () => entries(dirB()).join() === 'race');
    // Its metadata and chunks are gone from Redis too.
    expect(redisKeys()).toEqual(['loraplex:adapter:race', 'loraplex:adapters', ...blobKeys(1)].sort());
  }, 20_000);

  it('a new replica with an empty disk gets every adapter from Redis', async () => {
    const dirC = join(tmp, 'replica-c');
    const C = await startReplica(dirC);
    try {
      const listed = (await (await fetch(`${C.url}/v1/adapters`)).json()) as { data: Array<{ id: string; sha256: Record<string, string> }> };
      expect(listed.data.map((d) => d.id)).toEqual(['race']);
      const onA = (await (await getAdapter(A.url, 'race')).json()) as { rank: number; sha256: Record<string, string> };
      expect(listed.data[0].sha256).toEqual(onA.sha256);
      await expectParity(C.url, 'race', bestCase(onA.rank === 4 ? 'r4-mlp' : 'r2-attn-named-keys'));
      expect(entries(dirC)).toEqual(['race']);
    } finally {
      await C.stop();
    }
  }, 60_000);

  it('Redis down: uploads and deletes answer 503 while adapters cached on a replica keep serving', async () => {
    const onA = (await (await getAdapter(A.url, 'race')).json()) as { rank: number };
    const raceCase = bestCase(onA.rank === 4 ? 'r4-mlp' : 'r2-attn-named-keys');
    await expectParity(B.url, 'race', raceCase); // cached (resident) on B
    const beforeA = entries(dirA());
    const beforeB = entries(dirB());
    await killRedis();
    // An upload: 503 with Retry-After and the OpenAI error shape; nothing left on disk.
    let res: Response | null = null;
    await within(3000, 'uploads answer 503', async () => {
      res = await upload(A.url, 'during-outage', goldenFiles('r4-mlp'));
      if (res.status === 503) return true;
      expect(res.status, await res.clone().text()).not.toBe(201);
      return false;
    });
    expect(res!.headers.get('retry-after')).toBeTruthy();
    const err = await expectOpenAIError(res!, 503);
    expect(err.message).toMatch(/Redis|registry/i);
    expect(entries(dirA())).toEqual(beforeA);
    // Upload on B and delete on B: 503 as well.
    await expectOpenAIError(await upload(B.url, 'during-outage-b', goldenFiles('r4-mlp')), 503);
    const del = await fetch(`${B.url}/v1/adapters/race`, { method: 'DELETE' });
    expect(del.headers.get('retry-after')).toBeTruthy();
    await expectOpenAIError(del, 503);
    expect(entries(dirB())).toEqual(beforeB);
    // Adapters already on the replicas keep serving, with parity; listing works.
    await expectParity(B.url, 'race', raceCase);
    await expectParity(A.url, 'race', raceCase);
    for (const s of [A, B]) {
      const listed = (await (await fetch(`${s.url}/v1/adapters`)).json()) as { data: Array<{ id: string }> };
      expect(listed.data.map((d) => d.id)).toEqual(['race']);
      await expectBaseServes(s.url);
      const health = await fetch(`${s.url}/health`);
      expect(health.status).toBe(200);
    }
    // Neither replica crashed.
    expect(A.proc.exitCode).toBeNull();
    expect(B.proc.exitCode).toBeNull();
  }, 30_000);

  it('Redis back on the same port: replicas reconnect by themselves and propagate again', async () => {
    await startRedis();
    // Reconnection is automatic (the retry backoff is at most 2 s): writes work again on A ...
    let res: Response | null = null;
    await within(10_000, 'uploads work again after Redis restarts', async () => {
      res = await upload(A.url, 'after-outage', goldenFiles('r64-qv-rslora'));
      if (res.status === 201) return true;
      await expectOpenAIError(res, 503);
      return false;
    });
    // ... and on B, and the events flow both ways.
    await within(PROPAGATION_MS, 'B knows after-outage', async () => (await getAdapter(B.url, 'after-outage')).status === 200);
    await expectParity(B.url, 'after-outage', bestCase('r64-qv-rslora'));
    const up = await upload(B.url, 'after-outage-b', goldenFiles('r2-attn-named-keys'));
    expect(up.status, await up.clone().text()).toBe(201);
    await within(PROPAGATION_MS, 'A knows after-outage-b', async () => (await getAdapter(A.url, 'after-outage-b')).status === 200);
    await expectParity(A.url, 'after-outage-b', bestCase('r2-attn-named-keys'));
    const del = await fetch(`${B.url}/v1/adapters/after-outage`, { method: 'DELETE' });
    expect(del.status, await del.clone().text()).toBe(200);
    await within(PROPAGATION_MS, 'A answers 404 for after-outage', async () => (await complete(A.url, 'after-outage', [592, 1, 2], { max_tokens: 1 })).status === 404);
    await within(PROPAGATION_MS, "A's copy of after-outage is removed", async () => !existsSync(join(dirA(), 'after-outage')));
    // 'race' was uploaded (201) before the outage, kept serving through it, and nobody deleted it:
    // it must still be there. (This Redis restarts empty, --save '': a replica must not read "not
    // in the registry" as "deleted" and wipe its own copy. Soft, so the rest still runs.)
    for (const s of [A, B]) {
      const r = await complete(s.url, 'race', [592, 1, 2], { max_tokens: 1 });
      expect(r.status, `'race' still serves on ${s === A ? 'A' : 'B'} after Redis came back`).toBe(200);
    }
    expect(existsSync(join(dirB(), 'race')), "B's copy of 'race' survives Redis coming back empty").toBe(true);
    // No staging or trash folders are left on either replica.
    for (const d of [dirA(), dirB()]) expect(entries(d).filter((e) => e.startsWith('.'))).toEqual([]);
    expect(A.proc.exitCode).toBeNull();
    expect(B.proc.exitCode).toBeNull();
  }, 30_000);
});
