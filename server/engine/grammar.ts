// Grammar-constrained decoding: the one module that owns XGrammar (its WASM build, run in worker
// threads by grammar-worker.mjs), the compiled-grammar cache and the per-sequence matchers.
// Swapping in a native XGrammar later means changing this file only.
//
// Two workers:
// - the *probe* compiles every grammar not seen before, under a time bound. A grammar that takes
//   longer is refused (400 grammar_too_complex) and the probe is terminated, so a hostile schema
//   costs one worker, never the event loop or the running matchers. A schema XGrammar rejects
//   aborts its WASM module: that worker is replaced too.
// - the *server* compiles the grammars the probe passed (bounded by the same compile: it is
//   deterministic) into its LRU cache and runs the matchers: after each step the engine sends it
//   the sampled tokens of constrained sequences and gets their next token bitmasks back.
// XGrammar's compiled grammars cannot leave the WASM instance that built them, hence the second
// compile; a grammar in the server's cache skips both.
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import { LoraplexError } from './errors.js';

export type GrammarSpec =
  | { kind: 'json_schema'; schema: string }
  | { kind: 'json_object' }
  | { kind: 'regex'; pattern: string }
  | { kind: 'choice'; choices: string[] }
  | { kind: 'grammar'; grammar: string }
  | { kind: 'structural_tag'; tag: unknown };

/** A compiled grammar a sequence may use: its cache key and what compiles it again if evicted. */
export interface GrammarRef {
  key: string;
  spec: GrammarSpec;
}

export interface MaskResult {
  words: number; // int32 words per mask: ceil(vocab / 32)
  masks: Int32Array; // [n * words], bit t of word t >> 5 set = token t allowed
  flags: Uint8Array; // [n] 1: terminated (no mask), 2: the token was rejected
}

export interface GrammarOptions {
  /** Encoded vocabulary (tokenizer.json's token strings; '' for special and unused ids). */
  vocab: string[];
  vocabType: 'byte_level' | 'byte_fallback' | 'raw';
  vocabSize: number;
  stopIds: number[];
  /** A grammar that takes longer to compile is refused (grammar_too_complex). */
  compileTimeoutMs?: number;
  /** Compiled grammars kept (LRU; grammars in use are never dropped). */
  maxGrammars?: number;
}

export interface GrammarStats {
  compiles: number;
  cacheHits: number;
  refused: number;
  lastCompileMs: number;
}

/** The worker's file: next to this module (tsx, vitest) or, from dist/server/engine/, in the package's server/. */
function workerFile(): string {
  const here = fileURLToPath(new URL('.', import.meta.url));
  for (const rel of ['grammar-worker.mjs', '../../../server/engine/grammar-worker.mjs']) {
    const p = join(here, rel);
    if (existsSync(p)) return p;
  }
  throw new Error('grammar-worker.mjs not found');
}

interface Pending {
  resolve: (v: Record<string, unknown>) => void;
  reject: (e: Error) => void;
}

/** One worker and its request/reply bookkeeping; `dead` once it exited or was terminated. */
class WorkerHost {
  private readonly worker: Worker;
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  readonly ready: Promise<void>;
  dead = false;

  constructor(data: unknown, private readonly onExit: () => void) {
    this.worker = new Worker(workerFile(), { workerData: data });
    this.worker.unref();
    let ok: () => void;
    let fail: (e: Error) => void;
    this.ready = new Promise<void>((res, rej) => ((ok = res), (fail = rej)));
    this.ready.catch(() => undefined);
    this.worker.on('message', (m: Record<string, unknown>) => {
      if (m.ready) return ok();
      const p = this.pending.get(m.id as number);
      if (!p) return;
      this.pending.delete(m.id as number);
      p.resolve(m);
    });
    const die = (this.die = (e: Error) => {
      if (this.dead) return;
      this.dead = true;
      fail(e);
      for (const p of this.pending.values()) p.reject(e);
      this.pending.clear();
      this.onExit();
    });
    this.worker.on('error', (e) => die(e));
    this.worker.on('exit', (code) => die(new Error(`grammar worker exited (${code})`)));
  }

  async request(msg: Record<string, unknown>, transfer: ArrayBuffer[] = []): Promise<Record<string, unknown>> {
    await this.ready;
    if (this.dead) throw new Error('grammar worker is gone');
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.worker.postMessage({ ...msg, id }, transfer);
    });
  }

  post(msg: Record<string, unknown>): void {
    if (!this.dead) void this.ready.then(() => this.worker.postMessage(msg), () => undefined);
  }

  get busy(): boolean {
    return this.pending.size > 0;
  }

  private die: (e: Error) => void = () => undefined;

  terminate(): void {
    this.die(new Error('grammar worker terminated'));
    void this.worker.terminate();
  }
}

/** A bounded LRU of keys (Map order) with a value each. */
class Lru<V> {
  private readonly m = new Map<string, V>();
  constructor(private readonly cap: number) {}
  get(k: string): V | undefined {
    const v = this.m.get(k);
    if (v !== undefined) (this.m.delete(k), this.m.set(k, v));
    return v;
  }
  set(k: string, v: V): void {
    this.m.delete(k);
    this.m.set(k, v);
    while (this.m.size > this.cap) this.m.delete(this.m.keys().next().value as string);
  }
}

export class GrammarService {
  private probe: WorkerHost | null = null;
  private server: WorkerHost | null = null;
  private readonly timeoutMs: number;
  private readonly maxGrammars: number;
  /** Outcome of every grammar compiled so far (true: compiles; a string: why not). */
  private readonly verdicts = new Lru<true | string>(4096);
  /** Keys the server worker compiled recently (its own LRU is as large): no probe needed. */
  private readonly onServer: Lru<true>;
  /** In-flight preparations by key, so concurrent requests for one schema compile it once. */
  private readonly inflight = new Map<string, Promise<GrammarRef>>();
  private serverCompiles = 0;
  private closed = false;
  readonly stats: GrammarStats = { compiles: 0, cacheHits: 0, refused: 0, lastCompileMs: 0 };

  constructor(private readonly opts: GrammarOptions) {
    this.timeoutMs = opts.compileTimeoutMs ?? 5000;
    this.maxGrammars = opts.maxGrammars ?? 64;
    this.onServer = new Lru<true>(this.maxGrammars);
  }

  private workerData() {
    const { vocab, vocabType, vocabSize, stopIds } = this.opts;
    return { vocab, vocabType, vocabSize, stopIds, maxGrammars: this.maxGrammars };
  }

  private probeWorker(): WorkerHost {
    if (!this.probe || this.probe.dead) {
      const w: WorkerHost = new WorkerHost(this.workerData(), () => {
        if (this.probe === w) this.probe = null;
      });
      this.probe = w;
    }
    return this.probe;
  }

  private serverWorker(): WorkerHost {
    if (!this.server || this.server.dead) {
      if (this.closed) throw new LoraplexError('engine is shutting down', 503, 'server_error', null, 'shutting_down');
      const w: WorkerHost = new WorkerHost(this.workerData(), () => {
        if (this.server === w) this.server = null;
      });
      this.server = w;
    }
    return this.server;
  }

  /** True while the server worker compiles: masks asked for now wait behind it. */
  get compiling(): boolean {
    return this.serverCompiles > 0;
  }

  /**
   * Compiles `spec` (or finds it cached) so sequences can use it. Waits without blocking the
   * event loop; a 400 naming `param` if XGrammar refuses it or it takes longer than the bound.
   */
  prepare(spec: GrammarSpec, param: string): Promise<GrammarRef> {
    const key = JSON.stringify(spec);
    const verdict = this.verdicts.get(key);
    if (typeof verdict === 'string') return Promise.reject(this.refusal(verdict, param));
    if (verdict === true && this.onServer.get(key)) {
      this.stats.cacheHits++;
      return Promise.resolve({ key, spec });
    }
    let p = this.inflight.get(key);
    if (!p) {
      p = this.compileNew(key, spec).finally(() => this.inflight.delete(key));
      this.inflight.set(key, p);
    }
    return p.catch((e: unknown) => {
      if (e instanceof LoraplexError && e.param !== param) throw new LoraplexError(e.message, e.status, e.type, param, e.code);
      throw e;
    });
  }

  private refusal(verdict: string, param: string): LoraplexError {
    if (verdict.startsWith('timeout:'))
      return new LoraplexError(`the grammar took longer than ${this.timeoutMs / 1000} s to compile; simplify the schema`, 400, 'invalid_request_error', param, 'grammar_too_complex');
    return new LoraplexError(`the grammar cannot be compiled: ${verdict}`, 400, 'invalid_request_error', param, 'invalid_grammar');
  }

  private async compileNew(key: string, spec: GrammarSpec): Promise<GrammarRef> {
    const t0 = performance.now();
    if (this.verdicts.get(key) !== true) {
      const probe = this.probeWorker();
      let timer: NodeJS.Timeout | undefined;
      let r: Record<string, unknown> | 'timeout';
      try {
        await probe.ready;
      } catch (e) {
        // The worker could not start (not this grammar's doing): no verdict, the request may retry.
        probe.terminate();
        throw new LoraplexError(`grammar compiler unavailable: ${(e as Error).message}`, 503, 'server_error', null, 'grammar_unavailable');
      }
      try {
        // The bound starts once the probe is up (its first start loads WASM and the vocabulary).
        const timeout = new Promise<'timeout'>((res) => (timer = setTimeout(() => res('timeout'), this.timeoutMs)));
        r = await Promise.race([probe.request({ op: 'compile', key, spec }), timeout]);
      } catch (e) {
        // The worker died compiling it (out of memory, say): this grammar's doing.
        r = { ok: false, fatal: true, message: `the compiler failed on it (${(e as Error).message})` };
      } finally {
        clearTimeout(timer);
      }
      if (r === 'timeout') {
        probe.terminate();
        this.verdicts.set(key, `timeout:${this.timeoutMs}`);
        this.stats.refused++;
        throw this.refusal(`timeout:${this.timeoutMs}`, '');
      }
      if (!r.ok) {
        if (r.fatal || probe.dead) probe.terminate();
        const msg = String(r.message ?? 'unknown error');
        this.verdicts.set(key, msg);
        this.stats.refused++;
        throw this.refusal(msg, '');
      }
      this.verdicts.set(key, true);
    }
    this.serverCompiles++;
    try {
      const r = await this.serverWorker().request({ op: 'compile', key, spec });
      if (!r.ok) throw this.refusal(String(r.message), '');
    } finally {
      this.serverCompiles--;
    }
    this.onServer.set(key, true);
    this.stats.compiles++;
    this.stats.lastCompileMs = performance.now() - t0;
    return { key, spec };
  }

  /** A matcher for sequence `seq` (messages are handled in order: masks asked for later see it). */
  open(seq: number, ref: GrammarRef): void {
    void this.serverWorker().request({ op: 'open', seq, key: ref.key, spec: ref.spec }).catch(() => undefined);
  }

  /** Each sequence accepts its token (-1: none yet) and gets its next bitmask. */
  async masks(seqs: Int32Array, tokens: Int32Array): Promise<MaskResult> {
    const r = await this.serverWorker().request({ op: 'masks', seqs, tokens });
    if (!r.ok) throw new Error(String(r.message));
    return { words: r.words as number, masks: r.masks as Int32Array, flags: r.flags as Uint8Array };
  }

  release(seqs: number[]): void {
    if (seqs.length && this.server && !this.server.dead) this.server.post({ op: 'close', seqs });
  }

  close(): void {
    this.closed = true;
    this.probe?.terminate();
    this.server?.terminate();
  }
}

/**
 * The vocabulary as XGrammar's TokenizerInfo wants it: token strings in the tokenizer's own
 * encoding (byte-level BPE's "Ġ" form, SentencePiece's "▁" and <0x..> byte tokens), indexed by id,
 * padded with '' to the model's vocabulary (the embedding may be larger than the tokenizer):
 * XGrammar treats '' as a special token, never allowed. Special added tokens are '' too; the stop
 * tokens (EOS) are passed separately and allowed exactly where the grammar can end.
 */
export function grammarVocab(modelDir: string, vocabSize: number): Pick<GrammarOptions, 'vocab' | 'vocabType'> {
  const tj = JSON.parse(readFileSync(join(modelDir, 'tokenizer.json'), 'utf8')) as {
    model?: { type?: string; vocab?: Record<string, number> | Array<[string, number]>; byte_fallback?: boolean };
    added_tokens?: Array<{ id: number; content: string; special?: boolean }>;
    decoder?: { type?: string; decoders?: Array<{ type?: string }> } | null;
  };
  const vocab: string[] = new Array<string>(vocabSize).fill('');
  const mv = tj.model?.vocab;
  if (Array.isArray(mv)) mv.forEach(([t], i) => i < vocabSize && (vocab[i] = t));
  else if (mv) for (const [t, i] of Object.entries(mv)) if (i >= 0 && i < vocabSize) vocab[i] = t;
  for (const a of tj.added_tokens ?? []) if (a.id >= 0 && a.id < vocabSize) vocab[a.id] = a.special ? '' : a.content;
  const dec = tj.decoder;
  const decoders = [dec?.type, ...(dec?.decoders ?? []).map((d) => d.type)];
  const vocabType = decoders.includes('ByteLevel') ? 'byte_level' : decoders.includes('ByteFallback') || tj.model?.byte_fallback ? 'byte_fallback' : 'raw';
  return { vocab, vocabType };
}
