// Turns one sequence's tokens into text: incremental detokenisation (no split characters) and stop
// strings honoured across chunk boundaries and never emitted.
import type { Engine } from '../engine/engine.js';
import type { FinishReason, Sequence, TokenEvent } from '../engine/sequence.js';
import { IncrementalDecoder } from '../engine/tokenizer.js';

export interface TextDelta {
  text: string;
  tokens: TokenEvent[];
  finishReason: FinishReason | null;
}

export class TextStream {
  private readonly decoder: IncrementalDecoder;
  private pending = ''; // decoded, not yet emitted (might be the start of a stop string)
  private done = false;
  /** Why this choice ended as the client sees it ('stop' for a stop string too); null while running. */
  reason: FinishReason | null = null;
  readonly tokenIds: number[] = [];

  constructor(
    private readonly engine: Engine,
    readonly seq: Sequence,
    private readonly stops: string[],
  ) {
    this.decoder = new IncrementalDecoder(engine.tokenizer);
  }

  /** Next delta; finishReason set on the last one. Throws if the sequence failed. */
  async next(): Promise<TextDelta> {
    if (this.done) return { text: '', tokens: [], finishReason: this.seq.finishReason };
    const out = await this.seq.next();
    if (out.error) throw out.error;
    for (const t of out.tokens) this.tokenIds.push(t.token);
    // A stop token id or EOS is not part of the text (skip_special_tokens); decode the rest.
    let text = this.decoder.push(out.tokens.map((t) => t.token));
    if (out.finishReason) text += this.decoder.flush();
    this.pending += text;
    const hit = this.findStop();
    if (hit >= 0) {
      const emit = this.pending.slice(0, hit);
      this.pending = '';
      this.done = true;
      this.reason = 'stop';
      this.engine.abort(this.seq); // frees its pages now; the choice ends with "stop"
      return { text: emit, tokens: out.tokens, finishReason: 'stop' };
    }
    if (out.finishReason) {
      this.done = true;
      this.reason = out.finishReason;
      const emit = this.pending;
      this.pending = '';
      return { text: emit, tokens: out.tokens, finishReason: out.finishReason };
    }
    const hold = this.holdBack();
    const emit = this.pending.slice(0, this.pending.length - hold);
    this.pending = this.pending.slice(this.pending.length - hold);
    return { text: emit, tokens: out.tokens, finishReason: null };
  }

  get finished(): boolean {
    return this.done;
  }

  private findStop(): number {
    let best = -1;
    for (const s of this.stops) {
      const i = this.pending.indexOf(s);
      if (i >= 0 && (best < 0 || i < best)) best = i;
    }
    return best;
  }

  /** Length of the longest pending suffix that could still grow into a stop string. */
  private holdBack(): number {
    let h = 0;
    for (const s of this.stops)
      for (let k = Math.min(s.length - 1, this.pending.length); k > h; k--)
        if (this.pending.endsWith(s.slice(0, k))) {
          h = k;
          break;
        }
    return h;
  }
}
