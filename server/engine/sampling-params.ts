// Per-request generation parameters (vLLM's SamplingParams subset) and their validation.
import { LoraplexError } from './errors.js';

export interface SamplingParams {
  maxTokens: number;
  temperature: number; // 0 = greedy
  topP: number;
  topK: number; // -1 = off
  minP: number;
  repetitionPenalty: number;
  presencePenalty: number;
  frequencyPenalty: number;
  seed: number | null;
  logprobs: number | null; // top-N alternatives per token (0..20); null = none
  /** Logprobs of the prompt's own tokens, with top-N alternatives (0..20); null = none. */
  promptLogprobs: number | null;
  ignoreEos: boolean;
  minTokens: number;
  stopTokenIds: number[];
}

export const MAX_LOGPROBS = 20;

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
  if (s.seed !== null && !(Number.isSafeInteger(s.seed) && s.seed >= 0)) bad('seed', 'seed must be a non-negative integer');
  if (s.logprobs !== null && !(Number.isInteger(s.logprobs) && s.logprobs >= 0 && s.logprobs <= MAX_LOGPROBS))
    bad('logprobs', `logprobs must be an integer in [0, ${MAX_LOGPROBS}]`);
  if (s.promptLogprobs !== null && !(Number.isInteger(s.promptLogprobs) && s.promptLogprobs >= 0 && s.promptLogprobs <= MAX_LOGPROBS))
    bad('prompt_logprobs', `prompt_logprobs must be an integer in [0, ${MAX_LOGPROBS}]`);
  if (!Number.isInteger(s.minTokens) || s.minTokens < 0) bad('min_tokens', 'min_tokens must be a non-negative integer');
  if (s.minTokens > s.maxTokens) bad('min_tokens', 'min_tokens must not exceed max_tokens');
  return s;
}
