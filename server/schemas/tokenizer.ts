// TypeBox schemas of vLLM's tokenizer routes (POST /tokenize, POST /detokenize): the API contract.
// Which of `prompt` / `messages` is given, and the token ids' range, are checked in the route so
// the message names the parameter.
import { Type, type Static } from '@sinclair/typebox';
import { ChatMessage } from './openai.js';

export const TokenizeRequest = Type.Object(
  {
    model: Type.Optional(Type.Union([Type.String(), Type.Null()])),
    /** Completion form. */
    prompt: Type.Optional(Type.String()),
    /** Chat form: rendered with the chat template first. */
    messages: Type.Optional(Type.Array(ChatMessage)),
    /** Default true for `prompt`, false for `messages` (the template adds its own), as vLLM. */
    add_special_tokens: Type.Optional(Type.Boolean()),
    add_generation_prompt: Type.Optional(Type.Boolean()),
    continue_final_message: Type.Optional(Type.Boolean()),
    return_token_strs: Type.Optional(Type.Union([Type.Boolean(), Type.Null()])),
  },
  { additionalProperties: true },
);
export type TokenizeRequest = Static<typeof TokenizeRequest>;

export const DetokenizeRequest = Type.Object(
  {
    model: Type.Optional(Type.Union([Type.String(), Type.Null()])),
    tokens: Type.Array(Type.Integer()),
  },
  { additionalProperties: true },
);
export type DetokenizeRequest = Static<typeof DetokenizeRequest>;
