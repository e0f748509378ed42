// Adapter management API over real HTTP against an in-process server on the llama-gqa golden base
// model: multipart upload (validated, atomic, sha256), list/get/delete, vLLM load/unload, golden
// parity of uploaded adapters, racing uploads, restart from disk, delete while a request runs, and
// every hostile upload we can think of (after each one: the right status and OpenAI error shape,
// nothing new in the adapter folder, and the server still serves the base model).
import { createHash } from 'node:crypto';
import { cpSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { request as httpRequest } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TextTokenizer } from '../../server/engine/tokenizer.js';
import { adapterId, adapterRoot, loadGolden, modelDir, strictSteps, type GoldenCase } from '../helpers/fixtures.js';
import { startTestServer, type TestServer } from '../helpers/server.js';

const MODEL = 'llama-gqa';
const MAX_ADAPTER_BYTES = 200_000; // the biggest golden adapter (r64) is ~117 kB in all
const golden = loadGolden(MODEL);
const tok = new TextTokenizer(modelDir(MODEL));
// Token strings are not always unique (byte tokens decode to U+FFFD): those steps are pinned by id.
const VOCAB = (JSON.parse(readFileSync(join(modelDir(MODEL), 'config.json'), 'utf8')) as { vocab_size: number }).vocab_size;
const stringCount = new Map<string, number>();
for (let i = 0; i < VOCAB; i++) stringCount.set(tok.decode([i], false), (stringCount.get(tok.decode([i], false)) ?? 0) + 1);
const ambiguous = (id: number) => (stringCount.get(tok.decode([id], false)) ?? 0) > 1;
const ROOT = adapterRoot(MODEL);
const GOLDEN_ADAPTERS = readdirSync(ROOT).sort(); // r2-attn-named-keys, r4-mlp, r64-qv-rslora, r8-all

let tmp: string;
let adapterDir: string;
let srv: TestServer;

async function startServer(): Promise<TestServer> {
  return startTestServer({ model: modelDir(MODEL), adapterDir, maxLoraRank: 64 }, [
    '--max-adapter-bytes', String(MAX_ADAPTER_BYTES),
    '--lora-roots', `${ROOT},${join(tmp, 'root2')}`,
  ]);
}

beforeAll(async () => {
  tmp = mkdtempSync(join(tmpdir(), 'loraplex-adapters-api-'));
  adapterDir = join(tmp, 'adapters');
  mkdirSync(adapterDir); // a fresh, empty adapter directory
  srv = await startServer();
}, 30_000);

afterAll(async () => {
  await srv?.close();
  rmSync(tmp, { recursive: true, force: true });
});

// ---------------------------------------------------------------------------------------------
// helpers

interface Files {
  config: Buffer | string;
  model: Buffer;
}

function goldenFiles(name: string): Files {
  return {
    config: readFileSync(join(ROOT, name, 'adapter_config.json')),
    model: readFileSync(join(ROOT, name, 'adapter_model.safetensors')),
  };
}

function goldenConfig(name: string): Record<string, unknown> {
  return JSON.parse(readFileSync(join(ROOT, name, 'adapter_config.json'), 'utf8')) as Record<string, unknown>;
}

interface Part {
  field: string;
  value: string | Buffer;
  filename?: string;
}

function formOf(parts: Part[]): FormData {
  const fd = new FormData();
  for (const p of parts) {
    if (p.filename !== undefined) fd.append(p.field, new Blob([typeof p.value === 'string' ? p.value : new Uint8Array(p.value)]), p.filename);
    else fd.append(p.field, p.value as string);
  }
  return fd;
}

function adapterParts(id: string, f: Files): Part[] {
  return [
    { field: 'id', value: id },
    { field: 'adapter_config.json', value: f.config, filename: 'adapter_config.json' },
    { field: 'adapter_model.safetensors', value: f.model, filename: 'adapter_model.safetensors' },
  ];
}

async function postForm(parts: Part[], url = srv.url): Promise<Response> {
  return fetch(`${url}/v1/adapters`, { method: 'POST', body: formOf(parts) });
}

async function upload(id: string, f: Files, url = srv.url): Promise<Response> {
  return postForm(adapterParts(id, f), url);
}

function dirEntries(): string[] {
  return readdirSync(adapterDir).sort(); // readdir lists hidden entries (.upload-*, .trash-*) too
}

async function expectOpenAIError(res: Response, status: number, message?: RegExp): Promise<{ message: string; type: string; param: string | null; code: string | null }> {
  const text = await res.text();
  expect(res.status, text).toBe(status);
  const body = JSON.parse(text) as { error: { message: string; type: string; param: string | null; code: string | null } };
  expect(Object.keys(body)).toEqual(['error']);
  expect(Object.keys(body.error).sort()).toEqual(['code', 'message', 'param', 'type']);
  expect(typeof body.error.message).toBe('string');
  expect(body.error.message.length).toBeGreaterThan(0);
  expect(typeof body.error.type).toBe('string');
  expect(body.error.param === null || typeof body.error.param === 'string').toBe(true);
  expect(body.error.code === null || typeof body.error.code === 'string').toBe(true);
  if (message) expect(body.error.message).toMatch(message);
  return body.error;
}

async function complete(model: string, prompt: number[] | string, extra: Record<string, unknown> = {}, url = srv.url): Promise<Response> {
  return fetch(`${url}/v1/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ model, prompt, max_tokens: 16, temperature: 0, ignore_eos: true, ...extra }),
  });
}

async function expectBaseServes(url = srv.url): Promise<void> {
  const res = await complete(MODEL, [592, 458, 88, 442], { max_tokens: 4 });
  const text = await res.text();
  expect(res.status, text).toBe(200);
  const body = JSON.parse(text) as { choices: Array<{ finish_reason: string }>; usage: { completion_tokens: number } };
  expect(body.choices[0].finish_reason).toBe('length');
  expect(body.usage.completion_tokens).toBe(4);
}

function firstCase(name: string): GoldenCase {
  const cases = golden.cases.filter((c) => c.adapter !== null && adapterId(c.adapter) === name);
  expect(cases.length).toBeGreaterThan(0);
  // The case with the most strict steps (ties: the first).
  return cases.reduce((best, c) => (strictSteps(c) > strictSteps(best) ? c : best));
}

/** Greedy completion on `model` with the golden prompt ids; compares the strict steps token by token. */
async function expectParity(model: string, c: GoldenCase, url = srv.url): Promise<number> {
  const res = await complete(model, c.prompt_ids, { logprobs: 0 }, url);
  const text = await res.text();
  expect(res.status, text).toBe(200);
  const body = JSON.parse(text) as { choices: Array<{ text: string; finish_reason: string; logprobs: { tokens: string[] } }>; usage: { completion_tokens: number } };
  expect(body.usage.completion_tokens).toBe(16);
  const n = strictSteps(c);
  expect(n).toBeGreaterThan(0);
  const got = body.choices[0].logprobs.tokens.slice(0, n);
  const want = c.greedy_ids.slice(0, n).map((id) => tok.decode([id], false));
  expect(got).toEqual(want);
  if (n === c.greedy_ids.length) expect(body.choices[0].text).toBe(tok.decode(c.greedy_ids, true));
  return 1 + await pinAmbiguousSteps(c, n, (extra) => complete(model, c.prompt_ids, extra, url));
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

async function metricValue(name: string, labels: string, url = srv.url): Promise<number> {
  const res = await fetch(`${url}/metrics`);
  expect(res.status).toBe(200);
  const text = await res.text();
  const line = text.split('\n').find((l) => l.startsWith(`${name}{`) && l.includes(labels));
  expect(line, `${name}{${labels}} in /metrics`).toBeDefined();
  return Number(line!.split(' ').pop());
}

const sha = (b: Buffer | string) => createHash('sha256').update(b).digest('hex');

// Safetensors surgery for hostile files.
interface StEntry {
  name: string;
  dtype: string;
  shape: number[];
  data: Buffer;
}

function parseSt(buf: Buffer): { meta: unknown; tensors: StEntry[] } {
  const n = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + n).toString('utf8')) as Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }>;
  const base = 8 + n;
  const tensors: StEntry[] = [];
  let meta: unknown;
  for (const [name, e] of Object.entries(header)) {
    if (name === '__metadata__') {
      meta = e;
      continue;
    }
    tensors.push({ name, dtype: e.dtype, shape: e.shape, data: buf.subarray(base + e.data_offsets[0], base + e.data_offsets[1]) });
  }
  return { meta, tensors };
}

/** Builds a safetensors file; `layout` may move tensors (gaps, overlaps) and append bytes. */
function buildSt(tensors: StEntry[], opts: { meta?: unknown; gapBefore?: number; overlapAt?: number; trailing?: number } = {}): Buffer {
  const header: Record<string, unknown> = {};
  if (opts.meta !== undefined) header.__metadata__ = opts.meta;
  const chunks: Buffer[] = [];
  let cursor = 0;
  tensors.forEach((t, i) => {
    let begin = cursor;
    if (opts.gapBefore === i) {
      chunks.push(Buffer.alloc(8));
      begin += 8;
    }
    let data = t.data;
    if (opts.overlapAt === i) {
      begin -= 4; // starts inside the previous tensor; it is 4 bytes shorter in the file
      data = t.data.subarray(4);
    }
    header[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [begin, begin + t.data.length] };
    chunks.push(data);
    cursor = begin + t.data.length;
  });
  if (opts.trailing) chunks.push(Buffer.alloc(opts.trailing, 7));
  let h = JSON.stringify(header);
  while ((8 + Buffer.byteLength(h)) % 8) h += ' ';
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(Buffer.byteLength(h)));
  return Buffer.concat([len, Buffer.from(h), ...chunks]);
}

const R8 = goldenFiles('r8-all');
const R8_ST = parseSt(R8.model);

function r8Config(patch: Record<string, unknown>): string {
  return JSON.stringify({ ...goldenConfig('r8-all'), ...patch });
}

// ---------------------------------------------------------------------------------------------

describe('adapter upload, listing and serving', () => {
  it('starts with no adapters and serves the base model', async () => {
    expect(dirEntries()).toEqual([]);
    const res = await fetch(`${srv.url}/v1/adapters`);
    expect(res.status).toBe(200);
    expect(await res.json()).toEqual({ object: 'list', data: [] });
    await expectBaseServes();
  });

  it('uploads a golden adapter: 201 with metadata, persisted atomically with sha256', async () => {
    const before = Date.now() / 1000;
    const res = await upload('r8-all', R8);
    const text = await res.text();
    expect(res.status, text).toBe(201);
    const m = JSON.parse(text) as Record<string, unknown>;
    expect(m).toMatchObject({
      id: 'r8-all',
      rank: 8,
      alpha: 16,
      size: R8.model.length + Buffer.byteLength(R8.config),
      sha256: { 'adapter_config.json': sha(R8.config), 'adapter_model.safetensors': sha(R8.model) },
      resident: false,
      requests_served: 0,
    });
    expect([...(m.target_modules as string[])].sort()).toEqual(['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj']);
    expect(m.created as number).toBeGreaterThanOrEqual(Math.floor(before) - 1);
    expect(m.created as number).toBeLessThanOrEqual(Date.now() / 1000 + 1);
    // On disk: exactly the adapter folder (no staging leftovers), with byte-identical files.
    expect(dirEntries()).toEqual(['r8-all']);
    expect(readFileSync(join(adapterDir, 'r8-all', 'adapter_model.safetensors')).equals(R8.model)).toBe(true);
    expect(readFileSync(join(adapterDir, 'r8-all', 'adapter_config.json')).equals(R8.config as Buffer)).toBe(true);
  });

  it('lists the adapter in GET /v1/adapters, GET /v1/adapters/:id and /v1/models', async () => {
    const list = (await (await fetch(`${srv.url}/v1/adapters`)).json()) as { object: string; data: Array<Record<string, unknown>> };
    expect(list.object).toBe('list');
    expect(list.data.map((d) => d.id)).toEqual(['r8-all']);
    const one = await fetch(`${srv.url}/v1/adapters/r8-all`);
    expect(one.status).toBe(200);
    const m = (await one.json()) as Record<string, unknown>;
    for (const k of ['id', 'rank', 'alpha', 'target_modules', 'size', 'sha256', 'created', 'resident', 'requests_served']) expect(m).toHaveProperty(k);
    expect(m).toMatchObject({ id: 'r8-all', rank: 8, alpha: 16, sha256: { 'adapter_model.safetensors': sha(R8.model) } });
    expect(list.data[0]).toEqual(m);
    const models = (await (await fetch(`${srv.url}/v1/models`)).json()) as { data: Array<{ id: string }> };
    expect(models.data.map((d) => d.id)).toEqual([MODEL, 'r8-all']);
    await expectOpenAIError(await fetch(`${srv.url}/v1/adapters/nope`), 404);
  });

  it('serves every uploaded golden adapter with greedy parity over HTTP', async () => {
    const served: Record<string, number> = {};
    for (const name of GOLDEN_ADAPTERS) {
      if (name !== 'r8-all') {
        const res = await upload(name, goldenFiles(name));
        expect(res.status, await res.text()).toBe(201);
      }
      served[name] = await expectParity(name, firstCase(name));
    }
    // Base-model parity too: the adapters do not leak into base requests.
    await expectParity(MODEL, golden.cases.find((c) => c.adapter === null)!);
    const m = (await (await fetch(`${srv.url}/v1/adapters/r8-all`)).json()) as { requests_served: number; resident: boolean };
    expect(m.requests_served).toBe(served['r8-all']);
    expect(m.resident).toBe(true);
    expect(dirEntries()).toEqual(GOLDEN_ADAPTERS);
  }, 30_000);

  it('answers 409 for an id that exists and leaves the folder as it was', async () => {
    const before = dirEntries();
    const err = await expectOpenAIError(await upload('r8-all', goldenFiles('r4-mlp')), 409);
    expect(err.param).toBe('id');
    expect(dirEntries()).toEqual(before);
    // The original adapter is untouched.
    expect(readFileSync(join(adapterDir, 'r8-all', 'adapter_model.safetensors')).equals(R8.model)).toBe(true);
    await expectParity('r8-all', firstCase('r8-all'));
  });

  it('of two racing uploads of one id exactly one wins (201) and the other gets 409', async () => {
    const before = dirEntries();
    const [a, b] = await Promise.all([upload('race', goldenFiles('r4-mlp')), upload('race', goldenFiles('r2-attn-named-keys'))]);
    const statuses = [a.status, b.status].sort();
    expect(statuses).toEqual([201, 409]);
    const loser = a.status === 409 ? a : b;
    await expectOpenAIError(loser, 409);
    const winner = (await (a.status === 201 ? a : b).json()) as { rank: number };
    expect(dirEntries()).toEqual([...before, 'race'].sort());
    // The folder holds the winner's files, complete.
    const want = winner.rank === 4 ? goldenFiles('r4-mlp') : goldenFiles('r2-attn-named-keys');
    expect(readFileSync(join(adapterDir, 'race', 'adapter_model.safetensors')).equals(want.model)).toBe(true);
    await expectParity('race', firstCase(winner.rank === 4 ? 'r4-mlp' : 'r2-attn-named-keys'));
  }, 20_000);
});

// ---------------------------------------------------------------------------------------------

interface Hostile {
  name: string;
  parts: () => Part[];
  status: number;
  message: RegExp;
  param?: string | null;
}

const withModel = (model: Buffer): Files => ({ config: R8.config, model });
const withConfig = (config: string | Buffer): Files => ({ config, model: R8.model });

const HOSTILE: Hostile[] = [
  // safetensors
  { name: 'truncated file (shorter than the length prefix)', parts: () => adapterParts('h-trunc0', withModel(R8.model.subarray(0, 5))), status: 400, message: /truncated/ },
  { name: 'truncated file (cut inside the data)', parts: () => adapterParts('h-trunc1', withModel(R8.model.subarray(0, R8.model.length - 1000))), status: 400, message: /truncated|out of bounds/ },
  { name: 'truncated header', parts: () => adapterParts('h-trunc2', withModel(R8.model.subarray(0, 100))), status: 400, message: /header/ },
  {
    name: 'oversized header length',
    parts: () => {
      const b = Buffer.from(R8.model);
      b.writeBigUInt64LE(200n * 1024n * 1024n);
      return adapterParts('h-bighdr', withModel(b));
    },
    status: 400,
    message: /cap/,
  },
  {
    name: 'header that is not JSON',
    parts: () => {
      const b = Buffer.from(R8.model);
      b.write('{!!!', 8);
      return adapterParts('h-hdrjson', withModel(b));
    },
    status: 400,
    message: /JSON/,
  },
  { name: 'offsets with a gap', parts: () => adapterParts('h-gap', withModel(buildSt(R8_ST.tensors, { meta: R8_ST.meta, gapBefore: 3 }))), status: 400, message: /gap/ },
  { name: 'offsets that overlap', parts: () => adapterParts('h-overlap', withModel(buildSt(R8_ST.tensors, { meta: R8_ST.meta, overlapAt: 3 }))), status: 400, message: /overlap/ },
  { name: 'trailing bytes', parts: () => adapterParts('h-trailing', withModel(buildSt(R8_ST.tensors, { meta: R8_ST.meta, trailing: 16 }))), status: 400, message: /trailing/ },
  {
    name: 'a tensor of the wrong shape (same byte size)',
    parts: () => {
      const ts = R8_ST.tensors.map((t) => ({ ...t }));
      const i = ts.findIndex((t) => t.name.includes('layers.0.self_attn.q_proj.lora_A'));
      expect(i).toBeGreaterThanOrEqual(0);
      expect(ts[i].shape).toEqual([8, 64]);
      ts[i].shape = [16, 32];
      return adapterParts('h-shape', withModel(buildSt(ts, { meta: R8_ST.meta })));
    },
    status: 400,
    message: /shape|\[16, ?32\]|16 ?x ?32/,
  },
  {
    name: 'a missing tensor',
    parts: () => adapterParts('h-missing', withModel(buildSt(R8_ST.tensors.filter((t) => !t.name.includes('layers.1.mlp.up_proj.lora_B')), { meta: R8_ST.meta }))),
    status: 400,
    message: /up_proj|missing/,
  },
  {
    name: 'an unknown dtype',
    parts: () => adapterParts('h-dtype', withModel(buildSt(R8_ST.tensors.map((t, i) => (i === 0 ? { ...t, dtype: 'X32' } : t)), { meta: R8_ST.meta }))),
    status: 400,
    message: /dtype/,
  },
  // adapter_config.json
  { name: 'rank over --max-lora-rank', parts: () => adapterParts('h-rank', withConfig(r8Config({ r: 65 }))), status: 400, message: /rank/ },
  { name: 'DoRA', parts: () => adapterParts('h-dora', withConfig(r8Config({ use_dora: true }))), status: 400, message: /DoRA|use_dora/, param: 'use_dora' },
  { name: 'embedding target', parts: () => adapterParts('h-embed', withConfig(r8Config({ target_modules: ['q_proj', 'embed_tokens'] }))), status: 400, message: /embed/, param: 'target_modules' },
  { name: 'lm_head target', parts: () => adapterParts('h-lmhead', withConfig(r8Config({ target_modules: ['lm_head', 'v_proj'] }))), status: 400, message: /lm_head/, param: 'target_modules' },
  { name: 'modules_to_save', parts: () => adapterParts('h-mts', withConfig(r8Config({ modules_to_save: ['lm_head'] }))), status: 400, message: /modules_to_save/, param: 'modules_to_save' },
  { name: 'non-JSON config', parts: () => adapterParts('h-nonjson', withConfig('{"r": 8, this is not json')), status: 400, message: /adapter_config\.json/ },
  { name: 'config that is a JSON array', parts: () => adapterParts('h-array', withConfig('[1, 2, 3]')), status: 400, message: /adapter_config\.json/ },
  { name: 'config and weights that disagree on rank', parts: () => adapterParts('h-mismatch', withConfig(r8Config({ r: 4 }))), status: 400, message: /shape|rank|\[8, ?64\]|4/ },
  // formats
  {
    name: 'pickle weights (adapter_model.bin)',
    parts: () => [
      { field: 'id', value: 'h-pickle' },
      { field: 'adapter_config.json', value: R8.config, filename: 'adapter_config.json' },
      { field: 'adapter_model.bin', value: Buffer.from([0x80, 0x02, 0x7d, 0x71, 0x00, 0x2e]), filename: 'adapter_model.bin' },
    ],
    status: 415,
    message: /pickle/,
  },
  {
    name: 'pickle weights under the safetensors field name (.pt filename)',
    parts: () => [
      { field: 'id', value: 'h-pickle2' },
      { field: 'adapter_config.json', value: R8.config, filename: 'adapter_config.json' },
      { field: 'adapter_model.safetensors', value: Buffer.from([0x80, 0x02, 0x7d, 0x71, 0x00, 0x2e]), filename: 'adapter_model.pt' },
    ],
    status: 415,
    message: /pickle/,
  },
  {
    name: 'another format (gguf)',
    parts: () => [
      { field: 'id', value: 'h-gguf' },
      { field: 'adapter_config.json', value: R8.config, filename: 'adapter_config.json' },
      { field: 'adapter.gguf', value: Buffer.from('GGUF\x03\x00\x00\x00'), filename: 'adapter.gguf' },
    ],
    status: 415,
    message: /unexpected file|adapter_model\.safetensors/,
  },
  // form
  {
    name: 'a missing id field',
    parts: () => adapterParts('x', R8).filter((p) => p.field !== 'id'),
    status: 400,
    message: /id/,
    param: 'id',
  },
  {
    name: 'a missing weights file',
    parts: () => adapterParts('h-noweights', R8).filter((p) => p.field !== 'adapter_model.safetensors'),
    status: 400,
    message: /adapter_model\.safetensors/,
  },
  {
    name: 'a missing config file',
    parts: () => adapterParts('h-noconfig', R8).filter((p) => p.field !== 'adapter_config.json'),
    status: 400,
    message: /adapter_config\.json/,
  },
  {
    name: 'a file sent twice',
    parts: () => [...adapterParts('h-twice', R8), { field: 'adapter_config.json', value: R8.config, filename: 'adapter_config.json' }],
    status: 400,
    message: /twice|too many/,
  },
  { name: 'an unknown form field', parts: () => [{ field: 'name', value: 'zzz' }, ...adapterParts('h-field', R8)], status: 400, message: /name/ },
  // ids
  ...(['../x', 'a/b', '.hidden', 'a\u0000b', 'x'.repeat(300), '', '-leading-dash', 'sp ace', '..', 'ünïcode'] as const).map(
    (id): Hostile => ({
      name: `id ${JSON.stringify(id.length > 20 ? `${id.slice(0, 8)}…(${id.length} chars)` : id)}`,
      parts: () => adapterParts(id, R8),
      status: 400,
      message: /id must match/,
      param: 'id',
    }),
  ),
  {
    name: 'the id sent after the files',
    parts: () => {
      const p = adapterParts('../after', R8);
      return [p[1], p[2], p[0]];
    },
    status: 400,
    message: /id must match/,
    param: 'id',
  },
  // size
  {
    name: 'a body over --max-adapter-bytes',
    parts: () => adapterParts('h-big', withModel(Buffer.concat([R8.model, Buffer.alloc(MAX_ADAPTER_BYTES, 1)]))),
    status: 413,
    message: /max-adapter-bytes|too large|larger/,
  },
  {
    name: 'two files that together exceed --max-adapter-bytes',
    parts: () => adapterParts('h-big2', { config: Buffer.alloc(MAX_ADAPTER_BYTES - 10_000, 0x20), model: R8.model }),
    status: 413,
    message: /max-adapter-bytes|too large|larger/,
  },
];

describe('hostile uploads leave nothing behind and the server keeps serving', () => {
  for (const h of HOSTILE) {
    it(`rejects ${h.name} with ${h.status}`, async () => {
      const before = dirEntries();
      const err = await expectOpenAIError(await postForm(h.parts()), h.status, h.message);
      if (h.param !== undefined) expect(err.param).toBe(h.param);
      expect(dirEntries()).toEqual(before);
      await expectBaseServes();
    });
  }

  it('rejects a JSON (non-multipart) upload with 415', async () => {
    const before = dirEntries();
    const res = await fetch(`${srv.url}/v1/adapters`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ id: 'json-up' }) });
    await expectOpenAIError(res, 415);
    expect(dirEntries()).toEqual(before);
    await expectBaseServes();
  });

  it('cleans up after a client that disconnects mid-upload', async () => {
    const before = dirEntries();
    const boundary = '----loraplexTestBoundary7MA4YWxkTrZu0gW';
    const head = Buffer.from(
      `--${boundary}\r\nContent-Disposition: form-data; name="id"\r\n\r\nh-disconnect\r\n` +
        `--${boundary}\r\nContent-Disposition: form-data; name="adapter_config.json"; filename="adapter_config.json"\r\nContent-Type: application/json\r\n\r\n`,
    );
    const mid = Buffer.concat([
      R8.config as Buffer,
      Buffer.from(`\r\n--${boundary}\r\nContent-Disposition: form-data; name="adapter_model.safetensors"; filename="adapter_model.safetensors"\r\nContent-Type: application/octet-stream\r\n\r\n`),
      R8.model.subarray(0, 30_000),
    ]);
    const url = new URL(srv.url);
    const sawStaging = await new Promise<boolean>((resolve, reject) => {
      const req = httpRequest({
        host: url.hostname,
        port: url.port,
        path: '/v1/adapters',
        method: 'POST',
        headers: { 'content-type': `multipart/form-data; boundary=${boundary}`, 'content-length': String(head.length + mid.length + R8.model.length) },
      });
      req.on('error', () => undefined); // we destroy it ourselves
      req.on('response', (r) => reject(new Error(`server answered ${r.statusCode} before the body was complete`)));
      req.write(head);
      req.write(mid);
      // Wait until the server is streaming into a staging folder, then vanish.
      const t0 = Date.now();
      const poll = setInterval(() => {
        const staged = dirEntries().filter((e) => !before.includes(e));
        if (staged.length > 0 || Date.now() - t0 > 3000) {
          clearInterval(poll);
          req.destroy();
          resolve(staged.length > 0);
        }
      }, 10);
    });
    expect(sawStaging, 'the upload was being staged inside --adapter-dir').toBe(true);
    // The staging folder must disappear shortly after the disconnect.
    const deadline = Date.now() + 5000;
    while (Date.now() < deadline && dirEntries().join() !== before.join()) await new Promise((r) => setTimeout(r, 50));
    expect(dirEntries()).toEqual(before);
    await expectBaseServes();
    await expectOpenAIError(await fetch(`${srv.url}/v1/adapters/h-disconnect`), 404);
    // And a normal upload still works afterwards.
    const res = await upload('after-disconnect', goldenFiles('r4-mlp'));
    expect(res.status, await res.text()).toBe(201);
    expect(dirEntries()).toEqual([...before, 'after-disconnect'].sort());
  }, 15_000);

  it('never made any of the hostile ids visible', async () => {
    const list = (await (await fetch(`${srv.url}/v1/adapters`)).json()) as { data: Array<{ id: string }> };
    expect(list.data.map((d) => d.id).sort()).toEqual([...GOLDEN_ADAPTERS, 'after-disconnect', 'race'].sort());
  });
});

// ---------------------------------------------------------------------------------------------

describe("vLLM's load_lora_adapter / unload_lora_adapter", () => {
  const post = (path: string, body: unknown) =>
    fetch(`${srv.url}${path}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });

  it('loads an adapter from a --lora-roots folder and serves it with parity', async () => {
    const res = await post('/v1/load_lora_adapter', { lora_name: 'vllm-r4', lora_path: join(ROOT, 'r4-mlp') });
    expect(res.status, await res.clone().text()).toBe(200);
    expect(await res.text()).toMatch(/vllm-r4/);
    await expectParity('vllm-r4', firstCase('r4-mlp'));
    await expectOpenAIError(await post('/v1/load_lora_adapter', { lora_name: 'vllm-r4', lora_path: join(ROOT, 'r4-mlp') }), 409);
  });

  it('refuses paths that resolve outside --adapter-dir and --lora-roots', async () => {
    const outside = join(tmp, 'outside');
    cpSync(join(ROOT, 'r2-attn-named-keys'), outside, { recursive: true });
    const link = join(tmp, 'link-to-root');
    symlinkSync(ROOT, link); // a link to an allowed root is fine: realpath lands inside it
    const escape = join(tmp, 'escape-link');
    symlinkSync(outside, escape);
    const before = dirEntries();
    for (const p of [outside, join(adapterDir, '..', 'outside'), join(ROOT, '..', 'llama-gqa-not-there'), escape, '/etc', '/nonexistent/x']) {
      const err = await expectOpenAIError(await post('/v1/load_lora_adapter', { lora_name: 'vllm-bad', lora_path: p }), 400);
      expect(err.param).toBe('lora_path');
    }
    await expectOpenAIError(await complete('vllm-bad', [592, 1, 2]), 404);
    const ok = await post('/v1/load_lora_adapter', { lora_name: 'vllm-link', lora_path: join(link, 'r64-qv-rslora') });
    expect(ok.status, await ok.text()).toBe(200);
    await expectParity('vllm-link', firstCase('r64-qv-rslora'));
    expect(dirEntries()).toEqual(before);
  });

  it('validates a loaded adapter fully: DoRA is a 400 and pickle a 415, and neither is registered', async () => {
    const root2 = join(tmp, 'root2');
    mkdirSync(join(root2, 'dora'), { recursive: true });
    writeFileSync(join(root2, 'dora', 'adapter_config.json'), r8Config({ use_dora: true }));
    writeFileSync(join(root2, 'dora', 'adapter_model.safetensors'), R8.model);
    mkdirSync(join(root2, 'pickle'));
    writeFileSync(join(root2, 'pickle', 'adapter_config.json'), R8.config);
    writeFileSync(join(root2, 'pickle', 'adapter_model.bin'), Buffer.from([0x80, 0x02, 0x7d, 0x71, 0x00, 0x2e]));
    mkdirSync(join(root2, 'gap'));
    writeFileSync(join(root2, 'gap', 'adapter_config.json'), R8.config);
    writeFileSync(join(root2, 'gap', 'adapter_model.safetensors'), buildSt(R8_ST.tensors, { meta: R8_ST.meta, gapBefore: 2 }));
    const e1 = await expectOpenAIError(await post('/v1/load_lora_adapter', { lora_name: 'vllm-dora', lora_path: join(root2, 'dora') }), 400);
    expect(e1.message).toMatch(/DoRA|use_dora/);
    const e2 = await expectOpenAIError(await post('/v1/load_lora_adapter', { lora_name: 'vllm-pickle', lora_path: join(root2, 'pickle') }), 415);
    expect(e2.message).toMatch(/pickle/);
    const e3 = await expectOpenAIError(await post('/v1/load_lora_adapter', { lora_name: 'vllm-gap', lora_path: join(root2, 'gap') }), 400);
    expect(e3.message).toMatch(/gap/);
    for (const n of ['vllm-dora', 'vllm-pickle', 'vllm-gap']) {
      await expectOpenAIError(await complete(n, [592, 1, 2]), 404);
      await expectOpenAIError(await fetch(`${srv.url}/v1/adapters/${n}`), 404);
    }
    await expectBaseServes();
  });

  it('rejects a bad name and a missing field', async () => {
    const e1 = await expectOpenAIError(await post('/v1/load_lora_adapter', { lora_name: '../x', lora_path: join(ROOT, 'r4-mlp') }), 400);
    expect(e1.message).toMatch(/id must match/);
    const e2 = await expectOpenAIError(await post('/v1/load_lora_adapter', { lora_name: 'x' }), 400);
    expect(e2.param).toBe('lora_path');
  });

  it('unloads: requests answer 404 afterwards; unknown names are 404', async () => {
    const res = await post('/v1/unload_lora_adapter', { lora_name: 'vllm-r4' });
    expect(res.status, await res.clone().text()).toBe(200);
    await expectOpenAIError(await complete('vllm-r4', [592, 1, 2]), 404);
    await expectOpenAIError(await post('/v1/unload_lora_adapter', { lora_name: 'vllm-r4' }), 404);
    // The fixture folder is, of course, untouched.
    expect(existsSync(join(ROOT, 'r4-mlp', 'adapter_model.safetensors'))).toBe(true);
    const u2 = await post('/v1/unload_lora_adapter', { lora_name: 'vllm-link' });
    expect(u2.status).toBe(200);
  });
});

// ---------------------------------------------------------------------------------------------

describe('restart and delete', () => {
  it('a crash mid-upload leaves nothing behind: staging leftovers are never visible and are swept at start', async () => {
    // The exact on-disk state a process killed mid-upload / mid-delete leaves: a hidden staging
    // folder with partial files (mkdtemp '.upload-XXXXXX') and a renamed-away '.trash-*' folder.
    const staging = join(adapterDir, '.upload-Cr4sh1');
    mkdirSync(staging);
    cpSync(join(ROOT, 'r4-mlp', 'adapter_config.json'), join(staging, 'adapter_config.json'));
    writeFileSync(join(staging, 'adapter_model.safetensors'), R8.model.subarray(0, 20_000));
    const trash = join(adapterDir, `.trash-gone-12345-${Date.now()}`);
    cpSync(join(ROOT, 'r4-mlp'), trash, { recursive: true });
    const leftovers = ['.upload-Cr4sh1', trash.split('/').pop()!];
    try {
      await srv.close();
      srv = await startServer();
      const list = (await (await fetch(`${srv.url}/v1/adapters`)).json()) as { data: Array<{ id: string }> };
      expect(list.data.map((d) => d.id).sort()).toEqual([...GOLDEN_ADAPTERS, 'after-disconnect', 'race'].sort());
      await expectBaseServes();
      expect(dirEntries().filter((e) => leftovers.includes(e)), 'crash leftovers still in --adapter-dir after a restart').toEqual([]);
    } finally {
      for (const l of leftovers) rmSync(join(adapterDir, l), { recursive: true, force: true });
    }
  }, 30_000);

  it('keeps every uploaded adapter across a restart (same --adapter-dir)', async () => {
    const before = (await (await fetch(`${srv.url}/v1/adapters`)).json()) as { data: Array<Record<string, unknown>> };
    await srv.close();
    srv = await startServer();
    const after = (await (await fetch(`${srv.url}/v1/adapters`)).json()) as { data: Array<Record<string, unknown>> };
    const strip = (d: Record<string, unknown>) => ({ id: d.id, rank: d.rank, alpha: d.alpha, target_modules: d.target_modules, size: d.size, sha256: d.sha256, created: d.created });
    expect(after.data.map(strip)).toEqual(before.data.map(strip));
    expect(after.data.map((d) => d.id).sort()).toEqual([...GOLDEN_ADAPTERS, 'after-disconnect', 'race'].sort());
    await expectParity('r8-all', firstCase('r8-all'));
  }, 30_000);

  it('delete while a long generation runs: new requests 404 at once, the running one finishes, then files and pages are freed', async () => {
    const id = 'r8-all';
    // After the restart r8-all is the only adapter that has run, so it is the only one in the pool.
    expect(await metricValue('loraplex_pool_pages', 'kind="adapter"')).toBeGreaterThan(0);
    const ctrl = new AbortController();
    const res = await fetch(`${srv.url}/v1/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: id, prompt: [592, 360, 274], max_tokens: 200, temperature: 0, ignore_eos: true, stream: true, stream_options: { include_usage: true } }),
      signal: ctrl.signal,
    });
    expect(res.status).toBe(200);
    const reader = res.body!.getReader();
    const dec = new TextDecoder();
    let sse = '';
    let streamDone = false;
    const readAll = (async () => {
      while (true) {
        const { value, done } = await reader.read();
        if (done) break;
        sse += dec.decode(value, { stream: true });
      }
      streamDone = true;
    })();
    let del: Promise<Response> | null = null;
    try {
      // Wait for the first token, so the request is running.
      while (!sse.includes('data: ') && !streamDone) await new Promise((r) => setTimeout(r, 1));
      expect(streamDone).toBe(false);
      del = fetch(`${srv.url}/v1/adapters/${id}`, { method: 'DELETE' });
      let delDone = false;
      void del.then(() => (delDone = true), () => undefined);
      // New requests: 404 at once, while the old one is still running.
      let saw404WhileRunning = false;
      let delDoneWhileRunning = false;
      for (let i = 0; i < 200 && !streamDone; i++) {
        const r = await complete(id, [592, 1, 2], { max_tokens: 1 });
        if (r.status === 404) {
          saw404WhileRunning = !streamDone;
          delDoneWhileRunning = delDone && !streamDone;
          await expectOpenAIError(r, 404);
          break;
        }
        await r.text();
      }
      expect(saw404WhileRunning, 'a new request on the adapter got 404 while the old one still ran').toBe(true);
      expect(delDoneWhileRunning, 'DELETE answered before the running request finished').toBe(false);
      await expectOpenAIError(await fetch(`${srv.url}/v1/adapters/${id}`), 404);
      // A deleted adapter must not be listed either.
      const listed = (await (await fetch(`${srv.url}/v1/adapters`)).json()) as { data: Array<{ id: string }> };
      expect(listed.data.map((d) => d.id), 'GET /v1/adapters lists an adapter being deleted').not.toContain(id);
      const models = (await (await fetch(`${srv.url}/v1/models`)).json()) as { data: Array<{ id: string }> };
      expect(models.data.map((d) => d.id), 'GET /v1/models lists an adapter being deleted').not.toContain(id);
      // The running request completes normally: 200 tokens, finish_reason length, no error event.
      await readAll;
      const events = sse.split('\n\n').filter((e) => e.startsWith('data: ')).map((e) => e.slice(6));
      expect(events.at(-1)).toBe('[DONE]');
      const chunks = events.slice(0, -1).map((e) => JSON.parse(e) as { choices: Array<{ finish_reason: string | null }>; usage?: { completion_tokens: number }; error?: unknown });
      expect(chunks.some((c) => c.error)).toBe(false);
      expect(chunks.find((c) => c.usage)?.usage?.completion_tokens).toBe(200);
      expect(chunks.flatMap((c) => c.choices.map((x) => x.finish_reason)).filter(Boolean)).toEqual(['length']);
      const dres = await del;
      expect(dres.status, await dres.clone().text()).toBe(200);
      expect(await dres.json()).toMatchObject({ id, deleted: true });
      // Afterwards: the folder is gone (no trash left behind), no adapter pages in the pool.
      expect(existsSync(join(adapterDir, id))).toBe(false);
      expect(dirEntries().filter((e) => e.startsWith('.'))).toEqual([]);
      expect(await metricValue('loraplex_pool_pages', 'kind="adapter"')).toBe(0);
      await expectOpenAIError(await complete(id, [592, 1, 2]), 404);
      await expectOpenAIError(await fetch(`${srv.url}/v1/adapters/${id}`, { method: 'DELETE' }), 404);
      await expectBaseServes();
      // The id can be uploaded again and serves the new files.
      const again = await upload(id, R8);
      expect(again.status, await again.text()).toBe(201);
      await expectParity(id, firstCase(id));
    } finally {
      ctrl.abort(); // after a failure, leave no stream (and no DELETE waiting on it) behind
      await readAll.catch(() => undefined);
      await del?.catch(() => undefined);
    }
  }, 30_000);

  it('DELETE of unknown or malformed ids is a 404 and touches nothing', async () => {
    const before = dirEntries();
    for (const p of ['nope', '..%2Fr4-mlp', '.hidden', '%2E%2E', 'a%00b']) {
      await expectOpenAIError(await fetch(`${srv.url}/v1/adapters/${p}`, { method: 'DELETE' }), 404);
    }
    expect(dirEntries()).toEqual(before);
    await expectBaseServes();
  });

  it('an over-long or malformed adapter id in the URL is a 4xx in the OpenAI error shape', async () => {
    const before = dirEntries();
    for (const method of ['GET', 'DELETE']) {
      // 300 characters: over Fastify's default maxParamLength (100); then malformed percent-encoding.
      for (const p of ['x'.repeat(300), '%E0%A4%A']) {
        const res = await fetch(`${srv.url}/v1/adapters/${p}`, { method });
        const text = await res.text();
        const what = `${method} /v1/adapters/${p.slice(0, 12)}: ${res.status} ${text.slice(0, 160)}`;
        expect([400, 404, 414], what).toContain(res.status);
        let body: unknown = null;
        try {
          body = JSON.parse(text);
        } catch {
          /* reported below */
        }
        expect(body, what).toEqual({ error: { message: expect.any(String), type: expect.any(String), param: null, code: expect.any(String) } });
      }
    }
    expect(dirEntries()).toEqual(before);
    await expectBaseServes();
  });
});
