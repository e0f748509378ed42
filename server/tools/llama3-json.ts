// Llama 3.x JSON tool calls: the whole answer is `{"name": "...", "parameters": {...}}` (optionally
// after `<|python_tag|>`), several separated by `;`.
import { callFromJson, triggeredTags, type ParsedCall, type ToolCallParser } from './parser.js';
import type { ToolDef } from './tools.js';

export const llama3JsonParser: ToolCallParser = {
  name: 'llama3_json',
  trigger: '{"name": ',
  structuralTag(tools: ToolDef[], parallel: boolean) {
    return triggeredTags('{"name": ', tools, parallel, (n) => `{"name": ${n}, "parameters": `, '}');
  },
  parse(text: string) {
    const body = text.replace(/^\s*<\|python_tag\|>/, '').trim();
    if (!body.startsWith('{')) return { content: text, calls: [] };
    const calls: ParsedCall[] = [];
    // Split at `;` between top-level objects: try each prefix that parses.
    let rest = body;
    while (rest.length) {
      let found: { call: ParsedCall; end: number } | null = null;
      for (let i = rest.indexOf('}'); i >= 0; i = rest.indexOf('}', i + 1)) {
        const c = callFromJson(rest.slice(0, i + 1), ['parameters', 'arguments']);
        if (c) {
          found = { call: c, end: i + 1 };
          break;
        }
      }
      if (!found) return calls.length ? { content: rest.trim() || null, calls } : { content: text, calls: [] };
      calls.push(found.call);
      rest = rest.slice(found.end).replace(/^\s*;?\s*/, '');
    }
    return { content: null, calls };
  },
};
