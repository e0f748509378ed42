// config.json -> native spec for the families of issue #16 (Qwen3, Gemma 2, Gemma 3 incl. the
// multimodal text part, Phi-3 / Phi-4-mini), their one-line errors on bad input, and PEFT plans on
// them (Phi-3's fused modules), on real files in temp dirs.
import { copyFileSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { planFromConfig, toNativePlan } from '../../server/engine/adapter-config.js';
import type { NativeEngine } from '../../server/native/addon.js';
import { readModelDir, type ModelInfo } from '../../server/engine/model-config.js';
import { Engine } from '../../server/engine/engine.js';
import { adapterRoot, modelDir } from '../helpers/fixtures.js';

type Json = Record<string, unknown>;
let root: string;
let n = 0;
beforeAll(() => {
  root = mkdtempSync(join(tmpdir(), 'loraplex-families-'));
});
afterAll(() => {
  rmSync(root, { recursive: true, force: true });
});

function dirWith(config: Json): string {
  const dir = join(root, `m${n++}`);
  mkdirSync(dir);
  writeFileSync(join(dir, 'config.json'), JSON.stringify(config));
  writeFileSync(join(dir, 'model.safetensors'), '');
  return dir;
}
const read = (config: Json): ModelInfo => readModelDir(dirWith(config));
function loadError(config: Json): string {
  try {
    read(config);
  } catch (e) {
    return (e as Error).message;
  }
  throw new Error('expected an error');
}

const QWEN3: Json = {
  architectures: ['Qwen3ForCausalLM'], model_type: 'qwen3', hidden_size: 1024, intermediate_size: 3072, num_hidden_layers: 4,
  num_attention_heads: 16, num_key_value_heads: 8, head_dim: 128, vocab_size: 1000, rope_theta: 1000000, tie_word_embeddings: true,
};
const GEMMA2: Json = {
  architectures: ['Gemma2ForCausalLM'], model_type: 'gemma2', hidden_size: 2304, intermediate_size: 9216, num_hidden_layers: 4,
  num_attention_heads: 8, num_key_value_heads: 4, head_dim: 256, vocab_size: 1000, query_pre_attn_scalar: 256, sliding_window: 4096,
  attn_logit_softcapping: 50.0, final_logit_softcapping: 30.0, hidden_activation: 'gelu_pytorch_tanh',
};
const GEMMA3_1B: Json = {
  architectures: ['Gemma3ForCausalLM'], model_type: 'gemma3_text', hidden_size: 1152, intermediate_size: 6912, num_hidden_layers: 13,
  num_attention_heads: 4, num_key_value_heads: 1, head_dim: 256, vocab_size: 1000, query_pre_attn_scalar: 256, sliding_window: 512,
  sliding_window_pattern: 6, rope_theta: 1000000, rope_local_base_freq: 10000, rope_scaling: null,
};
const PHI4_MINI: Json = {
  architectures: ['Phi3ForCausalLM'], model_type: 'phi3', hidden_size: 3072, intermediate_size: 8192, num_hidden_layers: 2,
  num_attention_heads: 24, num_key_value_heads: 8, vocab_size: 1000, max_position_embeddings: 131072,
  original_max_position_embeddings: 4096, partial_rotary_factor: 0.75, rope_theta: 10000, sliding_window: 262144,
  tie_word_embeddings: true, rope_scaling: { type: 'longrope', short_factor: Array(48).fill(1.05), long_factor: Array(48).fill(2) },
};

describe('readModelDir: the new families', () => {
  it('Qwen3: q/k norm, head_dim independent of hidden/heads, no bias; use_sliding_window and attention_bias refused', () => {
    const s = read(QWEN3).spec;
    expect(s).toMatchObject({ arch: 'qwen3', headDim: 128, qkNorm: true, attentionBias: false, tiedEmbeddings: true, ropeTheta: 1000000 });
    expect(loadError({ ...QWEN3, use_sliding_window: true, sliding_window: 4096 })).toMatch(/config\.json: Qwen3 use_sliding_window is not supported/);
    expect(loadError({ ...QWEN3, attention_bias: true })).toMatch(/config\.json: attention_bias=true is not supported for Qwen3ForCausalLM/);
  });

  it('Gemma 2: sqrt(hidden) in fp32, (1 + w) and sandwich norms, GeGLU, query_pre_attn_scalar, soft-caps, alternating windows', () => {
    const s = read(GEMMA2).spec;
    expect(s).toMatchObject({ arch: 'gemma2', normPlusOne: true, sandwichNorm: true, activation: 'gelu_tanh', attnSoftcap: 50, finalSoftcap: 30 });
    expect(s.embedScale).toBe(Math.fround(Math.sqrt(2304)));
    expect(s.attnScale).toBe(256 ** -0.5);
    expect(s.layerWindows).toEqual([4096, 0, 4096, 0]); // HF: layer i slides iff (i + 1) % 2
    expect(s.tiedEmbeddings).toBe(true); // Gemma2Config's default
    expect(read({ ...GEMMA2, layer_types: ['full_attention', 'sliding_attention', 'full_attention', 'full_attention'] }).spec.layerWindows).toEqual([0, 4096, 0, 0]);
    expect(read({ ...GEMMA2, attn_logit_softcapping: null, final_logit_softcapping: null }).spec).toMatchObject({ attnSoftcap: 0, finalSoftcap: 0 });
    expect(loadError({ ...GEMMA2, hidden_activation: 'gelu' })).toMatch(/config\.json: hidden_activation "gelu" is not supported/);
    expect(loadError({ ...GEMMA2, layer_types: ['full_attention'] })).toMatch(/config\.json: layer_types must list/);
    expect(loadError({ ...GEMMA2, num_attention_heads: 0 })).toMatch(/config\.json: num_attention_heads must be a positive integer/);
  });

  it('Gemma 3: sliding_window_pattern as HF derives it, a local RoPE base, scaling on global layers only; per-type rope_parameters too', () => {
    const s = read({ ...GEMMA3_1B, rope_scaling: { rope_type: 'linear', factor: 8 } }).spec;
    // (i + 1) % 6 == 0 is global: layers 5 and 11 of 13
    expect(s.layerWindows).toEqual([512, 512, 512, 512, 512, 0, 512, 512, 512, 512, 512, 0, 512]);
    expect(s.layerLocalRope).toEqual([1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 1]);
    expect(s).toMatchObject({ qkNorm: true, ropeTheta: 1000000, ropeLocalTheta: 10000, attnSoftcap: 0, finalSoftcap: 0 });
    expect(s.ropeScaling).toMatchObject({ type: 'linear', factor: 8 });
    const t5 = read({
      ...GEMMA3_1B, rope_theta: undefined, rope_local_base_freq: undefined, sliding_window_pattern: undefined,
      layer_types: Array.from({ length: 13 }, (_, i) => (i === 3 ? 'full_attention' : 'sliding_attention')),
      rope_parameters: { full_attention: { rope_type: 'linear', factor: 4, rope_theta: 500000 }, sliding_attention: { rope_type: 'default', rope_theta: 20000 } },
    }).spec;
    expect(t5.layerWindows![3]).toBe(0);
    expect(t5).toMatchObject({ ropeTheta: 500000, ropeLocalTheta: 20000 });
    expect(t5.ropeScaling).toMatchObject({ type: 'linear', factor: 4 });
    expect(loadError({ ...GEMMA3_1B, sliding_window: -3 })).toMatch(/config\.json: sliding_window must be a positive integer or null/);
  });

  it('Gemma3ForConditionalGeneration: the text_config over Gemma3TextConfig defaults (a released 4B config), marked text only', () => {
    const info = read({
      architectures: ['Gemma3ForConditionalGeneration'], model_type: 'gemma3', eos_token_id: [1, 106],
      text_config: { hidden_size: 2560, intermediate_size: 10240, model_type: 'gemma3_text', num_hidden_layers: 34, rope_scaling: { factor: 8.0, rope_type: 'linear' }, sliding_window: 1024 },
      vision_config: { hidden_size: 1152, model_type: 'siglip_vision_model' },
    });
    expect(info.spec).toMatchObject({ arch: 'gemma3', multimodalText: true, numHeads: 8, numKvHeads: 4, headDim: 256, vocabSize: 262208, tiedEmbeddings: true });
    expect(info.spec.ropeScaling).toMatchObject({ type: 'linear', factor: 8 });
    expect(info.eosTokenIds).toEqual([1, 106]);
    expect(info.note).toMatch(/text only/);
    expect(loadError({ architectures: ['Gemma3ForConditionalGeneration'], model_type: 'gemma3' })).toMatch(/config\.json: text_config must be an object/);
  });

  it('Phi-4-mini: fused projections, partial rotary 0.75, longrope with its attention factor; Phi-3 vision/MoE/small stay refused', () => {
    const s = read(PHI4_MINI).spec;
    expect(s).toMatchObject({ arch: 'phi3', fusedQkv: true, fusedGateUp: true, headDim: 128, rotaryDim: 96, slidingWindow: 262144 });
    expect(s.ropeScaling.type).toBe('longrope');
    expect(s.ropeScaling.originalMaxPositionEmbeddings).toBe(4096);
    expect(s.ropeScaling.attentionFactor).toBeCloseTo(Math.sqrt(1 + Math.log(32) / Math.log(4096)), 12);
    expect(read({ ...PHI4_MINI, rope_scaling: null, partial_rotary_factor: undefined }).spec).toMatchObject({ rotaryDim: 128, ropeScaling: { type: 'none' } });
    expect(loadError({ ...PHI4_MINI, rope_scaling: { type: 'longrope', short_factor: [1, 2], long_factor: Array(48).fill(2) } })).toMatch(
      /config\.json rope_scaling: short_factor must be a list of 48 positive numbers/);
    expect(loadError({ ...PHI4_MINI, original_max_position_embeddings: undefined })).toMatch(/config\.json: original_max_position_embeddings must be a positive integer for longrope/);
    for (const a of ['Phi3SmallForCausalLM', 'PhiMoEForCausalLM', 'Phi3VForCausalLM'])
      expect(loadError({ ...PHI4_MINI, architectures: [a] })).toMatch(new RegExp(`config\\.json: unsupported architecture "${a}"`));
  });
});

describe('adapters on the new families', () => {
  it('Phi-3: one plan entry per projection of a fused module, same rank and scale; patterns keyed by the fused name', () => {
    const phi = readModelDir(modelDir('phi3'));
    const p = planFromConfig({ peft_type: 'LORA', r: 4, lora_alpha: 8, target_modules: ['qkv_proj', 'gate_up_proj'], rank_pattern: { gate_up_proj: 2 } }, phi, 64);
    expect(p.targetModules.sort()).toEqual(['gate_up_proj', 'qkv_proj']);
    const l0 = p.modules.filter((m) => m.layer === 0).map((m) => [m.proj, m.rank, m.scale]);
    expect(l0).toEqual([[0, 4, 2], [1, 4, 2], [2, 4, 2], [4, 2, 4], [5, 2, 4]]);
  });

  it('Phi-3: a fused target holds its A once (k and v take q\'s rows, up takes gate\'s), B split per projection', async () => {
    const engine = await Engine.create({ model: modelDir('phi3'), memoryBudget: 8 << 20, device: 'cpu', loraDtype: 'float32' });
    try {
      const dir = join(adapterRoot('phi3'), 'r8-fused');
      const p = planFromConfig(JSON.parse(readFileSync(join(dir, 'adapter_config.json'), 'utf8')) as Json, engine.model, 64);
      const native = (engine as unknown as { native: NativeEngine }).native;
      const parsed = await native.parseAdapter(join(dir, 'adapter_model.safetensors'), toNativePlan(p), 64);
      expect(parsed.numModules).toBe(2 * 7); // q, k, v, o, gate, up, down in each of 2 layers
      // Per layer, fp32: A of qkv_proj, o_proj, gate_up_proj (8 x 48 each) and down_proj (8 x 64),
      // once; B^T rows 8 x (80 | 48 | 128 | 48) (qkv = 48 + 16 + 16, gate_up = 2 x 64).
      expect(parsed.rowBytes).toBe(4 * 2 * (3 * 8 * 48 + 8 * 64 + 8 * (80 + 48 + 128 + 48)));
    } finally {
      await engine.close();
    }
  });

  it('Phi-3: an adapter naming q_proj (which Phi-3 does not have) is a one-line 400 naming the field', () => {
    const phi = readModelDir(modelDir('phi3'));
    expect(() => planFromConfig({ peft_type: 'LORA', r: 4, target_modules: ['q_proj', 'o_proj'] }, phi, 64)).toThrow(
      /^adapter_config\.json: target module q_proj does not exist in this phi3 model/);
  });

  it('Phi-3: a fused LoRA B of the wrong height is refused naming the file and tensor', async () => {
    const src = join(adapterRoot('phi3'), 'r8-fused');
    const adapters = join(root, `ad${n++}`);
    const dir = join(adapters, 'bad');
    mkdirSync(dir, { recursive: true });
    for (const f of readdirSync(src)) copyFileSync(join(src, f), join(dir, f));
    // Claim the fused B has one row fewer: the header edit keeps the file valid safetensors.
    const p = join(dir, 'adapter_model.safetensors');
    const buf = readFileSync(p);
    const len = Number(buf.readBigUInt64LE(0));
    const header = JSON.parse(buf.subarray(8, 8 + len).toString('utf8')) as Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }>;
    const key = 'base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight';
    header[key].shape = [header[key].shape[0] - 1, header[key].shape[1]];
    header[key].data_offsets = [header[key].data_offsets[0], header[key].data_offsets[1] - 4 * header[key].shape[1]];
    const data = buf.subarray(8 + len);
    // Re-pack: the shrunk tensor's bytes are dropped, later tensors shift down.
    const entries = Object.entries(header).filter(([k]) => k !== '__metadata__').sort((a, b) => a[1].data_offsets[0] - b[1].data_offsets[0]);
    const parts: Buffer[] = [];
    let at = 0;
    for (const [, e] of entries) {
      const size = e.data_offsets[1] - e.data_offsets[0];
      parts.push(data.subarray(e.data_offsets[0], e.data_offsets[0] + size));
      e.data_offsets = [at, at + size];
      at += size;
    }
    const h = Buffer.from(JSON.stringify(header) + ' '.repeat((8 - (Buffer.byteLength(JSON.stringify(header)) % 8)) % 8));
    const prefix = Buffer.alloc(8);
    prefix.writeBigUInt64LE(BigInt(h.length));
    writeFileSync(p, Buffer.concat([prefix, h, ...parts]));
    const engine = await Engine.create({ model: modelDir('phi3'), adapterDir: adapters, memoryBudget: 8 << 20, device: 'cpu' });
    try {
      await expect(engine.adapters.loadNow('bad')).rejects.toThrow(/adapter_model\.safetensors: tensor 'base_model\.model\.model\.layers\.0\.self_attn\.qkv_proj\.lora_B\.weight' has shape \[79, 8\], expected \[80, 8\]/);
    } finally {
      await engine.close();
    }
  });

  it('Phi-3: a fused weight of the wrong shape is refused naming the file and tensor', async () => {
    const dir = join(root, `m${n++}`);
    mkdirSync(dir);
    for (const f of readdirSync(modelDir('phi3'))) copyFileSync(join(modelDir('phi3'), f), join(dir, f));
    const cfg = JSON.parse(readFileSync(join(dir, 'config.json'), 'utf8'));
    cfg.num_key_value_heads = 3; // qkv_proj holds 48 + 2 x 16 rows, not 48 + 2 x 48
    writeFileSync(join(dir, 'config.json'), JSON.stringify(cfg));
    await expect(Engine.create({ model: dir, memoryBudget: 8 << 20, device: 'cpu' })).rejects.toThrow(
      /model\.safetensors: tensor 'model\.layers\.0\.self_attn\.qkv_proj\.weight' has shape \[80, 48\] but the config implies \[144, 48\]/);
  });
});
