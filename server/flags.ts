// The command-line flags of `loraplex serve` and `loraplex generate`, as one declarative table:
// parsing and validation (this file), `--help` and the README's flag tables (cli-help.ts) all read
// it. Every flag also reads from LORAPLEX_<NAME> (upper snake case), e.g. --memory-budget <-
// LORAPLEX_MEMORY_BUDGET; the command line wins over the environment.
import { parseArgs } from 'node:util';
import { SEED_MAX, SEED_MIN } from './engine/sampling-params.js';

export type Command = 'serve' | 'generate';
export const COMMANDS: readonly Command[] = ['serve', 'generate'];

/** Help sections, in order. */
export type FlagGroup = 'engine' | 'server' | 'sampling';

/** A bad flag, flag value, argument or command: a usage error (exit code 2). */
export class ConfigError extends Error {}

type FlagType =
  | { type: 'string' } // free text: a path, a URL, a key
  | { type: 'int'; min: number; max?: number }
  | { type: 'number'; min: number; max?: number; minOpen?: boolean } // minOpen: min itself is excluded
  | { type: 'size' } // bytes: 123, 512KiB, 8GiB, 1.5GB
  | { type: 'enum'; choices: readonly string[] }
  | { type: 'json-list' } // a JSON list of strings
  | { type: 'csv' } // comma-separated strings
  | { type: 'seed' } // a signed 64-bit integer
  | { type: 'boolean' }; // present or not; from the environment 1/true/yes/on or 0/false/no/off

export type FlagSpec = FlagType & {
  name: string;
  /** The value's placeholder in help and the README (`--model DIR`); none for booleans. */
  arg?: string;
  /** What the flag does, as the README says it (markdown: `code`, [links](#anchor)). */
  help: string;
  /** The typed default; null when decided later (defaultText says how). */
  default: unknown;
  /** A command whose default differs (generate runs one sequence). */
  defaultIn?: Partial<Record<Command, unknown>>;
  /** The default as the README says it (markdown), when the value alone does not say it. */
  defaultText?: string;
  commands: readonly Command[];
  group: FlagGroup;
};

const ENGINE: readonly Command[] = ['serve', 'generate'];
const SERVE: readonly Command[] = ['serve'];
const GENERATE: readonly Command[] = ['generate'];
const DTYPES = ['auto', 'float32', 'bfloat16'] as const;
const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;

const TABLE: readonly FlagSpec[] = [
  // Model and engine: serve and generate.
  { name: 'model', arg: 'DIR', type: 'string', default: null, defaultText: 'the demo model', commands: ENGINE, group: 'engine',
    help: 'HF model directory' },
  { name: 'served-model-name', arg: 'NAME', type: 'string', default: null, defaultText: 'directory name', commands: SERVE, group: 'engine',
    help: 'name of the base model in the requests\' `model` field' },
  { name: 'adapter-dir', arg: 'DIR', type: 'string', default: null, defaultText: '`./adapters` (demo: its adapters)', commands: SERVE, group: 'engine',
    help: 'one sub-directory per adapter; its name is the id' },
  { name: 'memory-budget', arg: 'SIZE', type: 'size', default: null, commands: ENGINE, group: 'engine',
    defaultText: 'CPU: room for `max-num-seqs` x 512 tokens, at least 64 MiB, at most 1/4 of RAM; CUDA: from `gpu-memory-utilization`',
    help: 'bytes of the unified pool (`512MiB`, `8GiB`); overrides `gpu-memory-utilization`' },
  { name: 'gpu-memory-utilization', arg: 'F', type: 'number', min: 0, minOpen: true, max: 1, default: 0.92, commands: ENGINE, group: 'engine',
    help: 'CUDA: the fraction of the GPU\'s total memory this server may use (vLLM\'s flag); the pool is that less the weights and activation buffers (and 1% kept back). Start-up fails if less than that is free' },
  { name: 'enforce-eager', type: 'boolean', default: false, defaultText: 'off', commands: ENGINE, group: 'engine',
    help: 'CUDA: launch every step kernel by kernel; by default decode steps of up to min(`max-num-seqs`, 512) sequences replay CUDA graphs captured per batch bucket (1, 2, 4, then multiples of 8) on first use' },
  { name: 'max-num-seqs', arg: 'N', type: 'int', min: 1, default: 64, defaultIn: { generate: 1 }, defaultText: '64 (`generate`: 1)', commands: ENGINE, group: 'engine',
    help: 'scheduler limit: sequences running at once' },
  { name: 'max-batch-tokens', arg: 'N', type: 'int', min: 1, default: 2048, commands: ENGINE, group: 'engine',
    help: 'scheduler limit: tokens in one step' },
  { name: 'max-lora-rank', arg: 'N', type: 'int', min: 1, default: 64, commands: ENGINE, group: 'engine',
    help: 'largest accepted rank' },
  { name: 'max-loras', arg: 'N', type: 'int', min: 1, default: 32, commands: ENGINE, group: 'engine',
    help: 'adapters resident in the pool at once (slots)' },
  { name: 'max-loras-per-batch', arg: 'N', type: 'int', min: 1, default: null, defaultText: 'no cap', commands: ENGINE, group: 'engine',
    help: 'distinct adapters running at once (FCFS waits beyond it)' },
  { name: 'max-cpu-loras', arg: 'N', type: 'int', min: 1, default: null, defaultText: 'no count bound (`max-cpu-lora-bytes` bounds it)', commands: ENGINE, group: 'engine',
    help: 'adapters kept parsed in host memory (the host tier, LRU), resident ones included' },
  { name: 'max-cpu-lora-bytes', arg: 'SIZE', type: 'size', default: 2 ** 30, defaultText: '1 GiB', commands: ENGINE, group: 'engine',
    help: 'host memory for parsed adapters (the host tier, LRU); adapters of queued requests are kept beyond it' },
  { name: 'lora-skip-ahead-ms', arg: 'MS', type: 'int', min: 0, default: 1000, commands: ENGINE, group: 'engine',
    help: 'longest a request waiting for its adapter to load may be passed over by later requests whose adapters are resident (0: strict FCFS)' },
  { name: 'max-model-len', arg: 'N', type: 'int', min: 1, default: null, defaultText: '`max_position_embeddings`', commands: ENGINE, group: 'engine',
    help: 'context window' },
  { name: 'block-size', arg: 'N', type: 'int', min: 1, max: 1024, default: 16, commands: ENGINE, group: 'engine',
    help: 'tokens per KV page (and per prefix-cache block)' },
  { name: 'threads', arg: 'N', type: 'int', min: 1, default: null, commands: ENGINE, group: 'engine',
    defaultText: '`OMP_NUM_THREADS` if set, else the CPUs this process may use: min(affinity mask, cgroup CPU quota rounded up), not the host\'s cores; OpenMP threads spin briefly (`GOMP_SPINCOUNT=1000`) then sleep, unless `OMP_WAIT_POLICY` or `GOMP_SPINCOUNT` is set',
    help: 'compute threads' },
  { name: 'device', arg: 'cpu|cuda', type: 'enum', choices: ['cpu', 'cuda'], default: null, commands: ENGINE, group: 'engine',
    defaultText: '`cuda` if built with it and a GPU is present, else `cpu`',
    help: 'backend (`cuda` without a CUDA build or a GPU is refused with the reason, never a silent CPU fallback)' },
  { name: 'compute-dtype', arg: 'auto|float32|bfloat16', type: 'enum', choices: DTYPES, default: 'auto', commands: ENGINE, group: 'engine',
    help: 'activations. CPU: `bfloat16` rounds those of BF16-weight matmuls to BF16 and runs the AVX512-BF16 dot product (twice the fp32 FMA rate; `auto` needs the CPU to have it); CUDA: `bfloat16` keeps activations in BF16 between kernels (fp32 math inside, fp32 residual stream and logits), GEMMs on tensor cores with fp32 accumulation' },
  { name: 'kv-cache-dtype', arg: 'auto|float32|bfloat16', type: 'enum', choices: DTYPES, default: 'auto', commands: ENGINE, group: 'engine',
    help: 'KV cache elements (CPU and CUDA). `bfloat16` halves the bytes attention reads and the pool a token takes' },
  { name: 'lora-dtype', arg: 'auto|float32|bfloat16', type: 'enum', choices: DTYPES, default: 'auto', commands: ENGINE, group: 'engine',
    help: 'adapter rows in the pool (CPU and CUDA). `bfloat16` halves the bytes a step reads per distinct adapter (PEFT saves fp32)' },
  { name: 'enable-prefix-caching', type: 'boolean', default: true, defaultText: 'on', commands: ENGINE, group: 'engine',
    help: 'automatic prefix caching ([below](#prefix-caching)); `LORAPLEX_ENABLE_PREFIX_CACHING=false` also turns it off' },
  { name: 'no-enable-prefix-caching', type: 'boolean', default: false, defaultText: 'off', commands: ENGINE, group: 'engine',
    help: 'turns automatic prefix caching off (vLLM\'s flag)' },

  // The HTTP server: serve only.
  { name: 'host', arg: 'HOST', type: 'string', default: '127.0.0.1', commands: SERVE, group: 'server',
    help: 'listen address' },
  { name: 'port', arg: 'N', type: 'int', min: 0, max: 65535, default: 8000, commands: SERVE, group: 'server',
    help: 'listen port (0: any free port)' },
  { name: 'api-key', arg: 'KEY', type: 'string', default: null, defaultText: 'none', commands: SERVE, group: 'server',
    help: 'Bearer key for every route but health, ready, metrics and the playground\'s static files' },
  { name: 'no-ui', type: 'boolean', default: false, defaultText: 'served', commands: SERVE, group: 'server',
    help: 'do not serve the [playground](#playground) at `GET /` and `/ui/`' },
  { name: 'allowed-origins', arg: 'JSON', type: 'json-list', default: ['*'], commands: SERVE, group: 'server',
    help: 'CORS, as vLLM: JSON lists (`\'["https://a.example"]\'`); preflights never need the key, every answer (errors and 401s too) carries the headers' },
  { name: 'allowed-methods', arg: 'JSON', type: 'json-list', default: ['*'], commands: SERVE, group: 'server',
    help: 'CORS methods, a JSON list as `--allowed-origins`' },
  { name: 'allowed-headers', arg: 'JSON', type: 'json-list', default: ['*'], commands: SERVE, group: 'server',
    help: 'CORS headers, a JSON list as `--allowed-origins`' },
  { name: 'allow-credentials', type: 'boolean', default: false, defaultText: 'off', commands: SERVE, group: 'server',
    help: 'CORS `Access-Control-Allow-Credentials: true` (the origin is echoed instead of `*`)' },
  { name: 'disable-tokenizer-info-endpoint', type: 'boolean', default: false, defaultText: 'served', commands: SERVE, group: 'server',
    help: 'do not serve `GET /tokenizer_info` (vLLM serves it only with `--enable-tokenizer-info-endpoint`)' },
  { name: 'enable-auto-tool-choice', type: 'boolean', default: false, defaultText: 'off', commands: SERVE, group: 'server',
    help: 'let the model decide to call tools (`tool_choice: "auto"`, the default when `tools` are sent); needs `--tool-call-parser`' },
  { name: 'tool-call-parser', arg: 'hermes|llama3_json|mistral', type: 'enum', choices: ['hermes', 'llama3_json', 'mistral'], default: null, defaultText: 'none', commands: SERVE, group: 'server',
    help: 'how the model writes tool calls in `auto` mode (its family\'s format); once the start tag appears, the call is constrained to the tools\' schemas' },
  { name: 'redis-url', arg: 'URL', type: 'string', default: null, defaultText: 'none (filesystem)', commands: SERVE, group: 'server',
    help: 'shared adapter registry across replicas' },
  { name: 'lora-roots', arg: 'DIRS', type: 'csv', default: [], defaultText: 'none', commands: SERVE, group: 'server',
    help: 'extra folders `load_lora_adapter` may read (comma-separated)' },
  { name: 'max-body-bytes', arg: 'SIZE', type: 'size', default: 16 * 2 ** 20, defaultText: '16 MiB', commands: SERVE, group: 'server',
    help: 'request body cap' },
  { name: 'max-adapter-bytes', arg: 'SIZE', type: 'size', default: 512 * 2 ** 20, defaultText: '512 MiB', commands: SERVE, group: 'server',
    help: 'adapter upload cap' },
  { name: 'max-queue', arg: 'N', type: 'int', min: 1, default: 1024, commands: SERVE, group: 'server',
    help: 'sequences (prompts x n) waiting or running before 429; one request that fans out to more is a 400' },
  { name: 'max-n', arg: 'N', type: 'int', min: 1, default: 16, commands: SERVE, group: 'server',
    help: 'largest `n` (choices per prompt) a request may ask for' },
  { name: 'shutdown-timeout', arg: 'S', type: 'number', min: 0, default: 30, commands: SERVE, group: 'server',
    help: 'SIGTERM drain time (seconds)' },
  { name: 'log-level', arg: 'LEVEL', type: 'enum', choices: LOG_LEVELS, default: 'info', commands: SERVE, group: 'server',
    help: 'log level (JSON lines on stderr; pretty on a terminal)' },

  // One generation: generate only.
  { name: 'prompt', arg: 'TEXT', type: 'string', default: null, defaultText: 'required', commands: GENERATE, group: 'sampling',
    help: 'the prompt (with `--chat`, the user message)' },
  { name: 'adapter', arg: 'DIR', type: 'string', default: null, defaultText: 'none (the base model)', commands: GENERATE, group: 'sampling',
    help: 'a PEFT adapter directory to apply' },
  { name: 'max-tokens', arg: 'N', type: 'int', min: 1, default: 64, commands: GENERATE, group: 'sampling',
    help: 'tokens to generate at most' },
  { name: 'temperature', arg: 'T', type: 'number', min: 0, max: 2, default: 0, commands: GENERATE, group: 'sampling',
    help: 'sampling temperature; 0 is greedy' },
  { name: 'top-p', arg: 'P', type: 'number', min: 0, minOpen: true, max: 1, default: 1, commands: GENERATE, group: 'sampling',
    help: 'nucleus sampling: keep the smallest set of tokens whose probability reaches P' },
  { name: 'top-k', arg: 'K', type: 'int', min: -1, default: -1, defaultText: '-1 (off)', commands: GENERATE, group: 'sampling',
    help: 'keep the K most likely tokens; -1 is off' },
  { name: 'seed', arg: 'S', type: 'seed', default: null, defaultText: 'none (unseeded)', commands: GENERATE, group: 'sampling',
    help: 'sampling seed, a signed 64-bit integer' },
  { name: 'chat', type: 'boolean', default: false, defaultText: 'off', commands: GENERATE, group: 'sampling',
    help: 'apply the model\'s chat template to the prompt as one user message' },
  { name: 'ignore-eos', type: 'boolean', default: false, defaultText: 'off', commands: GENERATE, group: 'sampling',
    help: 'keep generating past the end-of-sequence token' },
];

/** LORAPLEX_<NAME>: the environment variable a flag also reads. */
export function envName(flag: string): string {
  return 'LORAPLEX_' + flag.toUpperCase().replace(/-/g, '_');
}

/** The table, each flag with its environment variable. */
export const FLAGS: readonly (FlagSpec & { env: string })[] = TABLE.map((f) => ({ ...f, env: envName(f.name) }));

export function flagsOf(command: Command): (FlagSpec & { env: string })[] {
  return FLAGS.filter((f) => f.commands.includes(command));
}

/** The flags `loraplex serve` reads (each also from its LORAPLEX_* variable). */
export const SERVE_FLAG_NAMES: readonly string[] = flagsOf('serve').map((f) => f.name);

export function defaultOf(f: FlagSpec, command: Command): unknown {
  return f.defaultIn && command in f.defaultIn ? f.defaultIn[command] : f.default;
}

// ---------------------------------------------------------------------------------------------
// Values

/** Parses a byte size: 123, 512KiB, 512MiB, 8GiB, 1.5GB, 100MB. */
export function parseSize(v: string, flag: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$/i.exec(v);
  if (!m) throw new ConfigError(`--${flag} must be a size such as 512MiB or 8GiB (got ${JSON.stringify(v)})`);
  const n = Number(m[1]);
  const unit = (m[2] ?? 'B').toUpperCase();
  const pow = { B: 0, K: 1, M: 2, G: 3, T: 4 }[unit[0] as 'B' | 'K' | 'M' | 'G' | 'T'];
  const base = unit.includes('I') || unit.length === 1 ? 1024 : 1000;
  return Math.floor(n * base ** pow);
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

function range(min: number, max: number | undefined, minOpen = false): string {
  if (max === undefined) return minOpen ? `> ${min}` : `>= ${min}`;
  return `${minOpen ? '(' : '['}${min}, ${max}]`;
}

/** The typed value of one flag; throws ConfigError with the flag's reason (no source yet). */
function convert(f: FlagSpec, raw: string): unknown {
  const bad = (what: string): never => {
    throw new ConfigError(`--${f.name} must be ${what} (got ${JSON.stringify(raw)})`);
  };
  switch (f.type) {
    case 'string':
      if (raw === '') bad('a non-empty value');
      return raw;
    case 'int': {
      const n = Number(raw);
      const ok = /^\s*[+-]?\d+\s*$/.test(raw) && Number.isSafeInteger(n) && n >= f.min && (f.max === undefined || n <= f.max);
      if (!ok) bad(f.max !== undefined ? `an integer in ${f.min}..${f.max}` : f.min === 1 ? 'a positive integer' : `an integer >= ${f.min}`);
      return n;
    }
    case 'number': {
      const n = Number(raw);
      const inRange = f.minOpen ? n > f.min : n >= f.min;
      if (raw.trim() === '' || !Number.isFinite(n) || !inRange || (f.max !== undefined && n > f.max)) bad(`a number ${f.max === undefined ? range(f.min, f.max, f.minOpen) : `in ${range(f.min, f.max, f.minOpen)}`}`);
      return n;
    }
    case 'size': {
      const n = parseSize(raw, f.name);
      if (n < 1) bad('a size of at least 1 byte');
      return n;
    }
    case 'enum':
      if (!f.choices.includes(raw)) bad(f.choices.length === 2 ? f.choices.join(' or ') : `${f.choices.slice(0, -1).join(', ')} or ${f.choices.at(-1)}`);
      return raw;
    case 'json-list':
      return parseJsonList(raw, f.name);
    case 'csv':
      return raw.split(',').map((s) => s.trim()).filter(Boolean);
    case 'seed': {
      if (!/^\s*[+-]?\d+\s*$/.test(raw) || BigInt(raw.trim()) < SEED_MIN || BigInt(raw.trim()) > SEED_MAX) bad(`an integer in [${SEED_MIN}, ${SEED_MAX}]`);
      const b = BigInt(raw.trim());
      return b >= BigInt(Number.MIN_SAFE_INTEGER) && b <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(b) : b;
    }
    case 'boolean':
      if (/^(1|true|yes|on)$/i.test(raw)) return true;
      if (/^(0|false|no|off)$/i.test(raw)) return false;
      return bad('one of 1, true, yes, on, 0, false, no, off');
  }
}

// ---------------------------------------------------------------------------------------------
// Did you mean

/** Optimal string alignment distance: edits, with a swap of two neighbours counting as one. */
export function editDistance(a: string, b: string): number {
  const d = Array.from({ length: a.length + 1 }, (_, i) => [i, ...Array<number>(b.length).fill(0)]);
  for (let j = 1; j <= b.length; j++) d[0][j] = j;
  for (let i = 1; i <= a.length; i++)
    for (let j = 1; j <= b.length; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      d[i][j] = Math.min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) d[i][j] = Math.min(d[i][j], d[i - 2][j - 2] + 1);
    }
  return d[a.length][b.length];
}

/** The closest candidate within a few edits (about one per four characters), or a unique prefix. */
export function closest(word: string, candidates: readonly string[]): string | null {
  const w = word.toLowerCase().replace(/_/g, '-');
  let best: string | null = null;
  let bestD = Infinity;
  for (const c of candidates) {
    const d = editDistance(w, c);
    if (d < bestD) [best, bestD] = [c, d];
  }
  if (best !== null && bestD <= Math.min(3, Math.max(1, Math.floor(w.length / 4)))) return best;
  const prefixed = w.length >= 3 ? candidates.filter((c) => c.startsWith(w)) : [];
  return prefixed.length === 1 ? prefixed[0] : null;
}

// ---------------------------------------------------------------------------------------------
// Parsing

export interface ParsedFlags {
  /** Every flag of the command: its typed value, or its default. */
  values: Record<string, unknown>;
  /** Where each value came from. */
  from: Record<string, 'argv' | 'env' | 'default'>;
  /** --help / -h or --version was given (the other flags are then not checked). */
  help: boolean;
  version: boolean;
}

/**
 * Parses a command's argv (after the command word) and the environment against the table. Throws
 * ConfigError on the first problem: an unknown flag (with a "did you mean"), a flag of the other
 * command, a missing or bad value (naming the flag, and the variable when the value came from the
 * environment), a positional argument.
 */
export function parseCommandLine(command: Command, argv: string[], env: NodeJS.ProcessEnv = process.env): ParsedFlags {
  const specs = flagsOf(command);
  const byName = new Map(specs.map((f) => [f.name, f]));
  const options: Record<string, { type: 'string' | 'boolean'; short?: string }> = {
    help: { type: 'boolean', short: 'h' },
    version: { type: 'boolean' },
  };
  for (const f of specs) options[f.name] = { type: f.type === 'boolean' ? 'boolean' : 'string' };
  // Non-strict tokens: parseArgs splits `--name=value` / `--name value` / `--` / positionals; the
  // table decides what is allowed (strict mode's messages name no near miss and end in no newline).
  const { tokens } = parseArgs({ args: argv, options, strict: false, allowPositionals: true, tokens: true });
  if (tokens.some((t) => t.kind === 'option' && t.name === 'help')) return { values: {}, from: {}, help: true, version: false };
  if (tokens.some((t) => t.kind === 'option' && t.name === 'version')) return { values: {}, from: {}, help: false, version: true };

  const values: Record<string, unknown> = {};
  const from: ParsedFlags['from'] = {};
  for (const t of tokens) {
    if (t.kind === 'option-terminator') continue;
    if (t.kind === 'positional') {
      const hint = command === 'serve' ? 'serve takes flags only (a model directory goes in --model)' : 'the prompt goes in --prompt';
      throw new ConfigError(`unexpected argument ${JSON.stringify(t.value)}: ${hint}`);
    }
    const f = byName.get(t.name);
    if (!f) throw unknownFlag(command, t.rawName, t.name);
    if (f.type === 'boolean') {
      if (t.value !== undefined) throw new ConfigError(`--${f.name} takes no value (got ${JSON.stringify(t.value)})`);
      values[f.name] = true;
    } else {
      // `--model --port 80`: parseArgs (non-strict) would take "--port" as the model.
      if (t.value === undefined || (!t.inlineValue && t.value.startsWith('--')))
        throw new ConfigError(`--${f.name} needs a value (--${f.name} ${f.arg ?? 'VALUE'}${t.value !== undefined ? `; for one starting with --, write --${f.name}=VALUE` : ''})`);
      values[f.name] = convert(f, t.value);
    }
    from[f.name] = 'argv';
  }
  for (const f of specs) {
    if (f.name in values) continue;
    const raw = env[f.env];
    if (raw !== undefined && raw !== '') {
      try {
        values[f.name] = convert(f, raw);
      } catch (e) {
        throw new ConfigError(`${(e as Error).message.replace(/\)$/, '')} from ${f.env})`);
      }
      from[f.name] = 'env';
    } else {
      values[f.name] = defaultOf(f, command);
      from[f.name] = 'default';
    }
  }
  return { values, from, help: false, version: false };
}

function unknownFlag(command: Command, raw: string, name: string): ConfigError {
  const other = COMMANDS.find((c) => c !== command && FLAGS.some((f) => f.name === name && f.commands.includes(c)));
  if (raw.startsWith('--') && other) return new ConfigError(`--${name} is a flag of loraplex ${other}, not of loraplex ${command}`);
  const guess = closest(name, [...flagsOf(command).map((f) => f.name), 'help', 'version']);
  return new ConfigError(`unknown option ${raw}${guess ? `; did you mean --${guess}?` : ` (loraplex ${command} --help lists the flags)`}`);
}
