// Unit tests of readModelDir (config.json -> native spec) and planFromConfig (PEFT
// adapter_config.json -> per-module rank/alpha/scale), on real files in temp dirs.
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { PROJ_NAMES, planFromConfig, type AdapterPlan } from '../../server/engine/adapter-config.js';
import { LoraplexError } from '../../server/engine/errors.js';
import { readModelDir, type ModelInfo } from '../../server/engine/model-config.js';
import { modelDir } from '../helpers/fixtures.js';

let root: string;
let n = 0;
beforeAll(() => {
  root = mkdtempSync(join(tmpdir(), 'loraplex-modelcfg-'));
});
afterAll(() => {
  rmSync(root, { recursive: true, force: true });
});

type Json = Record<string, unknown>;

const LLAMA: Json = {
  architectures: ['LlamaForCausalLM'],
  model_type: 'llama',
  hidden_size: 64,
  intermediate_size: 176,
  num_hidden_layers: 2,
  num_attention_heads: 4,
  num_key_value_heads: 2,
  vocab_size: 600,
  max_position_embeddings: 256,
  rms_norm_eps: 1e-5,
  hidden_act: 'silu',
};

/**
 * A model directory with `config` (merged over LLAMA; undefined values delete keys), an optional
 * generation_config.json and an empty model.safetensors (readModelDir only checks it exists).
 */
function makeDir(config: Json, gen?: Json): string {
  const dir = join(root, `m${n++}`);
  mkdirSync(dir);
  const cfg: Json = { ...LLAMA, ...config };
  for (const k of Object.keys(cfg)) if (cfg[k] === undefined) delete cfg[k];
  writeFileSync(join(dir, 'config.json'), JSON.stringify(cfg));
  if (gen) writeFileSync(join(dir, 'generation_config.json'), JSON.stringify(gen));
  writeFileSync(join(dir, 'model.safetensors'), '');
  return dir;
}

function read(config: Json, gen?: Json): ModelInfo {
  return readModelDir(makeDir(config, gen));
}

function loadError(config: Json): Error {
  const dir = makeDir(config);
  try {
    readModelDir(dir);
  } catch (e) {
    expect(e).toBeInstanceOf(LoraplexError);
    expect((e as Error).message).toContain(join(dir, 'config.json'));
    return e as Error;
  }
  throw new Error('readModelDir should have thrown');
}

describe('readModelDir', () => {
  it('reads the llama-gqa fixture (transformers 5 config)', () => {
    const m = readModelDir(modelDir('llama-gqa'));
    expect(m.name).toBe('llama-gqa');
    expect(m.maxPositionEmbeddings).toBe(256);
    expect(m.eosTokenIds).toEqual([596]);
    expect(m.bosTokenId).toBe(592);
    expect(m.torchDtype).toBe('float32');
    expect(m.spec).toEqual({
      arch: 'llama',
      hiddenSize: 64,
      intermediateSize: 176,
      numLayers: 2,
      numHeads: 4,
      numKvHeads: 2,
      headDim: 16,
      vocabSize: 600,
      rmsNormEps: 1e-5,
      ropeTheta: 10000,
      ropeScaling: { type: 'none', factor: 1, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8192 },
      tiedEmbeddings: false,
      attentionBias: false,
      slidingWindow: 0,
      files: [join(modelDir('llama-gqa'), 'model.safetensors')],
    });
    expect(readModelDir(modelDir('llama-gqa'), 'served').name).toBe('served');
  });

  describe('rope scaling', () => {
    it('none: no rope_scaling, null, or type "default"', () => {
      for (const extra of [{}, { rope_scaling: null }, { rope_scaling: { rope_type: 'default' } }, { rope_parameters: { rope_type: 'default', rope_theta: 10000 } }]) {
        const s = read(extra).spec;
        expect(s.ropeScaling.type, JSON.stringify(extra)).toBe('none');
        expect(s.ropeScaling.factor).toBe(1);
        expect(s.ropeTheta).toBe(10000);
      }
    });

    it('linear, in both the old "type" and the newer "rope_type" spelling', () => {
      expect(read({ rope_scaling: { type: 'linear', factor: 4 } }).spec.ropeScaling).toMatchObject({ type: 'linear', factor: 4 });
      expect(read({ rope_scaling: { rope_type: 'linear', factor: 2.5 }, rope_theta: 5e5 }).spec).toMatchObject({
        ropeTheta: 5e5,
        ropeScaling: { type: 'linear', factor: 2.5 },
      });
    });

    it('llama3 (transformers 4 rope_scaling)', () => {
      const s = read({
        rope_theta: 500000,
        rope_scaling: { rope_type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192 },
      }).spec;
      expect(s.ropeTheta).toBe(500000);
      expect(s.ropeScaling).toEqual({ type: 'llama3', factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8192 });
    });

    it('llama3 and linear from transformers 5 rope_parameters (rope_theta inside it)', () => {
      const s = read({
        rope_theta: undefined,
        rope_parameters: {
          rope_type: 'llama3', rope_theta: 500000, factor: 32, low_freq_factor: 2, high_freq_factor: 8, original_max_position_embeddings: 4096,
        },
      }).spec;
      expect(s.ropeTheta).toBe(500000);
      expect(s.ropeScaling).toEqual({ type: 'llama3', factor: 32, lowFreqFactor: 2, highFreqFactor: 8, originalMaxPositionEmbeddings: 4096 });
      const l = read({ rope_theta: undefined, rope_scaling: null, rope_parameters: { rope_type: 'linear', rope_theta: 1e6, factor: 2 } }).spec;
      expect(l.ropeTheta).toBe(1e6);
      expect(l.ropeScaling).toMatchObject({ type: 'linear', factor: 2 });
      const d = read({ rope_theta: undefined, rope_parameters: { rope_type: 'default', rope_theta: 1e6 } }).spec;
      expect(d.ropeTheta).toBe(1e6);
      expect(d.ropeScaling.type).toBe('none');
    });

    it('rejects yarn, dynamic and longrope with a clear message', () => {
      for (const type of ['yarn', 'dynamic', 'longrope']) {
        for (const extra of [
          { rope_scaling: { rope_type: type, factor: 4, original_max_position_embeddings: 4096 } },
          { rope_scaling: { type, factor: 4 } },
          { rope_parameters: { rope_type: type, rope_theta: 10000, factor: 4 } },
        ]) {
          const e = loadError(extra);
          expect(e.message).toMatch(new RegExp(`rope_scaling type "${type}" is not supported \\(none, linear, llama3\\)`));
        }
      }
    });

    it('rejects a llama3 config with equal low and high frequency factors, and a non-positive factor', () => {
      expect(loadError({ rope_scaling: { rope_type: 'llama3', factor: 8, low_freq_factor: 4, high_freq_factor: 4, original_max_position_embeddings: 8192 } }).message)
        .toMatch(/high_freq_factor must differ/);
      expect(loadError({ rope_scaling: { rope_type: 'linear', factor: 0 } }).message).toMatch(/factor must be positive/);
    });
  });

  it('head_dim: given (may differ from hidden/heads), derived, or null', () => {
    expect(read({ head_dim: 32 }).spec.headDim).toBe(32);
    expect(read({ head_dim: undefined }).spec.headDim).toBe(16);
    expect(read({ head_dim: null }).spec.headDim).toBe(16);
    expect(loadError({ hidden_size: 66, head_dim: undefined, num_key_value_heads: 4 }).message).toMatch(/hidden_size is not a multiple of num_attention_heads/);
  });

  it('GQA: num_key_value_heads, defaulting to num_attention_heads; must divide it', () => {
    expect(read({ num_attention_heads: 8, num_key_value_heads: 2, head_dim: 8 }).spec).toMatchObject({ numHeads: 8, numKvHeads: 2 });
    expect(read({ num_key_value_heads: undefined }).spec.numKvHeads).toBe(4);
    expect(read({ num_key_value_heads: null }).spec.numKvHeads).toBe(4);
    expect(loadError({ num_key_value_heads: 3 }).message).toMatch(/num_attention_heads must be a multiple of num_key_value_heads/);
  });

  it('tie_word_embeddings defaults to false (as LlamaConfig, MistralConfig and Qwen2Config do in transformers 5.18)', () => {
    expect(read({}).spec.tiedEmbeddings).toBe(false);
    expect(read({ tie_word_embeddings: true }).spec.tiedEmbeddings).toBe(true);
    expect(read({ architectures: ['Qwen2ForCausalLM'], model_type: 'qwen2' }).spec.tiedEmbeddings).toBe(false);
    expect(read({ architectures: ['MistralForCausalLM'], model_type: 'mistral' }).spec.tiedEmbeddings).toBe(false);
  });

  it('eos ids: generation_config.json first, then config.json, deduplicated; bos prefers generation_config', () => {
    const a = read({ eos_token_id: 3, bos_token_id: 9 }, { eos_token_id: [1, 2], bos_token_id: 7 });
    expect(a.eosTokenIds).toEqual([1, 2, 3]);
    expect(a.bosTokenId).toBe(7);
    expect(read({ eos_token_id: [2, 5] }, { eos_token_id: 2 }).eosTokenIds).toEqual([2, 5]);
    const b = read({ eos_token_id: 4, bos_token_id: 9 });
    expect(b.eosTokenIds).toEqual([4]);
    expect(b.bosTokenId).toBe(9);
    expect(read({ eos_token_id: undefined, bos_token_id: undefined }).eosTokenIds).toEqual([]);
  });

  it('sliding_window only for Mistral; Qwen2 use_sliding_window is refused', () => {
    expect(read({ architectures: ['MistralForCausalLM'], model_type: 'mistral', sliding_window: 4096 }).spec.slidingWindow).toBe(4096);
    expect(read({ architectures: ['MistralForCausalLM'], model_type: 'mistral', sliding_window: null }).spec.slidingWindow).toBe(0);
    expect(read({ sliding_window: 4096 }).spec.slidingWindow).toBe(0); // Llama ignores it
    const q = read({ architectures: ['Qwen2ForCausalLM'], model_type: 'qwen2', sliding_window: 4096, use_sliding_window: false }).spec;
    expect(q.slidingWindow).toBe(0);
    expect(q.attentionBias).toBe(true);
    expect(loadError({ architectures: ['Qwen2ForCausalLM'], model_type: 'qwen2', sliding_window: 4096, use_sliding_window: true }).message).toMatch(
      /use_sliding_window is not supported/,
    );
  });

  it('rejects bad dimensions and unsupported activations, naming config.json', () => {
    expect(loadError({ hidden_size: 0 }).message).toMatch(/hidden_size must be a positive integer/);
    expect(loadError({ vocab_size: '600' }).message).toMatch(/vocab_size must be a positive integer/);
    expect(loadError({ hidden_act: 'gelu' }).message).toMatch(/hidden_act "gelu" is not supported/);
    expect(loadError({ attention_bias: true }).message).toMatch(/attention_bias=true is not supported/);
  });
});

// ---- planFromConfig ----

// The base the PEFT expectations were computed on: LlamaConfig(vocab_size=32, hidden_size=16,
// intermediate_size=24, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2).
let tiny: ModelInfo;
beforeAll(() => {
  tiny = readModelDir(
    makeDir({ hidden_size: 16, intermediate_size: 24, num_hidden_layers: 3, num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 32, max_position_embeddings: 64 }),
  );
});

type Row = [key: string, rank: number, alpha: number, scale: number];

function rows(plan: AdapterPlan): Row[] {
  return plan.modules.map((m) => [`model.layers.${m.layer}.${m.proj <= 3 ? 'self_attn' : 'mlp'}.${PROJ_NAMES[m.proj]}`, m.rank, m.alpha, m.scale]);
}

function expectRows(plan: AdapterPlan, want: Row[]): void {
  const got = rows(plan);
  expect(got.map((r) => r[0])).toEqual(want.map((r) => r[0]));
  got.forEach((r, i) => {
    expect(r[1], r[0]).toBe(want[i][1]);
    expect(r[2], r[0]).toBe(want[i][2]);
    expect(r[3], r[0]).toBeCloseTo(want[i][3], 6);
  });
}

const plan = (cfg: Json, maxRank = 64) => planFromConfig({ peft_type: 'LORA', ...cfg }, tiny, maxRank);
const L = (l: number, p: string): string => `model.layers.${l}.${['q_proj', 'k_proj', 'v_proj', 'o_proj'].includes(p) ? 'self_attn' : 'mlp'}.${p}`;
const ALL = (layers: number[], projs: readonly string[], r: number, a: number, s: number): Row[] =>
  layers.flatMap((l) => projs.map((p): Row => [L(l, p), r, a, s]));

/*
 * Expected rows below were produced with PEFT 0.21.0 + transformers 5.18.0 (python3): for each
 * config, get_peft_model(LlamaForCausalLM(<the tiny config above>), LoraConfig(**kw)), then for
 * every module with a `default` lora_A: [name, m.r["default"], m.lora_alpha["default"],
 * m.scaling["default"]], in named_modules() order.
 */
describe('planFromConfig mirrors PEFT', () => {
  it('target_modules list with layers_to_transform (list and int)', () => {
    // LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj","v_proj","mlp.down_proj"], layers_to_transform=[0,2])
    expectRows(plan({ r: 8, lora_alpha: 16, target_modules: ['q_proj', 'v_proj', 'mlp.down_proj'], layers_to_transform: [0, 2] }), [
      [L(0, 'q_proj'), 8, 16, 2], [L(0, 'v_proj'), 8, 16, 2], [L(0, 'down_proj'), 8, 16, 2],
      [L(2, 'q_proj'), 8, 16, 2], [L(2, 'v_proj'), 8, 16, 2], [L(2, 'down_proj'), 8, 16, 2],
    ]);
    // LoraConfig(r=4, lora_alpha=4, target_modules=["o_proj"], layers_to_transform=1)
    expectRows(plan({ r: 4, lora_alpha: 4, target_modules: ['o_proj'], layers_to_transform: 1 }), [[L(1, 'o_proj'), 4, 4, 1]]);
  });

  it('target_modules list entries match by ".name" suffix', () => {
    // LoraConfig(r=4, lora_alpha=8, target_modules=["layers.1.self_attn.q_proj", "mlp.up_proj"])
    expectRows(plan({ r: 4, lora_alpha: 8, target_modules: ['layers.1.self_attn.q_proj', 'mlp.up_proj'] }), [
      [L(0, 'up_proj'), 4, 8, 2], [L(1, 'q_proj'), 4, 8, 2], [L(1, 'up_proj'), 4, 8, 2], [L(2, 'up_proj'), 4, 8, 2],
    ]);
  });

  it('target_modules regex string is a full match against the module key', () => {
    // LoraConfig(r=4, lora_alpha=8, target_modules=r".*\.(q_proj|down_proj)")
    expectRows(plan({ r: 4, lora_alpha: 8, target_modules: '.*\\.(q_proj|down_proj)' }), ALL([0, 1, 2], ['q_proj', 'down_proj'], 4, 8, 2));
    // LoraConfig(r=4, lora_alpha=8, target_modules=r"model\.layers\.[02]\.self_attn\.(k|v)_proj")
    expectRows(plan({ r: 4, lora_alpha: 8, target_modules: 'model\\.layers\\.[02]\\.self_attn\\.(k|v)_proj' }), ALL([0, 2], ['k_proj', 'v_proj'], 4, 8, 2));
    // LoraConfig(target_modules=r"layers\.1\..*proj") -> PEFT: "Target modules ... not found in the base model"
    // (fullmatch: the key starts with "model.", so nothing matches).
    expect(() => plan({ r: 4, lora_alpha: 8, target_modules: 'layers\\.1\\..*proj' })).toThrow(/matches no projection/);
  });

  it('"all-linear" (any case) targets every projection of every layer', () => {
    // LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"): all 7 projections x 3 layers, scale 2
    const want = ALL([0, 1, 2], PROJ_NAMES, 2, 4, 2);
    expectRows(plan({ r: 2, lora_alpha: 4, target_modules: 'all-linear' }), want);
    expectRows(plan({ r: 2, lora_alpha: 4, target_modules: 'ALL-LINEAR' }), want);
  });

  it('layers_to_transform applies only to list targets', () => {
    // PEFT <= 0.13 ignored layers_to_transform for a regex target; PEFT 0.21 refuses the pair at
    // LoraConfig() ("`layers_to_transform` cannot be used when `target_modules` is a str.").
    // loraplex keeps the old reading: the regex alone decides.
    expectRows(plan({ r: 4, lora_alpha: 4, target_modules: '.*\\.q_proj', layers_to_transform: [0] }), ALL([0, 1, 2], ['q_proj'], 4, 4, 1));
    expectRows(plan({ r: 4, lora_alpha: 4, target_modules: ['q_proj'], layers_to_transform: [0] }), [[L(0, 'q_proj'), 4, 4, 1]]);
  });

  it('rank_pattern / alpha_pattern keys match as (.*\\.)?(key)$', () => {
    // LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj","k_proj","v_proj","up_proj","down_proj"],
    //   rank_pattern={"q_proj": 4, "layers.1.self_attn.k_proj": 2, "proj": 3, "model.layers.2.mlp.down_proj": 6},
    //   alpha_pattern={"k_proj": 5, r"layers\.[01]\.mlp\..*": 7})
    // ("proj" matches nothing: it must follow a dot or be the whole key.)
    expectRows(
      plan({
        r: 8, lora_alpha: 16, target_modules: ['q_proj', 'k_proj', 'v_proj', 'up_proj', 'down_proj'],
        rank_pattern: { q_proj: 4, 'layers.1.self_attn.k_proj': 2, proj: 3, 'model.layers.2.mlp.down_proj': 6 },
        alpha_pattern: { k_proj: 5, 'layers\\.[01]\\.mlp\\..*': 7 },
      }),
      [
        [L(0, 'q_proj'), 4, 16, 4], [L(0, 'k_proj'), 8, 5, 0.625], [L(0, 'v_proj'), 8, 16, 2], [L(0, 'up_proj'), 8, 7, 0.875], [L(0, 'down_proj'), 8, 7, 0.875],
        [L(1, 'q_proj'), 4, 16, 4], [L(1, 'k_proj'), 2, 5, 2.5], [L(1, 'v_proj'), 8, 16, 2], [L(1, 'up_proj'), 8, 7, 0.875], [L(1, 'down_proj'), 8, 7, 0.875],
        [L(2, 'q_proj'), 4, 16, 4], [L(2, 'k_proj'), 8, 5, 0.625], [L(2, 'v_proj'), 8, 16, 2], [L(2, 'up_proj'), 8, 16, 2], [L(2, 'down_proj'), 6, 16, 2.6666666666666665],
      ],
    );
    // LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj","v_proj"], rank_pattern={r".*_proj": 2, "q_proj": 4}):
    // the first matching key wins.
    expectRows(plan({ r: 8, lora_alpha: 8, target_modules: ['q_proj', 'v_proj'], rank_pattern: { '.*_proj': 2, q_proj: 4 } }), ALL([0, 1, 2], ['q_proj', 'v_proj'], 2, 8, 4));
  });

  it('use_rslora scales by alpha/sqrt(r) with the per-module rank; plain LoRA by alpha/r', () => {
    // LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj","gate_proj"], rank_pattern={"gate_proj": 4})
    expectRows(plan({ r: 16, lora_alpha: 8, use_rslora: true, target_modules: ['q_proj', 'gate_proj'], rank_pattern: { gate_proj: 4 } }), [
      [L(0, 'q_proj'), 16, 8, 2], [L(0, 'gate_proj'), 4, 8, 4],
      [L(1, 'q_proj'), 16, 8, 2], [L(1, 'gate_proj'), 4, 8, 4],
      [L(2, 'q_proj'), 16, 8, 2], [L(2, 'gate_proj'), 4, 8, 4],
    ]);
    // same without rsLoRA: 8/16 and 8/4
    expectRows(plan({ r: 16, lora_alpha: 8, target_modules: ['q_proj', 'gate_proj'], rank_pattern: { gate_proj: 4 } }), [
      [L(0, 'q_proj'), 16, 8, 0.5], [L(0, 'gate_proj'), 4, 8, 2],
      [L(1, 'q_proj'), 16, 8, 0.5], [L(1, 'gate_proj'), 4, 8, 2],
      [L(2, 'q_proj'), 16, 8, 0.5], [L(2, 'gate_proj'), 4, 8, 2],
    ]);
    // LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=r".*\.(v_proj|o_proj)",
    //   rank_pattern={"model.layers.0.self_attn.v_proj": 2}, alpha_pattern={"o_proj": 4})
    expectRows(
      plan({ r: 8, lora_alpha: 16, use_rslora: true, target_modules: '.*\\.(v_proj|o_proj)', rank_pattern: { 'model.layers.0.self_attn.v_proj': 2 }, alpha_pattern: { o_proj: 4 } }),
      [
        [L(0, 'v_proj'), 2, 16, 11.31370849898476], [L(0, 'o_proj'), 8, 4, 1.414213562373095],
        [L(1, 'v_proj'), 8, 16, 5.65685424949238], [L(1, 'o_proj'), 8, 4, 1.414213562373095],
        [L(2, 'v_proj'), 8, 16, 5.65685424949238], [L(2, 'o_proj'), 8, 4, 1.414213562373095],
      ],
    );
  });

  it('a module named exactly in the target list is taken whatever layers_to_transform says', () => {
    // LoraConfig(r=4, lora_alpha=8, target_modules=["model.layers.1.self_attn.q_proj", "v_proj"], layers_to_transform=[0])
    // PEFT's check_target_module_exists returns True for `key in target_modules` before it looks
    // at layers_to_transform, so layer 1's q_proj is adapted (and its tensors are in the file).
    expectRows(plan({ r: 4, lora_alpha: 8, target_modules: ['model.layers.1.self_attn.q_proj', 'v_proj'], layers_to_transform: [0] }), [
      [L(0, 'v_proj'), 4, 8, 2],
      [L(1, 'q_proj'), 4, 8, 2],
    ]);
  });

  it('exclude_modules (list or regex) removes modules from the targets', () => {
    // LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj","v_proj"], exclude_modules=["model.layers.1.self_attn.q_proj"])
    expectRows(plan({ r: 4, lora_alpha: 8, target_modules: ['q_proj', 'v_proj'], exclude_modules: ['model.layers.1.self_attn.q_proj'] }), [
      [L(0, 'q_proj'), 4, 8, 2], [L(0, 'v_proj'), 4, 8, 2], [L(1, 'v_proj'), 4, 8, 2], [L(2, 'q_proj'), 4, 8, 2], [L(2, 'v_proj'), 4, 8, 2],
    ]);
    // LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj","o_proj"], exclude_modules=r".*\.1\.self_attn\.k_proj")
    expectRows(plan({ r: 4, lora_alpha: 8, target_modules: ['k_proj', 'o_proj'], exclude_modules: '.*\\.1\\.self_attn\\.k_proj' }), [
      [L(0, 'k_proj'), 4, 8, 2], [L(0, 'o_proj'), 4, 8, 2], [L(1, 'o_proj'), 4, 8, 2], [L(2, 'k_proj'), 4, 8, 2], [L(2, 'o_proj'), 4, 8, 2],
    ]);
  });

  it('plan summary fields and rank limits', () => {
    const p = plan({ r: 8, lora_alpha: 16, target_modules: ['v_proj', 'q_proj'] });
    expect(p.rank).toBe(8);
    expect(p.alpha).toBe(16);
    expect(new Set(p.targetModules)).toEqual(new Set(['q_proj', 'v_proj']));
    // lora_alpha defaults to 8 (LoraConfig's default)
    expect(plan({ r: 4, target_modules: ['q_proj'] }).modules[0]).toMatchObject({ alpha: 8, scale: 2 });
    expect(() => plan({ r: 16, target_modules: ['q_proj'] }, 8)).toThrow(/rank 16 .*outside 1\.\.8/);
    expect(() => plan({ r: 4, target_modules: ['q_proj'], rank_pattern: { q_proj: 32 } }, 16)).toThrow(/rank 32 .*outside 1\.\.16/);
    expect(() => plan({ r: 0, target_modules: ['q_proj'] })).toThrow(/rank 0/);
    expect(() => plan({ r: 2.5, target_modules: ['q_proj'] })).toThrow(/r must be an integer/);
  });
});

describe('PEFT and transformers defaults', () => {
  it('takes r = 8 when absent, and ignores list targets this architecture does not have', () => {
    const p = planFromConfig({ peft_type: 'LORA', target_modules: ['q_proj', 'c_attn'] }, tiny, 64);
    expect(p.rank).toBe(8);
    expect(p.targetModules).toEqual(['q_proj']);
    expect(p.modules.every((m) => m.rank === 8 && m.proj === 0)).toBe(true);
    expect(() => planFromConfig({ peft_type: 'LORA', target_modules: ['c_attn'] }, tiny, 64)).toThrow(/matches no projection/);
  });

  it('uses MistralConfig\'s 4096 window when sliding_window is absent, none when null', () => {
    const mistral = { architectures: ['MistralForCausalLM'], model_type: 'mistral' };
    expect(read({ ...mistral, sliding_window: undefined }).spec.slidingWindow).toBe(4096);
    expect(read({ ...mistral, sliding_window: null }).spec.slidingWindow).toBe(0);
    expect(read({ ...mistral, sliding_window: 16 }).spec.slidingWindow).toBe(16);
  });

  it('takes the per-architecture max_position_embeddings default when absent', () => {
    expect(read({ max_position_embeddings: undefined }).maxPositionEmbeddings).toBe(2048);
    expect(read({ architectures: ['Qwen2ForCausalLM'], model_type: 'qwen2', max_position_embeddings: undefined }).maxPositionEmbeddings).toBe(32768);
  });
});
