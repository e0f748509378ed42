// Iteration-level (continuous batching) scheduler with chunked prefill, FCFS admission under the
// unified pool, and preemption by recompute when decode runs out of pages.
import type { PagingManager } from './paging-manager.js';
import { SeqState, type Sequence } from './sequence.js';

export interface SchedulerLimits {
  maxNumSeqs: number;
  maxBatchTokens: number;
  /** Distinct adapters among running sequences (0 = no cap). */
  maxLorasPerBatch?: number;
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
    //    what the prefix cache already holds).
    //    A constrained sequence whose first grammar mask is still being computed is passed over
    //    (it keeps its place); everything else is strictly FCFS.
    let wi = 0;
    while (wi < this.waiting.length && budget > 0 && this.running.length < this.limits.maxNumSeqs) {
      const seq = this.waiting[wi];
      if (!seq.canSample) {
        wi++;
        continue;
      }
      if (this.overLoraCap(seq)) break; // FCFS: wait until a running adapter's sequences finish
      if (!this.canAdmit(seq)) break; // its adapter is still loading, or no room for it yet
      // Cached leading blocks are referenced (so no reclaim can take them), not allocated; the
      // rest must fit.
      this.matchPrefix(seq);
      const need = this.paging.blocksFor(seq.numTokens) - seq.blocks.length;
      if (!this.paging.canAllocate(need)) this.reclaim(need - this.paging.freePages, seq);
      if (!this.paging.canAllocate(need)) {
        this.freeBlocks(seq);
        seq.numComputed = 0;
        if (this.running.length === 0 && plan.length === 0) {
          // Nothing else holds pages that could come back: this request can never fit.
          this.waiting.splice(wi, 1);
          this.onUnfittable(seq);
          continue;
        }
        break; // FCFS: nobody overtakes the head; KV comes back as others finish
      }
      const numNew = Math.min(seq.numTokens - seq.numComputed, budget);
      this.waiting.splice(wi, 1);
      seq.state = SeqState.Running;
      this.running.push(seq);
      this.grow(seq, seq.numComputed + numNew);
      plan.push({ seq, numNew, sample: seq.numComputed + numNew === seq.numTokens });
      planned.add(seq);
      budget -= numNew;
    }
    return plan;
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
