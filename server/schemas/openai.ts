// TypeBox schemas of the OpenAI-compatible routes: the API contract. Types are checked here;
// value ranges are checked in one place (sampling-params.ts, request-params.ts) so every message
// names its parameter the same way.
import { Type, type Static } from '@sinclair/typebox';

const StopSchema = Type.Union([Type.String(), Type.Array(Type.String())]);
const StreamOptions = Type.Object({ include_usage: Type.Optional(Type.Boolean()) }, { additionalProperties: true });
const Nullable = <T extends ReturnType<typeof Type.Number>>(t: T) => Type.Union([t, Type.Null()]);

/** Sampling fields shared by completions and chat (OpenAI names plus vLLM's extensions). */
const common = {
  model: Type.String(),
  max_tokens: Type.Optional(Type.Union([Type.Integer(), Type.Null()])),
  temperature: Type.Optional(Nullable(Type.Number())),
  top_p: Type.Optional(Nullable(Type.Number())),
  n: Type.Optional(Type.Union([Type.Integer(), Type.Null()])),
  stop: Type.Optional(Type.Union([StopSchema, Type.Null()])),
  stream: Type.Optional(Type.Union([Type.Boolean(), Type.Null()])),
  stream_options: Type.Optional(Type.Union([StreamOptions, Type.Null()])),
  seed: Type.Optional(Type.Union([Type.Integer(), Type.Null()])),
  presence_penalty: Type.Optional(Nullable(Type.Number())),
  frequency_penalty: Type.Optional(Nullable(Type.Number())),
  user: Type.Optional(Type.String()),
  top_k: Type.Optional(Type.Union([Type.Integer(), Type.Null()])),
  min_p: Type.Optional(Nullable(Type.Number())),
  repetition_penalty: Type.Optional(Nullable(Type.Number())),
  ignore_eos: Type.Optional(Type.Boolean()),
  min_tokens: Type.Optional(Type.Integer()),
  stop_token_ids: Type.Optional(Type.Array(Type.Integer())),
  cache_salt: Type.Optional(Type.Union([Type.String(), Type.Null()])),
};

export const CompletionRequest = Type.Object(
  {
    ...common,
    prompt: Type.Union([
      Type.String(),
      Type.Array(Type.String()),
      Type.Array(Type.Integer()),
      Type.Array(Type.Array(Type.Integer())),
    ]),
    logprobs: Type.Optional(Type.Union([Type.Integer(), Type.Null()])),
    echo: Type.Optional(Type.Union([Type.Boolean(), Type.Null()])),
    prompt_logprobs: Type.Optional(Type.Union([Type.Integer(), Type.Null()])),
    suffix: Type.Optional(Type.Union([Type.String(), Type.Null()])),
    best_of: Type.Optional(Type.Union([Type.Integer(), Type.Null()])),
    logit_bias: Type.Optional(Type.Union([Type.Record(Type.String(), Type.Unknown()), Type.Null()])), // values checked in request-params.ts
  },
  { additionalProperties: true },
);
export type CompletionRequest = Static<typeof CompletionRequest>;

const TextPart = Type.Object({ type: Type.String(), text: Type.Optional(Type.String()) }, { additionalProperties: true });
export const ChatMessage = Type.Object(
  {
    role: Type.String(),
    content: Type.Optional(Type.Union([Type.String(), Type.Array(TextPart), Type.Null()])),
    name: Type.Optional(Type.String()),
  },
  { additionalProperties: true },
);

export const ChatCompletionRequest = Type.Object(
  {
    ...common,
    messages: Type.Array(ChatMessage),
    max_completion_tokens: Type.Optional(Type.Union([Type.Integer(), Type.Null()])),
    logprobs: Type.Optional(Type.Union([Type.Boolean(), Type.Null()])),
    top_logprobs: Type.Optional(Type.Union([Type.Integer(), Type.Null()])),
    response_format: Type.Optional(Type.Union([Type.Object({ type: Type.String() }, { additionalProperties: true }), Type.Null()])),
    tools: Type.Optional(Type.Union([Type.Array(Type.Unknown()), Type.Null()])),
    tool_choice: Type.Optional(Type.Unknown()),
    logit_bias: Type.Optional(Type.Union([Type.Record(Type.String(), Type.Unknown()), Type.Null()])), // values checked in request-params.ts
    add_generation_prompt: Type.Optional(Type.Boolean()),
  },
  { additionalProperties: true },
);
export type ChatCompletionRequest = Static<typeof ChatCompletionRequest>;

export const ErrorResponse = Type.Object({
  error: Type.Object({
    message: Type.String(),
    type: Type.String(),
    param: Type.Union([Type.String(), Type.Null()]),
    code: Type.Union([Type.String(), Type.Null()]),
  }),
});
