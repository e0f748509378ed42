// Generates a random Llama with SmolLM2-135M's shape (plus PEFT LoRA adapters) for benchmarks:
// realistic sizes and memory traffic without downloading anything. The weights are seeded
// normal(0, 0.02) noise, so the text it produces is meaningless; the tokenizer is a small BPE
// trained on the demo corpus (its ids are a subset of the config's vocabulary).
// --shape qwen3-0.6b | gemma3-1b writes a Qwen3ForCausalLM / Gemma3ForCausalLM of those releases'
// dimensions instead; --family llama keeps those dimensions but writes a Llama (the same-shape
// baseline the family is compared against).
//
//   npx tsx bench/make-model.ts --out DIR [--dtype bf16|f16|f32] [--adapters N] [--rank 16]
//                               [--alpha 32] [--seed 1] [--shape smollm2-135m|qwen3-0.6b|gemma3-1b]
//                               [--family llama]
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import { BASE_CORPUS, STYLE_CORPORA } from '../server/demo/corpus.js';
import { CHAT_TEMPLATE, SPECIAL_TOKENS } from '../server/demo/demo-weights.js';
import { SeededRandom } from '../server/demo/seeded-random.js';
import { buildTokenizerConfig, trainBpe } from '../server/util/bpe-trainer.js';
import { writeSafetensors, type SafetensorsDtype, type TensorSpec } from '../server/util/safetensors-writer.js';

/** SmolLM2-135M's architecture. */
export const SMOLLM2_135M_SHAPE = {
  hiddenSize: 576,
  intermediateSize: 1536,
  numLayers: 30,
  numHeads: 9,
  numKvHeads: 3,
  vocabSize: 49152,
  ropeTheta: 100000,
  rmsNormEps: 1e-5,
  maxPositionEmbeddings: 8192,
} as const;

export type Family = 'llama' | 'qwen3' | 'gemma3';
export interface ModelShape {
  family: Family;
  hiddenSize: number;
  intermediateSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  vocabSize: number;
  ropeTheta: number;
  rmsNormEps: number;
  maxPositionEmbeddings: number;
}

/** The released models' dimensions (their config.json files). */
export const SHAPES: Record<string, ModelShape> = {
  'smollm2-135m': { family: 'llama', ...SMOLLM2_135M_SHAPE, headDim: SMOLLM2_135M_SHAPE.hiddenSize / SMOLLM2_135M_SHAPE.numHeads },
  'qwen3-0.6b': {
    family: 'qwen3', hiddenSize: 1024, intermediateSize: 3072, numLayers: 28, numHeads: 16, numKvHeads: 8, headDim: 128,
    vocabSize: 151936, ropeTheta: 1000000, rmsNormEps: 1e-6, maxPositionEmbeddings: 40960,
  },
  'gemma3-1b': {
    family: 'gemma3', hiddenSize: 1152, intermediateSize: 6912, numLayers: 26, numHeads: 4, numKvHeads: 1, headDim: 256,
    vocabSize: 262144, ropeTheta: 1000000, rmsNormEps: 1e-6, maxPositionEmbeddings: 32768,
  },
};

export const LORA_TARGET_MODULES = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] as const;

export interface MakeModelOptions {
  out: string;
  dtype?: 'bf16' | 'f16' | 'f32';
  adapters?: number;
  rank?: number;
  alpha?: number;
  seed?: number;
  shape?: string; // a key of SHAPES (default smollm2-135m)
  family?: Family; // overrides the shape's family (llama: the same dimensions as a Llama)
}

export interface MadeModel {
  modelDir: string;
  /** Directory holding one sub-directory per adapter (`a0`, `a1`, ...). */
  adapterDir: string;
  adapterIds: string[];
}

const WEIGHT_STD = 0.02;
const DTYPES: Record<NonNullable<MakeModelOptions['dtype']>, { st: SafetensorsDtype; torch: string }> = {
  bf16: { st: 'BF16', torch: 'bfloat16' },
  f16: { st: 'F16', torch: 'float16' },
  f32: { st: 'F32', torch: 'float32' },
};

/** Shapes of one layer's seven projections, [out, in], keyed by module name. */
function projectionShapes(s: ModelShape = SHAPES['smollm2-135m']): Record<(typeof LORA_TARGET_MODULES)[number], [number, number]> {
  const kv = s.numKvHeads * s.headDim, q = s.numHeads * s.headDim;
  return {
    q_proj: [q, s.hiddenSize],
    k_proj: [kv, s.hiddenSize],
    v_proj: [kv, s.hiddenSize],
    o_proj: [s.hiddenSize, q],
    gate_proj: [s.intermediateSize, s.hiddenSize],
    up_proj: [s.intermediateSize, s.hiddenSize],
    down_proj: [s.hiddenSize, s.intermediateSize],
  };
}

function moduleParent(module: string): string {
  return module === 'gate_proj' || module === 'up_proj' || module === 'down_proj' ? 'mlp' : 'self_attn';
}

/** Writes the model (and adapters) under `options.out`; files are overwritten. */
export async function makeModel(options: MakeModelOptions): Promise<MadeModel> {
  const dtype = DTYPES[options.dtype ?? 'bf16'];
  const seed = options.seed ?? 1;
  const rank = options.rank ?? 16;
  const alpha = options.alpha ?? 32;
  const numAdapters = options.adapters ?? 2;
  if (!dtype) throw new Error(`--dtype must be bf16, f16 or f32, got ${String(options.dtype)}`);
  for (const [name, v] of [['adapters', numAdapters], ['rank', rank], ['seed', seed]] as const) {
    if (!Number.isInteger(v) || v < (name === 'rank' ? 1 : 0)) throw new Error(`--${name} must be a non-negative integer, got ${v}`);
  }
  if (!(alpha > 0)) throw new Error(`--alpha must be positive, got ${alpha}`);
  const shape = SHAPES[options.shape ?? 'smollm2-135m'];
  if (!shape) throw new Error(`--shape must be one of ${Object.keys(SHAPES).join(', ')}, got ${options.shape}`);
  const s: ModelShape = { ...shape, family: options.family ?? shape.family };
  const modelDir = options.out;
  await mkdir(modelDir, { recursive: true });

  const tokenizer = trainBpe([...BASE_CORPUS, ...STYLE_CORPORA.flatMap((c) => c.text)], {
    vocabSize: 600,
    specialTokens: Object.values(SPECIAL_TOKENS),
    bosToken: SPECIAL_TOKENS.bos,
  });
  const idOf = (content: string): number => tokenizer.added_tokens.find((t) => t.content === content)!.id;
  const bos = idOf(SPECIAL_TOKENS.bos);
  const eos = [idOf(SPECIAL_TOKENS.eos), idOf(SPECIAL_TOKENS.eot)];

  const family: Record<string, unknown> =
    s.family === 'qwen3'
      ? { architectures: ['Qwen3ForCausalLM'], model_type: 'qwen3', use_sliding_window: false }
      : s.family === 'gemma3'
        ? {
            architectures: ['Gemma3ForCausalLM'], model_type: 'gemma3_text', hidden_act: undefined,
            hidden_activation: 'gelu_pytorch_tanh', query_pre_attn_scalar: 256, sliding_window: 512,
            sliding_window_pattern: 6, rope_local_base_freq: 10000, final_logit_softcapping: null,
            attn_logit_softcapping: null,
          }
        : {};
  const config = {
    architectures: ['LlamaForCausalLM'],
    attention_bias: false,
    attention_dropout: 0.0,
    bos_token_id: bos,
    eos_token_id: eos,
    head_dim: s.headDim,
    hidden_act: 'silu',
    hidden_size: s.hiddenSize,
    initializer_range: WEIGHT_STD,
    intermediate_size: s.intermediateSize,
    max_position_embeddings: s.maxPositionEmbeddings,
    mlp_bias: false,
    model_type: 'llama',
    num_attention_heads: s.numHeads,
    num_hidden_layers: s.numLayers,
    num_key_value_heads: s.numKvHeads,
    pretraining_tp: 1,
    rms_norm_eps: s.rmsNormEps,
    rope_scaling: null,
    rope_theta: s.ropeTheta,
    tie_word_embeddings: true,
    torch_dtype: dtype.torch,
    use_cache: true,
    vocab_size: s.vocabSize,
    ...family,
  };
  await writeJson(join(modelDir, 'config.json'), config);
  await writeJson(join(modelDir, 'generation_config.json'), { bos_token_id: bos, eos_token_id: eos });
  await writeJson(join(modelDir, 'tokenizer.json'), tokenizer);
  await writeJson(
    join(modelDir, 'tokenizer_config.json'),
    buildTokenizerConfig(tokenizer, { bosToken: SPECIAL_TOKENS.bos, eosToken: SPECIAL_TOKENS.eot, chatTemplate: CHAT_TEMPLATE, modelMaxLength: s.maxPositionEmbeddings }),
  );

  // Each tensor is generated just before it is written (from its own seeded stream), so peak
  // memory is one tensor, not the 135M-parameter model.
  const random = (name: string, shape: number[]): TensorSpec => ({
    name,
    dtype: dtype.st,
    shape,
    data: () => new SeededRandom(seed, name).normalArray(shape.reduce((a, b) => a * b, 1), WEIGHT_STD),
  });
  const ones = (name: string, n: number): TensorSpec => ({ name, dtype: dtype.st, shape: [n], data: () => new Float32Array(n).fill(1) });
  const shapes = projectionShapes(s);
  const tensors: TensorSpec[] = [random('model.embed_tokens.weight', [s.vocabSize, s.hiddenSize])];
  for (let l = 0; l < s.numLayers; l++) {
    const p = `model.layers.${l}`;
    tensors.push(ones(`${p}.input_layernorm.weight`, s.hiddenSize), ones(`${p}.post_attention_layernorm.weight`, s.hiddenSize));
    if (s.family === 'gemma3')
      tensors.push(ones(`${p}.pre_feedforward_layernorm.weight`, s.hiddenSize), ones(`${p}.post_feedforward_layernorm.weight`, s.hiddenSize));
    if (s.family !== 'llama')
      tensors.push(ones(`${p}.self_attn.q_norm.weight`, s.headDim), ones(`${p}.self_attn.k_norm.weight`, s.headDim));
    for (const m of LORA_TARGET_MODULES) tensors.push(random(`${p}.${moduleParent(m)}.${m}.weight`, shapes[m]));
  }
  tensors.push(ones('model.norm.weight', s.hiddenSize));
  await writeSafetensors(join(modelDir, 'model.safetensors'), tensors, { format: 'pt' });

  const adapterDir = join(modelDir, 'adapters');
  const adapterIds: string[] = [];
  for (let i = 0; i < numAdapters; i++) {
    const id = `a${i}`;
    await writeAdapter(join(adapterDir, id), { seed: seed * 1000003 + i, rank, alpha, shape: s });
    adapterIds.push(id);
  }
  return { modelDir, adapterDir, adapterIds };
}

/** One PEFT LoRA adapter on all seven projections of every layer, fp32 as PEFT saves it. */
async function writeAdapter(dir: string, o: { seed: number; rank: number; alpha: number; shape: ModelShape }): Promise<void> {
  await mkdir(dir, { recursive: true });
  const shapes = projectionShapes(o.shape);
  const tensors: TensorSpec[] = [];
  // B is random too (PEFT initialises it to zero): a "trained" adapter that changes the output.
  const random = (name: string, shape: [number, number]): TensorSpec => ({
    name,
    dtype: 'F32',
    shape,
    data: () => new SeededRandom(o.seed, name).normalArray(shape[0] * shape[1], WEIGHT_STD),
  });
  for (let l = 0; l < o.shape.numLayers; l++) {
    for (const m of LORA_TARGET_MODULES) {
      const [outDim, inDim] = shapes[m];
      const prefix = `base_model.model.model.layers.${l}.${moduleParent(m)}.${m}`;
      tensors.push(random(`${prefix}.lora_A.weight`, [o.rank, inDim]), random(`${prefix}.lora_B.weight`, [outDim, o.rank]));
    }
  }
  await writeJson(join(dir, 'adapter_config.json'), {
    alpha_pattern: {},
    auto_mapping: null,
    base_model_name_or_path: 'loraplex/bench-smollm2-135m-random',
    bias: 'none',
    fan_in_fan_out: false,
    inference_mode: true,
    init_lora_weights: true,
    layer_replication: null,
    layers_pattern: null,
    layers_to_transform: null,
    loftq_config: {},
    lora_alpha: o.alpha,
    lora_dropout: 0.0,
    megatron_config: null,
    megatron_core: 'megatron.core',
    modules_to_save: null,
    peft_type: 'LORA',
    r: o.rank,
    rank_pattern: {},
    revision: null,
    target_modules: [...LORA_TARGET_MODULES].sort(),
    task_type: 'CAUSAL_LM',
    use_dora: false,
    use_rslora: false,
  });
  await writeSafetensors(join(dir, 'adapter_model.safetensors'), tensors, { format: 'pt' });
}

async function writeJson(path: string, value: unknown): Promise<void> {
  await writeFile(path, `${JSON.stringify(value, null, 2)}\n`);
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      out: { type: 'string' },
      dtype: { type: 'string', default: 'bf16' },
      adapters: { type: 'string', default: '2' },
      rank: { type: 'string', default: '16' },
      alpha: { type: 'string', default: '32' },
      seed: { type: 'string', default: '1' },
      shape: { type: 'string', default: 'smollm2-135m' },
      family: { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
    strict: true,
  });
  if (values.help || !values.out) {
    console.log('usage: npx tsx bench/make-model.ts --out DIR [--dtype bf16|f16|f32] [--adapters N] [--rank 16] [--alpha 32] [--seed 1]');
    process.exitCode = values.help ? 0 : 2;
    return;
  }
  if (!(values.dtype in DTYPES)) throw new Error(`--dtype must be bf16, f16 or f32, got ${values.dtype}`);
  const started = performance.now();
  const made = await makeModel({
    out: values.out,
    dtype: values.dtype as MakeModelOptions['dtype'],
    adapters: Number(values.adapters),
    rank: Number(values.rank),
    alpha: Number(values.alpha),
    seed: Number(values.seed),
    shape: values.shape,
    family: values.family as Family | undefined,
  });
  const secs = ((performance.now() - started) / 1000).toFixed(1);
  console.log(`wrote ${made.modelDir} (${values.dtype}) and ${made.adapterIds.length} adapter(s) in ${made.adapterDir} in ${secs}s`);
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  main().catch((err: unknown) => {
    console.error(err instanceof Error ? err.message : err);
    process.exit(1);
  });
}
