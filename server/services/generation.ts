// Runs the choices of one API request (prompts x n) on the engine and merges their text deltas.
import type { Engine } from '../engine/engine.js';
import { LoraplexError } from '../engine/errors.js';
import type { SamplingParams } from '../engine/sampling-params.js';
import type { FinishReason, TokenEvent } from '../engine/sequence.js';
import { TextStream, type TextDelta } from './text-stream.js';

export interface ChoiceInput {
  promptIds: number[];
  params: SamplingParams;
  stops: string[];
}

export interface ChoiceEvent {
  index: number;
  text: string;
  tokens: TokenEvent[];
  finishReason: FinishReason | null;
}

export class GenerationRun {
  readonly streams: TextStream[] = [];
  readonly promptTokens: number;

  constructor(
    private readonly engine: Engine,
    private readonly inputs: ChoiceInput[],
    adapter: string | null,
    cacheSalt: string | null = null,
  ) {
    try {
      for (const c of inputs) {
        const seq = engine.submit(c.promptIds, c.params, { adapter, cacheSalt });
        this.streams.push(new TextStream(engine, seq, c.stops));
      }
    } catch (e) {
      this.abort();
      throw e;
    }
    // Prompt tokens are counted once per prompt, as OpenAI does for n > 1.
    const seen = new Set<number[]>();
    let p = 0;
    for (const c of inputs) if (!seen.has(c.promptIds)) (seen.add(c.promptIds), (p += c.promptIds.length));
    this.promptTokens = p;
  }

  /** Prompt tokens served from the prefix cache, counted once per prompt as promptTokens is. */
  get cachedTokens(): number {
    const seen = new Set<number[]>();
    let n = 0;
    this.streams.forEach((s, i) => {
      const p = this.inputs[i].promptIds;
      if (!seen.has(p)) (seen.add(p), (n += s.seq.cachedTokens));
    });
    return n;
  }

  get completionTokens(): number {
    return this.streams.reduce((n, s) => n + s.seq.outputIds.length, 0);
  }

  /** True once the run was cancelled (the client went away, or the consumer stopped early). */
  get cancelled(): boolean {
    return this.wasCancelled;
  }
  private wasCancelled = false;

  /** Cancels every choice still running (client went away): pages are freed at once. */
  abort(): void {
    if (this.streams.some((s) => !s.finished)) this.wasCancelled = true;
    for (const s of this.streams) this.engine.abort(s.seq);
  }

  /**
   * All choices' deltas as they arrive; ends when every choice has finished. Each choice has one
   * pump that appends to a shared queue, so waiting costs one pending promise per choice and one
   * wake-up per delta (racing every pending choice on every event was quadratic in choices).
   */
  async *events(): AsyncGenerator<ChoiceEvent> {
    const queue: Array<{ i: number; d: TextDelta } | { i: number; err: unknown }> = [];
    let wake: (() => void) | null = null;
    const push = (item: (typeof queue)[number]) => {
      queue.push(item);
      const w = wake;
      wake = null;
      w?.();
    };
    const pump = async (i: number) => {
      const s = this.streams[i];
      try {
        for (;;) {
          const d = await s.next();
          push({ i, d });
          if (d.finishReason) return;
        }
      } catch (err) {
        push({ i, err });
      }
    };
    this.streams.forEach((_, i) => void pump(i));
    let open = this.streams.length;
    try {
      while (open > 0) {
        if (queue.length === 0) await new Promise<void>((r) => (wake = r));
        // Take everything queued at once (one shift per event would be quadratic too).
        const batch = queue.splice(0, queue.length);
        for (const item of batch) {
          if ('err' in item) throw item.err;
          const { i, d } = item;
          if (d.finishReason === 'error') throw new LoraplexError('generation failed', 500, 'server_error');
          if (d.finishReason) open--;
          yield { index: i, text: d.text, tokens: d.tokens, finishReason: d.finishReason };
        }
      }
    } finally {
      if (open > 0) this.abort();
    }
  }
}
