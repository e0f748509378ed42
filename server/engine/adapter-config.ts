// PEFT adapter_config.json semantics -> a per-(layer, projection) plan of rank and scale, exactly
// as PEFT resolves target_modules, layers_to_transform, rank_pattern, alpha_pattern and rsLoRA.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { NativeLoraPlan } from '../native/addon.js';
import { LoraplexError } from './errors.js';
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

export class AdapterError extends LoraplexError {
  constructor(message: string, status = 400, param: string | null = null, code = 'invalid_adapter') {
    super(message, status, 'invalid_request_error', param, code);
    this.name = 'AdapterError';
  }
}

function moduleKey(layer: number, proj: number): string {
  return `model.layers.${layer}.${proj <= 3 ? 'self_attn' : 'mlp'}.${PROJ_NAMES[proj]}`;
}

function pyRegex(pattern: string, field: string, anchored: 'full' | 'suffix'): RegExp {
  try {
    return anchored === 'full' ? new RegExp(`^(?:${pattern})$`) : new RegExp(`^(.*\\.)?(${pattern})$`);
  } catch (e) {
    throw new AdapterError(`adapter_config.json: ${field} ${JSON.stringify(pattern)} is not a valid regular expression`, 400, field);
  }
}

function patternValue(pattern: Record<string, unknown>, key: string, field: string): number | undefined {
  for (const [k, v] of Object.entries(pattern)) {
    if (pyRegex(k, field, 'suffix').test(key)) {
      if (typeof v !== 'number' || !Number.isFinite(v)) throw new AdapterError(`adapter_config.json: ${field}[${k}] must be a number`, 400, field);
      return v;
    }
  }
  return undefined;
}

/** Reads and resolves an adapter directory's config against the base model. Throws AdapterError. */
export function planAdapter(dir: string, model: ModelInfo, maxLoraRank: number): AdapterPlan {
  const path = join(dir, 'adapter_config.json');
  let cfg: Record<string, unknown>;
  try {
    const v = JSON.parse(readFileSync(path, 'utf8'));
    if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new Error('not a JSON object');
    cfg = v;
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw new AdapterError(`adapter_config.json: ${code === 'ENOENT' ? 'missing' : (e as Error).message}`, 400, 'adapter_config.json');
  }
  return planFromConfig(cfg, model, maxLoraRank);
}

export function planFromConfig(cfg: Record<string, unknown>, model: ModelInfo, maxLoraRank: number): AdapterPlan {
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
  if (typeof alphaRaw !== 'number' || !Number.isFinite(alphaRaw)) fail('lora_alpha', 'lora_alpha must be a number');
  const alpha = alphaRaw as number;
  const rsLora = cfg.use_rslora === true;
  const rankPattern = (cfg.rank_pattern ?? {}) as Record<string, unknown>;
  const alphaPattern = (cfg.alpha_pattern ?? {}) as Record<string, unknown>;
  if (typeof rankPattern !== 'object' || Array.isArray(rankPattern)) fail('rank_pattern', 'rank_pattern must be an object');
  if (typeof alphaPattern !== 'object' || Array.isArray(alphaPattern)) fail('alpha_pattern', 'alpha_pattern must be an object');

  // PEFT's check_target_module_exists, for the module keys of a Llama-family model:
  // exclude_modules first; a string is a full-match regex (layers_to_transform does not apply);
  // in a list, an exact key is taken as is, a `.suffix` match is subject to layers_to_transform.
  const excl = cfg.exclude_modules;
  let excluded: (key: string) => boolean = () => false;
  if (typeof excl === 'string') {
    const re = pyRegex(excl, 'exclude_modules', 'full');
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
      const re = pyRegex(tm, 'target_modules', 'full');
      for (const k of embedKeys) if (re.test(k)) fail('target_modules', `target_modules matches ${k}; embedding and lm_head LoRA are not supported`);
      exact = (k) => re.test(k);
    }
    suffix = () => false;
  } else if (Array.isArray(tm) && tm.every((x) => typeof x === 'string') && tm.length > 0) {
    const list = tm as string[];
    for (const t of list) {
      if (/(^|\.)(embed_tokens|lm_head|wte|embed)$/.test(t)) fail('target_modules', `target module ${t}: embedding and lm_head LoRA are not supported`);
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
    for (let proj = 0; proj < PROJ_NAMES.length; proj++) {
      const key = moduleKey(layer, proj);
      if (!matches(key, layer)) continue;
      const mr = patternValue(rankPattern, key, 'rank_pattern') ?? rank;
      const ma = patternValue(alphaPattern, key, 'alpha_pattern') ?? alpha;
      if (!Number.isInteger(mr) || mr < 1 || mr > maxLoraRank)
        throw new AdapterError(`adapter rank ${mr} (${key}) is outside 1..${maxLoraRank} (--max-lora-rank)`, 400, 'r', 'invalid_rank');
      modules.push({ layer, proj, rank: mr, alpha: ma, scale: rsLora ? ma / Math.sqrt(mr) : ma / mr });
      targets.add(PROJ_NAMES[proj]);
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
