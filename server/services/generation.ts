// Runs the choices of one API request (prompts x n) on the engine and merges their text deltas.
import type { Engine } from '../engine/engine.js';
import { LoraplexError } from '../engine/errors.js';
import type { SamplingParams } from '../engine/sampling-params.js';
import type { FinishReason, TokenEvent } from '../engine/sequence.js';
import { TextStream } from './text-stream.js';

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
    inputs: ChoiceInput[],
    adapter: string | null,
  ) {
    try {
      for (const c of inputs) {
        const seq = engine.submit(c.promptIds, c.params, { adapter });
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

  get completionTokens(): number {
    return this.streams.reduce((n, s) => n + s.seq.outputIds.length, 0);
  }

  /** Cancels every choice still running (client went away): pages are freed at once. */
  abort(): void {
    for (const s of this.streams) this.engine.abort(s.seq);
  }

  /** All choices' deltas as they arrive; ends when every choice has finished. */
  async *events(): AsyncGenerator<ChoiceEvent> {
    const pending = new Map<number, Promise<{ i: number; d: Awaited<ReturnType<TextStream['next']>> }>>();
    const pull = (i: number) => pending.set(i, this.streams[i].next().then((d) => ({ i, d })));
    this.streams.forEach((_, i) => pull(i));
    try {
      while (pending.size) {
        const { i, d } = await Promise.race(pending.values());
        pending.delete(i);
        if (d.finishReason === 'error') throw new LoraplexError('generation failed', 500, 'server_error');
        if (!d.finishReason) pull(i);
        yield { index: i, text: d.text, tokens: d.tokens, finishReason: d.finishReason };
      }
    } finally {
      if (pending.size) this.abort();
    }
  }
}
