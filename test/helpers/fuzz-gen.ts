// Seeded request generator for the HTTP fuzz test (test/server/fuzz.test.ts): valid requests for
// every route, then random mutations of them (dropped fields, wrong types, extreme numbers, huge or
// hostile strings, invalid JSON, wrong content types, broken multipart uploads and adapter files).
// The same seed gives the same request list, byte for byte; each request carries a short text that
// says how to reproduce it.
import { SeededRandom } from '../../server/demo/seeded-random.js';

export interface FuzzRequest {
  /** Position in the list (stable for a seed). */
  i: number;
  /** What generated it: route family plus the mutations applied. */
  label: string;
  method: string;
  /** Raw request target, sent as is (already percent-encoded where needed). */
  path: string;
  headers: Record<string, string>;
  body?: Buffer;
  /** The request in a form a person can replay (body text, or the multipart parts). */
  repro: string;
}

/** What the generator may name: models, adapters, and folders on the server side. */
export interface FuzzWorld {
  base: string;
  /** Adapters the fuzzer may read and name but never deletes or unloads (the greedy check uses them). */
  keep: string[];
  /** Adapter ids that may be created, deleted, loaded and unloaded. */
  mutable: string[];
  /** Valid adapters to upload: file bytes by name. */
  uploads: Array<{ name: string; config: Record<string, unknown>; safetensors: Buffer }>;
  /** Paths for load_lora_adapter: inside the roots (good and broken), outside, nonexistent. */
  loadPaths: string[];
  maxAdapterBytes: number;
  maxBodyBytes: number;
}

// ---------------------------------------------------------------------------------------------
// Random choices

export class Rng {
  private r: SeededRandom;
  constructor(seed: number, stream: string) {
    this.r = new SeededRandom(seed, stream);
  }
  float(): number {
    return this.r.uniform();
  }
  /** Integer in [lo, hi]. */
  int(lo: number, hi: number): number {
    return lo + Math.floor(this.r.uniform() * (hi - lo + 1));
  }
  chance(p: number): boolean {
    return this.r.uniform() < p;
  }
  pick<T>(xs: readonly T[]): T {
    return xs[this.int(0, xs.length - 1)];
  }
  weighted<T>(entries: ReadonlyArray<readonly [number, T]>): T {
    const total = entries.reduce((s, [w]) => s + w, 0);
    let x = this.r.uniform() * total;
    for (const [w, v] of entries) if ((x -= w) < 0) return v;
    return entries[entries.length - 1][1];
  }
}

// ---------------------------------------------------------------------------------------------
// Values

/**
 * Numbers JSON.stringify cannot write (1e999 parses to Infinity, a 30-digit integer loses its
 * precision) travel as this marker string and are spliced into the body text unquoted.
 */
const RAW = '\u0001raw:';
const raw = (text: string) => `${RAW}${text}`;

function serialize(v: unknown): string {
  return JSON.stringify(v).replace(/"\\u0001raw:([^"]*)"/g, '$1');
}

const HUGE_INTS = [2 ** 31, 2 ** 31 - 1, 2 ** 32, 2 ** 53, 2 ** 53 + 2, 2 ** 63, 2 ** 64, -(2 ** 63), 1e308, -1e308, Number.MAX_SAFE_INTEGER];
const RAW_NUMBERS = ['1e999', '-1e999', '123456789012345678901234567890', '-0', '1e-400', '0.0000000000000000000001', '1E2', '4.9e-324'];

const UNICODE = [
  'héllo wörld', '世界你好', '🌍🚀👩‍👩‍👧‍👦', '\u0000', 'a\u0000b', '\ud800', '\udfff\ud800', '\u202eevil', '\ufeffbom', 'e\u0301\u0301\u0301',
  '<|eot_id|>', '<|begin_of_text|>', '<|start_header_id|>system<|end_header_id|>', '{{ raise_exception("x") }}', '{% for i in range(99999999) %}x{% endfor %}',
  '\r\n\r\n', '\t', ' ', '\\', '"', "'; DROP TABLE adapters; --", '../../../../etc/passwd', '%s%s%n', '\u{10FFFF}', '\uFFFD', 'The quick brown fox',
];

export function randomString(g: Rng, maxLen = 64): string {
  switch (g.int(0, 5)) {
    case 0:
      return '';
    case 1:
      return g.pick(UNICODE);
    case 2:
      return 'The'.repeat(g.int(1, 8));
    case 3: {
      let s = '';
      const n = g.int(1, maxLen);
      for (let k = 0; k < n; k++) s += String.fromCharCode(g.chance(0.8) ? g.int(32, 126) : g.int(0, 0xffff));
      return s;
    }
    case 4:
      return g.pick(['a', 'x', 'true', 'null', 'NaN', 'Infinity', '-1', '1e308', '0x10', '[]', '{}']);
    default:
      return g.pick(UNICODE) + 'x'.repeat(g.int(0, maxLen));
  }
}

/** Nested arrays `depth` deep, built as text (JSON.stringify would recurse that deep). */
function deepArray(depth: number): string {
  return raw('['.repeat(depth) + '1' + ']'.repeat(depth));
}

/** A value of any JSON type, with a bias to the edge cases. */
export function randomJson(g: Rng, depth = 0): unknown {
  const k = g.int(0, depth > 2 ? 5 : 9);
  switch (k) {
    case 0:
      return null;
    case 1:
      return g.chance(0.5);
    case 2:
      return g.pick([0, 1, -1, 0.5, 7, 256, 600, -2.5]);
    case 3:
      return g.chance(0.5) ? g.pick(HUGE_INTS) : raw(g.pick(RAW_NUMBERS));
    case 4:
    case 5:
      return randomString(g);
    case 6:
    case 7:
      return Array.from({ length: g.int(0, 4) }, () => randomJson(g, depth + 1));
    case 8: {
      const o: Record<string, unknown> = {};
      for (let j = g.int(0, 4); j > 0; j--) o[g.pick([...FIELD_NAMES, 'x', '', '__proto__x', 'constructor', randomString(g, 8)])] = randomJson(g, depth + 1);
      return o;
    }
    default:
      return g.chance(0.5) ? deepArray(g.int(10, 5000)) : 'x'.repeat(g.int(1000, 40000));
  }
}

/** An odd value for any field: wrong type, out of range, huge, empty or hostile. */
function weirdValue(g: Rng): unknown {
  return g.weighted<() => unknown>([
    [3, () => null],
    [2, () => g.pick([true, false])],
    [3, () => g.pick([0, -1, 1.5, -0.5, 1e-300, 9, 21, 257, 1000])],
    [3, () => g.pick(HUGE_INTS)],
    [2, () => raw(g.pick(RAW_NUMBERS))],
    [2, () => g.pick(['NaN', 'Infinity', '-Infinity', '1', '8', 'null', 'true'])],
    [3, () => randomString(g)],
    [2, () => g.pick([[], {}, [null], [[]], [1, 'a'], { a: 1 }])],
    [1, () => 'x'.repeat(g.int(10_000, 200_000))],
    [1, () => deepArray(g.int(100, 20_000))],
    [2, () => randomJson(g)],
  ])();
}

// ---------------------------------------------------------------------------------------------
// Generation bodies and their mutations

const FIELD_NAMES = [
  'model', 'prompt', 'messages', 'max_tokens', 'max_completion_tokens', 'temperature', 'top_p', 'top_k', 'min_p', 'n', 'stop', 'stream',
  'stream_options', 'seed', 'presence_penalty', 'frequency_penalty', 'repetition_penalty', 'logprobs', 'top_logprobs', 'echo', 'suffix',
  'best_of', 'logit_bias', 'ignore_eos', 'min_tokens', 'stop_token_ids', 'user', 'response_format', 'tools', 'tool_choice', 'add_generation_prompt',
];

/** Per-field edge values that pass the schema's type check but probe the range checks behind it. */
const FIELD_EDGES: Record<string, unknown[]> = {
  max_tokens: [0, -1, 1, 255, 256, 257, 1e9, 2 ** 31, 2 ** 63, 1e308, 1.5, null],
  max_completion_tokens: [0, -1, 1, 256, 2 ** 63, null],
  n: [0, -1, 1, 8, 9, 16, 1000, 2 ** 31, 2 ** 63, 1e308, null],
  temperature: [0, -1, 1e-45, 1e-300, 2, 100, 1e308, -1e308, null],
  top_p: [0, -0.1, 1e-30, 1, 1.1, 1e308, null],
  top_k: [-2, -1, 0, 1, 599, 600, 601, 1e9, 2 ** 63, null],
  min_p: [-1, 0, 0.5, 1, 1.5, 1e308, null],
  seed: [0, -1, 2 ** 31, 2 ** 32, 2 ** 63, -(2 ** 63), 2 ** 64, 1e308, -1e308, null],
  presence_penalty: [-2, 2, -3, 3, 1e308, -1e308, null],
  frequency_penalty: [-2, 2, -3, 3, 1e308, -1e308, null],
  repetition_penalty: [0, -1, 1e-30, 1, 2, 1e308, null],
  logprobs: [-1, 0, 5, 20, 21, 1e9, 2 ** 63, true, null],
  top_logprobs: [-1, 0, 5, 20, 21, 2 ** 63, null],
  min_tokens: [-1, 0, 8, 300, 1e9, 2 ** 63],
  stop: ['', [''], ['a', ''], Array.from({ length: 17 }, (_, k) => `s${k}`), '\u0000', 'e', [' ', 'the', '🌍'], null],
  stop_token_ids: [[], [596], [599], [600], [-1], [2 ** 63], Array.from({ length: 600 }, (_, k) => k)],
  logit_bias: [{}, { 1: 5 }, { x: 1 }, { 999999: -100 }, null],
  stream_options: [null, {}, { include_usage: true }, { include_usage: false }, { include_usage: 'yes' }, { other: 1 }],
  best_of: [1, 2, 0, -1, null],
  echo: [true, false, null],
  suffix: ['', 'x', null],
  ignore_eos: [true, false],
  user: ['', 'u', 'x'.repeat(5000)],
  response_format: [{ type: 'text' }, { type: 'json_object' }, { type: 'json_schema', json_schema: {} }, {}, null],
  tools: [[], [{ type: 'function', function: { name: 'f' } }], null],
  tool_choice: ['auto', 'none', { type: 'function' }, null],
  add_generation_prompt: [true, false],
};

interface GenCtx {
  g: Rng;
  w: FuzzWorld;
}

/** A model name: mostly the base and adapters that exist, sometimes unknown or hostile names. */
function modelName({ g, w }: GenCtx): string {
  return g.weighted<() => string>([
    [6, () => w.base],
    [4, () => g.pick(w.keep)],
    [3, () => g.pick(w.mutable)],
    [1, () => g.pick(['nope', '', w.base.toUpperCase(), `${w.base} `, '..', '../llama-gqa', 'x'.repeat(200), '🌍', 'a\u0000b', w.keep[0] + '/'])],
  ])();
}

function tokenIds(g: Rng, min = 1, max = 12): number[] {
  return Array.from({ length: g.int(min, max) }, () => g.int(0, 599));
}

function samplingFields(g: Rng, body: Record<string, unknown>): void {
  body.max_tokens = g.int(1, 8);
  if (g.chance(0.6)) body.temperature = g.pick([0, 0, 0.7, 1, 1.3]);
  if (g.chance(0.2)) body.top_p = g.pick([0.5, 0.9, 1]);
  if (g.chance(0.2)) body.top_k = g.pick([-1, 1, 5, 50]);
  if (g.chance(0.1)) body.min_p = g.pick([0, 0.05, 0.2]);
  if (g.chance(0.3)) body.seed = g.int(0, 1000);
  if (g.chance(0.2)) body.n = g.int(1, 4);
  if (g.chance(0.2)) body.stop = g.chance(0.5) ? g.pick(['.', 'e', 'the', '\n']) : ['a', 'b', 'xyz'];
  if (g.chance(0.15)) body.presence_penalty = g.pick([-1, 0.5, 2]);
  if (g.chance(0.15)) body.frequency_penalty = g.pick([-1, 0.5, 2]);
  if (g.chance(0.1)) body.repetition_penalty = g.pick([0.8, 1.2, 2]);
  if (g.chance(0.3)) body.ignore_eos = true;
  if (g.chance(0.1)) body.min_tokens = g.int(0, 4);
  if (g.chance(0.1)) body.stop_token_ids = [596, g.int(0, 599)];
  if (g.chance(0.35)) {
    body.stream = true;
    if (g.chance(0.5)) body.stream_options = { include_usage: g.chance(0.7) };
  }
}

function completionBody(c: GenCtx): Record<string, unknown> {
  const { g } = c;
  const body: Record<string, unknown> = { model: modelName(c) };
  body.prompt = g.weighted<() => unknown>([
    [4, () => randomString(g, 40) || 'The'],
    [3, () => tokenIds(g)],
    [2, () => Array.from({ length: g.int(1, 4) }, () => tokenIds(g))],
    [2, () => Array.from({ length: g.int(1, 4) }, () => g.pick(['The', 'Once upon', 'héllo', 'a b c', '🌍']))],
  ])();
  samplingFields(g, body);
  if (g.chance(0.25)) body.logprobs = g.int(0, 5);
  else if (g.chance(0.08)) body.echo = true;
  return body;
}

function chatBody(c: GenCtx): Record<string, unknown> {
  const { g } = c;
  const msg = () => {
    const role = g.weighted([[5, 'user'], [2, 'assistant'], [2, 'system'], [1, 'developer']] as const);
    const content = g.chance(0.8) ? randomString(g, 40) || 'Hi' : [{ type: 'text', text: 'Hello' }, { type: 'text', text: randomString(g, 10) }];
    return { role, content };
  };
  const body: Record<string, unknown> = { model: modelName(c), messages: Array.from({ length: g.int(1, 4) }, msg) };
  samplingFields(g, body);
  if (g.chance(0.1)) {
    body.max_completion_tokens = body.max_tokens;
    delete body.max_tokens;
  }
  if (g.chance(0.25)) {
    body.logprobs = true;
    if (g.chance(0.7)) body.top_logprobs = g.int(0, 5);
  }
  return body;
}

/** Chat-only edits: roles, content parts, tools. */
const CHAT_EDITS: Array<[string, (g: Rng, b: Record<string, unknown>) => void]> = [
  ['role', (g, b) => ((b.messages as Array<Record<string, unknown>>)[0].role = g.pick(['tool', 'function', '', 'USER', 'x'.repeat(300), 1, null]))],
  ['content', (g, b) => ((b.messages as Array<Record<string, unknown>>)[0].content = g.pick([null, 1, [], [{ type: 'image_url', image_url: { url: 'x' } }], [{ type: 'text' }], [{ text: 'a' }], { text: 'a' }, '']))],
  ['no-content', (_g, b) => delete (b.messages as Array<Record<string, unknown>>)[0].content],
  ['messages', (g, b) => (b.messages = g.pick([[], null, 'hi', [null], [[]], [{}], Array.from({ length: 300 }, () => ({ role: 'user', content: 'hi' }))]))],
  ['assistant-null', (_g, b) => (b.messages = [{ role: 'user', content: 'a' }, { role: 'assistant', content: null }])],
  ['tools', (g, b) => (b.tools = g.pick(FIELD_EDGES.tools))],
  ['response_format', (g, b) => (b.response_format = g.pick(FIELD_EDGES.response_format))],
];

/** Applies 1-3 mutations to a JSON body; returns their names. */
function mutateBody(g: Rng, body: Record<string, unknown>, chat: boolean): string[] {
  const names: string[] = [];
  for (let k = g.int(1, 3); k > 0; k--) {
    const keys = Object.keys(body);
    const kind = g.weighted([
      [3, 'drop'], [5, 'edge'], [4, 'weird'], [2, 'unknown'], [1, 'nulls'], [chat ? 3 : 0, 'chat'], [1, 'prompt'],
    ] as const);
    if (kind === 'drop' && keys.length) {
      const key = g.pick(keys);
      delete body[key];
      names.push(`drop(${key})`);
    } else if (kind === 'edge') {
      const key = g.pick(Object.keys(FIELD_EDGES));
      body[key] = g.pick(FIELD_EDGES[key]);
      names.push(`edge(${key})`);
    } else if (kind === 'weird') {
      const key = g.pick([...keys, ...FIELD_NAMES]);
      body[key] = weirdValue(g);
      names.push(`weird(${key})`);
    } else if (kind === 'unknown') {
      const key = g.pick(['foo', 'guided_json', 'lora_request', 'extra_body', '', '\u0000', '$ref', 'constructor']);
      body[key] = randomJson(g);
      names.push(`unknown(${JSON.stringify(key)})`);
    } else if (kind === 'nulls') {
      for (const key of keys) if (key !== 'model' && key !== 'prompt' && key !== 'messages' && g.chance(0.5)) body[key] = null;
      names.push('nulls');
    } else if (kind === 'chat') {
      const [n, f] = g.pick(CHAT_EDITS);
      const m = body.messages;
      if (!Array.isArray(m) || m.length === 0 || typeof m[0] !== 'object' || m[0] === null) body.messages = [{ role: 'user', content: 'Hi' }];
      f(g, body);
      names.push(`chat(${n})`);
    } else {
      // Prompts that pass the schema but not the range checks (and ones that do not).
      body.prompt = g.pick<unknown>([
        '', [], [[]], [600], [-1], [0, 1.5], [2 ** 63], [[1], []], [[1], 'a'], ['a', ''], ['a', 1], tokenIds(g, 250, 260),
        Array.from({ length: 40 }, () => [592, 1]), 'The '.repeat(g.int(100, 3000)), [null], { a: 1 },
      ]);
      names.push('prompt');
    }
  }
  return names;
}

// ---------------------------------------------------------------------------------------------
// Body encodings: raw-text mutations and content types

interface Encoded {
  body: Buffer;
  headers: Record<string, string>;
  label: string;
}

function encodeJson(g: Rng, value: unknown, allowRaw: boolean): Encoded {
  let text = serialize(value);
  const headers: Record<string, string> = { 'content-type': 'application/json' };
  let label = '';
  if (allowRaw && g.chance(0.12)) {
    const kind = g.int(0, 9);
    if (kind === 0) (text = text.slice(0, g.int(0, text.length - 1))), (label = 'truncated-json');
    else if (kind === 1) (text = text.replace(/^\{/, '{"model":"nope",')), (label = 'duplicate-key');
    else if (kind === 2) (text = text.replace(/\}$/, ',}')), (label = 'trailing-comma');
    else if (kind === 3) (text = '\ufeff' + text), (label = 'bom');
    else if (kind === 4) (text = text.replace(/^\{/, '{"__proto__":{"polluted":1},')), (label = 'proto');
    else if (kind === 5) (text = text.replace(/^\{/, '{"constructor":{"prototype":{"polluted":1}},')), (label = 'constructor-prototype');
    else if (kind === 6) (text = ''), (label = 'empty-body');
    else if (kind === 7) (text = text + g.pick(['x', '\u0000', '}', ' \n ', '{}'])), (label = 'trailing-garbage');
    else if (kind === 8) (headers['content-type'] = g.pick(['text/plain', 'application/x-www-form-urlencoded', 'multipart/form-data', 'application/xml', 'application/json; charset=latin1', 'APPLICATION/JSON', 'application/json-patch+json', 'application/octet-stream'])), (label = `ctype(${headers['content-type']})`);
    else delete headers['content-type'], (label = 'no-ctype');
  }
  return { body: Buffer.from(text, 'utf8'), headers, label };
}

function reproOf(method: string, path: string, headers: Record<string, string>, body: Buffer | undefined, note = ''): string {
  let s = `${method} ${path}`;
  const h = Object.entries(headers).filter(([k]) => k !== 'content-length');
  if (h.length) s += ` ${JSON.stringify(Object.fromEntries(h))}`;
  if (body && !headers['content-type']?.startsWith('multipart/')) {
    const text = body.toString('utf8');
    s += text.length > 1200 ? ` body(${body.length} B): ${JSON.stringify(text.slice(0, 600))} ... ${JSON.stringify(text.slice(-200))}` : ` body: ${JSON.stringify(text)}`;
  }
  if (body && headers['content-type']?.startsWith('multipart/')) s += ` body(${body.length} B)`;
  return note ? `${s} [${note}]` : s;
}

// ---------------------------------------------------------------------------------------------
// Multipart uploads

interface Part {
  name: string;
  filename?: string;
  contentType?: string;
  data: Buffer;
  /** How it was made, for the reproduction text. */
  note: string;
}

function multipartBody(parts: Part[], boundary: string, closed: boolean): Buffer {
  const chunks: Buffer[] = [];
  for (const p of parts) {
    let h = `--${boundary}\r\nContent-Disposition: form-data; name="${p.name}"`;
    if (p.filename !== undefined) h += `; filename="${p.filename}"`;
    h += '\r\n';
    if (p.contentType) h += `Content-Type: ${p.contentType}\r\n`;
    chunks.push(Buffer.from(h + '\r\n', 'utf8'), p.data, Buffer.from('\r\n'));
  }
  if (closed) chunks.push(Buffer.from(`--${boundary}--\r\n`));
  return Buffer.concat(chunks);
}

function safetensorsHeader(buf: Buffer): { len: number; header: Record<string, unknown> } {
  const len = Number(buf.readBigUInt64LE(0));
  return { len, header: JSON.parse(buf.subarray(8, 8 + len).toString('utf8')) as Record<string, unknown> };
}

function withHeader(buf: Buffer, header: unknown): Buffer {
  const { len } = safetensorsHeader(buf);
  const h = Buffer.from(JSON.stringify(header), 'utf8');
  const out = Buffer.alloc(8);
  out.writeBigUInt64LE(BigInt(h.length));
  return Buffer.concat([out, h, buf.subarray(8 + len)]);
}

/** Broken or hostile adapter_model.safetensors made from a valid one. */
function mutateSafetensors(g: Rng, st: Buffer, others: Buffer[]): [Buffer, string] {
  const { len, header } = safetensorsHeader(st);
  const tensors = Object.keys(header).filter((k) => k !== '__metadata__');
  const t = g.pick(tensors);
  const entry = header[t] as { dtype: string; shape: number[]; data_offsets: [number, number] };
  const edit = (f: (e: typeof entry) => void) => {
    const h = structuredClone(header) as Record<string, typeof entry>;
    f(h[t]);
    return withHeader(st, h);
  };
  switch (g.int(0, 13)) {
    case 0:
      return [st.subarray(0, g.int(0, st.length - 1)), 'truncated'];
    case 1:
      return [Buffer.alloc(0), 'empty'];
    case 2: {
      const b = Buffer.from(st);
      for (let k = 0; k < 20; k++) b[g.int(0, Math.min(b.length - 1, 8 + len))] = g.int(0, 255);
      return [b, 'garbage-in-header'];
    }
    case 3: {
      const b = Buffer.from(st);
      b.writeBigUInt64LE(g.pick([2n ** 63n, 2n ** 64n - 1n, BigInt(st.length), 0n, 1n]));
      return [b, 'header-length'];
    }
    case 4:
      return [edit((e) => (e.shape = g.pick([[e.shape[1], e.shape[0]], [e.shape[0]], [0, e.shape[1]], [e.shape[0], 2 ** 40], [-1, e.shape[1]], [1e308, 1]]))), `shape(${t})`];
    case 5:
      return [edit((e) => (e.dtype = g.pick(['F64', 'I8', 'BF16', 'F16', 'U8', 'bool', '', 'F32 ']))), `dtype(${t})`];
    case 6:
      return [edit((e) => (e.data_offsets = g.pick<[number, number]>([[0, 2 ** 40], [-8, 0], [e.data_offsets[1], e.data_offsets[0]], [0, 0], [1, e.data_offsets[1] + 1], [2 ** 53, 2 ** 53 + 4]]))), `offsets(${t})`];
    case 7: {
      const h = structuredClone(header) as Record<string, unknown>;
      delete h[t];
      return [withHeader(st, h), `missing(${t})`];
    }
    case 8: {
      const h = structuredClone(header) as Record<string, unknown>;
      h[g.pick(['base_model.model.lm_head.lora_A.weight', 'x', '', '../x', t.replace('lora_A', 'lora_C')])] = structuredClone(entry);
      return [withHeader(st, h), 'extra-tensor'];
    }
    case 9: {
      const b = Buffer.from(st);
      const at = 8 + len + entry.data_offsets[0] + 4 * g.int(0, 3);
      if (at + 4 <= b.length) b.writeFloatLE(g.pick([NaN, Infinity, -Infinity, 3e38]), at);
      return [b, `non-finite(${t})`];
    }
    case 10:
      return [g.pick(others), 'other-adapter-weights'];
    case 11:
      return [Buffer.concat([st, Buffer.alloc(g.int(1, 64), 7)]), 'trailing-bytes'];
    case 12:
      return [withHeader(st, g.pick<unknown>([[], null, 'x', 1, { __metadata__: { format: 'pt' } }, {}])), 'odd-header-json'];
    default:
      return [Buffer.from(g.pick(['\u0080\u0004\u0095pickle', 'PK\u0003\u0004zip', '{"not":"safetensors"}', 'x'.repeat(100)]), 'latin1'), 'not-safetensors'];
  }
}

const CONFIG_EDITS: Array<[string, (g: Rng, c: Record<string, unknown>) => void]> = [
  ['r', (g, c) => (c.r = g.pick([0, -1, 1.5, '8', 'NaN', null, 65, 128, 2 ** 31, 2 ** 63, 1e308, raw('1e999'), [], true]))],
  ['lora_alpha', (g, c) => (c.lora_alpha = g.pick([0, -1, '16', 'NaN', null, 1e308, -1e308, raw('1e999'), raw('-1e999'), 1e-320, {}]))],
  ['target_modules', (g, c) => (c.target_modules = g.pick<unknown>([[], ['nope'], 'q_proj', '.*', '(a+)+$', '(.*a){20}', '^(q|k)_proj$', '[', [1, 2], null, ['lm_head'], ['embed_tokens'], ['q_proj', 'q_proj'], 'all-linear', Array.from({ length: 5000 }, (_, k) => `m${k}`)]))],
  ['peft_type', (g, c) => (c.peft_type = g.pick(['PREFIX_TUNING', 'IA3', 'lora', '', null, 1, 'LOHA']))],
  ['use_dora', (g, c) => (c.use_dora = g.pick([true, 'true', 1, null]))],
  ['use_rslora', (g, c) => (c.use_rslora = g.pick([true, 'yes', 2, null]))],
  ['rank_pattern', (g, c) => (c.rank_pattern = g.pick<unknown>([{ q_proj: 1e9 }, { '.*': 4 }, { '(a+)+$': 2 }, { q_proj: -1 }, { q_proj: 'x' }, [], null, 'q_proj']))],
  ['alpha_pattern', (g, c) => (c.alpha_pattern = g.pick<unknown>([{ q_proj: 1e308 }, { '.*': 'NaN' }, { '((a|a)*)*$': 1 }, { v_proj: 0 }, [], 'x']))],
  ['layers_to_transform', (g, c) => (c.layers_to_transform = g.pick<unknown>([[0], [999], -1, 0, [-1], 'x', [0.5], []]))],
  ['layers_pattern', (g, c) => (c.layers_pattern = g.pick<unknown>(['layers', '(a+)+$', ['x'], 1]))],
  ['modules_to_save', (g, c) => (c.modules_to_save = g.pick<unknown>([['lm_head'], ['embed_tokens'], 'lm_head', [], 1]))],
  ['bias', (g, c) => (c.bias = g.pick(['all', 'lora_only', 'none', 1, null]))],
  ['fan_in_fan_out', (g, c) => (c.fan_in_fan_out = g.pick([true, 'true', null]))],
  ['exclude_modules', (g, c) => (c.exclude_modules = g.pick<unknown>([['q_proj'], '.*', '(a+)+$', 1]))],
  ['unknown', (g, c) => (c[g.pick(['foo', '', '__proto__', 'constructor', 'x'.repeat(500)])] = randomJson(g))],
  ['drop', (g, c) => delete c[g.pick(['r', 'lora_alpha', 'target_modules', 'peft_type', 'use_rslora', 'bias'])]],
  ['base_model', (g, c) => (c.base_model_name_or_path = g.pick(['/etc/passwd', '../../..', 'other-model', null, 1]))],
];

function mutateConfig(g: Rng, cfg: Record<string, unknown>): [Buffer, string] {
  if (g.chance(0.15)) {
    const text = g.pick(['', 'not json', '[]', 'null', '1', '"LORA"', '{', '\ufeff{"r":8}', '{"r": 8, "r": "x"}', JSON.stringify(cfg).slice(0, 40), '{"peft_type":"LORA","x":"' + 'y'.repeat(200_000) + '"}']);
    return [Buffer.from(text, 'utf8'), `config-text(${text.length > 40 ? text.slice(0, 30) + '...' : text})`];
  }
  const c = structuredClone(cfg);
  const names: string[] = [];
  for (let k = g.int(1, 2); k > 0; k--) {
    const [n, f] = g.pick(CONFIG_EDITS);
    f(g, c);
    names.push(n);
  }
  return [Buffer.from(serialize(c), 'utf8'), `config(${names.join(',')}): ${serialize(c).slice(0, 300)}`];
}

const HOSTILE_IDS = [
  '', '.', '..', '.upload-x', '.trash-x', '-lead', '_x', 'a/b', '../x', 'a b', 'a\u0000b', 'adaptér', '🌍', 'x'.repeat(64), 'x'.repeat(65),
  'CON', 'a\nb', 'id"; filename="x', '%2e%2e', 'A'.repeat(5000),
];

function uploadRequest(c: GenCtx): { parts: Part[]; boundary: string; closed: boolean; headers: Record<string, string>; notes: string[] } {
  const { g, w } = c;
  const src = g.pick(w.uploads);
  const notes: string[] = [`from ${src.name}`];
  const id = g.weighted<() => string>([
    [8, () => g.pick(w.mutable)],
    [2, () => g.pick(w.keep)],
    [2, () => g.pick(HOSTILE_IDS)],
  ])();
  const idPart = (v: string): Part => ({ name: 'id', data: Buffer.from(v, 'utf8'), note: `id=${JSON.stringify(v.length > 80 ? v.slice(0, 20) + `...(${v.length})` : v)}` });
  const filePart = (name: string, data: Buffer, note: string, filename = name, contentType = 'application/octet-stream'): Part => ({ name, filename, contentType, data, note });
  let cfg: Buffer = Buffer.from(JSON.stringify(src.config), 'utf8');
  let cfgNote = 'adapter_config.json (valid)';
  let st = src.safetensors;
  let stNote = 'adapter_model.safetensors (valid)';
  const mutate = g.chance(0.6);
  if (mutate && g.chance(0.4)) [cfg, cfgNote] = mutateConfig(g, src.config);
  if (mutate && g.chance(0.35)) [st, stNote] = mutateSafetensors(g, st, w.uploads.map((u) => u.safetensors));
  let parts: Part[] = [idPart(id), filePart('adapter_config.json', cfg, cfgNote), filePart('adapter_model.safetensors', st, stNote)];
  if (g.chance(0.3)) parts = [parts[1], parts[2], parts[0]]; // id after the files
  let boundary = `----fuzz${g.int(0, 1e9)}`;
  let closed = true;
  let contentType = `multipart/form-data; boundary=${boundary}`;
  if (mutate && g.chance(0.45)) {
    const kind = g.int(0, 16);
    if (kind === 0) (parts = parts.filter((p) => p.name !== 'id')), notes.push('no-id');
    else if (kind === 1) (parts = parts.filter((p) => p.name !== 'adapter_config.json')), notes.push('no-config');
    else if (kind === 2) (parts = parts.filter((p) => p.name !== 'adapter_model.safetensors')), notes.push('no-weights');
    else if (kind === 3) parts.push(filePart('adapter_config.json', cfg, 'duplicate config')), notes.push('dup-config');
    else if (kind === 4) parts.push(idPart(g.pick(w.mutable))), notes.push('dup-id');
    else if (kind === 5) parts.push({ name: g.pick(['name', 'model', '', 'id2']), data: Buffer.from('x'), note: 'extra field' }), notes.push('extra-field');
    else if (kind === 6) parts.push(filePart(g.pick(['README.md', 'config.json', 'x']), Buffer.from('hello'), 'extra file')), notes.push('extra-file');
    else if (kind === 7) parts[parts.findIndex((p) => p.name === 'adapter_model.safetensors')].filename = g.pick(['adapter_model.bin', 'pytorch_model.pt', 'x.pkl', 'a.ckpt']), notes.push('pickle-name');
    else if (kind === 8) parts[parts.findIndex((p) => p.name === 'adapter_config.json')].filename = g.pick(['../../adapter_config.json', '/etc/adapter_config.json', 'C:\\x\\adapter_config.json', '..', '', 'adapter_config.json\u0000.png']), notes.push('path-filename');
    else if (kind === 9) parts[parts.findIndex((p) => p.name === 'adapter_config.json')].name = g.pick(['config', 'file', '']), notes.push('wrong-fieldname');
    else if (kind === 10) parts = parts.map((p) => (p.filename !== undefined ? { ...p, filename: undefined, contentType: undefined, note: p.note + ' (sent as a plain field)' } : p)), notes.push('files-as-fields');
    else if (kind === 11) for (let k = 0; k < 6; k++) parts.push(idPart(`p${k}`)), notes.push('too-many-parts');
    else if (kind === 12) (closed = false), notes.push('no-closing-boundary');
    else if (kind === 13) (contentType = `multipart/form-data; boundary=other${boundary}`), notes.push('wrong-boundary');
    else if (kind === 14) (contentType = g.pick(['multipart/form-data', 'multipart/mixed; boundary=' + boundary, 'multipart/form-data; boundary=', `multipart/form-data; boundary="${boundary}"; charset=x`])), notes.push(`ctype(${contentType})`);
    else if (kind === 15) parts.push(filePart('adapter_model.safetensors', Buffer.alloc(w.maxAdapterBytes + g.int(1, 4096), 1), 'oversize', 'adapter_model.safetensors')), notes.push('oversize');
    else (parts = []), notes.push('no-parts');
  }
  if (g.chance(0.05)) (boundary = boundary + '-'), notes.push('body-boundary-differs');
  return { parts, boundary, closed, headers: { 'content-type': contentType }, notes };
}

// ---------------------------------------------------------------------------------------------
// Paths

/** A hostile or ordinary adapter id for a URL path, percent-encoded (or deliberately not). */
function idInPath(g: Rng, ids: string[]): string {
  return g.weighted<() => string>([
    [6, () => encodeURIComponent(g.pick(ids))],
    [3, () => encodeURIComponent(g.pick(HOSTILE_IDS))],
    [3, () => g.pick(['..', '.', '%2e%2e', '%2E%2E%2Fmodels', '..%2F..%2Fetc%2Fpasswd', '%00', '%', '%zz', '%C0%AE%C0%AE', '%ED%A0%80', 'a%2Fb', '', 'x'.repeat(g.int(90, 120)), 'y'.repeat(3000), '%F0%9F%8C%8D', '~', 'a;b', '*'])],
  ])();
}

// ---------------------------------------------------------------------------------------------
// The request list

export function generateRequests(seed: number, count: number, w: FuzzWorld): FuzzRequest[] {
  const g = new Rng(seed, 'fuzz-requests');
  const c: GenCtx = { g, w };
  const out: FuzzRequest[] = [];
  const add = (label: string, method: string, path: string, headers: Record<string, string>, body?: Buffer, note = '') =>
    out.push({ i: out.length, label, method, path, headers, body, repro: reproOf(method, path, headers, body, note) });
  const json = (label: string, method: string, path: string, value: unknown, allowRaw = true) => {
    const e = encodeJson(g, value, allowRaw);
    add(e.label ? `${label}+${e.label}` : label, method, path, e.headers, e.body);
  };
  const deletable = [...w.mutable];
  const allIds = [...w.keep, ...w.mutable];

  while (out.length < count) {
    const family = g.weighted([
      [26, 'completions'], [22, 'chat'], [10, 'upload'], [5, 'load'], [4, 'unload'], [4, 'delete'], [9, 'get'], [4, 'other'], [4, 'random'],
    ] as const);
    switch (family) {
      case 'completions':
      case 'chat': {
        const chat = family === 'chat';
        const body = chat ? chatBody(c) : completionBody(c);
        const muts = g.chance(0.55) ? mutateBody(g, body, chat) : [];
        json(`${family}${body.stream ? '/stream' : ''}${muts.length ? ':' + muts.join('+') : ''}`, 'POST', chat ? '/v1/chat/completions' : '/v1/completions', body);
        break;
      }
      case 'upload': {
        const u = uploadRequest(c);
        const body = multipartBody(u.parts, u.boundary, u.closed);
        const note = u.parts.map((p) => `${JSON.stringify(p.name)}${p.filename !== undefined ? `; filename=${JSON.stringify(p.filename)}` : ''} (${p.data.length} B): ${p.note}`).join(' | ');
        add(`upload:${u.notes.join('+')}`, 'POST', '/v1/adapters', u.headers, body, `multipart: ${note}${u.closed ? '' : ' | no closing boundary'}`);
        break;
      }
      case 'load': {
        const body: Record<string, unknown> = {
          lora_name: g.weighted<() => string>([[7, () => g.pick(w.mutable)], [1, () => g.pick(w.keep)], [2, () => g.pick(HOSTILE_IDS)]])(),
          lora_path: g.pick(w.loadPaths),
        };
        const muts = g.chance(0.25) ? mutateLoad(g, body) : [];
        json(`load${muts.length ? ':' + muts.join('+') : ''}`, 'POST', '/v1/load_lora_adapter', body);
        break;
      }
      case 'unload': {
        const body: Record<string, unknown> = { lora_name: g.chance(0.8) ? g.pick(deletable) : g.pick(HOSTILE_IDS) };
        const muts = g.chance(0.2) ? mutateLoad(g, body) : [];
        json(`unload${muts.length ? ':' + muts.join('+') : ''}`, 'POST', '/v1/unload_lora_adapter', body);
        break;
      }
      case 'delete':
        add('delete', 'DELETE', `/v1/adapters/${idInPath(g, deletable)}`, {});
        break;
      case 'get': {
        const path = g.weighted<() => string>([
          [2, () => '/v1/models'], [2, () => '/v1/adapters'], [4, () => `/v1/adapters/${idInPath(g, allIds)}`], [1, () => '/health'], [1, () => '/ready'], [1, () => '/metrics'],
          [1, () => g.pick(['/v1/models?x=1', '/v1/adapters?limit=-1&limit=2', '/health?%zz', '/v1/models#frag', '/v1/models/', '//v1/models', '/v1//adapters', '/V1/MODELS', '/v1/models?' + 'a=1&'.repeat(500)])],
        ])();
        add(`get ${path.slice(0, 40)}`, g.chance(0.1) ? 'HEAD' : 'GET', path, {});
        break;
      }
      case 'other': {
        const [method, path] = g.pick<[string, string]>([
          ['GET', '/v1/completions'], ['PUT', '/v1/completions'], ['PATCH', '/v1/chat/completions'], ['DELETE', '/v1/models'], ['POST', '/v1/models'],
          ['POST', '/health'], ['OPTIONS', '/v1/completions'], ['PUT', `/v1/adapters/${encodeURIComponent(g.pick(w.mutable))}`], ['DELETE', '/v1/adapters'],
          ['GET', '/v1/load_lora_adapter'], ['POST', '/v1/embeddings'], ['POST', '/v1/responses'], ['GET', '/'], ['GET', '/nope'], ['POST', '/v1/completions/x'],
          ['GET', '/..%2f..%2fetc%2fpasswd'], ['PROPFIND', '/'], ['SEARCH', '/v1/models'], ['TRACE', '/health'], ['POST', '/v2/completions'],
        ]);
        if (g.chance(0.5) && method !== 'GET' && method !== 'TRACE') json(`other ${method} ${path}`, method, path, randomJson(g));
        else add(`other ${method} ${path}`, method, path, {});
        break;
      }
      default: {
        // Any JSON value (or a huge or deeply nested one) to any POST route.
        const path = g.pick(['/v1/completions', '/v1/chat/completions', '/v1/load_lora_adapter', '/v1/unload_lora_adapter', '/v1/adapters']);
        let value: unknown = randomJson(g);
        if (g.chance(0.1)) value = { model: w.base, prompt: 'x'.repeat(w.maxBodyBytes + g.int(1, 1000)), max_tokens: 1 };
        json(`random ${path}`, 'POST', path, value);
      }
    }
  }
  return out;
}

function mutateLoad(g: Rng, body: Record<string, unknown>): string[] {
  const key = g.pick(['lora_name', 'lora_path', 'lora_int_id', 'base_model_name']);
  if (g.chance(0.3)) {
    delete body[key];
    return [`drop(${key})`];
  }
  body[key] = weirdValue(g);
  return [`weird(${key})`];
}
