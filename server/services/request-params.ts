// OpenAI request fields -> engine inputs: model/adapter resolution, prompt normalisation and
// sampling parameters, each failure a 400/404 naming the parameter.
import type { Engine } from '../engine/engine.js';
import { LoraplexError } from '../engine/errors.js';
import { makeSamplingParams, MAX_LOGIT_BIAS, type SamplingParams } from '../engine/sampling-params.js';
import { exactSeed } from '../json-body.js';

export function invalid(param: string, message: string, code = 'invalid_value'): never {
  throw new LoraplexError(message, 400, 'invalid_request_error', param, code);
}

/** The base model's name selects no adapter; any other name must be a known adapter (404). */
export function resolveAdapter(engine: Engine, model: string): string | null {
  if (model === engine.model.name) return null;
  if (engine.adapters.lookup(model)) return model;
  throw new LoraplexError(`The model \`${model}\` does not exist.`, 404, 'invalid_request_error', 'model', 'model_not_found');
}

export interface CommonFields {
  max_tokens?: number | null;
  temperature?: number | null;
  top_p?: number | null;
  n?: number | null;
  stop?: string | string[] | null;
  seed?: number | null;
  presence_penalty?: number | null;
  frequency_penalty?: number | null;
  top_k?: number | null;
  min_p?: number | null;
  repetition_penalty?: number | null;
  ignore_eos?: boolean;
  min_tokens?: number;
  stop_token_ids?: number[];
  logit_bias?: Record<string, unknown> | null;
  echo?: boolean | null;
}

export function stopStrings(stop: string | string[] | null | undefined): string[] {
  if (stop == null) return [];
  const list = typeof stop === 'string' ? [stop] : stop;
  if (list.some((s) => s.length === 0)) invalid('stop', 'stop strings must not be empty');
  if (list.length > 16) invalid('stop', 'at most 16 stop strings are allowed');
  return list;
}

export function choiceCount(n: number | null | undefined, maxN: number): number {
  const v = n ?? 1;
  if (!Number.isInteger(v) || v < 1 || v > maxN) invalid('n', `n must be an integer in [1, ${maxN}]`);
  return v;
}

/**
 * Sampling parameters for one prompt. `maxTokens` null means "the rest of the context window".
 * Checks the context window here so the error names max_tokens with context_length_exceeded.
 */
export function samplingParams(
  engine: Engine,
  body: CommonFields,
  maxTokens: number | null | undefined,
  maxTokensParam: string,
  promptLen: number,
  logprobs: number | null,
  promptLogprobs: number | null = null,
): SamplingParams {
  const logitBias = logitBiasPairs(engine, body.logit_bias);
  const ctx = engine.maxModelLen;
  // 0 is valid only where the route allows it (completions with echo: the prompt alone).
  if (maxTokens != null && (!Number.isInteger(maxTokens) || maxTokens < 0 || (maxTokens === 0 && promptLogprobs === null && !body.echo)))
    invalid(maxTokensParam, `${maxTokensParam} must be a positive integer`);
  const room = ctx - promptLen;
  if (maxTokens != null && maxTokens > ctx)
    invalid(maxTokensParam, `${maxTokensParam} (${maxTokens}) is larger than the context window of ${ctx} tokens`, 'context_length_exceeded');
  if (room < (maxTokens === 0 ? 0 : 1) || (maxTokens != null && promptLen + maxTokens > ctx))
    invalid(
      maxTokensParam,
      `This model's maximum context length is ${ctx} tokens. However, you requested ${promptLen + (maxTokens ?? 1)} tokens (${promptLen} in the prompt, ${maxTokens ?? 1} for the completion).`,
      'context_length_exceeded',
    );
  if (body.stop_token_ids?.some((id) => id < 0 || id >= engine.model.spec.vocabSize))
    invalid('stop_token_ids', 'stop_token_ids must be token ids of the vocabulary');
  if (body.top_k != null && body.top_k === 0) invalid('top_k', 'top_k must be -1 (off) or a positive integer');
  try {
    return makeSamplingParams({
      maxTokens: maxTokens ?? room,
      temperature: body.temperature ?? 1,
      topP: body.top_p ?? 1,
      topK: body.top_k ?? -1,
      minP: body.min_p ?? 0,
      repetitionPenalty: body.repetition_penalty ?? 1,
      presencePenalty: body.presence_penalty ?? 0,
      frequencyPenalty: body.frequency_penalty ?? 0,
      seed: exactSeed(body) ?? body.seed ?? null, // exact past 2^53 (json-body.ts)
      logprobs,
      promptLogprobs,
      ignoreEos: body.ignore_eos ?? false,
      minTokens: body.min_tokens ?? 0,
      stopTokenIds: body.stop_token_ids ?? [],
      logitBias,
    });
  } catch (e) {
    if (e instanceof LoraplexError && e.param === 'max_tokens') invalid(maxTokensParam, e.message.replace('max_tokens', maxTokensParam));
    throw e;
  }
}

/**
 * OpenAI's logit_bias ({"token id": bias}) as [id, bias] pairs: keys must be token ids of the
 * vocabulary, values numbers in [-100, 100] (vLLM clamps them; OpenAI refuses them), at most
 * MAX_LOGIT_BIAS entries. Keys naming the same id ("5", "05"): the last wins, as in vLLM.
 */
export function logitBiasPairs(engine: Engine, bias: Record<string, unknown> | null | undefined): Array<[number, number]> {
  if (bias == null) return [];
  const keys = Object.keys(bias);
  if (keys.length > MAX_LOGIT_BIAS) invalid('logit_bias', `logit_bias may hold at most ${MAX_LOGIT_BIAS} entries (got ${keys.length})`);
  const V = engine.model.spec.vocabSize;
  const byId = new Map<number, number>();
  for (const k of keys) {
    if (!/^\s*[+-]?\d+\s*$/.test(k)) invalid('logit_bias', `logit_bias keys must be token ids (integers), got ${JSON.stringify(k)}`);
    const id = Number(k);
    if (!(id >= 0 && id < V)) invalid('logit_bias', `token id ${k.trim()} in logit_bias is outside the vocabulary [0, ${V})`);
    const v = bias[k];
    if (typeof v !== 'number' || !(v >= -100 && v <= 100))
      invalid('logit_bias', `logit_bias values must be numbers in [-100, 100], got ${JSON.stringify(v)} for token ${k.trim()}`);
    byId.set(id, v);
  }
  return [...byId];
}

/** `prompt` of /v1/completions: a string, strings, token ids, or lists of token ids. */
export function normalizePrompts(engine: Engine, prompt: unknown): Array<{ ids: number[]; text: string | null }> {
  const V = engine.model.spec.vocabSize;
  const checkIds = (ids: number[]) => {
    if (ids.length === 0) invalid('prompt', 'prompt must not be empty');
    for (const id of ids) if (id < 0 || id >= V) invalid('prompt', `token id ${id} is outside the vocabulary [0, ${V})`);
    return { ids, text: null };
  };
  const fromText = (t: string) => {
    if (t.length === 0) invalid('prompt', 'prompt must not be empty');
    return { ids: engine.tokenizer.encode(t), text: t };
  };
  if (typeof prompt === 'string') return [fromText(prompt)];
  if (!Array.isArray(prompt) || prompt.length === 0) invalid('prompt', 'prompt must not be empty');
  if (typeof prompt[0] === 'string') return (prompt as string[]).map(fromText);
  if (typeof prompt[0] === 'number') return [checkIds(prompt as number[])];
  return (prompt as number[][]).map(checkIds);
}
