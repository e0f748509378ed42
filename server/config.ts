// The typed configuration of `loraplex serve` and `loraplex generate`, built from the flag table's
// parsed values (server/flags.ts: names, types, defaults, LORAPLEX_<NAME> variables, validation).
import type { EngineOptions } from './engine/engine.js';
import { ConfigError, parseCommandLine, type Command } from './flags.js';
import type { DtypeOption } from './native/addon.js';

export { ConfigError, envName, parseJsonList, parseSize, SERVE_FLAG_NAMES } from './flags.js';

export interface ServeConfig {
  model: string | null; // null: the bundled demo model
  servedModelName: string | null;
  adapterDir: string | null; // null: ./adapters, or the demo adapters with the demo model
  host: string;
  port: number;
  memoryBudget: number | null;
  gpuMemoryUtilization: number;
  enforceEager: boolean;
  maxNumSeqs: number;
  maxBatchTokens: number;
  maxLoraRank: number;
  maxLoras: number;
  maxLorasPerBatch: number;
  maxCpuLoras: number | null;
  maxCpuLoraBytes: number;
  loraSkipAheadMs: number;
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
  /** tool_choice "auto": on with --enable-auto-tool-choice, parsed with --tool-call-parser. */
  enableAutoToolChoice: boolean;
  toolCallParser: 'hermes' | 'llama3_json' | 'mistral' | null;
}

/** The engine flags, which serve and generate share. */
export type EngineConfig = Pick<ServeConfig,
  'model' | 'memoryBudget' | 'gpuMemoryUtilization' | 'enforceEager' | 'maxNumSeqs' | 'maxBatchTokens' | 'maxLoraRank' | 'maxLoras' | 'maxLorasPerBatch' | 'maxModelLen' |
  'maxCpuLoras' | 'maxCpuLoraBytes' | 'loraSkipAheadMs' |
  'blockSize' | 'threads' | 'device' | 'loraDtype' | 'computeDtype' | 'kvCacheDtype' | 'enablePrefixCaching'>;

export interface GenerateConfig extends EngineConfig {
  prompt: string;
  adapter: string | null;
  maxTokens: number;
  temperature: number;
  topP: number;
  topK: number;
  seed: number | bigint | null;
  chat: boolean;
  ignoreEos: boolean;
}

type Values = Record<string, unknown>;

function engineConfig(v: Values): EngineConfig {
  return {
    model: v.model as string | null,
    memoryBudget: v['memory-budget'] as number | null,
    gpuMemoryUtilization: v['gpu-memory-utilization'] as number,
    enforceEager: v['enforce-eager'] === true,
    maxNumSeqs: v['max-num-seqs'] as number,
    maxBatchTokens: v['max-batch-tokens'] as number,
    maxLoraRank: v['max-lora-rank'] as number,
    maxLoras: v['max-loras'] as number,
    maxLorasPerBatch: (v['max-loras-per-batch'] as number | null) ?? 0, // 0: no cap
    maxCpuLoras: v['max-cpu-loras'] as number | null,
    maxCpuLoraBytes: v['max-cpu-lora-bytes'] as number,
    loraSkipAheadMs: v['lora-skip-ahead-ms'] as number,
    maxModelLen: v['max-model-len'] as number | null,
    blockSize: v['block-size'] as number,
    threads: v.threads as number | null,
    device: v.device as ServeConfig['device'],
    // auto (default): bfloat16 where the model's weights are BF16 (CPU and CUDA), float32 otherwise.
    loraDtype: v['lora-dtype'] as DtypeOption,
    computeDtype: v['compute-dtype'] as DtypeOption,
    kvCacheDtype: v['kv-cache-dtype'] as DtypeOption,
    // vLLM's pair: on by default; --no-enable-prefix-caching (or LORAPLEX_ENABLE_PREFIX_CACHING=false) turns it off.
    enablePrefixCaching: v['no-enable-prefix-caching'] === true ? false : v['enable-prefix-caching'] !== false,
  };
}

/** Parsed values of `serve` (parseCommandLine) -> ServeConfig. */
export function toServeConfig(v: Values): ServeConfig {
  if (v['enable-auto-tool-choice'] === true && !v['tool-call-parser'])
    throw new ConfigError('--enable-auto-tool-choice needs --tool-call-parser (hermes, llama3_json or mistral)');
  return {
    ...engineConfig(v),
    servedModelName: v['served-model-name'] as string | null,
    adapterDir: v['adapter-dir'] as string | null,
    host: v.host as string,
    port: v.port as number,
    apiKey: v['api-key'] as string | null,
    redisUrl: v['redis-url'] as string | null,
    maxBodyBytes: v['max-body-bytes'] as number,
    maxAdapterBytes: v['max-adapter-bytes'] as number,
    maxQueue: v['max-queue'] as number,
    maxN: v['max-n'] as number,
    shutdownTimeout: v['shutdown-timeout'] as number,
    logLevel: v['log-level'] as string,
    loraRoots: v['lora-roots'] as string[],
    allowedOrigins: v['allowed-origins'] as string[],
    allowedMethods: v['allowed-methods'] as string[],
    allowedHeaders: v['allowed-headers'] as string[],
    allowCredentials: v['allow-credentials'] === true,
    tokenizerInfoEndpoint: v['disable-tokenizer-info-endpoint'] !== true,
    ui: v['no-ui'] !== true,
    enableAutoToolChoice: v['enable-auto-tool-choice'] === true,
    toolCallParser: v['tool-call-parser'] as ServeConfig['toolCallParser'],
  };
}

/** Parsed values of `generate` -> GenerateConfig; --prompt is required. */
export function toGenerateConfig(v: Values): GenerateConfig {
  if (typeof v.prompt !== 'string') throw new ConfigError('--prompt TEXT is required (or LORAPLEX_PROMPT)');
  return {
    ...engineConfig(v),
    prompt: v.prompt,
    adapter: v.adapter as string | null,
    maxTokens: v['max-tokens'] as number,
    temperature: v.temperature as number,
    topP: v['top-p'] as number,
    topK: v['top-k'] as number,
    seed: v.seed as number | bigint | null,
    chat: v.chat === true,
    ignoreEos: v['ignore-eos'] === true,
  };
}

function parsed(command: Command, argv: string[], env: NodeJS.ProcessEnv): Values {
  const p = parseCommandLine(command, argv, env);
  if (p.help || p.version) throw new ConfigError(`--${p.help ? 'help' : 'version'} is answered by the command line (server/cli.ts)`);
  return p.values;
}

/** `loraplex serve` flags + LORAPLEX_* environment -> ServeConfig (throws ConfigError). */
export function serveConfig(argv: string[], env: NodeJS.ProcessEnv = process.env): ServeConfig {
  return toServeConfig(parsed('serve', argv, env));
}

/** `loraplex generate` flags + LORAPLEX_* environment -> GenerateConfig (throws ConfigError). */
export function generateConfig(argv: string[], env: NodeJS.ProcessEnv = process.env): GenerateConfig {
  return toGenerateConfig(parsed('generate', argv, env));
}

/** The Engine.create options of the engine flags (the model directory resolved by the caller). */
export function engineOptions(cfg: EngineConfig, model: string): EngineOptions {
  return {
    model,
    memoryBudget: cfg.memoryBudget ?? undefined,
    gpuMemoryUtilization: cfg.gpuMemoryUtilization,
    enforceEager: cfg.enforceEager,
    blockSize: cfg.blockSize,
    maxNumSeqs: cfg.maxNumSeqs,
    maxBatchTokens: cfg.maxBatchTokens,
    maxLoraRank: cfg.maxLoraRank,
    maxLoras: cfg.maxLoras,
    maxLorasPerBatch: cfg.maxLorasPerBatch,
    maxCpuLoras: cfg.maxCpuLoras ?? undefined,
    maxCpuLoraBytes: cfg.maxCpuLoraBytes,
    loraSkipAheadMs: cfg.loraSkipAheadMs,
    maxModelLen: cfg.maxModelLen ?? undefined,
    threads: cfg.threads ?? undefined,
    device: cfg.device ?? undefined,
    loraDtype: cfg.loraDtype,
    computeDtype: cfg.computeDtype,
    kvCacheDtype: cfg.kvCacheDtype,
    enablePrefixCaching: cfg.enablePrefixCaching,
  };
}
