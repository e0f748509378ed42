// Command-line flags of `loraplex serve` / `loraplex generate`. Every flag also reads from
// LORAPLEX_<NAME> (upper snake case), e.g. --memory-budget <- LORAPLEX_MEMORY_BUDGET.
import { parseArgs } from 'node:util';
import type { DtypeOption } from './native/addon.js';

export interface ServeConfig {
  model: string | null; // null: the bundled demo model
  servedModelName: string | null;
  adapterDir: string | null; // null: ./adapters, or the demo adapters with the demo model
  host: string;
  port: number;
  memoryBudget: number | null;
  maxNumSeqs: number;
  maxBatchTokens: number;
  maxLoraRank: number;
  maxLoras: number;
  maxLorasPerBatch: number;
  maxModelLen: number | null;
  blockSize: number;
  threads: number | null;
  apiKey: string | null;
  redisUrl: string | null;
  device: 'cpu' | 'cuda' | null;
  loraDtype: DtypeOption;
  computeDtype: DtypeOption;
  kvCacheDtype: DtypeOption;
  maxBodyBytes: number;
  maxAdapterBytes: number;
  maxQueue: number;
  maxN: number;
  shutdownTimeout: number; // seconds
  logLevel: string;
  loraRoots: string[];
  /** CORS (vLLM's flags): JSON lists, each ["*"] by default. */
  allowedOrigins: string[];
  allowedMethods: string[];
  allowedHeaders: string[];
  allowCredentials: boolean;
  /** GET /tokenizer_info (on unless --disable-tokenizer-info-endpoint). */
  tokenizerInfoEndpoint: boolean;
  /** The playground at GET / and /ui/ (on unless --no-ui). */
  ui: boolean;
  /** Automatic prefix caching (--enable-prefix-caching / --no-enable-prefix-caching; default on). */
  enablePrefixCaching: boolean;
}

export class ConfigError extends Error {}

interface FlagSpec {
  type: 'string' | 'boolean';
  env: string;
}

const SERVE_FLAGS = {
  model: 'string', 'served-model-name': 'string', 'adapter-dir': 'string', host: 'string', port: 'string',
  'memory-budget': 'string', 'max-num-seqs': 'string', 'max-batch-tokens': 'string', 'max-lora-rank': 'string',
  'max-loras': 'string', 'max-loras-per-batch': 'string', 'max-model-len': 'string', 'block-size': 'string', threads: 'string', 'api-key': 'string',
  'redis-url': 'string', device: 'string', 'lora-dtype': 'string', 'compute-dtype': 'string', 'kv-cache-dtype': 'string', 'max-body-bytes': 'string', 'max-adapter-bytes': 'string',
  'max-queue': 'string', 'max-n': 'string', 'shutdown-timeout': 'string', 'log-level': 'string', 'lora-roots': 'string',
  'allowed-origins': 'string', 'allowed-methods': 'string', 'allowed-headers': 'string', 'allow-credentials': 'boolean',
  'disable-tokenizer-info-endpoint': 'boolean',
  'no-ui': 'boolean',
  'enable-prefix-caching': 'boolean', 'no-enable-prefix-caching': 'boolean',
} as const;

export const SERVE_FLAG_NAMES = Object.keys(SERVE_FLAGS);

export function envName(flag: string): string {
  return 'LORAPLEX_' + flag.toUpperCase().replace(/-/g, '_');
}

/** Parses a byte size: 123, 512KiB, 512MiB, 8GiB, 1.5GB, 100MB. */
export function parseSize(v: string, flag: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$/i.exec(v);
  if (!m) throw new ConfigError(`--${flag}: cannot parse size ${JSON.stringify(v)} (examples: 512MiB, 8GiB)`);
  const n = Number(m[1]);
  const unit = (m[2] ?? 'B').toUpperCase();
  const pow = { B: 0, K: 1, M: 2, G: 3, T: 4 }[unit[0] as 'B' | 'K' | 'M' | 'G' | 'T'];
  const base = unit.includes('I') || unit.length === 1 ? 1024 : 1000;
  return Math.floor(n * base ** pow);
}

function positiveInt(v: string, flag: string): number {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1) throw new ConfigError(`--${flag} must be a positive integer (got ${JSON.stringify(v)})`);
  return n;
}

/** A JSON list of strings, as vLLM's `--allowed-origins '["https://a.example"]'` takes it. */
export function parseJsonList(v: string, flag: string): string[] {
  let list: unknown;
  try {
    list = JSON.parse(v);
  } catch {
    list = undefined;
  }
  if (!Array.isArray(list) || !list.every((x) => typeof x === 'string'))
    throw new ConfigError(`--${flag} must be a JSON list of strings, e.g. '["*"]' (got ${JSON.stringify(v)})`);
  return list;
}

type Specs = Record<string, 'string' | 'boolean'>;

/** Parses argv + environment for the given flag set; flags win over the environment. */
export function parseFlags(argv: string[], specs: Specs, env: NodeJS.ProcessEnv = process.env): { values: Record<string, string | boolean | undefined>; positionals: string[] } {
  const options: Record<string, { type: 'string' | 'boolean' }> = {};
  for (const [k, t] of Object.entries(specs)) options[k] = { type: t };
  let parsed;
  try {
    parsed = parseArgs({ args: argv, options, allowPositionals: true, strict: true });
  } catch (e) {
    throw new ConfigError((e as Error).message);
  }
  const values: Record<string, string | boolean | undefined> = { ...parsed.values };
  for (const [k, t] of Object.entries(specs)) {
    if (values[k] !== undefined) continue;
    const ev = env[envName(k)];
    if (ev === undefined || ev === '') continue;
    values[k] = t === 'boolean' ? /^(1|true|yes)$/i.test(ev) : ev;
  }
  return { values, positionals: parsed.positionals };
}

export function serveConfig(argv: string[], env: NodeJS.ProcessEnv = process.env): ServeConfig {
  const { values: v, positionals } = parseFlags(argv, SERVE_FLAGS, env);
  if (positionals.length) throw new ConfigError(`unexpected argument ${JSON.stringify(positionals[0])}`);
  const s = (k: string) => v[k] as string | undefined;
  const port = Number(s('port') ?? 8000);
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw new ConfigError(`--port must be 0..65535`);
  const device = s('device') ?? null;
  if (device !== null && device !== 'cpu' && device !== 'cuda') throw new ConfigError(`--device must be cpu or cuda`);
  // auto (default): bfloat16 where the model's weights are BF16 (CPU), float32 otherwise.
  const dtype = (flag: string): DtypeOption => {
    const v = s(flag) ?? 'auto';
    if (v !== 'auto' && v !== 'float32' && v !== 'bfloat16') throw new ConfigError(`--${flag} must be auto, float32 or bfloat16`);
    return v;
  };
  const loraDtype = dtype('lora-dtype'), computeDtype = dtype('compute-dtype'), kvCacheDtype = dtype('kv-cache-dtype');
  return {
    model: s('model') ?? null,
    servedModelName: s('served-model-name') ?? null,
    adapterDir: s('adapter-dir') ?? null,
    host: s('host') ?? '127.0.0.1',
    port,
    memoryBudget: s('memory-budget') ? parseSize(s('memory-budget')!, 'memory-budget') : null,
    maxNumSeqs: positiveInt(s('max-num-seqs') ?? '64', 'max-num-seqs'),
    maxBatchTokens: positiveInt(s('max-batch-tokens') ?? '2048', 'max-batch-tokens'),
    maxLoraRank: positiveInt(s('max-lora-rank') ?? '64', 'max-lora-rank'),
    maxLoras: positiveInt(s('max-loras') ?? '32', 'max-loras'),
    maxLorasPerBatch: s('max-loras-per-batch') ? positiveInt(s('max-loras-per-batch')!, 'max-loras-per-batch') : 0,
    maxModelLen: s('max-model-len') ? positiveInt(s('max-model-len')!, 'max-model-len') : null,
    blockSize: positiveInt(s('block-size') ?? '16', 'block-size'),
    threads: s('threads') ? positiveInt(s('threads')!, 'threads') : null,
    apiKey: s('api-key') ?? null,
    redisUrl: s('redis-url') ?? null,
    device: device as ServeConfig['device'],
    loraDtype,
    computeDtype,
    kvCacheDtype,
    maxBodyBytes: parseSize(s('max-body-bytes') ?? '16MiB', 'max-body-bytes'),
    maxAdapterBytes: parseSize(s('max-adapter-bytes') ?? '512MiB', 'max-adapter-bytes'),
    maxQueue: positiveInt(s('max-queue') ?? '1024', 'max-queue'),
    maxN: positiveInt(s('max-n') ?? '16', 'max-n'),
    shutdownTimeout: Number(s('shutdown-timeout') ?? 30),
    logLevel: s('log-level') ?? 'info',
    loraRoots: (s('lora-roots') ?? '').split(',').filter(Boolean),
    allowedOrigins: parseJsonList(s('allowed-origins') ?? '["*"]', 'allowed-origins'),
    allowedMethods: parseJsonList(s('allowed-methods') ?? '["*"]', 'allowed-methods'),
    allowedHeaders: parseJsonList(s('allowed-headers') ?? '["*"]', 'allowed-headers'),
    allowCredentials: v['allow-credentials'] === true,
    tokenizerInfoEndpoint: v['disable-tokenizer-info-endpoint'] !== true,
    ui: v['no-ui'] !== true,
    // vLLM's pair: on by default; --no-enable-prefix-caching (or LORAPLEX_ENABLE_PREFIX_CACHING=false) turns it off.
    enablePrefixCaching: v['no-enable-prefix-caching'] === true ? false : v['enable-prefix-caching'] !== false,
  };
}
