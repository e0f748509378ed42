// Hermes / Qwen2.5 tool calls: `<tool_call>\n{"name": "...", "arguments": {...}}\n</tool_call>`,
// any number of them, after optional text.
import { callFromJson, triggeredTags, type ParsedCall, type ToolCallParser } from './parser.js';
import type { ToolDef } from './tools.js';

const CALL = /<tool_call>\s*([\s\S]*?)\s*<\/tool_call>/g;

export const hermesParser: ToolCallParser = {
  name: 'hermes',
  trigger: '<tool_call>',
  structuralTag(tools: ToolDef[], parallel: boolean) {
    return triggeredTags('<tool_call>', tools, parallel, (n) => `<tool_call>\n{"name": ${n}, "arguments": `, '}\n</tool_call>');
  },
  parse(text: string) {
    const calls: ParsedCall[] = [];
    let content = '';
    let last = 0;
    for (const m of text.matchAll(CALL)) {
      const c = callFromJson(m[1], ['arguments', 'parameters']);
      if (!c) continue;
      calls.push(c);
      content += text.slice(last, m.index);
      last = m.index! + m[0].length;
    }
    if (calls.length === 0) return { content: text, calls };
    content += text.slice(last);
    return { content: content.trim() === '' ? null : content.trim(), calls };
  },
};
