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
  /** What of the checkpoint is served, when not all of it (a multimodal model's text part); /v1/models shows it. */
  note: string | null;
}

const ARCHES: Record<string, NativeModelSpec['arch']> = {
  LlamaForCausalLM: 'llama',
  MistralForCausalLM: 'mistral',
  Qwen2ForCausalLM: 'qwen2',
  Qwen3ForCausalLM: 'qwen3',
  Gemma2ForCausalLM: 'gemma2',
  Gemma3ForCausalLM: 'gemma3',
  // The text part only: the language model's weights; the vision tower is never loaded.
  Gemma3ForConditionalGeneration: 'gemma3',
  // Phi-3-mini/medium, Phi-3.5-mini, Phi-4-mini (Phi-3-small, MoE and vision are other classes).
  Phi3ForCausalLM: 'phi3',
};

/** transformers' per-class defaults for keys a config.json may leave out (Gemma 3's released
 *  multimodal configs carry a partial text_config and rely on them). */
const CLASS_DEFAULTS: Partial<Record<NativeModelSpec['arch'], Record<string, unknown>>> = {
  qwen3: { head_dim: 128, max_position_embeddings: 32768, tie_word_embeddings: false },
  gemma2: {
    vocab_size: 256000, hidden_size: 2304, intermediate_size: 9216, num_hidden_layers: 26, num_attention_heads: 8,
    num_key_value_heads: 4, head_dim: 256, max_position_embeddings: 8192, tie_word_embeddings: true,
    query_pre_attn_scalar: 256, sliding_window: 4096, final_logit_softcapping: 30.0, attn_logit_softcapping: 50.0,
    hidden_activation: 'gelu_pytorch_tanh', rope_theta: 10000,
  },
  phi3: { vocab_size: 32064, max_position_embeddings: 4096, rms_norm_eps: 1e-5, tie_word_embeddings: false, hidden_act: 'silu' },
  gemma3: {
    vocab_size: 262208, hidden_size: 2304, intermediate_size: 9216, num_hidden_layers: 26, num_attention_heads: 8,
    num_key_value_heads: 4, head_dim: 256, max_position_embeddings: 131072, tie_word_embeddings: true,
    query_pre_attn_scalar: 256, sliding_window: 4096, final_logit_softcapping: null, attn_logit_softcapping: null,
    hidden_activation: 'gelu_pytorch_tanh', sliding_window_pattern: 6,
  },
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

interface RopeSpec {
  spec: NativeModelSpec['ropeScaling'];
  theta: number | null; // rope_theta inside the rope block, if any
}

/** One RoPE block (rope_scaling or rope_parameters) -> the native scaling spec. Errors name the
 *  file and the block (`field`: rope_scaling, rope_parameters.full_attention, ...). */
function parseRope(ropeCfg: Json | null, file: string, field = 'rope_scaling'): RopeSpec {
  const spec: NativeModelSpec['ropeScaling'] = {
    type: 'none',
    factor: 1,
    lowFreqFactor: 1,
    highFreqFactor: 4,
    originalMaxPositionEmbeddings: 8192,
  };
  if (!ropeCfg) return { spec, theta: null };
  const where = `${file} ${field}`;
  const type = String(ropeCfg.rope_type ?? ropeCfg.type ?? 'default');
  if (type === 'linear' || type === 'llama3') {
    spec.type = type;
    spec.factor = num(ropeCfg, 'factor', where, 1);
    if (!(spec.factor > 0)) throw new ModelLoadError(`${file}: ${field}.factor must be positive`);
    if (type === 'llama3') {
      spec.lowFreqFactor = num(ropeCfg, 'low_freq_factor', where, 1);
      spec.highFreqFactor = num(ropeCfg, 'high_freq_factor', where, 4);
      spec.originalMaxPositionEmbeddings = int(ropeCfg, 'original_max_position_embeddings', where);
      if (spec.highFreqFactor === spec.lowFreqFactor)
        throw new ModelLoadError(`${file}: ${field} high_freq_factor must differ from low_freq_factor`);
    }
  } else if (type !== 'default' && type !== 'none') {
    throw new ModelLoadError(`${file}: ${field} type ${JSON.stringify(type)} is not supported (none, linear, llama3)`);
  }
  const theta = ropeCfg.rope_theta;
  if (theta != null && (typeof theta !== 'number' || !(theta > 0))) throw new ModelLoadError(`${where}: rope_theta must be a positive number`);
  return { spec, theta: (theta as number | undefined) ?? null };
}

/** A boolean config key (absent: the class default). */
function bool(cfg: Json, key: string, path: string, fallback: boolean): boolean {
  const v = cfg[key] ?? fallback;
  if (typeof v !== 'boolean') throw new ModelLoadError(`${path}: ${key} must be true or false`);
  return v;
}

/** A positive number, or null / 0 for "off" (soft-capping values). */
function optPositive(cfg: Json, key: string, path: string): number {
  const v = cfg[key];
  if (v == null) return 0;
  if (typeof v !== 'number' || !Number.isFinite(v) || v < 0) throw new ModelLoadError(`${path}: ${key} must be a positive number or null`);
  return v;
}

/** Phi-3's rotated dimensions: int(head_dim * partial_rotary_factor) (Phi-4-mini: 0.75), even. */
function phi3RotaryDim(cfg: Json, rp: Json | null, where: string, headDim: number): number {
  const rs = (cfg.rope_scaling ?? null) as Json | null;
  const f = rp?.partial_rotary_factor ?? rs?.partial_rotary_factor ?? cfg.partial_rotary_factor ?? 1.0;
  if (typeof f !== 'number' || !(f > 0 && f <= 1)) throw new ModelLoadError(`${where}: partial_rotary_factor must be in (0, 1] (got ${JSON.stringify(f)})`);
  const dim = Math.floor(headDim * f);
  if (dim < 2 || dim % 2 !== 0) throw new ModelLoadError(`${where}: partial_rotary_factor ${f} gives ${dim} rotary dimensions of ${headDim}; it must be an even number`);
  return dim;
}

/**
 * Phi-3's RoPE: default, or longrope (legacy type names "su" and "yarn" mean longrope, as in
 * Phi3Config): short_factor / long_factor of rotary_dim / 2 entries each, original_max_position_embeddings
 * (in the rope block or top-level), and the attention factor (given, else from factor =
 * max_position_embeddings / original_max_position_embeddings: sqrt(1 + ln(factor) / ln(original))).
 */
function parsePhi3Rope(cfg: Json, block: Json | null, where: string, headDim: number): { rope: RopeSpec; ropeTheta: number } {
  const type = String(block?.rope_type ?? block?.type ?? 'default');
  const ropeTheta = typeof block?.rope_theta === 'number' ? block.rope_theta : num(cfg, 'rope_theta', where, 10000);
  if (!(ropeTheta > 0)) throw new ModelLoadError(`${where}: rope_theta must be positive`);
  if (type === 'default' || type === 'none') return { rope: parseRope(null, where), ropeTheta };
  if (type !== 'longrope' && type !== 'su' && type !== 'yarn')
    throw new ModelLoadError(`${where} rope_scaling: rope type ${JSON.stringify(type)} is not supported for Phi-3 (default, longrope)`);
  const b = block as Json;
  const rot = phi3RotaryDim(cfg, (cfg.rope_parameters ?? null) as Json | null, where, headDim);
  const list = (key: string): number[] => {
    const v = b[key];
    if (!Array.isArray(v) || v.length !== rot / 2 || !v.every((x) => typeof x === 'number' && Number.isFinite(x) && x > 0))
      throw new ModelLoadError(`${where} rope_scaling: ${key} must be a list of ${rot / 2} positive numbers (rotary dimensions / 2)`);
    return v as number[];
  };
  const shortFactor = list('short_factor');
  const longFactor = list('long_factor');
  const origRaw = b.original_max_position_embeddings ?? cfg.original_max_position_embeddings;
  if (typeof origRaw !== 'number' || !Number.isInteger(origRaw) || origRaw <= 0)
    throw new ModelLoadError(`${where}: original_max_position_embeddings must be a positive integer for longrope (got ${JSON.stringify(origRaw)})`);
  const maxPos = int(cfg, 'max_position_embeddings', where);
  const factor = typeof b.factor === 'number' ? b.factor : maxPos / origRaw;
  let attentionFactor: number;
  if (b.attention_factor != null) {
    if (typeof b.attention_factor !== 'number' || !(b.attention_factor > 0))
      throw new ModelLoadError(`${where} rope_scaling: attention_factor must be a positive number`);
    attentionFactor = b.attention_factor;
  } else {
    attentionFactor = factor <= 1 ? 1 : Math.sqrt(1 + Math.log(factor) / Math.log(origRaw));
  }
  const spec: NativeModelSpec['ropeScaling'] = {
    type: 'longrope', factor, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: origRaw,
    shortFactor, longFactor, attentionFactor,
  };
  return { rope: { spec, theta: ropeTheta }, ropeTheta };
}

export function readModelDir(dirArg: string, servedName?: string): ModelInfo {
  const dir = resolve(dirArg);
  if (!existsSync(dir) || !statSync(dir).isDirectory()) throw new ModelLoadError(`${dir}: model directory not found`);
  const cfgPath = join(dir, 'config.json');
  const top = readJson(cfgPath);
  const archList = top.architectures;
  const archName = Array.isArray(archList) && typeof archList[0] === 'string' ? archList[0] : String(top.model_type ?? '');
  const arch = ARCHES[archName];
  if (!arch)
    throw new ModelLoadError(
      `${cfgPath}: unsupported architecture ${JSON.stringify(archName)} (supported: ${Object.keys(ARCHES).join(', ')})`,
    );
  // Gemma3ForConditionalGeneration: the text model's settings are in text_config (over the class
  // defaults, as transformers fills them in); the vision tower's are ignored.
  const multimodalText = archName === 'Gemma3ForConditionalGeneration';
  let raw: Json = top;
  if (multimodalText) {
    const tc = top.text_config;
    if (typeof tc !== 'object' || tc === null || Array.isArray(tc))
      throw new ModelLoadError(`${cfgPath}: text_config must be an object (the language model's settings)`);
    raw = tc as Json;
  }
  const cfg: Json = { ...(CLASS_DEFAULTS[arch] ?? {}) };
  for (const [k, v] of Object.entries(raw)) if (v !== undefined) cfg[k] = v;
  // Keys HF reads from the text config, but that multimodal checkpoints keep at the top level.
  if (multimodalText) for (const k of ['eos_token_id', 'bos_token_id']) if (raw[k] === undefined && top[k] !== undefined) cfg[k] = top[k];
  if (multimodalText && top.tie_word_embeddings !== undefined) cfg.tie_word_embeddings = top.tie_word_embeddings;
  const where = multimodalText ? `${cfgPath} text_config` : cfgPath;

  const gemma = arch === 'gemma2' || arch === 'gemma3';
  const hidden = int(cfg, 'hidden_size', where);
  const heads = int(cfg, 'num_attention_heads', where);
  const kvHeads = int(cfg, 'num_key_value_heads', where, heads);
  const headDim = cfg.head_dim == null ? hidden / heads : int(cfg, 'head_dim', where);
  const numLayers = int(cfg, 'num_hidden_layers', where);
  if (!Number.isInteger(headDim)) throw new ModelLoadError(`${where}: hidden_size is not a multiple of num_attention_heads`);
  if (heads % kvHeads !== 0)
    throw new ModelLoadError(`${where}: num_attention_heads must be a multiple of num_key_value_heads`);
  for (const k of ['mlp_bias', 'attention_bias']) {
    if (cfg[k] === true && arch !== 'qwen2') throw new ModelLoadError(`${where}: ${k}=true is not supported for ${archName}`);
  }
  let activation: 'silu' | 'gelu_tanh' = 'silu';
  if (gemma) {
    // Gemma reads hidden_activation (older configs: hidden_act); tanh-approximate GELU only.
    const act = cfg.hidden_activation ?? cfg.hidden_act;
    if (act !== 'gelu_pytorch_tanh' && act !== 'gelu_tanh')
      throw new ModelLoadError(`${where}: hidden_activation ${JSON.stringify(act)} is not supported (gelu_pytorch_tanh)`);
    activation = 'gelu_tanh';
  } else if (cfg.hidden_act != null && cfg.hidden_act !== 'silu') {
    throw new ModelLoadError(`${where}: hidden_act ${JSON.stringify(cfg.hidden_act)} is not supported (silu only)`);
  }
  const dtype = (top.torch_dtype ?? top.dtype ?? cfg.torch_dtype ?? cfg.dtype ?? null) as string | null;

  // RoPE: transformers 5 writes rope_parameters (rope_theta inside); older configs rope_theta +
  // rope_scaling. Gemma 3 has one block per layer type (full_attention / sliding_attention), or
  // rope_scaling for the global layers and rope_local_base_freq for the sliding ones.
  const rs = (cfg.rope_scaling ?? null) as Json | null;
  const rp = (cfg.rope_parameters ?? null) as Json | null;
  let ropeTheta: number;
  let rope: RopeSpec;
  let ropeLocalTheta = 0;
  const perType = rp !== null && typeof rp.full_attention === 'object' && rp.full_attention !== null;
  if (arch === 'gemma3') {
    const full = perType ? (rp.full_attention as Json) : (rs ?? (rp && !perType ? rp : null));
    rope = parseRope(full, where, perType ? 'rope_parameters.full_attention' : 'rope_scaling');
    ropeTheta = rope.theta ?? num(cfg, 'rope_theta', where, 1_000_000);
    const slide = perType && typeof rp.sliding_attention === 'object' ? (rp.sliding_attention as Json) : null;
    const local = parseRope(slide, where, 'rope_parameters.sliding_attention');
    if (local.spec.type !== 'none')
      throw new ModelLoadError(`${where}: scaled RoPE on sliding layers (rope_parameters.sliding_attention) is not supported`);
    ropeLocalTheta = local.theta ?? num(cfg, 'rope_local_base_freq', where, 10_000);
  } else if (arch === 'phi3') {
    ({ rope, ropeTheta } = parsePhi3Rope(cfg, rs ?? rp, where, headDim));
  } else {
    rope = parseRope(rs ?? rp, where);
    ropeTheta = num(cfg, 'rope_theta', where, typeof rp?.rope_theta === 'number' ? rp.rope_theta : 10000);
    if (rope.theta !== null) ropeTheta = rope.theta;
  }

  let slidingWindow = 0;
  let layerWindows: number[] | undefined;
  let layerLocalRope: number[] | undefined;
  // MistralConfig's default window is 4096 when the key is absent; null means none.
  if (arch === 'mistral') slidingWindow = cfg.sliding_window === undefined ? 4096 : typeof cfg.sliding_window === 'number' ? cfg.sliding_window : 0;
  // Phi3Config: null (no window) unless set; the 4k models set 2047, applied to every layer.
  if (arch === 'phi3') {
    const w = cfg.sliding_window;
    if (w != null && (typeof w !== 'number' || !Number.isInteger(w) || w <= 0))
      throw new ModelLoadError(`${where}: sliding_window must be a positive integer or null (got ${JSON.stringify(w)})`);
    slidingWindow = (w as number | null | undefined) ?? 0;
  }
  if ((arch === 'qwen2' || arch === 'qwen3') && cfg.use_sliding_window === true && typeof cfg.sliding_window === 'number')
    throw new ModelLoadError(`${where}: ${arch === 'qwen2' ? 'Qwen2' : 'Qwen3'} use_sliding_window is not supported`);
  if (gemma) {
    // Per layer: sliding_attention or full_attention (layer_types); without it Gemma 2 alternates
    // (even layers slide) and Gemma 3 makes layer i global iff (i + 1) % sliding_window_pattern == 0.
    let types: string[];
    if (cfg.layer_types != null) {
      const lt = cfg.layer_types;
      if (!Array.isArray(lt) || lt.length !== numLayers || !lt.every((t) => t === 'sliding_attention' || t === 'full_attention'))
        throw new ModelLoadError(`${where}: layer_types must list sliding_attention or full_attention for each of the ${numLayers} layers`);
      types = lt as string[];
    } else {
      const pattern = arch === 'gemma2' ? 2 : int(cfg, 'sliding_window_pattern', where);
      types = Array.from({ length: numLayers }, (_, i) => ((i + 1) % pattern ? 'sliding_attention' : 'full_attention'));
    }
    const w = cfg.sliding_window;
    if (w !== null && (typeof w !== 'number' || !Number.isInteger(w) || w <= 0))
      throw new ModelLoadError(`${where}: sliding_window must be a positive integer or null (got ${JSON.stringify(w)})`);
    const window = (w as number | null) ?? 0;
    layerWindows = types.map((t) => (t === 'sliding_attention' ? window : 0));
    slidingWindow = Math.max(0, ...layerWindows);
    if (arch === 'gemma3') layerLocalRope = types.map((t) => (t === 'sliding_attention' ? 1 : 0));
    if (cfg.use_bidirectional_attention === true) throw new ModelLoadError(`${where}: use_bidirectional_attention is not supported`);
  }

  const genPath = join(dir, 'generation_config.json');
  const gen = existsSync(genPath) ? readJson(genPath) : {};
  const eos = [...new Set([...idList(gen.eos_token_id), ...idList(cfg.eos_token_id)])];
  const bos = typeof gen.bos_token_id === 'number' ? gen.bos_token_id : typeof cfg.bos_token_id === 'number' ? cfg.bos_token_id : null;

  const files = findWeightFiles(dir);
  const spec: NativeModelSpec = {
    arch,
    hiddenSize: hidden,
    intermediateSize: int(cfg, 'intermediate_size', where),
    numLayers,
    numHeads: heads,
    numKvHeads: kvHeads,
    headDim,
    vocabSize: int(cfg, 'vocab_size', where),
    rmsNormEps: num(cfg, 'rms_norm_eps', where, 1e-6),
    ropeTheta,
    ropeScaling: rope.spec,
    tiedEmbeddings: bool(cfg, 'tie_word_embeddings', where, false),
    attentionBias: arch === 'qwen2',
    slidingWindow,
    files,
  };
  if (arch === 'qwen3') spec.qkNorm = true;
  if (gemma) {
    Object.assign(spec, {
      layerWindows,
      normPlusOne: true,
      sandwichNorm: true,
      activation,
      // HF multiplies by torch.tensor(hidden_size ** 0.5): the double square root rounded to fp32.
      embedScale: Math.fround(Math.sqrt(hidden)),
      attnScale: num(cfg, 'query_pre_attn_scalar', where, 256) ** -0.5,
      attnSoftcap: optPositive(cfg, 'attn_logit_softcapping', where),
      finalSoftcap: optPositive(cfg, 'final_logit_softcapping', where),
    });
    if (!(num(cfg, 'query_pre_attn_scalar', where, 256) > 0)) throw new ModelLoadError(`${where}: query_pre_attn_scalar must be positive`);
  }
  if (arch === 'gemma3') Object.assign(spec, { qkNorm: true, layerLocalRope, ropeLocalTheta, multimodalText });
  if (arch === 'phi3') Object.assign(spec, { fusedQkv: true, fusedGateUp: true, rotaryDim: phi3RotaryDim(cfg, rp, where, headDim) });
  return {
    dir,
    name: servedName ?? basename(dir),
    // transformers' per-class defaults when the key is absent
    maxPositionEmbeddings: int(cfg, 'max_position_embeddings', where, { llama: 2048, mistral: 131072, qwen2: 32768 }[arch as string]),
    eosTokenIds: eos,
    bosTokenId: bos,
    torchDtype: dtype,
    maxNewTokens: typeof gen.max_new_tokens === 'number' && Number.isInteger(gen.max_new_tokens) && gen.max_new_tokens > 0 ? gen.max_new_tokens : null,
    note: multimodalText
      ? `${archName}: text only (the language model is served; the vision tower is not loaded and image inputs are refused)`
      : null,
    spec,
  };
}
