// Streaming of `required` and `auto` tool calls for one choice: text before the parser's start tag
// streams as content (a tail that could begin the tag is held back until it cannot); from the tag
// on, the output is held and parsed into calls when the choice finishes.
import type { ParsedCall } from './parser.js';
import { parseToolOutput, type ToolPlan } from './tools.js';

export interface ToolStreamDelta {
  content: string | null; // text to send now
  calls: ParsedCall[]; // complete calls (only when the choice finished)
  finishReason: string | null; // `tool_calls` when it called tools and stopped
}

export class ToolCallStream {
  private text = '';
  private sent = 0; // characters sent as content
  private inCall = false;

  constructor(private readonly plan: ToolPlan) {}

  push(delta: string, finish: string | null): ToolStreamDelta {
    this.text += delta;
    let content = '';
    const trigger = this.plan.mode === 'auto' ? this.plan.parser!.trigger : null;
    if (trigger !== null && !this.inCall) {
      const at = this.text.indexOf(trigger, Math.max(0, this.sent - trigger.length));
      let end = at >= 0 ? at : this.text.length;
      if (at < 0 && finish === null)
        for (let k = Math.min(trigger.length - 1, this.text.length); k > 0; k--)
          if (trigger.startsWith(this.text.slice(this.text.length - k))) {
            end = this.text.length - k;
            break;
          }
      if (end > this.sent) content = this.text.slice(this.sent, end);
      this.sent = Math.max(this.sent, end);
      if (at >= 0) this.inCall = true;
    }
    if (finish === null) return { content: content || null, calls: [], finishReason: null };
    const rest = this.text.slice(this.sent);
    const r = trigger === null || this.inCall ? parseToolOutput(this.plan, rest) : { content: rest || null, calls: [] };
    if (r.calls.length === 0) content += rest;
    else if (r.content) content += r.content;
    return { content: content || null, calls: r.calls, finishReason: r.calls.length && finish === 'stop' ? 'tool_calls' : finish };
  }
}
