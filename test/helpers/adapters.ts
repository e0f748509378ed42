// Writes random PEFT LoRA adapters for a fixture model (tests that need many distinct adapters).
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { SeededRandom } from '../../server/demo/seeded-random.js';
import { writeSafetensors, type TensorSpec } from '../../server/util/safetensors-writer.js';

export interface ModelDims {
  hidden: number;
  intermediate: number;
  layers: number;
  qDim: number;
  kvDim: number;
}

const IO: Record<string, (d: ModelDims) => [number, number]> = {
  q_proj: (d) => [d.hidden, d.qDim],
  k_proj: (d) => [d.hidden, d.kvDim],
  v_proj: (d) => [d.hidden, d.kvDim],
  o_proj: (d) => [d.qDim, d.hidden],
  gate_proj: (d) => [d.hidden, d.intermediate],
  up_proj: (d) => [d.hidden, d.intermediate],
  down_proj: (d) => [d.intermediate, d.hidden],
};

export async function writeRandomAdapter(
  dir: string,
  dims: ModelDims,
  opts: { rank: number; alpha?: number; targets?: string[]; seed: number; std?: number },
): Promise<void> {
  mkdirSync(dir, { recursive: true });
  const targets = opts.targets ?? ['q_proj', 'v_proj'];
  const rng = new SeededRandom(opts.seed, 'adapter');
  const std = opts.std ?? 0.2;
  const tensors: TensorSpec[] = [];
  for (let l = 0; l < dims.layers; l++)
    for (const t of targets) {
      const [inW, outW] = IO[t](dims);
      const mod = `base_model.model.model.layers.${l}.${t.endsWith('_proj') && ['q_proj', 'k_proj', 'v_proj', 'o_proj'].includes(t) ? 'self_attn' : 'mlp'}.${t}`;
      const a = new Float32Array(opts.rank * inW).map(() => rng.normal() * std);
      const b = new Float32Array(outW * opts.rank).map(() => rng.normal() * std);
      tensors.push({ name: `${mod}.lora_A.weight`, dtype: 'F32', shape: [opts.rank, inW], data: a });
      tensors.push({ name: `${mod}.lora_B.weight`, dtype: 'F32', shape: [outW, opts.rank], data: b });
    }
  tensors.sort((x, y) => x.name.localeCompare(y.name));
  await writeSafetensors(join(dir, 'adapter_model.safetensors'), tensors);
  writeFileSync(
    join(dir, 'adapter_config.json'),
    JSON.stringify({ peft_type: 'LORA', r: opts.rank, lora_alpha: opts.alpha ?? opts.rank * 2, target_modules: targets, bias: 'none', use_rslora: false, use_dora: false, modules_to_save: null }),
  );
}
