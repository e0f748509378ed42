// Mistral tool calls: `[TOOL_CALLS][{"name": "...", "arguments": {...}}, ...]` after optional text.
import { callFromJson, type ParsedCall, type ToolCallParser } from './parser.js';
import type { ToolDef } from './tools.js';

const TAG = '[TOOL_CALLS]';

export const mistralParser: ToolCallParser = {
  name: 'mistral',
  trigger: TAG,
  structuralTag(tools: ToolDef[], parallel: boolean) {
    return {
      type: 'structural_tag',
      format: {
        type: 'triggered_tags',
        stop_after_first: !parallel,
        triggers: [TAG],
        tags: tools.map((t) => ({
          type: 'tag',
          begin: `${TAG}[{"name": ${JSON.stringify(t.name)}, "arguments": `,
          content: { type: 'json_schema', json_schema: t.schema },
          end: '}]',
        })),
      },
    };
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
