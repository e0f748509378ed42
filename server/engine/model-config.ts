// Reads a Hugging Face model directory's config.json (+ generation_config.json, the safetensors
// index) into the normalised spec the native loader takes. Never reads pickle files.
import { existsSync, readFileSync, readdirSync, statSync } from 'node:fs';
import { basename, join, resolve } from 'node:path';
import type { NativeModelSpec } from '../native/addon.js';
import { ModelLoadError } from './errors.js';

export interface ModelInfo {
  dir: string;
  name: string;
  spec: NativeModelSpec;
  maxPositionEmbeddings: number;
  eosTokenIds: number[];
  bosTokenId: number | null;
  torchDtype: string | null;
  /** generation_config.json max_new_tokens: the default cap of a chat completion. */
  maxNewTokens: number | null;
}

const ARCHES: Record<string, NativeModelSpec['arch']> = {
  LlamaForCausalLM: 'llama',
  MistralForCausalLM: 'mistral',
  Qwen2ForCausalLM: 'qwen2',
};

type Json = Record<string, unknown>;

function readJson(path: string): Json {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (e) {
    throw new ModelLoadError(`${path}: cannot read (${(e as NodeJS.ErrnoException).code ?? String(e)})`);
  }
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch (e) {
    throw new ModelLoadError(`${path}: not valid JSON (${(e as Error).message})`);
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new ModelLoadError(`${path}: not a JSON object`);
  return v as Json;
}

function int(cfg: Json, key: string, path: string, fallback?: number): number {
  const v = cfg[key] ?? fallback;
  if (typeof v !== 'number' || !Number.isInteger(v) || v <= 0)
    throw new ModelLoadError(`${path}: ${key} must be a positive integer (got ${JSON.stringify(cfg[key])})`);
  return v;
}

function num(cfg: Json, key: string, path: string, fallback: number): number {
  const v = cfg[key] ?? fallback;
  if (typeof v !== 'number' || !Number.isFinite(v)) throw new ModelLoadError(`${path}: ${key} must be a number`);
  return v;
}

function idList(v: unknown): number[] {
  if (typeof v === 'number') return [v];
  if (Array.isArray(v)) return v.filter((x): x is number => typeof x === 'number');
  return [];
}

/** Shard files: model.safetensors.index.json's weight_map, else model.safetensors, else *.safetensors. */
function findWeightFiles(dir: string): string[] {
  const index = join(dir, 'model.safetensors.index.json');
  if (existsSync(index)) {
    const idx = readJson(index);
    const map = idx.weight_map;
    if (typeof map !== 'object' || map === null) throw new ModelLoadError(`${index}: missing weight_map`);
    const files = [...new Set(Object.values(map as Record<string, unknown>).map(String))].sort();
    for (const f of files) {
      if (f.includes('/') || f.includes('\\') || f.startsWith('.'))
        throw new ModelLoadError(`${index}: shard name ${JSON.stringify(f)} is not a plain file name`);
      if (!f.endsWith('.safetensors')) throw new ModelLoadError(`${index}: shard ${f} is not a .safetensors file`);
      if (!existsSync(join(dir, f))) throw new ModelLoadError(`${join(dir, f)}: missing shard named by ${index}`);
    }
    return files.map((f) => join(dir, f));
  }
  const single = join(dir, 'model.safetensors');
  if (existsSync(single)) return [single];
  const any = readdirSync(dir).filter((f) => f.endsWith('.safetensors')).sort();
  if (any.length) return any.map((f) => join(dir, f));
  const pickles = readdirSync(dir).filter((f) => /\.(bin|pt|pth|ckpt)$/.test(f));
  if (pickles.length)
    throw new ModelLoadError(
      `${dir}: only pickle weights (${pickles.join(', ')}); loraplex never loads pickle files, convert to safetensors`,
      415,
      'unsupported_format',
    );
  throw new ModelLoadError(`${dir}: no model.safetensors or model.safetensors.index.json`);
}

export function readModelDir(dirArg: string, servedName?: string): ModelInfo {
  const dir = resolve(dirArg);
  if (!existsSync(dir) || !statSync(dir).isDirectory()) throw new ModelLoadError(`${dir}: model directory not found`);
  const cfgPath = join(dir, 'config.json');
  const cfg = readJson(cfgPath);
  const archList = cfg.architectures;
  const archName = Array.isArray(archList) && typeof archList[0] === 'string' ? archList[0] : String(cfg.model_type ?? '');
  const arch = ARCHES[archName];
  if (!arch)
    throw new ModelLoadError(
      `${cfgPath}: unsupported architecture ${JSON.stringify(archName)} (supported: ${Object.keys(ARCHES).join(', ')})`,
    );
  const hidden = int(cfg, 'hidden_size', cfgPath);
  const heads = int(cfg, 'num_attention_heads', cfgPath);
  const kvHeads = int(cfg, 'num_key_value_heads', cfgPath, heads);
  const headDim = cfg.head_dim == null ? hidden / heads : int(cfg, 'head_dim', cfgPath);
  if (!Number.isInteger(headDim)) throw new ModelLoadError(`${cfgPath}: hidden_size is not a multiple of num_attention_heads`);
  if (heads % kvHeads !== 0)
    throw new ModelLoadError(`${cfgPath}: num_attention_heads must be a multiple of num_key_value_heads`);
  for (const k of ['mlp_bias', 'attention_bias']) {
    if (cfg[k] === true && arch !== 'qwen2') throw new ModelLoadError(`${cfgPath}: ${k}=true is not supported for ${archName}`);
  }
  for (const k of ['hidden_act']) {
    if (cfg[k] != null && cfg[k] !== 'silu') throw new ModelLoadError(`${cfgPath}: ${k} ${JSON.stringify(cfg[k])} is not supported (silu only)`);
  }
  const dtype = (cfg.torch_dtype ?? cfg.dtype ?? null) as string | null;

  const rs = (cfg.rope_scaling ?? null) as Json | null;
  const spec: NativeModelSpec['ropeScaling'] = {
    type: 'none',
    factor: 1,
    lowFreqFactor: 1,
    highFreqFactor: 4,
    originalMaxPositionEmbeddings: 8192,
  };
  // transformers 5 moves rope settings into rope_parameters; accept both.
  const rp = (cfg.rope_parameters ?? null) as Json | null;
  const ropeCfg = rs ?? rp;
  let ropeTheta = num(cfg, 'rope_theta', cfgPath, typeof rp?.rope_theta === 'number' ? rp.rope_theta : 10000);
  if (ropeCfg) {
    const type = String(ropeCfg.rope_type ?? ropeCfg.type ?? 'default');
    if (type === 'linear' || type === 'llama3') {
      spec.type = type;
      spec.factor = num(ropeCfg, 'factor', cfgPath + ' rope_scaling', 1);
      if (!(spec.factor > 0)) throw new ModelLoadError(`${cfgPath}: rope_scaling.factor must be positive`);
      if (type === 'llama3') {
        spec.lowFreqFactor = num(ropeCfg, 'low_freq_factor', cfgPath + ' rope_scaling', 1);
        spec.highFreqFactor = num(ropeCfg, 'high_freq_factor', cfgPath + ' rope_scaling', 4);
        spec.originalMaxPositionEmbeddings = int(ropeCfg, 'original_max_position_embeddings', cfgPath + ' rope_scaling');
        if (spec.highFreqFactor === spec.lowFreqFactor)
          throw new ModelLoadError(`${cfgPath}: rope_scaling high_freq_factor must differ from low_freq_factor`);
      }
    } else if (type !== 'default' && type !== 'none') {
      throw new ModelLoadError(`${cfgPath}: rope_scaling type ${JSON.stringify(type)} is not supported (none, linear, llama3)`);
    }
    if (typeof ropeCfg.rope_theta === 'number') ropeTheta = ropeCfg.rope_theta;
  }

  let slidingWindow = 0;
  // MistralConfig's default window is 4096 when the key is absent; null means none.
  if (arch === 'mistral') slidingWindow = cfg.sliding_window === undefined ? 4096 : typeof cfg.sliding_window === 'number' ? cfg.sliding_window : 0;
  if (arch === 'qwen2' && cfg.use_sliding_window === true && typeof cfg.sliding_window === 'number')
    throw new ModelLoadError(`${cfgPath}: Qwen2 use_sliding_window is not supported`);

  const genPath = join(dir, 'generation_config.json');
  const gen = existsSync(genPath) ? readJson(genPath) : {};
  const eos = [...new Set([...idList(gen.eos_token_id), ...idList(cfg.eos_token_id)])];
  const bos = typeof gen.bos_token_id === 'number' ? gen.bos_token_id : typeof cfg.bos_token_id === 'number' ? cfg.bos_token_id : null;

  const files = findWeightFiles(dir);
  return {
    dir,
    name: servedName ?? basename(dir),
    // transformers' per-class defaults when the key is absent
    maxPositionEmbeddings: int(cfg, 'max_position_embeddings', cfgPath, { llama: 2048, mistral: 131072, qwen2: 32768 }[arch]),
    eosTokenIds: eos,
    bosTokenId: bos,
    torchDtype: dtype,
    maxNewTokens: typeof gen.max_new_tokens === 'number' && Number.isInteger(gen.max_new_tokens) && gen.max_new_tokens > 0 ? gen.max_new_tokens : null,
    spec: {
      arch,
      hiddenSize: hidden,
      intermediateSize: int(cfg, 'intermediate_size', cfgPath),
      numLayers: int(cfg, 'num_hidden_layers', cfgPath),
      numHeads: heads,
      numKvHeads: kvHeads,
      headDim,
      vocabSize: int(cfg, 'vocab_size', cfgPath),
      rmsNormEps: num(cfg, 'rms_norm_eps', cfgPath, 1e-6),
      ropeTheta,
      ropeScaling: spec,
      tiedEmbeddings: cfg.tie_word_embeddings === true,
      attentionBias: arch === 'qwen2',
      slidingWindow,
      files,
    },
  };
}
