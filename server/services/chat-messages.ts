// OpenAI chat messages -> the chat template's {role, content} list (text parts only; assistant
// tool_calls and tool results as transformers' templates take them), each failure a 400 naming the
// message. Shared by /v1/chat/completions and /tokenize.
import type { Static } from '@sinclair/typebox';
import type { ChatMessage as TplMessage } from '../engine/tokenizer.js';
import type { ChatMessage } from '../schemas/openai.js';
import { invalid } from './request-params.js';

export function templateMessages(messages: Array<Static<typeof ChatMessage>>): TplMessage[] {
  if (messages.length === 0) invalid('messages', 'messages must not be empty');
  return messages.map((m, i) => {
    if (!['system', 'user', 'assistant', 'developer', 'tool'].includes(m.role))
      invalid(`messages[${i}].role`, `unknown role ${JSON.stringify(m.role)} (system, user, assistant, tool)`);
    let content = '';
    if (typeof m.content === 'string') content = m.content;
    else if (Array.isArray(m.content)) {
      for (const [j, part] of m.content.entries()) {
        if (part.type !== 'text' || typeof part.text !== 'string')
          invalid(`messages[${i}].content[${j}]`, `content part type ${JSON.stringify(part.type)} is not supported (text only)`);
        content += part.text;
      }
    } else if (m.role !== 'assistant') invalid(`messages[${i}].content`, 'content is required');
    const out: TplMessage = { role: m.role === 'developer' ? 'system' : m.role, content };
    const raw = m as Record<string, unknown>;
    if (m.role === 'assistant' && raw.tool_calls != null) out.tool_calls = toolCalls(raw.tool_calls, `messages[${i}].tool_calls`);
    if (m.role === 'tool') {
      if (typeof raw.tool_call_id !== 'string') invalid(`messages[${i}].tool_call_id`, 'a tool message needs the tool_call_id it answers');
      out.tool_call_id = raw.tool_call_id;
      if (typeof m.name === 'string') out.name = m.name;
    }
    return out;
  });
}

/** An assistant message's tool_calls; arguments become objects where they parse (templates index them). */
function toolCalls(v: unknown, param: string): NonNullable<TplMessage['tool_calls']> {
  if (!Array.isArray(v)) invalid(param, 'tool_calls must be a list');
  return v.map((c: unknown, j) => {
    const call = c as { id?: unknown; type?: unknown; function?: { name?: unknown; arguments?: unknown } };
    if (!call || typeof call !== 'object' || !call.function || typeof call.function.name !== 'string')
      invalid(`${param}[${j}]`, 'each tool call needs function.name and function.arguments');
    let args: unknown = call.function.arguments ?? {};
    if (typeof args === 'string') {
      try {
        args = JSON.parse(args);
      } catch {
        // kept as the string the client sent
      }
    }
    return { id: typeof call.id === 'string' ? call.id : `call_${j}`, type: 'function' as const, function: { name: call.function.name, arguments: args } };
  });
}
