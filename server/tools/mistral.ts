// Mistral tool calls: `[TOOL_CALLS][{"name": "...", "arguments": {...}}, ...]` after optional text.
import { callFromJson, triggeredTags, type ParsedCall, type ToolCallParser } from './parser.js';
import type { ToolDef } from './tools.js';

const TAG = '[TOOL_CALLS]';

export const mistralParser: ToolCallParser = {
  name: 'mistral',
  trigger: TAG,
  structuralTag(tools: ToolDef[], parallel: boolean) {
    return triggeredTags(TAG, tools, parallel, (n) => `${TAG}[{"name": ${n}, "arguments": `, '}]');
  },
  parse(text: string) {
    const at = text.indexOf(TAG);
    if (at < 0) return { content: text, calls: [] };
    const head = text.slice(0, at).trim();
    let list: unknown;
    try {
      list = JSON.parse(text.slice(at + TAG.length).trim());
    } catch {
      return { content: text, calls: [] };
    }
    const calls: ParsedCall[] = [];
    for (const item of Array.isArray(list) ? list : [list]) {
      const c = callFromJson(JSON.stringify(item), ['arguments', 'parameters']);
      if (!c) return { content: text, calls: [] };
      calls.push(c);
    }
    return { content: head === '' ? null : head, calls };
  },
};
