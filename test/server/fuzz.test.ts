// HTTP fuzz test (hardening issue): a fixed-seed list of 2,400 requests across every route — valid
// ones and random mutations of them, multipart uploads with broken parts and adapter files,
// load/unload with hostile paths and names, unknown routes and methods — sent over real HTTP with
// 8 in flight. Asserts: no 5xx and no hang; every 4xx in the OpenAI error shape (429 with
// Retry-After); every SSE stream well-formed; no upload leftovers; and afterwards the server is
// idle, its invariants hold and its greedy output is unchanged. Failures quote the request.
import { cpSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { Agent, request as httpRequest } from 'node:http';
import type { Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { generateRequests, type FuzzRequest, type FuzzWorld } from '../helpers/fuzz-gen.js';
import { adapterRoot, FIXTURES, modelDir } from '../helpers/fixtures.js';
import { startTestServer, type TestServer } from '../helpers/server.js';

const M = 'llama-gqa';
const SEED = 0x10a4a;
const COUNT = 2400;
const IN_FLIGHT = 8;
const REQUEST_TIMEOUT_MS = 10_000;
const MAX_ADAPTER_BYTES = 300_000;
const MAX_BODY_BYTES = 1 << 20;
const FIXTURE_ADAPTERS = ['r2-attn-named-keys', 'r4-mlp', 'r64-qv-rslora', 'r8-all'];
/** Copies of fixture adapters the fuzzer never deletes or unloads: the greedy check runs on them. */
const KEEP: Record<string, string> = { 'keep-r8-all': 'r8-all', 'keep-r4-mlp': 'r4-mlp' };
const GREEDY_PROMPTS = [[592, 10, 20, 30], [592, 100, 7, 300, 42]];

interface Answer {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  text: string;
}

/** The last request sent on each connection: a request that hangs may be the victim of the one before. */
const lastOnSocket = new WeakMap<Socket, FuzzRequest>();

function send(base: URL, agent: Agent, r: FuzzRequest): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const headers: Record<string, string | number> = { ...r.headers };
    if (r.body) headers['content-length'] = r.body.length;
    let previous: FuzzRequest | undefined;
    const req = httpRequest({ host: base.hostname, port: base.port, method: r.method, path: r.path, headers, agent }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (d: Buffer) => chunks.push(d));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, text: Buffer.concat(chunks).toString('utf8') }));
      res.on('error', reject);
    });
    req.on('socket', (sock) => {
      previous = lastOnSocket.get(sock);
      lastOnSocket.set(sock, r);
    });
    req.setTimeout(REQUEST_TIMEOUT_MS, () => {
      const after = previous ? `; the connection's previous request was #${previous.i} ${previous.label}: ${previous.repro.slice(0, 600)}` : '';
      req.destroy(new Error(`no answer within ${REQUEST_TIMEOUT_MS} ms (hang)${after}`));
    });
    req.on('error', reject);
    req.end(r.body);
  });
}

/** Problems with one answer (empty when it is fine). */
function check(r: FuzzRequest, a: Answer): string[] {
  const bad: string[] = [];
  if (a.status >= 500) bad.push(`status ${a.status}`);
  const ctype = String(a.headers['content-type'] ?? '');
  if (a.status >= 400 && r.method !== 'HEAD') {
    if (!/application\/json/.test(ctype)) bad.push(`error content-type ${JSON.stringify(ctype)}`);
    bad.push(...errorShape(a.text));
  }
  if (a.status === 429 && !a.headers['retry-after']) bad.push('429 without Retry-After');
  if (a.status === 200 && /text\/event-stream/.test(ctype)) bad.push(...sseProblems(a.text));
  else if (a.status === 200 && r.method === 'POST' && /\/v1\/(chat\/)?completions$/.test(r.path)) {
    try {
      const j = JSON.parse(a.text) as { choices?: Array<{ finish_reason: unknown }>; usage?: unknown };
      if (!Array.isArray(j.choices) || j.choices.length === 0 || !j.usage) bad.push('completion without choices or usage');
      else if (j.choices.some((c) => typeof c.finish_reason !== 'string')) bad.push('a choice without finish_reason');
    } catch {
      bad.push('200 completion body is not JSON');
    }
  }
  return bad;
}

function errorShape(text: string, where = 'body'): string[] {
  let j: unknown;
  try {
    j = JSON.parse(text);
  } catch {
    return [`error ${where} is not JSON`];
  }
  const e = (j as { error?: Record<string, unknown> } | null)?.error;
  if (!e || typeof e !== 'object') return [`error ${where} has no "error" object`];
  const bad: string[] = [];
  for (const k of ['message', 'type', 'param', 'code']) if (!(k in e)) bad.push(`error.${k} missing`);
  if (typeof e.message !== 'string' || typeof e.type !== 'string') bad.push('error.message/type not strings');
  if (e.param !== null && e.param !== undefined && typeof e.param !== 'string') bad.push('error.param neither string nor null');
  if (e.code !== null && e.code !== undefined && typeof e.code !== 'string') bad.push('error.code neither string nor null');
  return bad;
}

/** An SSE body: `data: ` events of JSON chunks (or one OpenAI error), ending in [DONE]. */
function sseProblems(text: string): string[] {
  if (!text.endsWith('\n\n')) return ['SSE stream does not end with a blank line'];
  const events = text.slice(0, -2).split('\n\n');
  const finished = new Map<number, boolean>();
  let errored = false;
  for (const [k, ev] of events.entries()) {
    if (!ev.startsWith('data: ') || ev.includes('\n')) return [`SSE event ${k} is not one data line: ${JSON.stringify(ev.slice(0, 200))}`];
    const data = ev.slice(6);
    if (data === '[DONE]') {
      if (k !== events.length - 1) return ['SSE data after [DONE]'];
      continue;
    }
    let j: { error?: unknown; choices?: Array<{ index: number; finish_reason: string | null }>; object?: string };
    try {
      j = JSON.parse(data) as typeof j;
    } catch {
      return [`SSE event ${k} is not JSON: ${JSON.stringify(data.slice(0, 200))}`];
    }
    if (j.error !== undefined) {
      const bad = errorShape(data, `SSE event ${k}`);
      if (bad.length) return bad;
      errored = true;
      continue;
    }
    if (!Array.isArray(j.choices) || (j.object !== 'text_completion' && j.object !== 'chat.completion.chunk')) return [`SSE event ${k} is not a chunk: ${data.slice(0, 200)}`];
    for (const c of j.choices) finished.set(c.index, (finished.get(c.index) ?? false) || typeof c.finish_reason === 'string');
  }
  if (!errored) {
    if (events[events.length - 1] !== 'data: [DONE]') return ['SSE stream without [DONE]'];
    if (finished.size === 0 || [...finished.values()].some((f) => !f)) return ['SSE stream: a choice never finished'];
  }
  return [];
}

/** Runs `items` through `fn` with at most `limit` at a time, in list order. */
async function pool<T>(items: T[], limit: number, fn: (x: T) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(Array.from({ length: limit }, async () => {
    while (next < items.length) await fn(items[next++]);
  }));
}

describe('HTTP fuzz: 2,400 seeded requests across every route', () => {
  let tmp: string;
  let srv: TestServer;
  let world: FuzzWorld;
  let adapterDir: string;

  const greedyAll = async (): Promise<Record<string, string[]>> => {
    const out: Record<string, string[]> = {};
    for (const model of [M, ...Object.keys(KEEP)]) {
      out[model] = [];
      for (const prompt of GREEDY_PROMPTS) {
        const res = await fetch(`${srv.url}/v1/completions`, {
          method: 'POST', headers: { 'content-type': 'application/json' },
          body: JSON.stringify({ model, prompt, max_tokens: 8, temperature: 0, ignore_eos: true }),
        });
        const text = await res.text();
        expect(res.status, `greedy ${model}: ${text}`).toBe(200);
        out[model].push((JSON.parse(text) as { choices: Array<{ text: string }> }).choices[0].text);
      }
    }
    return out;
  };

  beforeAll(async () => {
    tmp = mkdtempSync(join(tmpdir(), 'loraplex-fuzz-'));
    adapterDir = join(tmp, 'adapters');
    const roots = join(tmp, 'roots');
    mkdirSync(adapterDir);
    mkdirSync(roots);
    for (const a of FIXTURE_ADAPTERS) cpSync(join(adapterRoot(M), a), join(adapterDir, a), { recursive: true });
    for (const [id, src] of Object.entries(KEEP)) cpSync(join(adapterRoot(M), src), join(adapterDir, id), { recursive: true });
    // --lora-roots: good adapters, broken ones, and links that lead outside.
    for (const a of FIXTURE_ADAPTERS) cpSync(join(adapterRoot(M), a), join(roots, a), { recursive: true });
    mkdirSync(join(roots, 'broken-weights'));
    cpSync(join(adapterRoot(M), 'r8-all', 'adapter_config.json'), join(roots, 'broken-weights', 'adapter_config.json'));
    writeFileSync(join(roots, 'broken-weights', 'adapter_model.safetensors'), Buffer.from('\u0008\u0000\u0000\u0000\u0000\u0000\u0000\u0000{"a":1}garbage'));
    mkdirSync(join(roots, 'broken-config'));
    cpSync(join(adapterRoot(M), 'r8-all', 'adapter_model.safetensors'), join(roots, 'broken-config', 'adapter_model.safetensors'));
    writeFileSync(join(roots, 'broken-config', 'adapter_config.json'), '{"peft_type":"LORA","r":"eight","target_modules":"(a+)+$"}');
    mkdirSync(join(roots, 'empty'));
    symlinkSync(join(adapterRoot(M), 'r4-mlp'), join(roots, 'escape-dir'));
    mkdirSync(join(roots, 'escape-file'));
    cpSync(join(adapterRoot(M), 'r4-mlp', 'adapter_config.json'), join(roots, 'escape-file', 'adapter_config.json'));
    symlinkSync(join(adapterRoot(M), 'r4-mlp', 'adapter_model.safetensors'), join(roots, 'escape-file', 'adapter_model.safetensors'));

    srv = await startTestServer({ model: modelDir(M), adapterDir }, [
      '--lora-roots', roots, '--max-n', '8', '--max-queue', '16', '--max-body-bytes', '1MiB', '--max-adapter-bytes', String(MAX_ADAPTER_BYTES),
    ]);
    const uploads = FIXTURE_ADAPTERS.map((name) => ({
      name,
      config: JSON.parse(readFileSync(join(adapterRoot(M), name, 'adapter_config.json'), 'utf8')) as Record<string, unknown>,
      safetensors: readFileSync(join(adapterRoot(M), name, 'adapter_model.safetensors')),
    }));
    world = {
      base: M,
      keep: Object.keys(KEEP),
      mutable: [...FIXTURE_ADAPTERS, 'up-0', 'up-1', 'up-2', 'up-3', 'up-4', 'up-5', 'ld-0', 'ld-1', 'ld-2'],
      uploads,
      loadPaths: [
        ...FIXTURE_ADAPTERS.map((a) => join(roots, a)), ...FIXTURE_ADAPTERS.map((a) => join(roots, a)),
        join(adapterDir, 'keep-r8-all'), join(adapterDir, 'r4-mlp'),
        join(roots, 'broken-weights'), join(roots, 'broken-config'), join(roots, 'empty'), join(roots, 'escape-dir'), join(roots, 'escape-file'),
        roots, adapterDir, join(roots, 'nonexistent'), join(roots, '..'), join(roots, 'r8-all', '..', '..', '..'), `${roots}/../roots/r8-all`,
        join(adapterRoot(M), 'r8-all'), FIXTURES, '/', '/etc', '/proc/self', '/dev/null', 'r8-all', './adapters', '', ' ', '~',
        `${roots}/r8-all\u0000x`, 'x'.repeat(5000), `${roots}/${'a/'.repeat(3000)}`, join(adapterDir, '.upload-x'),
      ],
      maxAdapterBytes: MAX_ADAPTER_BYTES,
      maxBodyBytes: MAX_BODY_BYTES,
    };
  });

  afterAll(async () => {
    srv?.app.server.closeAllConnections(); // a request the server never answered must not hold up close
    await srv?.close();
    if (tmp) rmSync(tmp, { recursive: true, force: true });
  });

  it('answers every request without a 5xx, in the OpenAI error shape, and keeps its greedy output', async () => {
    const before = await greedyAll();
    const requests = generateRequests(SEED, COUNT, world);
    expect(requests.length).toBeGreaterThanOrEqual(2000);

    const base = new URL(srv.url);
    const agent = new Agent({ keepAlive: true, maxSockets: IN_FLIGHT });
    const statuses = new Map<number, number>();
    const byFamily = new Map<string, Map<number, number>>();
    const failures: string[] = [];
    let slowest = { ms: 0, i: -1 };
    const t0 = performance.now();
    await pool(requests, IN_FLIGHT, async (r) => {
      let a: Answer;
      const t = performance.now();
      try {
        a = await send(base, agent, r);
        const ms = Math.round(performance.now() - t);
        if (ms > slowest.ms) slowest = { ms, i: r.i };
      } catch (e) {
        failures.push(`#${r.i} ${r.label}: no answer (${(e as Error).message})\n    ${r.repro.slice(0, 1500)}`);
        statuses.set(0, (statuses.get(0) ?? 0) + 1);
        return;
      }
      statuses.set(a.status, (statuses.get(a.status) ?? 0) + 1);
      const fam = r.label.split(/[:+ /]/)[0];
      const h = byFamily.get(fam) ?? new Map<number, number>();
      h.set(a.status, (h.get(a.status) ?? 0) + 1);
      byFamily.set(fam, h);
      const bad = check(r, a);
      if (bad.length) failures.push(`#${r.i} ${r.label}: ${bad.join('; ')}; answered ${a.status} ${a.text.slice(0, 300)}\n    ${r.repro.slice(0, 1500)}`);
    });
    agent.destroy();
    const seconds = (performance.now() - t0) / 1000;
    const hist = Object.fromEntries([...statuses.entries()].sort((x, y) => x[0] - y[0]));
    console.log(`fuzz: ${requests.length} requests (seed ${SEED}, ${IN_FLIGHT} in flight) in ${seconds.toFixed(1)} s, slowest ${slowest.ms} ms (#${slowest.i}); statuses ${JSON.stringify(hist)}`);
    for (const [fam, h] of [...byFamily.entries()].sort()) console.log(`  ${fam.padEnd(12)} ${JSON.stringify(Object.fromEntries([...h.entries()].sort((x, y) => x[0] - y[0])))}`);

    // Afterwards: nothing half-written, the engine idle and consistent, the same greedy text.
    const hidden = () => readdirSync(adapterDir).filter((f) => f.startsWith('.'));
    for (let k = 0; k < 50 && hidden().length; k++) await new Promise((r) => setTimeout(r, 40)); // cleanup of a request cut off just now
    const leftovers = hidden();
    if (leftovers.length) failures.push(`after the run: leftovers in the adapter directory: ${leftovers.join(', ')}`);
    const deadline = Date.now() + 5000;
    while (srv.engine.scheduler.hasWork && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    if (srv.engine.scheduler.hasWork) failures.push('after the run: the engine still has work 5 s after the last answer');
    try {
      srv.engine.checkInvariants();
    } catch (e) {
      failures.push(`after the run: checkInvariants: ${(e as Error).message}`);
    }
    const after = await greedyAll();
    if (JSON.stringify(after) !== JSON.stringify(before)) failures.push(`after the run: greedy output changed: before ${JSON.stringify(before)}, after ${JSON.stringify(after)}`);
    const how = `(#i is the index in generateRequests(${SEED}, ${COUNT}, world); replay it against a fresh server)`;
    expect(failures.length, `${failures.length} problems ${how}:\n${failures.slice(0, 25).join("\n")}\n`).toBe(0);
  });
});
