// The engine: owns the native engine, the paging manager, the scheduler and the adapter cache, and
// runs the loop `schedule -> step -> postprocess` while there is work.
import { statSync } from 'node:fs';
import { totalmem } from 'node:os';
import { join } from 'node:path';
import { loadNative, type ComputeDtype, type DtypeOption, type KvCacheDtype, type LoraDtype, type NativeEngine, type NativeLoadPhase, type NativeLoraPlan, type NativePoolInfo, type NativeStepBatch, type NativeStepResult } from '../native/addon.js';
import { AdapterCache, type AdapterCacheStats } from './adapter-cache.js';
import { defaultThreadCount } from './cpu-threads.js';
import { LoraplexError } from './errors.js';
import { GrammarService, grammarVocab } from './grammar.js';
import { readModelDir, type ModelInfo } from './model-config.js';
import { PagingManager, type PoolStats } from './paging-manager.js';
import { PrefixCache, type PrefixCacheStats } from './prefix-cache.js';
import { makeSamplingParams, type SamplingParams } from './sampling-params.js';
import { Scheduler, type ScheduledSeq } from './scheduler.js';
import { Sequence, SeqState, type SeqOutput, type TokenEvent } from './sequence.js';
import { TextTokenizer } from './tokenizer.js';

export interface EngineOptions {
  model: string;
  servedModelName?: string;
  adapterDir?: string;
  memoryBudget?: number; // bytes of the unified pool
  /** CUDA: fraction of the GPU's memory to use when memoryBudget is not given (default 0.92). */
  gpuMemoryUtilization?: number;
  /** CUDA: no CUDA graphs, every step launched kernel by kernel. */
  enforceEager?: boolean;
  blockSize?: number;
  maxNumSeqs?: number;
  maxBatchTokens?: number;
  maxLoraRank?: number;
  maxLoras?: number; // adapter slots resident at once
  maxLorasPerBatch?: number; // distinct adapters running at once (0 = no cap)
  maxCpuLoras?: number; // host tier bound in adapters (default: the byte bound alone)
  maxCpuLoraBytes?: number; // host tier bound in bytes (default 1 GiB)
  loraSkipAheadMs?: number; // longest a request waiting for its adapter may be passed over (default 1000)
  maxModelLen?: number;
  threads?: number;
  device?: 'cpu' | 'cuda';
  /** Numeric options, CPU and CUDA (default 'auto': bfloat16 for BF16 weights, else float32). */
  loraDtype?: DtypeOption;
  computeDtype?: DtypeOption;
  kvCacheDtype?: DtypeOption;
  /** Automatic prefix caching (default on, as vLLM's --enable-prefix-caching). */
  enablePrefixCaching?: boolean;
  /** Longest a step waits for grammar masks still being computed (default 100 ms; tests use 0). */
  maskWaitMs?: number;
  /**
   * Load progress: called with every phase so far (config first, then the native phases) about
   * ten times a second while the model loads, and once more when the load ends (ok or not).
   */
  onLoadProgress?: (phases: readonly LoadPhase[]) => void;
}

/** A phase of Engine.create: `config` (config.json, tokenizer) or a native one (NativeLoadPhase). */
export interface LoadPhase {
  phase: 'config' | NativeLoadPhase['phase'];
  done: number; // bytes
  total: number; // bytes
  ms: number;
  finished: boolean;
}

/** Bytes of the small files read before the weights (config, tokenizer, chat template). */
function configBytes(dir: string): number {
  let n = 0;
  for (const f of ['config.json', 'generation_config.json', 'tokenizer.json', 'tokenizer_config.json']) {
    try {
      n += statSync(join(dir, f)).size;
    } catch {
      // optional file
    }
  }
  return n;
}

export interface EngineStats extends PoolStats {
  waiting: number;
  running: number;
  /** Waiting and running sequences per adapter id (the base model is not listed). */
  perAdapter: Record<string, { waiting: number; running: number }>;
  preemptions: number;
  steps: number;
  adapters: AdapterCacheStats;
  prefixCache: PrefixCacheStats;
}

export interface GenerateOptions {
  adapter?: string | null;
  /** Requests share prefix-cache blocks only with requests of the same salt. */
  cacheSalt?: string | null;
  signal?: AbortSignal;
}

const MiB = 1024 * 1024;
/** Longest a step waits for grammar masks before sampling without the late sequences. */
const MASK_WAIT_MS = 100;

/** Which sequence and prompt position a prompt-logprob row of a step belongs to. */
interface PromptLpOwner {
  seq: Sequence;
  pos: number;
}

/** Default pool size: room for maxNumSeqs sequences of 512 tokens, at least 64 MiB, at most 1/4 of RAM. */
export function defaultMemoryBudget(pageBytes: number, blockSize: number, maxNumSeqs: number): number {
  const want = pageBytes * Math.ceil((maxNumSeqs * 512) / blockSize);
  return Math.min(Math.max(want, 64 * MiB), Math.floor(totalmem() / 4));
}

export class Engine {
  readonly model: ModelInfo;
  readonly tokenizer: TextTokenizer;
  readonly paging: PagingManager;
  readonly scheduler: Scheduler;
  readonly adapters: AdapterCache;
  readonly prefix: PrefixCache;
  readonly maxModelLen: number;
  readonly backend: string;
  /** Adapter rows in the pool (--lora-dtype). */
  readonly loraDtype: LoraDtype;
  /** Activations: of BF16-weight matmuls (CPU), between all kernels (CUDA) (--compute-dtype). */
  readonly computeDtype: ComputeDtype;
  /** KV cache elements (--kv-cache-dtype). */
  readonly kvCacheDtype: KvCacheDtype;
  private readonly native: NativeEngine;
  private nextSeqId = 1;
  private loop: Promise<void> | null = null;
  private freeSeqIds: number[] = [];
  /** Waiting requests whose adapters load ahead of admission (2 x max-num-seqs). */
  private readonly prefetchWindow: number;
  private steps = 0;
  private lastProgress = performance.now();
  private closed = false;
  /**
   * LORAPLEX_CHECK_INVARIANTS=1 (the test suite sets it): the pool's invariants are checked after
   * every step and when the engine goes idle, and a violation fails loudly.
   */
  private readonly checking = process.env.LORAPLEX_CHECK_INVARIANTS === '1';
  private readonly maskWaitMs: number;
  /** Structured outputs: XGrammar's workers, started on first use (grammars getter). */
  private grammarService: GrammarService | null = null;
  /** The grammar masks being computed for the next step, if any. */
  private masksInFlight: Promise<void> | null = null;
  /**
   * Grammar masks: steps whose masks followed their forward (waits), the time from the step's
   * start until they were handed over (waitMs), the part the forward did not hide (exposedMs),
   * masks computed, and rows left unsampled because their mask was late (lateRows).
   */
  readonly maskStats = { waits: 0, waitMs: 0, exposedMs: 0, masks: 0, lateRows: 0 };
  /** Called after every step (tests check pool invariants here; benchmarks read lastStep). */
  onStep: (() => void) | null = null;
  /** Timings of the most recent step: host side = wall - forward - sample. */
  lastStep = { tokens: 0, seqs: 0, forwardMs: 0, sampleMs: 0, wallMs: 0 };

  private constructor(model: ModelInfo, tokenizer: TextTokenizer, native: NativeEngine, pool: NativePoolInfo, opts: EngineOptions) {
    this.model = model;
    this.tokenizer = tokenizer;
    this.native = native;
    this.backend = pool.backend;
    this.loraDtype = pool.loraDtype;
    this.computeDtype = pool.computeDtype;
    this.kvCacheDtype = pool.kvCacheDtype;
    this.maxModelLen = Math.min(opts.maxModelLen ?? model.maxPositionEmbeddings, model.maxPositionEmbeddings);
    this.maskWaitMs = opts.maskWaitMs ?? MASK_WAIT_MS;
    this.paging = new PagingManager(pool.numPages, pool.pageBytes, pool.blockSize);
    this.adapters = new AdapterCache(native, this.paging, model, {
      adapterDir: opts.adapterDir ?? null,
      maxLoraRank: opts.maxLoraRank ?? 64,
      maxSlots: opts.maxLoras ?? 32,
      maxCpuLoras: opts.maxCpuLoras,
      hostCacheBytes: opts.maxCpuLoraBytes,
    });
    this.prefetchWindow = 2 * (opts.maxNumSeqs ?? 64);
    // Everything that changes a KV block's bytes besides its tokens and adapter.
    const kvIdentity = [model.name, model.spec.numLayers, model.spec.numKvHeads, model.spec.headDim, pool.kvCacheDtype, pool.computeDtype, pool.loraDtype, pool.blockSize, pool.backend].join('|');
    this.prefix = new PrefixCache(this.paging, kvIdentity, opts.enablePrefixCaching ?? true);
    this.adapters.reclaim = (pages, keep) => this.reclaimPool(pages, keep);
    this.adapters.onReplaced = (digest) => this.prefix.dropAdapter(digest);
    this.scheduler = new Scheduler(
      this.paging,
      {
        maxNumSeqs: opts.maxNumSeqs ?? 64, maxBatchTokens: opts.maxBatchTokens ?? 2048, maxLorasPerBatch: opts.maxLorasPerBatch ?? 0,
        skipAheadMs: opts.loraSkipAheadMs ?? 1000,
        longRopeOriginalMax: model.spec.ropeScaling.type === 'longrope' ? model.spec.ropeScaling.originalMaxPositionEmbeddings : 0,
      },
      (seq) => this.adapters.admit(seq),
      (pages, keep) => this.reclaimPool(pages, keep?.adapterId ?? null),
      (seq) =>
        this.finishSeq(seq, 'error', new LoraplexError(
          `the request needs ${this.paging.blocksFor(seq.numTokens)} KV pages plus its adapter's; the pool cannot hold them`,
          400, 'invalid_request_error', 'max_tokens', 'context_length_exceeded')),
      (seq) => {
        const hit = this.prefix.match(seq, this.adapters.digestOf(seq.adapterId));
        if (seq.numPreemptions === 0) seq.cachedTokens = hit;
      },
      (seq) => this.prefix.release(seq),
    );
    this.adapters.pinnedSlots = () => new Set(this.scheduler.running.map((q) => q.adapterSlot).filter((x) => x > 0));
    this.adapters.onLoadFailed = (id, err) => {
      for (const q of [...this.scheduler.waiting]) if (q.adapterId === id) this.finishSeq(q, 'error', err);
    };
  }

  static async create(opts: EngineOptions): Promise<Engine> {
    const t0 = performance.now();
    const model = readModelDir(opts.model, opts.servedModelName);
    const tokenizer = new TextTokenizer(model.dir);
    const cfgBytes = configBytes(model.dir);
    const configPhase: LoadPhase = { phase: 'config', done: cfgBytes, total: cfgBytes, ms: performance.now() - t0, finished: true };
    const { Engine: NativeEngineCtor } = loadNative();
    const native = new NativeEngineCtor();
    const report = opts.onLoadProgress;
    const progress = () => report?.([configPhase, ...native.loadProgress()]);
    report?.([configPhase]);
    const blockSize = opts.blockSize ?? 16;
    const maxNumSeqs = opts.maxNumSeqs ?? 64;
    const s = model.spec;
    // The default budget is sized with fp32 KV pages; the native side cuts the budget into pages of
    // the KV dtype it resolves (a BF16 cache gets twice the pages in the same bytes).
    const fp32PageBytes = Math.ceil((s.numLayers * 2 * blockSize * s.numKvHeads * s.headDim * 4) / 64) * 64;
    const budget = opts.memoryBudget ?? defaultMemoryBudget(fp32PageBytes, blockSize, maxNumSeqs);
    const maxSlots = opts.maxLoras ?? 32;
    let pool: NativePoolInfo;
    const timer = report ? setInterval(progress, 100) : null;
    try {
      pool = await native.load(s, {
        blockSize,
        poolBytes: budget,
        poolBytesExplicit: opts.memoryBudget !== undefined,
        gpuMemoryUtilization: opts.gpuMemoryUtilization ?? 0.92,
        enforceEager: opts.enforceEager ?? false,
        maxBatchTokens: opts.maxBatchTokens ?? 2048,
        maxNumSeqs,
        maxSlots,
        eosIds: Int32Array.from(model.eosTokenIds),
        threads: opts.threads ?? defaultThreadCount(),
        device: opts.device,
        loraDtype: opts.loraDtype,
        computeDtype: opts.computeDtype,
        kvCacheDtype: opts.kvCacheDtype,
      });
    } catch (e) {
      if (timer) clearInterval(timer);
      progress();
      await native.close().catch(() => undefined);
      const msg = (e as Error).message;
      if (msg.startsWith('--memory-budget') || msg.startsWith('--gpu-memory-utilization')) throw new LoraplexError(msg, 400, 'invalid_request_error', 'memory_budget');
      throw new LoraplexError(msg, 400, 'invalid_request_error', null, 'invalid_model');
    }
    if (timer) clearInterval(timer);
    progress();
    return new Engine(model, tokenizer, native, pool, opts);
  }

  /**
   * Starts a generation and yields its tokens as they are sampled. Several generations run at
   * once and are batched together by the scheduler.
   */
  async *generate(promptIds: number[], params: Partial<SamplingParams> = {}, opts: GenerateOptions = {}): AsyncGenerator<TokenEvent, SeqOutput['finishReason']> {
    const seq = this.submit(promptIds, params, opts);
    try {
      while (true) {
        const out = await seq.next();
        for (const t of out.tokens) yield t;
        if (out.finishReason) {
          if (out.error) throw out.error;
          return out.finishReason;
        }
      }
    } finally {
      if (!seq.isFinished) this.abort(seq);
    }
  }

  /** The grammar compiler and matchers (XGrammar in worker threads), started on first use. */
  get grammars(): GrammarService {
    if (!this.grammarService) {
      const V = this.model.spec.vocabSize;
      this.grammarService = new GrammarService({ ...grammarVocab(this.model.dir, V), vocabSize: V, stopIds: this.model.eosTokenIds });
    }
    return this.grammarService;
  }

  /** Validates and enqueues a request; the returned Sequence delivers its tokens. */
  submit(promptIds: number[], paramsIn: Partial<SamplingParams> = {}, opts: GenerateOptions = {}): Sequence {
    if (this.closed) throw new LoraplexError('engine is shutting down', 503, 'server_error', null, 'shutting_down');
    const params = makeSamplingParams(paramsIn);
    if (promptIds.length === 0) throw new LoraplexError('prompt must not be empty', 400, 'invalid_request_error', 'prompt', 'invalid_value');
    const V = this.model.spec.vocabSize;
    for (const id of promptIds)
      if (!Number.isInteger(id) || id < 0 || id >= V)
        throw new LoraplexError(`token id ${id} is outside the vocabulary [0, ${V})`, 400, 'invalid_request_error', 'prompt', 'invalid_value');
    for (const [id] of params.logitBias)
      if (id >= V) throw new LoraplexError(`token id ${id} in logit_bias is outside the vocabulary [0, ${V})`, 400, 'invalid_request_error', 'logit_bias', 'invalid_value');
    const total = promptIds.length + params.maxTokens;
    if (total > this.maxModelLen)
      throw new LoraplexError(
        `this model's maximum context length is ${this.maxModelLen} tokens; the request asks for ${total} (${promptIds.length} in the prompt, ${params.maxTokens} to generate)`,
        400, 'invalid_request_error', 'max_tokens', 'context_length_exceeded');
    const adapterId = opts.adapter ?? null;
    const slot = adapterId === null ? 0 : this.adapters.acquire(adapterId); // throws 404 if unknown
    const kvCapacity = Math.max(0, this.paging.totalPages - this.adapters.pagesFor(adapterId));
    if (this.paging.blocksFor(total) > kvCapacity) {
      if (adapterId !== null) this.adapters.releaseRef(adapterId);
      throw new LoraplexError(
        `the request needs ${this.paging.blocksFor(total)} KV pages but the memory pool holds only ${kvCapacity}`,
        400, 'invalid_request_error', 'max_tokens', 'context_length_exceeded');
    }
    const seq = new Sequence(this.nextSeqId++, promptIds.slice(), params, adapterId, slot);
    seq.cacheSalt = opts.cacheSalt ?? null;
    if (opts.signal) {
      if (opts.signal.aborted) {
        if (adapterId !== null) this.adapters.releaseRef(adapterId);
        throw new LoraplexError('request aborted', 400, 'invalid_request_error', null, 'aborted');
      }
      opts.signal.addEventListener('abort', () => this.abort(seq), { once: true });
    }
    this.scheduler.add(seq);
    if (adapterId !== null) this.adapters.prefetch(this.scheduler.waiting, this.prefetchWindow);
    if (seq.grammar) this.requestMasks(); // its first mask is computed while it waits
    this.kick();
    return seq;
  }

  /** Cancels a sequence: frees its pages now, ends its stream with finish reason "abort". */
  abort(seq: Sequence): void {
    if (seq.isFinished) return;
    this.finishSeq(seq, 'abort');
  }

  stats(): EngineStats {
    const perAdapter: EngineStats['perAdapter'] = {};
    for (const [list, key] of [[this.scheduler.waiting, 'waiting'], [this.scheduler.running, 'running']] as const)
      for (const q of list) if (q.adapterId !== null) (perAdapter[q.adapterId] ??= { waiting: 0, running: 0 })[key]++;
    return {
      ...this.paging.stats(),
      waiting: this.scheduler.waiting.length,
      running: this.scheduler.running.length,
      perAdapter,
      preemptions: this.scheduler.numPreemptions,
      steps: this.steps,
      adapters: this.adapters.stats(),
      prefixCache: this.prefix.stats(),
    };
  }

  /** Seconds since the loop last finished a step while it had work (0 when idle). */
  secondsSinceProgress(): number {
    if (!this.scheduler.hasWork) return 0;
    return (performance.now() - this.lastProgress) / 1000;
  }

  /** Parses and checks an adapter file against the base model without making it resident. */
  async parseAdapterFile(path: string, plan: NativeLoraPlan, maxRank: number): Promise<void> {
    this.native.freeAdapter(await this.native.parseAdapter(path, plan, maxRank));
  }

  /** Resolves when every queued request has finished. */
  async idle(): Promise<void> {
    while (this.loop) await this.loop;
  }

  async close(): Promise<void> {
    this.closed = true;
    for (const s of [...this.scheduler.running, ...this.scheduler.waiting]) this.abort(s);
    await this.idle();
    this.grammarService?.close();
    await this.native.close();
  }

  private kick(): void {
    if (!this.loop) {
      this.lastProgress = performance.now();
      this.loop = this.runLoop().finally(() => {
        this.loop = null;
        if (this.scheduler.hasWork) this.kick();
      });
    }
  }

  private async runLoop(): Promise<void> {
    // Start on the next turn of the event loop, so that requests submitted together (one burst of
    // HTTP requests, a Promise.all of generations) share the first step instead of the first one
    // running alone.
    await new Promise<void>((r) => setImmediate(r));
    while (this.scheduler.hasWork) {
      const deferred = this.deferMasks();
      let plan: ScheduledSeq[];
      this.adapters.prefetch(this.scheduler.waiting, this.prefetchWindow);
      try {
        plan = this.scheduler.schedule();
      } catch (e) {
        // A scheduling bug must not wedge the server: fail what is queued and keep serving.
        for (const q of [...this.scheduler.running, ...this.scheduler.waiting]) this.finishSeq(q, 'error', e as Error);
        continue;
      }
      if (plan.length === 0) {
        // Everything waits on something outside the step (an adapter load, a grammar mask behind a
        // compile): yield and retry.
        await (this.masksInFlight ? Promise.race([this.masksInFlight, this.adapters.waitForProgress()]) : this.adapters.waitForProgress());
        continue;
      }
      const t0 = performance.now();
      const batch = this.buildBatch(plan);
      let result;
      let maskWait = 0;
      try {
        const stepping = this.native.step(batch);
        if (batch.masksDeferred) maskWait = await this.provideMasks(batch, plan, deferred);
        result = await stepping;
      } catch (e) {
        // A step that fails fails its sequences, never the server.
        for (const q of deferred) q.grammar!.deferrable = false;
        for (const p of plan) this.finishSeq(p.seq, 'error', e as Error);
        continue;
      }
      this.steps++;
      this.lastProgress = performance.now();
      for (const q of deferred) q.grammar!.deferrable = false;
      // The part of the wait for masks the forward did not hide.
      if (batch.masksDeferred) this.maskStats.exposedMs += Math.max(0, maskWait - result.forwardMs);
      this.postprocess(plan, result, batch.promptLpOwners);
      this.requestMasks();
      this.lastStep = { tokens: batch.tokens.length, seqs: plan.length, forwardMs: result.forwardMs, sampleMs: result.sampleMs, wallMs: performance.now() - t0 };
      if (this.checking) this.checkInvariants();
      this.onStep?.();
    }
    if (this.checking) this.checkInvariants();
  }

  /**
   * Sends the grammar worker every constrained sequence that needs its next mask (its new token to
   * accept, or none for a fresh one); one round trip for all of them. The replies arrive while the
   * loop goes on: a sequence samples only once its mask is back (Sequence.canSample).
   */
  private requestMasks(): void {
    if (this.masksInFlight || !this.grammarService) return;
    const g = this.grammarService;
    const want: Sequence[] = [];
    for (const q of [...this.scheduler.running, ...this.scheduler.waiting])
      if (q.grammar && q.grammar.mask === null && !q.grammar.requested) want.push(q);
    if (want.length === 0) return;
    for (const q of want) {
      if (!q.grammar!.opened) {
        g.open(q.id, q.params.grammar!);
        q.grammar!.opened = true;
      }
      q.grammar!.requested = true;
    }
    const tokens = Int32Array.from(want.map((q) => q.grammar!.pending));
    this.masksInFlight = g.masks(Int32Array.from(want.map((q) => q.id)), tokens).then(
      (r) => {
        want.forEach((q, i) => {
          const sg = q.grammar!;
          sg.requested = false;
          if (q.isFinished) return;
          sg.pending = -1;
          if (r.flags[i] & 2) {
            this.finishSeq(q, 'error', new LoraplexError('the grammar rejected a sampled token', 500, 'server_error', null, 'grammar_error'));
          } else if (r.flags[i] & 1) {
            this.finishSeq(q, 'stop'); // the grammar is complete and allows nothing more
          } else {
            sg.mask = r.masks.subarray(i * r.words, (i + 1) * r.words);
          }
        });
        this.maskStats.masks += want.length;
      },
      (e: Error) => {
        for (const q of want) {
          q.grammar!.requested = false;
          this.finishSeq(q, 'error', new LoraplexError(`structured output failed: ${e.message}`, 500, 'server_error', null, 'grammar_error'));
        }
      },
    ).finally(() => {
      this.masksInFlight = null;
      if (!this.loop && this.scheduler.hasWork) this.kick();
    });
  }

  /**
   * Sends for the masks sequences need, and lets the sequences whose masks are in flight take part
   * in the coming step: their masks follow the forward (provideMasks), so the grammar worker
   * computes them while the forward runs. Not while the worker compiles a new grammar: then those
   * sequences sit the step out instead of holding it behind the compile. Returns the deferred ones.
   */
  private deferMasks(): Sequence[] {
    this.requestMasks();
    if (!this.masksInFlight || this.grammarService?.compiling) return [];
    const out: Sequence[] = [];
    for (const q of [...this.scheduler.running, ...this.scheduler.waiting])
      if (q.grammar && q.grammar.requested && q.grammar.mask === null) {
        q.grammar.deferrable = true;
        out.push(q);
      }
    return out;
  }

  /**
   * Hands the step in flight its masks once the worker has them, waiting at most MASK_WAIT_MS
   * from now (the forward runs meanwhile); a sequence whose mask is late is not sampled this step
   * (token -2) and samples in a later one.
   */
  private async provideMasks(batch: NativeStepBatch, plan: ScheduledSeq[], deferred: Sequence[]): Promise<number> {
    const skip: number[] = [];
    const t0 = performance.now();
    try {
      const inFlight = this.masksInFlight;
      if (inFlight && deferred.some((q) => q.grammar!.mask === null)) {
        let timer: NodeJS.Timeout | undefined;
        await Promise.race([inFlight, new Promise<void>((r) => (timer = setTimeout(r, this.maskWaitMs)))]);
        clearTimeout(timer);
        this.maskStats.waits++;
        this.maskStats.waitMs += performance.now() - t0;
      }
    } finally {
      const W = batch.maskWords!;
      const rows = batch.maskRows!;
      const out = new Int32Array(rows.reduce((n, r) => Math.max(n, r + 1), 0) * W);
      let j = 0;
      for (const p of plan) {
        if (!p.sample) continue;
        const r = rows[j];
        const g = p.seq.grammar;
        if (r >= 0) {
          if (g?.mask) out.set(g.mask, r * W);
          else skip.push(j);
        }
        j++;
      }
      this.native.provideMasks(out, Int32Array.from(skip));
    }
    return performance.now() - t0;
  }

  /**
   * Frees `pages` pages for KV or an adapter: one least-recently-used order across reclaimable
   * prefix-cache blocks and adapters no running sequence uses (never `keep`). Returns pages freed.
   */
  private reclaimPool(pages: number, keep: string | null): number {
    let freed = 0;
    const ads = this.adapters.evictable(keep);
    let a = 0;
    const cached = this.prefix.reclaimable();
    let c = cached.next();
    while (freed < pages && (a < ads.length || !c.done)) {
      if (!c.done && (a >= ads.length || c.value.lastUsed <= ads[a].lastUsed)) {
        this.prefix.evict(c.value.page);
        freed++;
        c = cached.next();
      } else {
        freed += ads[a].pages.length;
        this.adapters.evict(ads[a++]);
      }
    }
    return freed;
  }

  /** Pages nobody needs now: free, reclaimable prefix blocks, adapters no running sequence uses. */
  reclaimablePages(): number {
    return this.paging.freePages + this.prefix.reclaimableCount + this.adapters.evictablePages();
  }

  /** Pool, adapter residency, prefix cache and KV ownership agree; throws on the first disagreement. */
  checkInvariants(): void {
    this.paging.checkInvariants();
    this.adapters.checkInvariants();
    // A running sequence's adapter stays in its slot until it finishes (pinned: never evicted).
    for (const q of this.scheduler.running)
      if (q.adapterId !== null && this.adapters.inSlot(q.adapterSlot) !== q.adapterId)
        throw new Error(`invariant: running sequence ${q.id} on ${q.adapterId} has slot ${q.adapterSlot}, which holds ${this.adapters.inSlot(q.adapterSlot)}`);
    const seqs = [...this.scheduler.running, ...this.scheduler.waiting];
    this.prefix.checkInvariants(seqs);
    let kv = 0;
    for (const q of seqs) {
      for (const p of q.blocks) {
        const o = this.paging.ownerOf(p);
        if (o?.kind === 'prefix') continue; // counted by the prefix cache's own check
        if (!o || o.kind !== 'kv' || o.seqId !== q.id) throw new Error(`invariant: page ${p} of sequence ${q.id} is owned by ${JSON.stringify(o)}`);
        kv++;
      }
    }
    if (kv !== this.paging.stats().kvPages) throw new Error(`invariant: sequences hold ${kv} KV pages, the pool counts ${this.paging.stats().kvPages}`);
  }

  private buildBatch(plan: ScheduledSeq[]): NativeStepBatch & { promptLpOwners: PromptLpOwner[] } {
    // Group sequences by adapter so each adapter's tokens form one SGMV segment.
    plan.sort((a, b) => a.seq.adapterSlot - b.seq.adapterSlot);
    const S = plan.length;
    let T = 0;
    let maxBlocks = 1;
    for (const p of plan) {
      T += p.numNew;
      maxBlocks = Math.max(maxBlocks, p.seq.blocks.length);
    }
    const tokens = new Int32Array(T);
    const positions = new Int32Array(T);
    const tokenSlots = new Int32Array(T);
    const queryStart = new Int32Array(S + 1);
    const contextLens = new Int32Array(S);
    const blockTables = new Int32Array(S * maxBlocks);
    const seqIds = new Uint32Array(S);
    // A request with max_tokens 0 only scores its prompt: its last chunk samples nothing.
    for (const p of plan) if (p.sample && p.seq.params.maxTokens === 0) p.sample = false;
    const samples = plan.map((p, i) => (p.sample ? i : -1)).filter((i) => i >= 0);
    const N = samples.length;
    const b: NativeStepBatch & { promptLpOwners: PromptLpOwner[] } = {
      tokens, positions, tokenSlots, queryStart, contextLens, blockTables, maxBlocks, seqIds,
      sampleSeqs: Int32Array.from(samples),
      temperature: new Float32Array(N), topP: new Float32Array(N), minP: new Float32Array(N),
      repetitionPenalty: new Float32Array(N), presencePenalty: new Float32Array(N), frequencyPenalty: new Float32Array(N),
      topK: new Int32Array(N), numLogprobs: new Int32Array(N), suppressEos: new Uint8Array(N),
      logitBiasStart: new Int32Array(N + 1), logitBiasIds: new Int32Array(0), logitBiasValues: new Float32Array(0),
      newSeqIds: new Uint32Array(0), newSeeds: new BigInt64Array(0), newHasSeed: new Uint8Array(0), newPromptStart: new Int32Array(1), newPromptTokens: new Int32Array(0),
      freeSeqIds: Uint32Array.from(this.freeSeqIds),
      promptLpOwners: [],
    };
    const lpRows: number[] = [];
    const lpTargets: number[] = [];
    const lpTop: number[] = [];
    this.freeSeqIds = [];
    let t = 0;
    const fresh: Sequence[] = [];
    plan.forEach((p, i) => {
      const seq = p.seq;
      queryStart[i] = t;
      const P = seq.promptIds.length;
      const lpTopN = seq.params.promptLogprobs;
      for (let k = 0; k < p.numNew; k++, t++) {
        const pos = seq.numComputed + k;
        tokens[t] = seq.tokenAt(pos);
        positions[t] = pos;
        tokenSlots[t] = seq.adapterSlot;
        // Prompt logprobs: the logits at `pos` score prompt token pos + 1 (once: a recompute after
        // preemption does not score it again).
        if (lpTopN !== null && pos + 1 < P && seq.promptLogprobs[pos + 1] === undefined) {
          lpRows.push(t);
          lpTargets.push(seq.promptIds[pos + 1]);
          lpTop.push(lpTopN);
          b.promptLpOwners.push({ seq, pos: pos + 1 });
        }
      }
      contextLens[i] = seq.numComputed + p.numNew;
      blockTables.set(seq.blocks, i * maxBlocks);
      seqIds[i] = seq.id;
      if (p.sample && !seq.registeredWithSampler) fresh.push(seq);
      if (!seq.lookupCounted && seq.numPreemptions === 0) {
        seq.lookupCounted = true;
        this.prefix.count(seq.promptIds.length, seq.cachedTokens);
      }
    });
    queryStart[S] = T;
    // LongRoPE: which sequences rotate with the long factors (the scheduler decides, per sequence).
    if (this.model.spec.ropeScaling.type === 'longrope') b.ropeLong = Uint8Array.from(plan.map((p) => (p.seq.ropeLong ? 1 : 0)));
    if (lpRows.length) {
      b.promptLpRows = Int32Array.from(lpRows);
      b.promptLpTargets = Int32Array.from(lpTargets);
      b.promptLpTop = Int32Array.from(lpTop);
    }
    samples.forEach((si, j) => {
      const sp = plan[si].seq.params;
      const seq = plan[si].seq;
      b.temperature[j] = sp.temperature;
      b.topP[j] = sp.topP;
      b.minP[j] = sp.minP;
      b.repetitionPenalty[j] = sp.repetitionPenalty;
      b.presencePenalty[j] = sp.presencePenalty;
      b.frequencyPenalty[j] = sp.frequencyPenalty;
      b.topK[j] = sp.topK;
      b.numLogprobs[j] = sp.logprobs ?? -1; // -1: skip the vocabulary-wide log-sum-exp
      // min_tokens does not hold back EOS where a grammar allows nothing else (the grammar wins).
      b.suppressEos[j] = !sp.ignoreEos && !seq.grammar && seq.outputIds.length < sp.minTokens ? 1 : 0;
    });
    // Grammar bitmasks of the constrained samples, one row each.
    // A mask still on its way (deferrable) makes the whole step's masks follow its forward.
    const masked = samples.filter((si) => plan[si].seq.grammar !== null);
    if (masked.length > 0) {
      const W = Math.ceil(this.model.spec.vocabSize / 32);
      b.maskWords = W;
      b.maskRows = new Int32Array(N).fill(-1);
      b.masksDeferred = masked.some((si) => plan[si].seq.grammar!.mask === null);
      b.masks = new Int32Array(b.masksDeferred ? 0 : masked.length * W);
      let row = 0;
      samples.forEach((si, j) => {
        const g = plan[si].seq.grammar;
        if (!g) return;
        if (!b.masksDeferred) b.masks!.set(g.mask!, row * W);
        b.maskRows![j] = row++;
      });
    }
    // logit_bias: sample j's (id, bias) pairs are [logitBiasStart[j], logitBiasStart[j + 1]).
    let nBias = 0;
    for (const si of samples) nBias += plan[si].seq.params.logitBias.length;
    if (nBias > 0) {
      b.logitBiasIds = new Int32Array(nBias);
      b.logitBiasValues = new Float32Array(nBias);
      let off = 0;
      samples.forEach((si, j) => {
        b.logitBiasStart[j] = off;
        for (const [id, v] of plan[si].seq.params.logitBias) {
          b.logitBiasIds[off] = id;
          b.logitBiasValues[off++] = v;
        }
      });
      b.logitBiasStart[N] = off;
    }
    if (fresh.length) {
      b.newSeqIds = Uint32Array.from(fresh.map((s) => s.id));
      // Any int64 seeds the native mt19937_64 (as its uint64 bits); the flag tells "no seed" apart.
      b.newSeeds = BigInt64Array.from(fresh.map((s) => (s.params.seed === null ? 0n : BigInt.asIntN(64, BigInt(s.params.seed)))));
      b.newHasSeed = Uint8Array.from(fresh.map((s) => (s.params.seed === null ? 0 : 1)));
      b.newPromptStart = new Int32Array(fresh.length + 1);
      let n = 0;
      fresh.forEach((s, i) => {
        b.newPromptStart[i] = n;
        n += s.promptIds.length;
      });
      b.newPromptStart[fresh.length] = n;
      b.newPromptTokens = new Int32Array(n);
      fresh.forEach((s, i) => b.newPromptTokens.set(s.promptIds, b.newPromptStart[i]));
      for (const s of fresh) s.registeredWithSampler = true;
    }
    return b;
  }

  private postprocess(plan: ScheduledSeq[], result: NativeStepResult, lpOwners: PromptLpOwner[]): void {
    const { tokens, logprobs, topIds, topLogprobs: topLps, numTop } = result;
    lpOwners.forEach(({ seq, pos }, r) => {
      if (seq.promptLogprobs.length === 0) seq.promptLogprobs.push(null); // the first token has none
      const top: Array<[number, number]> = [];
      for (let q = 0; q < (seq.params.promptLogprobs ?? 0); q++)
        top.push([result.promptTopIds[r * result.promptNumTop + q], result.promptTopLogprobs[r * result.promptNumTop + q]]);
      seq.promptLogprobs[pos] = { logprob: result.promptLogprobs[r], rank: result.promptRanks[r], top };
    });
    let j = 0;
    for (const p of plan) {
      const seq = p.seq;
      if (!p.sample) {
        if (seq.isFinished) continue;
        seq.numComputed += p.numNew;
        this.prefix.promote(seq, this.adapters.digestOf(seq.adapterId));
        // max_tokens 0 (prompt scoring only): done once the whole prompt went through.
        if (seq.params.maxTokens === 0 && seq.numComputed === seq.numTokens) this.finishSeq(seq, 'length');
        continue;
      }
      const k = j++;
      if (seq.isFinished) continue; // aborted while the step ran
      // Not sampled (its grammar mask came late): the same tokens run again next step (their KV
      // is rewritten with the same values).
      if (tokens[k] === -2) {
        this.maskStats.lateRows++;
        continue;
      }
      seq.numComputed += p.numNew;
      this.prefix.promote(seq, this.adapters.digestOf(seq.adapterId));
      const id = tokens[k];
      if (id < 0) {
        // Defence in depth behind adapter validation: never sample from NaN/inf logits.
        this.finishSeq(seq, 'error', new LoraplexError(
          'the model produced non-finite logits for this request; it was stopped instead of sampling garbage',
          500, 'server_error', null, 'non_finite_logits'));
        continue;
      }
      let top: Array<[number, number]> | null = null;
      const nTop = seq.params.logprobs ?? 0;
      if (seq.params.logprobs !== null) {
        top = [];
        for (let q = 0; q < nTop; q++) top.push([topIds[k * numTop + q], topLps[k * numTop + q]]);
      }
      seq.deliver({ token: id, logprob: logprobs[k], top });
      if (seq.grammar) {
        // The matcher accepts it on the way to the next mask (requestMasks).
        seq.grammar.pending = id;
        seq.grammar.mask = null;
      }
      const sp = seq.params;
      // EOS is masked in C++ until min_tokens; stop token ids before min_tokens are not stops.
      const canStop = seq.outputIds.length >= sp.minTokens;
      const isEos = !sp.ignoreEos && this.model.eosTokenIds.includes(id);
      if (canStop && (isEos || sp.stopTokenIds.includes(id))) this.finishSeq(seq, 'stop');
      else if (seq.outputIds.length >= sp.maxTokens) this.finishSeq(seq, 'length');
    }
  }

  private finishSeq(seq: Sequence, reason: 'stop' | 'length' | 'abort' | 'error', error?: Error): void {
    if (seq.isFinished) return;
    this.scheduler.remove(seq);
    if (seq.registeredWithSampler) this.freeSeqIds.push(seq.id);
    if (seq.grammar?.opened) this.grammarService?.release([seq.id]); // after its masks, in order
    if (seq.adapterId !== null) this.adapters.releaseRef(seq.adapterId);
    seq.finish(reason, error);
  }
}
