// Iteration-level (continuous batching) scheduler with chunked prefill, FCFS admission under the
// unified pool, and preemption by recompute when decode runs out of pages.
// Skip-ahead: a waiting request whose adapter is not ready (loading, or no slot/room for it yet)
// does not hold up those behind it whose adapters are; but once it has been passed over for
// skipAheadMs, nothing behind it is admitted until it is (so nothing starves). A request that is
// ready but whose KV does not fit is never overtaken (FCFS, as before).
import type { PagingManager } from './paging-manager.js';
import { SeqState, type Sequence } from './sequence.js';

export interface SchedulerLimits {
  maxNumSeqs: number;
  maxBatchTokens: number;
  /** Distinct adapters among running sequences (0 = no cap). */
  maxLorasPerBatch?: number;
  /** Longest a request may be passed over while its adapter is not ready (0 = strict FCFS; default 1000). */
  skipAheadMs?: number;
  /** LongRoPE models (Phi-3): original_max_position_embeddings; 0 / absent for every other RoPE. */
  longRopeOriginalMax?: number;
}

export interface ScheduledSeq {
  seq: Sequence;
  numNew: number; // tokens fed this step: [numComputed, numComputed + numNew)
  sample: boolean; // the step ends at the sequence's last token, so it samples
}

/** Admission hook for the adapter a sequence needs (returns false: not yet, keep waiting). */
export type AdmitHook = (seq: Sequence) => boolean;

export class Scheduler {
  readonly waiting: Sequence[] = [];
  readonly running: Sequence[] = [];
  numPreemptions = 0;

  constructor(
    private readonly paging: PagingManager,
    readonly limits: SchedulerLimits,
    private readonly canAdmit: AdmitHook = () => true,
    /** Frees pool space held by unpinned adapters (never `keep`'s adapter); returns pages freed. */
    private readonly reclaim: (pagesNeeded: number, keep?: Sequence) => number = () => 0,
    /** A waiting sequence that cannot fit even in an otherwise empty pool. */
    private readonly onUnfittable: (seq: Sequence) => void = () => undefined,
    /** Prefix cache: give an admitted sequence its cached leading blocks (sets blocks, numComputed). */
    private readonly matchPrefix: (seq: Sequence) => void = () => undefined,
    /** Lets go of a sequence's pages (cached blocks stay cached); the default frees them. */
    private readonly releaseBlocks: (seq: Sequence) => void = (seq) => {
      if (seq.blocks.length) this.paging.release(seq.blocks);
      seq.blocks = [];
    },
  ) {}

  add(seq: Sequence): void {
    seq.state = SeqState.Waiting;
    this.waiting.push(seq);
  }

  get hasWork(): boolean {
    return this.waiting.length > 0 || this.running.length > 0;
  }

  /** Removes a sequence wherever it is and frees its pages. */
  remove(seq: Sequence): void {
    const w = this.waiting.indexOf(seq);
    if (w >= 0) this.waiting.splice(w, 1);
    const r = this.running.indexOf(seq);
    if (r >= 0) this.running.splice(r, 1);
    this.freeBlocks(seq);
  }

  schedule(): ScheduledSeq[] {
    let budget = this.limits.maxBatchTokens;
    const plan: ScheduledSeq[] = [];
    const planned = new Set<Sequence>();

    // 1. Running sequences first, oldest first: decode tokens and unfinished prefill chunks.
    for (let i = 0; i < this.running.length && budget > 0; i++) {
      const seq = this.running[i];
      this.switchLongRope(seq);
      const numNew = Math.min(seq.numTokens - seq.numComputed, budget);
      // A constrained sequence whose next mask is still being computed sits this step out.
      if (!seq.canSample && seq.numComputed + numNew === seq.numTokens) continue;
      if (!this.ensureBlocks(seq, seq.numComputed + numNew, planned)) {
        // `seq` itself was the only candidate left and was preempted.
        i--;
        continue;
      }
      plan.push({ seq, numNew, sample: seq.numComputed + numNew === seq.numTokens });
      planned.add(seq);
      budget -= numNew;
    }

    // 2. Admit waiting sequences in arrival order while the pool holds their whole prompt (less
    //    what the prefix cache already holds); skip ahead of those whose adapter is not ready.
    const now = performance.now();
    const bound = this.limits.skipAheadMs ?? 1000;
    // Requests skipped in this pass because their adapter was not ready: each one is passed over
    // from the moment someone behind it is admitted (merely waiting deep in the queue is not).
    const skipped: Sequence[] = [];
    let i = 0;
    while (i < this.waiting.length && budget > 0 && this.running.length < this.limits.maxNumSeqs) {
      const seq = this.waiting[i];
      if (!seq.canSample) {
        // Its first grammar mask is on its way (compiled off this thread): nothing it needs is
        // held by those behind it, so they go first, with no bound.
        i++;
        continue;
      }
      if (this.overLoraCap(seq) || !this.canAdmit(seq)) {
        // Its adapter is still loading, or there is no slot or room for it yet. Later requests
        // may go first, until it has been passed over for `bound` ms.
        if (bound <= 0 || (seq.passedOverSince !== null && now - seq.passedOverSince >= bound)) break;
        skipped.push(seq);
        i++;
        continue;
      }
      // Cached leading blocks are referenced (so no reclaim can take them), not allocated; the
      // rest must fit. (The RoPE regime first: it is part of what a cached block means.)
      const orig = this.limits.longRopeOriginalMax ?? 0;
      const long = orig > 0 && seq.numTokens > orig;
      if (long !== seq.ropeLong) seq.blockKeys.length = 0;
      seq.ropeLong = long;
      this.matchPrefix(seq);
      const need = this.paging.blocksFor(seq.numTokens) - seq.blocks.length;
      if (!this.paging.canAllocate(need)) this.reclaim(need - this.paging.freePages, seq);
      if (!this.paging.canAllocate(need)) {
        this.freeBlocks(seq);
        seq.numComputed = 0;
        if (this.running.length === 0 && plan.length === 0) {
          // Nothing else holds pages that could come back: this request can never fit.
          this.waiting.splice(i, 1);
          this.onUnfittable(seq);
          continue;
        }
        break; // FCFS: nobody overtakes a request that waits for KV; pages come back as others finish
      }
      const numNew = Math.min(seq.numTokens - seq.numComputed, budget);
      this.waiting.splice(i, 1);
      seq.state = SeqState.Running;
      seq.passedOverSince = null;
      seq.admittedAt = now;
      for (const q of skipped) q.passedOverSince ??= now;
      this.running.push(seq);
      this.grow(seq, seq.numComputed + numNew);
      plan.push({ seq, numNew, sample: seq.numComputed + numNew === seq.numTokens });
      planned.add(seq);
      budget -= numNew;
    }
    return plan;
  }

  /**
   * LongRoPE, as HF computes it: a forward over L tokens rotates every position with the short
   * factors while L <= original_max_position_embeddings and with the long ones beyond (HF's
   * generate drops its KV cache once, when a sequence crosses). A running sequence that crosses
   * therefore recomputes: its pages go, and every position is prefilled again with the long factors.
   */
  private switchLongRope(seq: Sequence): void {
    const orig = this.limits.longRopeOriginalMax ?? 0;
    if (orig <= 0 || seq.ropeLong || seq.numTokens <= orig) return;
    seq.ropeLong = true;
    seq.blockKeys.length = 0; // prefix-cache keys carry the regime
    if (seq.numComputed > 0 || seq.blocks.length > 0) {
      this.freeBlocks(seq);
      seq.numComputed = 0;
    }
  }

  private overLoraCap(seq: Sequence): boolean {
    const cap = this.limits.maxLorasPerBatch ?? 0;
    if (cap <= 0 || seq.adapterId === null) return false;
    const running = new Set(this.running.map((s) => s.adapterId).filter((a) => a !== null));
    return !running.has(seq.adapterId) && running.size >= cap;
  }

  /**
   * Makes `seq` hold pages for `tokens` tokens, preempting the newest running sequences not yet
   * planned this step when the pool is short. Returns false if `seq` itself had to be preempted.
   */
  private ensureBlocks(seq: Sequence, tokens: number, planned: Set<Sequence>): boolean {
    const need = () => this.paging.blocksFor(tokens) - seq.blocks.length;
    while (!this.paging.canAllocate(need())) {
      this.reclaim(need() - this.paging.freePages);
      if (this.paging.canAllocate(need())) break;
      const victim = [...this.running].reverse().find((s) => s !== seq && !planned.has(s));
      if (!victim) {
        this.preempt(seq);
        return false;
      }
      this.preempt(victim);
    }
    this.grow(seq, tokens);
    return true;
  }

  private grow(seq: Sequence, tokens: number): void {
    const need = this.paging.blocksFor(tokens) - seq.blocks.length;
    if (need > 0) seq.blocks.push(...this.paging.allocate(need, { kind: 'kv', seqId: seq.id }));
  }

  /** Recompute preemption: drop the KV cache, requeue at the front (it keeps its place in line). */
  private preempt(seq: Sequence): void {
    const i = this.running.indexOf(seq);
    if (i >= 0) this.running.splice(i, 1);
    this.freeBlocks(seq);
    seq.numComputed = 0;
    seq.state = SeqState.Waiting;
    seq.numPreemptions++;
    this.numPreemptions++;
    this.waiting.unshift(seq);
  }

  private freeBlocks(seq: Sequence): void {
    this.releaseBlocks(seq);
  }
}
