// Paths and loaders for the committed golden fixtures (test/golden/fixtures, from make_golden.py).
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const FIXTURES = join(ROOT, 'test', 'golden', 'fixtures');
export const MODEL_NAMES = ['llama-gqa', 'qwen2-tied', 'llama3-bf16', 'mistral-sharded', 'llama-f16', 'qwen3-tied', 'gemma2', 'gemma3', 'phi3'] as const;

export interface GoldenStep {
  top: Array<[number, number]>;
  margin: number;
}

export interface GoldenCase {
  adapter: string | null;
  prompt: string;
  prompt_ids: number[];
  greedy_ids: number[];
  steps: GoldenStep[];
}

export interface GoldenFile {
  model: string;
  weights_dtype: string;
  tokenize: Array<{ text: string; add_special_tokens: boolean; ids: number[] }>;
  chat: Array<{ messages: Array<{ role: string; content: string }>; add_generation_prompt: boolean; text: string; ids: number[] }>;
  cases: GoldenCase[];
}

export function loadGolden(name: string): GoldenFile {
  return JSON.parse(readFileSync(join(FIXTURES, `${name}.json`), 'utf8')) as GoldenFile;
}

export function modelDir(name: string): string {
  return join(FIXTURES, 'models', name);
}

/** Adapter id used for a golden adapter path like "adapters/llama-gqa/r8-all". */
export function adapterId(path: string): string {
  return path.split('/').pop()!;
}

export function adapterRoot(name: string): string {
  return join(FIXTURES, 'adapters', name);
}

/**
 * Number of leading steps that must match exactly: up to (not including) the first step whose
 * reference top-2 margin is under 1e-3, where fp32 reordering may legitimately flip the argmax.
 */
export function strictSteps(c: GoldenCase, minMargin = 1e-3): number {
  const i = c.steps.findIndex((s) => s.margin < minMargin);
  return i < 0 ? c.steps.length : i;
}
