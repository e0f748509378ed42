// Constructs (does not train) the demo model: a tiny Llama whose output reads like the demo
// corpus, plus LoRA adapters that pull it towards a style. Everything is computed from the corpus
// and a fixed seed, so the result is the same bytes on every machine.
//
// How the base model works:
//   - hidden_size > vocab_size; token t embeds as EMBED_SCALE * e_t (one-hot, dims [0, V)).
//   - Both layers hold small random weights (std 1e-3): the attention and MLP paths run, but
//     they barely move the residual stream, which stays ~EMBED_SCALE * e_t.
//   - The final RMSNorm turns that into g * e_t (g ~ sqrt(H)); lm_head[u][t] is
//     LOGIT_SCALE * log P(u | t) / g (minus a per-column constant, which softmax ignores), so the
//     logits are the corpus's bigram log-probabilities, sharpened a little so that sampling at
//     temperature 1 stays on likely words. Greedy decoding follows the likeliest bigram chain.
// How an adapter works (style k, rank-4 LoRA on the last layer's gate/up/down projections):
//   - Spare dims [V, V + styles) of the residual are "style" dims; lm_head[u][V + k] is a clipped
//     log-ratio of style k's unigram frequency of u against the whole corpus's.
//   - The last layer reserves 4 intermediate units per style whose base gate/up rows and down
//     column are zero. The adapter's gate/up LoRA reads a constant feature (the sum of the
//     one-hot dims, ~g for every token) and drives its 4 units to a fixed activation; its down
//     LoRA reads those units and writes +STYLE_PUSH into style dim k. After the final norm that
//     adds STYLE_WEIGHT * (the style's log-ratios) to every position's logits.
import { Tokenizer } from '@huggingface/tokenizers';
import { buildTokenizerConfig, tokenizerVocabSize, trainBpe, type TokenizerJson } from '../util/bpe-trainer.js';
import type { TensorSpec } from '../util/safetensors-writer.js';
import { BASE_CORPUS, STYLE_CORPORA } from './corpus.js';
import { SeededRandom } from './seeded-random.js';

export const SPECIAL_TOKENS = {
  bos: '<|begin_of_text|>',
  eos: '<|end_of_text|>',
  startHeader: '<|start_header_id|>',
  endHeader: '<|end_header_id|>',
  eot: '<|eot_id|>',
} as const;

/** Llama-3-style chat template; it emits BOS itself, so encode its output without special tokens. */
export const CHAT_TEMPLATE =
  "{{- bos_token }}{%- for message in messages %}" +
  "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}" +
  "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}";

const SEED = 20240601;
const BPE_VOCAB = 600; // cap; the corpus runs out of pairs seen twice at ~570 (+ 5 special tokens)
const NUM_LAYERS = 2;
const NUM_HEADS = 4;
const NUM_KV_HEADS = 2;
const RMS_EPS = 1e-5;
const NOISE_STD = 1e-3; // random layer weights: exercised, but ~1e-3 of the residual
const LORA_RANK = 4;
const LORA_ALPHA = 8;
const UNITS_PER_STYLE = LORA_RANK; // one reserved intermediate unit per LoRA rank row
const GATE_ACT = 6; // pre-activation the adapter writes into its gate / up units
const LOGIT_SCALE = 1.5; // base logits = 1.5 * log P(u | t): sampling at T=1 stays on likely words
const EMBED_SCALE = 4; // one-hot height: the layers' random outputs are ~1e-3 / EMBED_SCALE of it
const STYLE_PUSH = 0.5 * EMBED_SCALE; // residual value the adapter writes into its style dim
const STYLE_WEIGHT = 5; // multiplies the style log-ratios in lm_head
const STYLE_IN_BASE = 0.5; // weight of the style paragraphs in the base model's counts
const STYLE_CLIP = 4; // |log-ratio| cap, so unseen words are discouraged, not forbidden
const TIE_STEP = 0.03; // minimum log-prob gap between a row's top TIE_RANKS candidates
const TIE_RANKS = 8;
const BIGRAM_SMOOTHING = 0.1; // Dirichlet prior weight towards the unigram distribution
const UNIGRAM_SMOOTHING = 0.05; // add-k for the unigram distribution itself
const STYLE_SMOOTHING = 1; // Dirichlet prior weight of a style's unigram towards the corpus's

export interface DemoAdapter {
  name: string;
  config: Record<string, unknown>;
  tensors: TensorSpec[];
}

export interface DemoModel {
  config: Record<string, unknown>;
  generationConfig: Record<string, unknown>;
  tokenizer: TokenizerJson;
  tokenizerConfig: Record<string, unknown>;
  tensors: TensorSpec[];
  adapters: DemoAdapter[];
}

interface Dims {
  vocab: number; // V: token ids, also the one-hot dims [0, V)
  hidden: number; // H
  intermediate: number; // I
  headDim: number;
  styleDim: (k: number) => number; // residual dim of style k
  styleUnits: (k: number) => number[]; // last layer's reserved intermediate units of style k
  normGain: number; // RMSNorm(EMBED_SCALE * e_t)[t], ~sqrt(H)
}

export function buildDemoModel(): DemoModel {
  const allParagraphs = [...BASE_CORPUS, ...STYLE_CORPORA.flatMap((s) => s.text)];
  const specials = Object.values(SPECIAL_TOKENS);
  const tokenizer = trainBpe(allParagraphs, { vocabSize: BPE_VOCAB, specialTokens: specials, bosToken: SPECIAL_TOKENS.bos });
  const tokenizerConfig = buildTokenizerConfig(tokenizer, {
    bosToken: SPECIAL_TOKENS.bos,
    eosToken: SPECIAL_TOKENS.eot,
    chatTemplate: CHAT_TEMPLATE,
    modelMaxLength: 2048,
  });
  const V = tokenizerVocabSize(tokenizer);
  const H = Math.ceil((V + STYLE_CORPORA.length + 1) / 64) * 64;
  const I = 2 * H;
  const dims: Dims = {
    vocab: V,
    hidden: H,
    intermediate: I,
    headDim: H / NUM_HEADS,
    styleDim: (k) => V + k,
    styleUnits: (k) => Array.from({ length: UNITS_PER_STYLE }, (_, j) => I - 1 - k * UNITS_PER_STYLE - j),
    normGain: EMBED_SCALE / Math.sqrt((EMBED_SCALE * EMBED_SCALE) / H + RMS_EPS),
  };

  const idOf = (token: string): number => {
    const t = tokenizer.added_tokens.find((a) => a.content === token);
    if (!t) throw new Error(`missing special token ${token}`);
    return t.id;
  };
  const ids = {
    bos: idOf(SPECIAL_TOKENS.bos),
    eos: idOf(SPECIAL_TOKENS.eos),
    startHeader: idOf(SPECIAL_TOKENS.startHeader),
    endHeader: idOf(SPECIAL_TOKENS.endHeader),
    eot: idOf(SPECIAL_TOKENS.eot),
  };

  const encoder = new Tokenizer(tokenizer, tokenizerConfig);
  const encode = (text: string): number[] => encoder.encode(text, { add_special_tokens: false }).ids;
  // The token sequences the bigram table is counted over: each paragraph as a document, and as
  // the answer of a chat turn, so the model also follows the chat template's special tokens. The
  // role names are left out of the chat sequence: their pieces ('as', 's', 'ist', ...) would
  // otherwise teach the model to follow ordinary text with <|end_header_id|>.
  const newline = encode('\n');
  const sequencesOf = (paragraph: string): number[][] => [
    [ids.bos, ...encode(paragraph), ids.eos],
    [ids.bos, ids.startHeader],
    [ids.endHeader, ...newline, ...encode(paragraph), ids.eot, ids.startHeader],
  ];
  const weighted = (paragraphs: string[], weight: number): Counted[] =>
    paragraphs.flatMap(sequencesOf).map((tokens) => ({ tokens, weight }));
  const baseSequences = [
    ...weighted(BASE_CORPUS, 1),
    ...STYLE_CORPORA.flatMap((s) => weighted(s.text, STYLE_IN_BASE)),
  ];
  const logBigram = bigramLogProbs(baseSequences, V);
  const corpusUnigram = unigramCounts(baseSequences, V);
  const styleRatios = STYLE_CORPORA.map((s) => styleLogRatios(unigramCounts(weighted(s.text, 1), V), corpusUnigram));

  const config = {
    architectures: ['LlamaForCausalLM'],
    attention_bias: false,
    attention_dropout: 0.0,
    bos_token_id: ids.bos,
    eos_token_id: [ids.eos, ids.eot],
    head_dim: dims.headDim,
    hidden_act: 'silu',
    hidden_size: H,
    initializer_range: 0.02,
    intermediate_size: I,
    max_position_embeddings: 2048,
    mlp_bias: false,
    model_type: 'llama',
    num_attention_heads: NUM_HEADS,
    num_hidden_layers: NUM_LAYERS,
    num_key_value_heads: NUM_KV_HEADS,
    pretraining_tp: 1,
    rms_norm_eps: RMS_EPS,
    rope_scaling: null,
    rope_theta: 10000.0,
    tie_word_embeddings: false,
    torch_dtype: 'float32',
    use_cache: true,
    vocab_size: V,
  };
  const generationConfig = { bos_token_id: ids.bos, eos_token_id: [ids.eos, ids.eot], do_sample: false };

  return {
    config,
    generationConfig,
    tokenizer,
    tokenizerConfig,
    tensors: baseTensors(dims, logBigram, styleRatios),
    adapters: STYLE_CORPORA.map((s, k) => buildAdapter(s.name, k, dims)),
  };
}

/** A token sequence and how much it counts. */
interface Counted {
  tokens: number[];
  weight: number;
}

/** log P(u | t), [V * V] row-major by t, smoothed towards the (add-k) unigram distribution. */
function bigramLogProbs(sequences: Counted[], V: number): Float64Array {
  const pair = new Float64Array(V * V);
  const from = new Float64Array(V);
  for (const { tokens: seq, weight } of sequences) {
    for (let i = 0; i + 1 < seq.length; i++) {
      pair[seq[i]! * V + seq[i + 1]!]! += weight;
      from[seq[i]!]! += weight;
    }
  }
  const uni = unigramCounts(sequences, V);
  let total = 0;
  for (const c of uni) total += c;
  const out = new Float64Array(V * V);
  const order = new SeededRandom(SEED, 'bigram.tie-break');
  for (let t = 0; t < V; t++) {
    const row = new Float64Array(V);
    for (let u = 0; u < V; u++) {
      const prior = (uni[u]! + UNIGRAM_SMOOTHING) / (total + UNIGRAM_SMOOTHING * V);
      row[u] = Math.log((pair[t * V + u]! + BIGRAM_SMOOTHING * prior) / (from[t]! + BIGRAM_SMOOTHING));
    }
    // Greedy decoding must not hinge on a near-tie that float rounding could flip between
    // implementations: rank the candidates (equal counts in a seeded random order) and widen
    // every gap among the top TIE_RANKS by TIE_STEP. Monotone, so the ranking is unchanged.
    const tieKey = Array.from({ length: V }, () => order.uniform());
    const ranked = Array.from({ length: V }, (_, u) => u).sort((a, b) => row[b]! - row[a]! || tieKey[a]! - tieKey[b]!);
    ranked.forEach((u, rank) => {
      out[t * V + u] = row[u]! - TIE_STEP * Math.min(rank, TIE_RANKS);
    });
  }
  return out;
}

function unigramCounts(sequences: Counted[], V: number): Float64Array {
  const counts = new Float64Array(V);
  for (const { tokens, weight } of sequences) for (const t of tokens) counts[t]! += weight;
  return counts;
}

/** clip(log(P_style(u) / P_corpus(u))), the style's unigram smoothed towards the corpus's. */
function styleLogRatios(style: Float64Array, corpus: Float64Array): Float64Array {
  const V = corpus.length;
  let nStyle = 0;
  let nCorpus = 0;
  for (let u = 0; u < V; u++) {
    nStyle += style[u]!;
    nCorpus += corpus[u]!;
  }
  const out = new Float64Array(V);
  for (let u = 0; u < V; u++) {
    const pCorpus = (corpus[u]! + UNIGRAM_SMOOTHING) / (nCorpus + UNIGRAM_SMOOTHING * V);
    const pStyle = (style[u]! + STYLE_SMOOTHING * pCorpus) / (nStyle + STYLE_SMOOTHING);
    out[u] = Math.max(-STYLE_CLIP, Math.min(STYLE_CLIP, Math.log(pStyle / pCorpus)));
  }
  return out;
}

function baseTensors(d: Dims, logBigram: Float64Array, styleRatios: Float64Array[]): TensorSpec[] {
  const { vocab: V, hidden: H, intermediate: I, headDim } = d;
  const kvDim = NUM_KV_HEADS * headDim;
  const f32 = (name: string, shape: number[], data: () => Float32Array): TensorSpec => ({ name, dtype: 'F32', shape, data });
  const ones = (n: number) => () => new Float32Array(n).fill(1);
  const noise = (name: string, n: number) => () => new SeededRandom(SEED, name).normalArray(n, NOISE_STD);

  const tensors: TensorSpec[] = [];
  tensors.push(
    f32('model.embed_tokens.weight', [V, H], () => {
      const e = new Float32Array(V * H); // [V, H]
      for (let t = 0; t < V; t++) e[t * H + t] = EMBED_SCALE;
      return e;
    }),
  );
  const reserved = styleRatios.flatMap((_, k) => d.styleUnits(k));
  for (let l = 0; l < NUM_LAYERS; l++) {
    const p = `model.layers.${l}`;
    const last = l === NUM_LAYERS - 1;
    tensors.push(
      f32(`${p}.input_layernorm.weight`, [H], ones(H)),
      f32(`${p}.self_attn.q_proj.weight`, [H, H], noise(`${p}.self_attn.q_proj.weight`, H * H)),
      f32(`${p}.self_attn.k_proj.weight`, [kvDim, H], noise(`${p}.self_attn.k_proj.weight`, kvDim * H)),
      f32(`${p}.self_attn.v_proj.weight`, [kvDim, H], noise(`${p}.self_attn.v_proj.weight`, kvDim * H)),
      f32(`${p}.self_attn.o_proj.weight`, [H, H], noise(`${p}.self_attn.o_proj.weight`, H * H)),
      f32(`${p}.post_attention_layernorm.weight`, [H], ones(H)),
      // The adapters' units stay silent in the base model: zero gate/up rows, zero down column.
      f32(`${p}.mlp.gate_proj.weight`, [I, H], () => zeroRows(noise(`${p}.mlp.gate_proj.weight`, I * H)(), H, last ? reserved : [])),
      f32(`${p}.mlp.up_proj.weight`, [I, H], () => zeroRows(noise(`${p}.mlp.up_proj.weight`, I * H)(), H, last ? reserved : [])),
      f32(`${p}.mlp.down_proj.weight`, [H, I], () => zeroColumns(noise(`${p}.mlp.down_proj.weight`, H * I)(), I, last ? reserved : [])),
    );
  }
  tensors.push(f32('model.norm.weight', [H], ones(H)));
  tensors.push(
    f32('lm_head.weight', [V, H], () => {
      // Column t holds log P(. | t) minus its mean: softmax ignores the shift, and the small
      // entries keep the layers' noise (which reaches every column) from moving the logits.
      const colMean = new Float64Array(V);
      for (let t = 0; t < V; t++) {
        for (let u = 0; u < V; u++) colMean[t]! += logBigram[t * V + u]! / V;
      }
      const w = new Float32Array(V * H); // [V, H]
      for (let u = 0; u < V; u++) {
        for (let t = 0; t < V; t++) w[u * H + t] = (LOGIT_SCALE * (logBigram[t * V + u]! - colMean[t]!)) / d.normGain;
        styleRatios.forEach((ratio, k) => {
          w[u * H + d.styleDim(k)] = (STYLE_WEIGHT * ratio[u]!) / d.normGain;
        });
      }
      return w;
    }),
  );
  return tensors;
}

function zeroRows(w: Float32Array, cols: number, rows: number[]): Float32Array {
  for (const r of rows) w.fill(0, r * cols, (r + 1) * cols);
  return w;
}

function zeroColumns(w: Float32Array, cols: number, columns: number[]): Float32Array {
  const rows = w.length / cols;
  for (let r = 0; r < rows; r++) for (const c of columns) w[r * cols + c] = 0;
  return w;
}

function silu(x: number): number {
  return x / (1 + Math.exp(-x));
}

function buildAdapter(name: string, k: number, d: Dims): DemoAdapter {
  const { vocab: V, hidden: H, intermediate: I } = d;
  const r = LORA_RANK;
  const scale = LORA_ALPHA / LORA_RANK;
  const units = d.styleUnits(k);
  const unitAct = silu(GATE_ACT) * GATE_ACT; // silu(gate) * up on a driven unit
  const tensors: TensorSpec[] = [];
  const lora = (layer: number, module: string, ab: 'A' | 'B', shape: number[], data: () => Float32Array): TensorSpec => ({
    name: `base_model.model.model.layers.${layer}.mlp.${module}.lora_${ab}.weight`,
    dtype: 'F32',
    shape,
    data,
  });

  for (let l = 0; l < NUM_LAYERS; l++) {
    const rng = (what: string) => new SeededRandom(SEED, `${name}.${l}.${what}`);
    if (l < NUM_LAYERS - 1) {
      // Earlier layers: small random LoRA, so every layer's adapter path runs but changes little.
      tensors.push(
        lora(l, 'down_proj', 'A', [r, I], () => rng('down.A').normalArray(r * I, NOISE_STD)),
        lora(l, 'down_proj', 'B', [H, r], () => rng('down.B').normalArray(H * r, NOISE_STD)),
        lora(l, 'gate_proj', 'A', [r, H], () => rng('gate.A').normalArray(r * H, NOISE_STD)),
        lora(l, 'gate_proj', 'B', [I, r], () => rng('gate.B').normalArray(I * r, NOISE_STD)),
        lora(l, 'up_proj', 'A', [r, H], () => rng('up.A').normalArray(r * H, NOISE_STD)),
        lora(l, 'up_proj', 'B', [I, r], () => rng('up.B').normalArray(I * r, NOISE_STD)),
      );
      continue;
    }
    // Row j of A reads the constant feature: ~1/g on each one-hot dim, jittered by 10% so the
    // four rows differ (a genuine rank-4 update) while each still reads ~1 for every token.
    const constantReader = (what: string) => () => {
      const g = rng(what);
      const a = new Float32Array(r * H); // [r, H]
      for (let j = 0; j < r; j++) for (let t = 0; t < V; t++) a[j * H + t] = (1 + 0.1 * g.normal()) / d.normGain;
      return a;
    };
    // B column j drives unit j of this style to GATE_ACT (after the alpha / r scale).
    const unitWriter = () => {
      const b = new Float32Array(I * r); // [I, r]
      units.forEach((unit, j) => (b[unit * r + j] = GATE_ACT / scale));
      return b;
    };
    tensors.push(
      lora(l, 'down_proj', 'A', [r, I], () => {
        const a = new Float32Array(r * I); // [r, I]: row j reads unit j, normalised to ~1
        units.forEach((unit, j) => (a[j * I + unit] = 1 / unitAct));
        return a;
      }),
      lora(l, 'down_proj', 'B', [H, r], () => {
        const b = new Float32Array(H * r); // [H, r]: every row adds its share to the style dim
        for (let j = 0; j < r; j++) b[d.styleDim(k) * r + j] = STYLE_PUSH / (r * scale);
        return b;
      }),
      lora(l, 'gate_proj', 'A', [r, H], constantReader('gate.A')),
      lora(l, 'gate_proj', 'B', [I, r], unitWriter),
      lora(l, 'up_proj', 'A', [r, H], constantReader('up.A')),
      lora(l, 'up_proj', 'B', [I, r], unitWriter),
    );
  }

  const config = {
    alpha_pattern: {},
    auto_mapping: null,
    base_model_name_or_path: 'loraplex/demo-v1',
    bias: 'none',
    fan_in_fan_out: false,
    inference_mode: true,
    init_lora_weights: true,
    layer_replication: null,
    layers_pattern: null,
    layers_to_transform: null,
    loftq_config: {},
    lora_alpha: LORA_ALPHA,
    lora_dropout: 0.0,
    megatron_config: null,
    megatron_core: 'megatron.core',
    modules_to_save: null,
    peft_type: 'LORA',
    r: LORA_RANK,
    rank_pattern: {},
    revision: null,
    target_modules: ['down_proj', 'gate_proj', 'up_proj'],
    task_type: 'CAUSAL_LM',
    use_dora: false,
    use_rslora: false,
  };
  return { name, config, tensors };
}
