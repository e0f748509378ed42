// One generation request as the scheduler sees it: its tokens, KV pages, adapter and state.
import type { SamplingParams } from './sampling-params.js';

/**
 * A constrained sequence's matcher as the engine sees it: the matcher itself lives in the grammar
 * worker; `mask` is the bitmask for the next token (null while the worker computes it), and
 * `pending` the sampled token it has not accepted yet (-1: none).
 */
export interface SeqGrammar {
  opened: boolean;
  mask: Int32Array | null;
  pending: number;
  requested: boolean;
  /** Its mask is on its way and may follow the step's forward (Engine: masks deferred). */
  deferrable: boolean;
}

export enum SeqState {
  Waiting = 'waiting',
  Running = 'running',
  Finished = 'finished',
}

export type FinishReason = 'stop' | 'length' | 'abort' | 'error';

export interface TokenEvent {
  token: number;
  logprob: number; // NaN unless the request asked for logprobs
  top: Array<[number, number]> | null; // [id, logprob] best first, when logprobs were asked for
}

/** Logprob of a prompt token given the tokens before it (teacher forcing). */
export interface PromptLogprob {
  logprob: number;
  rank: number; // 1-based
  top: Array<[number, number]>; // [id, logprob] best first
}

export interface SeqOutput {
  /** Tokens sampled since the last delivery. */
  tokens: TokenEvent[];
  finishReason: FinishReason | null;
  error?: Error;
}

export class Sequence {
  state = SeqState.Waiting;
  readonly outputIds: number[] = [];
  /** Tokens whose K/V are in the cache. */
  numComputed = 0;
  /** KV pages, in order: block i holds positions [i*B, (i+1)*B). */
  blocks: number[] = [];
  registeredWithSampler = false;
  /** Structured outputs: set when params.grammar is. */
  readonly grammar: SeqGrammar | null;
  finishReason: FinishReason | null = null;
  error: Error | undefined;
  numPreemptions = 0;
  /** Prefix cache: keys of this sequence's full blocks (computed once), and how many of its
   *  leading blocks are cached pages or were offered to the cache. */
  readonly blockKeys: string[] = [];
  promotedBlocks = 0;
  /** The prefix-cache metrics already count its lookup. */
  lookupCounted = false;
  /** Its adapter's requests_served already counts it. */
  servedCounted = false;
  /** Where its adapter was when admission first asked for it (the adapter lookup metrics). */
  adapterLookup: 'pool_hit' | 'host_hit' | 'miss' | undefined;
  /** Skip-ahead: when later requests were first admitted ahead of it (null: never passed over). */
  passedOverSince: number | null = null;
  /** When the scheduler admitted it (last admission, after any preemption). */
  admittedAt: number | null = null;
  /** Prompt tokens found in the prefix cache at its first admission (usage.cached_tokens). */
  cachedTokens = 0;
  /** Requests share cached blocks only when their salts are equal (cache_salt). */
  cacheSalt: string | null = null;
  /** LongRoPE (Phi-3): its KV is (being) computed with the long factors (it has more tokens than
   *  original_max_position_embeddings). Flips once; the scheduler then recomputes every position. */
  ropeLong = false;
  /** Prompt logprobs need every prompt position computed: never skip cached blocks. */
  get noPrefixMatch(): boolean {
    return this.params.promptLogprobs !== null;
  }
  /** Prompt logprobs by position (params.promptLogprobs set): [0] stays null, filled as prefill runs. */
  readonly promptLogprobs: Array<PromptLogprob | null> = [];
  readonly arrival = performance.now();
  firstTokenAt: number | null = null;

  private pending: TokenEvent[] = [];
  private wake: (() => void) | null = null;

  constructor(
    readonly id: number,
    readonly promptIds: number[],
    readonly params: SamplingParams,
    readonly adapterId: string | null,
    public adapterSlot: number,
  ) {
    this.grammar = params.grammar ? { opened: false, mask: null, pending: -1, requested: false, deferrable: false } : null;
  }

  /** A constrained sequence samples only once its next mask is known, or is on its way to the step. */
  get canSample(): boolean {
    return this.grammar === null || this.grammar.mask !== null || this.grammar.deferrable;
  }

  get numTokens(): number {
    return this.promptIds.length + this.outputIds.length;
  }

  tokenAt(i: number): number {
    return i < this.promptIds.length ? this.promptIds[i] : this.outputIds[i - this.promptIds.length];
  }

  get isFinished(): boolean {
    return this.state === SeqState.Finished;
  }

  /** Called by the engine loop with each sampled token. */
  deliver(ev: TokenEvent): void {
    this.outputIds.push(ev.token);
    if (this.firstTokenAt === null) this.firstTokenAt = performance.now();
    this.pending.push(ev);
    this.notify();
  }

  finish(reason: FinishReason, error?: Error): void {
    if (this.state === SeqState.Finished) return;
    this.state = SeqState.Finished;
    this.finishReason = reason;
    this.error = error;
    this.notify();
  }

  private notify(): void {
    const w = this.wake;
    this.wake = null;
    w?.();
  }

  /** Waits for new tokens or the end; returns what accumulated since the last call. */
  async next(): Promise<SeqOutput> {
    while (this.pending.length === 0 && !this.isFinished) {
      await new Promise<void>((r) => (this.wake = r));
    }
    const tokens = this.pending;
    this.pending = [];
    return { tokens, finishReason: this.isFinished ? this.finishReason : null, error: this.error };
  }
}
