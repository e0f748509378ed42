// Typed binding to the C++ addon (build/Release/loraplex_native.node).
// Every method that computes returns a Promise settled on the JS thread; the work runs on the
// engine's own C++ thread (model load, step, adapter install/remove) or a libuv worker (parse).
import { createRequire } from 'node:module';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { applyOpenMpWaitDefault } from '../engine/cpu-threads.js';

export interface NativeModelSpec {
  arch: 'llama' | 'mistral' | 'qwen2' | 'qwen3' | 'gemma2' | 'gemma3' | 'phi3';
  hiddenSize: number;
  intermediateSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  vocabSize: number;
  rmsNormEps: number;
  ropeTheta: number;
  ropeScaling: {
    type: 'none' | 'linear' | 'llama3' | 'longrope';
    factor: number;
    lowFreqFactor: number;
    highFreqFactor: number;
    originalMaxPositionEmbeddings: number;
    // longrope: per-frequency divisors [rotaryDim / 2] up to / past originalMaxPositionEmbeddings,
    // and the cos/sin scale
    shortFactor?: number[];
    longFactor?: number[];
    attentionFactor?: number;
  };
  tiedEmbeddings: boolean;
  attentionBias: boolean;
  slidingWindow: number; // the largest window of any layer (0 = none)
  // Family features (addon/model.h ModelSpec); absent = the Llama behaviour.
  layerWindows?: number[]; // [numLayers] attention window per layer, 0 = full
  layerLocalRope?: number[]; // [numLayers] 1 = the local RoPE base (Gemma 3 sliding layers)
  ropeLocalTheta?: number; // 0 = one RoPE for every layer
  rotaryDim?: number; // rotated dimensions per head (partial rotary); 0 = headDim
  qkNorm?: boolean; // per-head RMSNorm of q and k before RoPE
  normPlusOne?: boolean; // RMSNorm multiplies by (1 + w) (Gemma)
  sandwichNorm?: boolean; // post-attention, pre- and post-feedforward norms (Gemma)
  activation?: 'silu' | 'gelu_tanh';
  embedScale?: number; // embeddings times this (Gemma: sqrt(hidden), in fp32)
  attnScale?: number; // attention scores' scale; 0 = 1/sqrt(headDim)
  attnSoftcap?: number; // 0 = none
  finalSoftcap?: number; // 0 = none
  multimodalText?: boolean; // Gemma3ForConditionalGeneration: the language model only
  fusedQkv?: boolean; // Phi-3: qkv_proj holds q | k | v rows
  fusedGateUp?: boolean; // Phi-3: gate_up_proj holds gate | up rows
  files: string[];
}

export interface NativeLoadOptions {
  blockSize: number;
  poolBytes: number; // the pool's budget, cut into pages of the resolved KV dtype
  poolBytesExplicit?: boolean; // CUDA: poolBytes is --memory-budget; otherwise sized by gpuMemoryUtilization
  gpuMemoryUtilization?: number; // CUDA: fraction of the device's total memory (default 0.92)
  enforceEager?: boolean; // CUDA: no graphs
  maxBatchTokens?: number; // CUDA: activation buffers sized for this many tokens at load
  maxNumSeqs?: number; // CUDA: largest decode batch captured in a graph (at most 512)
  maxSlots: number;
  eosIds: Int32Array;
  threads?: number;
  device?: 'cpu' | 'cuda'; // default: cuda if built with it and a GPU is present, else cpu
  // Numeric options (CPU and CUDA); 'auto' (default) follows the weights: BF16 weights -> bfloat16, else float32.
  loraDtype?: DtypeOption; // adapter rows in the pool
  computeDtype?: DtypeOption; // activations of BF16-weight matmuls
  kvCacheDtype?: DtypeOption; // KV cache elements
}

export type DtypeOption = 'auto' | 'float32' | 'bfloat16';

/** float32: exact attention inputs; bfloat16: K and V rounded to BF16 in the pool (CPU only). */
export type KvCacheDtype = 'float32' | 'bfloat16';

/** float32: every matmul in fp32 (exact against HF in fp32); bfloat16: BF16-weight matmuls take
 *  BF16-rounded activations on the AVX512-BF16 dot-product instruction (CPU only). */
export type ComputeDtype = 'float32' | 'bfloat16';

/** float32: rows as PEFT stores them (HF parity); bfloat16: half the bytes per adapter, CPU only. */
export type LoraDtype = 'float32' | 'bfloat16';

export interface NativePoolInfo {
  pageBytes: number;
  numPages: number;
  blockSize: number;
  backend: string;
  threads: number;
  loraDtype: LoraDtype;
  computeDtype: ComputeDtype;
  kvCacheDtype: KvCacheDtype;
}

/** One engine step as flat typed arrays; see addon/backend.h StepBatch for shapes. */
export interface NativeStepBatch {
  tokens: Int32Array; // [T]
  positions: Int32Array; // [T]
  tokenSlots: Int32Array; // [T]
  queryStart: Int32Array; // [S+1]
  contextLens: Int32Array; // [S]
  blockTables: Int32Array; // [S * maxBlocks]
  maxBlocks: number;
  seqIds: Uint32Array; // [S]
  sampleSeqs: Int32Array; // [N] indices into the S sequences
  temperature: Float32Array; // [N]
  topP: Float32Array;
  minP: Float32Array;
  repetitionPenalty: Float32Array;
  presencePenalty: Float32Array;
  frequencyPenalty: Float32Array;
  topK: Int32Array;
  numLogprobs: Int32Array;
  suppressEos: Uint8Array;
  newSeqIds: Uint32Array; // [K] sequences to register with the sampler this step
  logitBiasStart: Int32Array; // [N+1] sample j's logit_bias pairs: [start[j], start[j+1])
  logitBiasIds: Int32Array; // token ids
  logitBiasValues: Float32Array; // biases in [-100, 100], added to the logits before processing
  newSeeds: BigInt64Array; // [K] int64 seeds (newHasSeed 0: unseeded, the value is ignored)
  newHasSeed: Uint8Array; // [K]
  newPromptStart: Int32Array; // [K+1]
  newPromptTokens: Int32Array;
  freeSeqIds: Uint32Array; // sampler states to drop
  /** Grammar bitmasks: sample j uses row maskRows[j] of masks (-1: unconstrained). */
  maskRows?: Int32Array; // [N]
  maskWords?: number; // ceil(vocab / 32)
  masks?: Int32Array; // [rows * maskWords], bit t set = token t allowed
  /** The masks follow through provideMasks() while the forward runs (grammar worker overlap). */
  masksDeferred?: boolean;
  /** Prompt logprobs: token indices (in [0, T)) whose logits are scored against the next prompt token. */
  promptLpRows?: Int32Array; // [R]
  ropeLong?: Uint8Array; // [S] LongRoPE models: 1 = this sequence rotates with the long factors
  promptLpTargets?: Int32Array; // [R] the token each row should have predicted
  promptLpTop?: Int32Array; // [R] top-N alternatives to report (0..20)
}

export interface NativeStepResult {
  tokens: Int32Array; // [N]; -1: non-finite logits; -2: not sampled (a deferred mask came late)
  logprobs: Float32Array; // [N]
  topIds: Int32Array; // [N * numTop]
  topLogprobs: Float32Array; // [N * numTop]
  numTop: number;
  promptLogprobs: Float32Array; // [R] logprob of each promptLpTargets entry
  promptRanks: Int32Array; // [R] its 1-based rank
  promptTopIds: Int32Array; // [R * promptNumTop]
  promptTopLogprobs: Float32Array; // [R * promptNumTop]
  promptNumTop: number;
  forwardMs: number;
  sampleMs: number;
}

/** A parsed adapter: host memory holding its pool pages' image (the host tier). */
export interface NativeAdapter {
  handle: unknown;
  /** Host bytes held (pages x page size). */
  bytes: number;
  maxRank: number;
  numModules: number;
  /** Pool pages it takes. */
  pages: number;
  /** Bytes of its rows (A and B^T; a fused target's shared A once), without page padding. */
  rowBytes: number;
  /** Time the worker thread spent reading, checking and converting it. */
  parseMs: number;
  /** Identity of the safetensors file read: "dev:ino:size:mtime_ns:ctime_ns". */
  file: string;
}

export interface NativeLoraPlan {
  layers: Int32Array;
  projs: Int32Array;
  ranks: Int32Array;
  scales: Float32Array;
}

/**
 * One phase of the native model load (addon/load_progress.h): read (open and validate the
 * safetensors files), pool (commit the unified pool), pack (CPU: weights into the GEMM layout,
 * where their pages are first read from disk), upload (CUDA: weights to device memory).
 */
export interface NativeLoadPhase {
  phase: 'read' | 'pool' | 'pack' | 'upload';
  done: number; // bytes
  total: number; // bytes
  ms: number; // in this phase so far
  finished: boolean;
}

export interface NativeEngine {
  load(spec: NativeModelSpec, options: NativeLoadOptions): Promise<NativePoolInfo>;
  /** The current (or last) load's phases so far; synchronous, for polling while load() runs. */
  loadProgress(): NativeLoadPhase[];
  step(batch: NativeStepBatch): Promise<NativeStepResult>;
  /**
   * The grammar masks of the step in flight when it carries masksDeferred (rows as maskRows
   * numbers them), and the sample indices it must not sample (token -2: their masks are late).
   */
  provideMasks(masks: Int32Array, skip: Int32Array): void;
  parseAdapter(path: string, plan: NativeLoraPlan, maxRank: number): Promise<NativeAdapter>;
  adapterPages(adapter: NativeAdapter): number;
  /** Drops the host copy now (an install already queued keeps its own reference). */
  freeAdapter(adapter: NativeAdapter): void;
  /** Host memory in adapter images, and freed images kept for the next load. */
  adapterImageStats(): { liveBytes: number; cachedBytes: number };
  installAdapter(slot: number, adapter: NativeAdapter, pages: Int32Array): Promise<void>;
  removeAdapter(slot: number): Promise<void>;
  close(): Promise<void>;
}

interface NativeModule {
  Engine: new () => NativeEngine;
}

let cached: NativeModule | undefined;

function findAddon(): string {
  // Works from server/native (tsx, vitest) and dist/server/native (compiled).
  let dir = dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 5; i++) {
    const p = join(dir, 'build', 'Release', 'loraplex_native.node');
    if (existsSync(p)) return p;
    dir = dirname(dir);
  }
  throw new Error('native addon not built: run `npm run build` (cmake-js) first');
}

export function loadNative(): NativeModule {
  if (!cached) {
    // libgomp reads its environment once, when the addon loads it: set the wait policy first.
    applyOpenMpWaitDefault();
    cached = createRequire(import.meta.url)(findAddon()) as NativeModule;
  }
  return cached;
}
