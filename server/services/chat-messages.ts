// OpenAI chat messages -> the chat template's {role, content} list (text parts only), each
// failure a 400 naming the message. Shared by /v1/chat/completions and /tokenize.
import type { Static } from '@sinclair/typebox';
import type { ChatMessage as TplMessage } from '../engine/tokenizer.js';
import type { ChatMessage } from '../schemas/openai.js';
import { invalid } from './request-params.js';

export function templateMessages(messages: Array<Static<typeof ChatMessage>>): TplMessage[] {
  if (messages.length === 0) invalid('messages', 'messages must not be empty');
  return messages.map((m, i) => {
    if (!['system', 'user', 'assistant', 'developer'].includes(m.role))
      invalid(`messages[${i}].role`, `unknown role ${JSON.stringify(m.role)} (system, user, assistant)`);
    let content = '';
    if (typeof m.content === 'string') content = m.content;
    else if (Array.isArray(m.content)) {
      for (const [j, part] of m.content.entries()) {
        if (part.type !== 'text' || typeof part.text !== 'string')
          invalid(`messages[${i}].content[${j}]`, `content part type ${JSON.stringify(part.type)} is not supported (text only)`);
        content += part.text;
      }
    } else if (m.role !== 'assistant') invalid(`messages[${i}].content`, 'content is required');
    return { role: m.role === 'developer' ? 'system' : m.role, content };
  });
}
