// PEFT adapter_config.json semantics -> a per-(layer, projection) plan of rank and scale, exactly
// as PEFT resolves target_modules, layers_to_transform, rank_pattern, alpha_pattern and rsLoRA.
import { RE2JS } from 're2js';
import type { NativeLoraPlan } from '../native/addon.js';
import { readAdapterConfig } from './adapter-files.js';
import { AdapterError } from './errors.js';
import type { ModelInfo } from './model-config.js';

export const PROJ_NAMES = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] as const;

export interface LoraModulePlan {
  layer: number;
  proj: number; // index into PROJ_NAMES
  rank: number;
  alpha: number;
  scale: number;
}

export interface AdapterPlan {
  config: Record<string, unknown>;
  rank: number; // base r
  alpha: number;
  targetModules: string[]; // projection names that got at least one module
  modules: LoraModulePlan[];
}

export { AdapterError };

/** A LoRA-able linear module of a layer: its name and the projections (PROJ_NAMES indices) whose
 *  outputs it produces. Phi-3's fused qkv_proj and gate_up_proj produce several: one LoRA on them
 *  is one A and a B whose rows cover q | k | v (gate | up), which the plan and the native parser
 *  split into per-projection modules sharing A, sliced exactly where HF slices the fused output. */
interface LinearModule {
  name: string;
  parent: 'self_attn' | 'mlp';
  projs: number[];
}

const SEPARATE: LinearModule[] = PROJ_NAMES.map((name, p) => ({ name, parent: p <= 3 ? 'self_attn' : 'mlp', projs: [p] }));
const PHI3: LinearModule[] = [
  { name: 'qkv_proj', parent: 'self_attn', projs: [0, 1, 2] },
  { name: 'o_proj', parent: 'self_attn', projs: [3] },
  { name: 'gate_up_proj', parent: 'mlp', projs: [4, 5] },
  { name: 'down_proj', parent: 'mlp', projs: [6] },
];

function linearModules(model: ModelInfo): LinearModule[] {
  return model.spec.fusedQkv ? PHI3 : SEPARATE;
}

/** The module's name as PEFT matches it: `model.layers.N...`, or in a multimodal checkpoint's
 *  language model (Gemma3ForConditionalGeneration) `model.language_model.layers.N...`. */
function moduleKey(model: ModelInfo, layer: number, m: LinearModule): string {
  const prefix = model.spec.multimodalText ? 'model.language_model.' : 'model.';
  return `${prefix}layers.${layer}.${m.parent}.${m.name}`;
}

/**
 * Module-name patterns of adapter_config.json are matched with RE2 semantics (re2js: linear time in
 * the key, no backtracking), so a hostile pattern such as `(.*)*z` costs what any other does.
 * Python's lookaround and backreferences have no linear-time form: such a pattern is refused.
 */
export const MAX_PATTERN_LENGTH = 1024;
/** Entries of rank_pattern / alpha_pattern; of them, regular expressions (not plain module names). */
export const MAX_PATTERN_KEYS = 4096;
export const MAX_REGEX_KEYS = 256;

// The first compile and match pay for warming re2js up (~30 ms): do it at start, not in a request.
RE2JS.compile('(?:.*\\.)?(?:(a|b)*c+_proj)').matches('model.layers.0.mlp.c_proj');

interface KeyMatcher {
  test(key: string): boolean;
}

// `(.*\.)?(L)$` for a key L of plain name characters ('.' matches any character, as in the regex):
// a suffix compare, no regex at all. PEFT configs usually list module names like this.
const PLAIN_KEY = /^[A-Za-z0-9_.-]+$/;

function plainSuffixMatcher(lit: string): KeyMatcher {
  // L has a fixed length, so there is one split: the key's last |L| characters match L and what
  // precedes them is empty or ends with a literal dot.
  return {
    test(key: string): boolean {
      const off = key.length - lit.length;
      if (off < 0 || (off > 0 && key[off - 1] !== '.')) return false;
      for (let i = 0; i < lit.length; i++) if (lit[i] !== '.' && lit[i] !== key[off + i]) return false;
      return true;
    },
  };
}

function patternMatcher(pattern: string, field: string, anchored: 'full' | 'suffix'): KeyMatcher {
  if (pattern.length > MAX_PATTERN_LENGTH)
    throw new AdapterError(`adapter_config.json: a ${field} pattern is longer than ${MAX_PATTERN_LENGTH} characters`, 400, field);
  if (anchored === 'suffix' && PLAIN_KEY.test(pattern)) return plainSuffixMatcher(pattern);
  try {
    const re = RE2JS.compile(anchored === 'full' ? `(?:${pattern})` : `(?:.*\\.)?(?:${pattern})`);
    return { test: (key: string) => re.matches(key) };
  } catch (e) {
    throw new AdapterError(
      `adapter_config.json: ${field} ${JSON.stringify(pattern.slice(0, 80))} is not a supported regular expression (RE2 syntax: no lookaround or backreferences): ${(e as Error).message.replace(/^error parsing regexp: /, '')}`,
      400, field);
  }
}

interface PatternTable {
  entries: Array<{ key: string; value: number; m: KeyMatcher | null }>;
}

function patternTable(pattern: Record<string, unknown>, field: string): PatternTable {
  const keys = Object.keys(pattern);
  if (keys.length > MAX_PATTERN_KEYS) throw new AdapterError(`adapter_config.json: ${field} has more than ${MAX_PATTERN_KEYS} entries`, 400, field);
  if (keys.filter((k) => !PLAIN_KEY.test(k)).length > MAX_REGEX_KEYS)
    throw new AdapterError(`adapter_config.json: ${field} has more than ${MAX_REGEX_KEYS} regular-expression keys (plain module names are not limited this way)`, 400, field);
  return {
    entries: keys.map((k) => {
      const v = pattern[k];
      if (typeof v !== 'number' || !Number.isFinite(v)) throw new AdapterError(`adapter_config.json: ${field}[${JSON.stringify(k.slice(0, 80))}] must be a number`, 400, field);
      return { key: k, value: v, m: null };
    }),
  };
}

/** First entry (in the config's order) whose pattern matches `key`; compiled lazily, once. */
function* patternValue(t: PatternTable, key: string, field: string): Generator<void, number | undefined> {
  for (let i = 0; i < t.entries.length; i++) {
    const e = t.entries[i];
    e.m ??= patternMatcher(e.key, field, 'suffix');
    if (e.m.test(key)) return e.value;
    yield; // a compile can take a millisecond: give the caller a chance to pause after each

  }
  return undefined;
}

/**
 * Largest |scale| (lora_alpha / r, or / sqrt(r) with rsLoRA) accepted. Real adapters stay far
 * below it (alpha = 2r is common, i.e. 2); past it the delta swamps the base model and fp32
 * activations move towards overflow.
 */
export const MAX_LORA_SCALE = 1e4;

/** Reads an adapter directory's config (resolved inside the allowed roots) and plans it; off-loop friendly. */
export async function planAdapter(dir: string, model: ModelInfo, maxLoraRank: number, roots: string[]): Promise<AdapterPlan> {
  const cfg = readAdapterConfig(dir, roots);
  return planFromConfigAsync(cfg, model, maxLoraRank);
}

/** Resolves the plan synchronously (tests, small configs). */
export function planFromConfig(cfg: Record<string, unknown>, model: ModelInfo, maxLoraRank: number): AdapterPlan {
  const g = planSteps(cfg, model, maxLoraRank);
  for (;;) {
    const r = g.next();
    if (r.done) return r.value;
  }
}

/** Time a plan may take in all (hostile pattern tables); the event loop gets a turn every slice. */
const PLAN_SLICE_MS = 5;
const PLAN_DEADLINE_MS = 2000;

/**
 * Resolves the plan in slices of a few milliseconds, yielding to the event loop between them, so
 * a config with thousands of patterns never stalls running streams or /health.
 */
export async function planFromConfigAsync(cfg: Record<string, unknown>, model: ModelInfo, maxLoraRank: number): Promise<AdapterPlan> {
  const g = planSteps(cfg, model, maxLoraRank);
  const t0 = performance.now();
  let slice = t0;
  for (;;) {
    const r = g.next();
    if (r.done) return r.value;
    const now = performance.now();
    if (now - slice >= PLAN_SLICE_MS) {
      if (now - t0 > PLAN_DEADLINE_MS)
        throw new AdapterError(`adapter_config.json: matching its module patterns takes longer than ${PLAN_DEADLINE_MS / 1000} s; use fewer or simpler patterns`, 400, 'adapter_config.json');
      await new Promise<void>((res) => setImmediate(res));
      slice = performance.now();
    }
  }
}

function* planSteps(cfg: Record<string, unknown>, model: ModelInfo, maxLoraRank: number): Generator<void, AdapterPlan> {
  const fail = (field: string, msg: string): never => {
    throw new AdapterError(`adapter_config.json: ${msg}`, 400, field);
  };
  const peftType = cfg.peft_type ?? 'LORA';
  if (peftType !== 'LORA') fail('peft_type', `peft_type ${JSON.stringify(peftType)} is not supported (LORA only)`);
  if (cfg.use_dora === true) fail('use_dora', 'use_dora (DoRA) is not supported');
  if (Array.isArray(cfg.modules_to_save) ? cfg.modules_to_save.length > 0 : cfg.modules_to_save != null)
    fail('modules_to_save', 'modules_to_save is not supported');
  if (cfg.bias != null && cfg.bias !== 'none') fail('bias', `bias ${JSON.stringify(cfg.bias)} is not supported (none only)`);
  if (cfg.fan_in_fan_out === true) fail('fan_in_fan_out', 'fan_in_fan_out is not supported');
  for (const f of ['trainable_token_indices', 'target_parameters']) {
    const v = cfg[f];
    if (v != null && !(Array.isArray(v) && v.length === 0) && !(typeof v === 'object' && Object.keys(v as object).length === 0))
      fail(f, `${f} is not supported`);
  }
  const r = cfg.r ?? 8; // PEFT's default
  if (typeof r !== 'number' || !Number.isInteger(r)) fail('r', 'r must be an integer');
  const rank = r as number;
  const alphaRaw = cfg.lora_alpha ?? 8;
  if (typeof alphaRaw !== 'number' || !Number.isFinite(alphaRaw)) fail('lora_alpha', 'lora_alpha must be a finite number');
  const alpha = alphaRaw as number;
  const rsLora = cfg.use_rslora === true;
  const rankPatternRaw = cfg.rank_pattern ?? {};
  const alphaPatternRaw = cfg.alpha_pattern ?? {};
  if (typeof rankPatternRaw !== 'object' || Array.isArray(rankPatternRaw)) fail('rank_pattern', 'rank_pattern must be an object');
  if (typeof alphaPatternRaw !== 'object' || Array.isArray(alphaPatternRaw)) fail('alpha_pattern', 'alpha_pattern must be an object');
  const rankPattern = patternTable(rankPatternRaw as Record<string, unknown>, 'rank_pattern');
  const alphaPattern = patternTable(alphaPatternRaw as Record<string, unknown>, 'alpha_pattern');

  // PEFT's check_target_module_exists, for the module keys of a Llama-family model:
  // exclude_modules first; a string is a full-match regex (layers_to_transform does not apply);
  // in a list, an exact key is taken as is, a `.suffix` match is subject to layers_to_transform.
  const excl = cfg.exclude_modules;
  let excluded: (key: string) => boolean = () => false;
  if (typeof excl === 'string') {
    const re = patternMatcher(excl, 'exclude_modules', 'full');
    excluded = (k) => re.test(k);
  } else if (Array.isArray(excl) && excl.length > 0) {
    const list = excl.map(String);
    excluded = (k) => list.includes(k) || list.some((t) => k.endsWith(`.${t}`));
  } else if (excl != null && !Array.isArray(excl)) {
    fail('exclude_modules', 'exclude_modules must be a list of names or a regex string');
  }

  const tm = cfg.target_modules;
  let exact: (key: string) => boolean = () => false;
  let suffix: (key: string) => boolean;
  const embedKeys = ['model.embed_tokens', 'lm_head'];
  if (typeof tm === 'string') {
    if (tm.toLowerCase() === 'all-linear') {
      exact = () => true; // every linear layer but the output head
    } else {
      const re = patternMatcher(tm, 'target_modules', 'full');
      for (const k of embedKeys) if (re.test(k)) fail('target_modules', `target_modules matches ${k}; embedding and lm_head LoRA are not supported`);
      exact = (k) => re.test(k);
    }
    suffix = () => false;
  } else if (Array.isArray(tm) && tm.every((x) => typeof x === 'string') && tm.length > 0) {
    const list = tm as string[];
    for (const t of list) {
      if (/(^|\.)(embed_tokens|lm_head|wte|embed)$/.test(t)) fail('target_modules', `target module ${t}: embedding and lm_head LoRA are not supported`);
    }
    // A module name of the separate projections on a fused model (Phi-3 has qkv_proj and
    // gate_up_proj, no q_proj or gate_proj): an adapter trained for another architecture.
    if (model.spec.fusedQkv) {
      const missing = list.filter((t) => /(^|\.)(q_proj|k_proj|v_proj|gate_proj|up_proj)$/.test(t));
      if (missing.length)
        fail('target_modules', `target module ${missing[0]} does not exist in this ${model.spec.arch} model (its projections are qkv_proj, o_proj, gate_up_proj, down_proj)`);
    }
    exact = (k) => list.includes(k);
    suffix = (k) => list.some((t) => k.endsWith(`.${t}`));
  } else {
    return fail('target_modules', 'target_modules must be a non-empty list of names or a regex string');
  }

  let layers: Set<number> | null = null;
  const ltt = cfg.layers_to_transform;
  if (ltt != null && !(Array.isArray(ltt) && ltt.length === 0)) {
    const list = typeof ltt === 'number' ? [ltt] : Array.isArray(ltt) ? ltt : fail('layers_to_transform', 'layers_to_transform must be an int or a list');
    for (const l of list as unknown[])
      if (typeof l !== 'number' || !Number.isInteger(l) || l < 0 || l >= model.spec.numLayers)
        fail('layers_to_transform', `layers_to_transform entry ${JSON.stringify(l)} is not a layer of this ${model.spec.numLayers}-layer model`);
    layers = new Set(list as number[]);
  }
  const matches = (key: string, layer: number) =>
    !excluded(key) && (exact(key) || (suffix(key) && (layers === null || layers.has(layer))));

  const modules: LoraModulePlan[] = [];
  const targets = new Set<string>();
  for (let layer = 0; layer < model.spec.numLayers; layer++) {
    for (const mod of linearModules(model)) {
      const key = moduleKey(model, layer, mod);
      if (!matches(key, layer)) continue;
      const mr = (yield* patternValue(rankPattern, key, 'rank_pattern')) ?? rank;
      const ma = (yield* patternValue(alphaPattern, key, 'alpha_pattern')) ?? alpha;
      if (!Number.isInteger(mr) || mr < 1 || mr > maxLoraRank)
        throw new AdapterError(`adapter rank ${mr} (${key}) is outside 1..${maxLoraRank} (--max-lora-rank)`, 400, 'r', 'invalid_rank');
      const scale = rsLora ? ma / Math.sqrt(mr) : ma / mr;
      // The kernels multiply by the scale in fp32: it must be finite there, and sane.
      if (!Number.isFinite(Math.fround(scale)) || Math.abs(scale) > MAX_LORA_SCALE) {
        const field = ma === alpha ? 'lora_alpha' : 'alpha_pattern';
        throw new AdapterError(
          `adapter_config.json: the LoRA scale of ${key} (${field} ${ma} / ${rsLora ? 'sqrt(r)' : 'r'} with r ${mr}) is ${scale}; |scale| must be at most ${MAX_LORA_SCALE}`,
          400, field);
      }
      for (const proj of mod.projs) modules.push({ layer, proj, rank: mr, alpha: ma, scale });
      yield;
      targets.add(mod.name);
    }
  }
  if (modules.length === 0) fail('target_modules', 'target_modules matches no projection of the base model');
  return { config: cfg, rank, alpha, targetModules: [...targets], modules };
}

export function toNativePlan(plan: AdapterPlan): NativeLoraPlan {
  return {
    layers: Int32Array.from(plan.modules.map((m) => m.layer)),
    projs: Int32Array.from(plan.modules.map((m) => m.proj)),
    ranks: Int32Array.from(plan.modules.map((m) => m.rank)),
    scales: Float32Array.from(plan.modules.map((m) => m.scale)),
  };
}
