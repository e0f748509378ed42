// Per-request generation parameters (vLLM's SamplingParams subset) and their validation.
import { LoraplexError } from './errors.js';
import type { GrammarRef } from './grammar.js';

export interface SamplingParams {
  maxTokens: number;
  temperature: number; // 0 = greedy
  topP: number;
  topK: number; // -1 = off
  minP: number;
  repetitionPenalty: number;
  presencePenalty: number;
  frequencyPenalty: number;
  /** Any integer in the signed 64-bit range (a bigint where a double cannot hold it); null = unseeded. */
  seed: number | bigint | null;
  logprobs: number | null; // top-N alternatives per token (0..20); null = none
  /** Logprobs of the prompt's own tokens, with top-N alternatives (0..20); null = none. */
  promptLogprobs: number | null;
  ignoreEos: boolean;
  minTokens: number;
  stopTokenIds: number[];
  /** OpenAI's logit_bias: [token id, bias in [-100, 100]] added to the logits before any processing. */
  logitBias: Array<[number, number]>;
  /** Structured outputs: a compiled grammar (GrammarService.prepare) every token must follow; null = free. */
  grammar: GrammarRef | null;
}

export const MAX_LOGPROBS = 20;
export const MAX_LOGIT_BIAS = 1024;
export const SEED_MIN = -(2n ** 63n);
export const SEED_MAX = 2n ** 63n - 1n;

/** The 64-bit seed of choice k of a request seeded with `seed` (seed + k, wrapping as int64). */
export function choiceSeed(seed: number | bigint | null, k: number): bigint | null {
  return seed === null ? null : BigInt.asIntN(64, BigInt(seed) + BigInt(k));
}

export function defaultSamplingParams(): SamplingParams {
  return {
    maxTokens: 16,
    temperature: 1,
    topP: 1,
    topK: -1,
    minP: 0,
    repetitionPenalty: 1,
    presencePenalty: 0,
    frequencyPenalty: 0,
    seed: null,
    logprobs: null,
    promptLogprobs: null,
    ignoreEos: false,
    minTokens: 0,
    stopTokenIds: [],
    logitBias: [],
    grammar: null,
  };
}

function bad(param: string, message: string): never {
  throw new LoraplexError(message, 400, 'invalid_request_error', param, 'invalid_value');
}

/** Fills defaults and checks every range; throws a 400 LoraplexError naming the parameter. */
export function makeSamplingParams(p: Partial<SamplingParams>): SamplingParams {
  const s = { ...defaultSamplingParams(), ...Object.fromEntries(Object.entries(p).filter(([, v]) => v !== undefined)) };
  // 0 only scores the prompt (echo with prompt logprobs); the routes decide when that is allowed.
  if (!Number.isInteger(s.maxTokens) || s.maxTokens < 0) bad('max_tokens', 'max_tokens must be a non-negative integer');
  if (!(s.temperature >= 0 && s.temperature <= 2)) bad('temperature', 'temperature must be in [0, 2]');
  if (!(s.topP > 0 && s.topP <= 1)) bad('top_p', 'top_p must be in (0, 1]');
  if (!Number.isInteger(s.topK) || s.topK < -1 || s.topK === 0) bad('top_k', 'top_k must be -1 (off) or a positive integer');
  if (!(s.minP >= 0 && s.minP <= 1)) bad('min_p', 'min_p must be in [0, 1]');
  if (!(s.repetitionPenalty > 0 && s.repetitionPenalty <= 2)) bad('repetition_penalty', 'repetition_penalty must be in (0, 2]');
  if (!(s.presencePenalty >= -2 && s.presencePenalty <= 2)) bad('presence_penalty', 'presence_penalty must be in [-2, 2]');
  if (!(s.frequencyPenalty >= -2 && s.frequencyPenalty <= 2)) bad('frequency_penalty', 'frequency_penalty must be in [-2, 2]');
  if (s.seed !== null && !((typeof s.seed === 'bigint' || Number.isInteger(s.seed)) && BigInt(s.seed) >= SEED_MIN && BigInt(s.seed) <= SEED_MAX))
    bad('seed', `seed must be an integer in [${SEED_MIN}, ${SEED_MAX}]`);
  if (s.logitBias.length > MAX_LOGIT_BIAS) bad('logit_bias', `logit_bias may hold at most ${MAX_LOGIT_BIAS} entries`);
  for (const [id, v] of s.logitBias)
    if (!(Number.isInteger(id) && id >= 0 && typeof v === 'number' && v >= -100 && v <= 100))
      bad('logit_bias', 'logit_bias maps token ids to biases in [-100, 100]');
  if (s.logprobs !== null && !(Number.isInteger(s.logprobs) && s.logprobs >= 0 && s.logprobs <= MAX_LOGPROBS))
    bad('logprobs', `logprobs must be an integer in [0, ${MAX_LOGPROBS}]`);
  if (s.promptLogprobs !== null && !(Number.isInteger(s.promptLogprobs) && s.promptLogprobs >= 0 && s.promptLogprobs <= MAX_LOGPROBS))
    bad('prompt_logprobs', `prompt_logprobs must be an integer in [0, ${MAX_LOGPROBS}]`);
  if (!Number.isInteger(s.minTokens) || s.minTokens < 0) bad('min_tokens', 'min_tokens must be a non-negative integer');
  if (s.minTokens > s.maxTokens) bad('min_tokens', 'min_tokens must not exceed max_tokens');
  return s;
}
