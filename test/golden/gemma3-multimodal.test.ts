// Gemma3ForConditionalGeneration checkpoints (the Gemma 3 4B-27B releases) served as text: the
// language model's weights under either prefix (`language_model.model.` as transformers writes the
// file, `model.language_model.` as it names the modules), vision tower and projector tensors
// present but never loaded, adapters whose keys carry the language model's prefix and that also
// hold vision-tower LoRA (PEFT wraps its q/k/v too), and /v1/models saying it is text only.
// make_golden.py --families gemma3 checks that HF's Gemma3ForConditionalGeneration built from the
// gemma3 fixture's weights gives exactly the Gemma3ForCausalLM logits on text, so the gemma3
// golden outputs are this checkpoint's HF outputs.
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Engine } from '../../server/engine/engine.js';
import type { TokenEvent } from '../../server/engine/sequence.js';
import { writeSafetensors, type TensorSpec } from '../../server/util/safetensors-writer.js';
import { adapterRoot, loadGolden, modelDir, strictSteps, type GoldenCase } from '../helpers/fixtures.js';
import { startTestServer } from '../helpers/server.js';

const FP32 = { computeDtype: 'float32', kvCacheDtype: 'float32', loraDtype: 'float32' } as const;
const golden = loadGolden('gemma3');
let root: string;
let n = 0;

beforeAll(() => {
  root = mkdtempSync(join(tmpdir(), 'loraplex-gemma3mm-'));
});
afterAll(() => {
  rmSync(root, { recursive: true, force: true });
});

/** The fp32 tensors of a safetensors file, renamed by `rename` (null drops one). */
function tensors(path: string, rename: (name: string) => string): TensorSpec[] {
  const buf = readFileSync(path);
  const len = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + len).toString('utf8')) as Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }>;
  const data = buf.subarray(8 + len);
  return Object.entries(header)
    .filter(([k]) => k !== '__metadata__')
    .map(([name, e]) => {
      const bytes = Buffer.from(data.subarray(e.data_offsets[0], e.data_offsets[1]));
      return { name: rename(name), dtype: 'F32' as const, shape: e.shape, data: new Float32Array(bytes.buffer, bytes.byteOffset, bytes.length / 4) };
    });
}

const noise = (n: number) => Float32Array.from({ length: n }, (_, i) => Math.sin(i) * 0.1);

/** A Gemma3ForConditionalGeneration directory holding the gemma3 fixture as its language model. */
async function multimodalDir(prefix: 'language_model.model.' | 'model.language_model.'): Promise<string> {
  const src = modelDir('gemma3');
  const dir = join(root, `m${n++}`);
  mkdirSync(dir);
  for (const f of readdirSync(src)) if (f !== 'model.safetensors' && f !== 'config.json') copyFileSync(join(src, f), join(dir, f));
  const text = JSON.parse(readFileSync(join(src, 'config.json'), 'utf8'));
  delete text.architectures;
  text.model_type = 'gemma3_text';
  const visionPrefix = prefix === 'language_model.model.' ? '' : 'model.';
  writeFileSync(join(dir, 'config.json'), JSON.stringify({
    architectures: ['Gemma3ForConditionalGeneration'],
    model_type: 'gemma3',
    text_config: text,
    vision_config: { model_type: 'siglip_vision_model', hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, num_attention_heads: 2, image_size: 28, patch_size: 14 },
    mm_tokens_per_image: 4,
    eos_token_id: text.eos_token_id,
    bos_token_id: text.bos_token_id,
    tie_word_embeddings: true,
  }));
  const ts = tensors(join(src, 'model.safetensors'), (n) => prefix + n.slice('model.'.length));
  ts.push({ name: `${visionPrefix}vision_tower.embeddings.patch_embedding.weight`, dtype: 'F32', shape: [16, 3, 14, 14], data: noise(16 * 3 * 14 * 14) });
  ts.push({ name: `${visionPrefix}vision_tower.encoder.layers.0.self_attn.q_proj.weight`, dtype: 'F32', shape: [16, 16], data: noise(256) });
  ts.push({ name: `${visionPrefix}multi_modal_projector.mm_input_projection_weight`, dtype: 'F32', shape: [16, 48], data: noise(16 * 48) });
  await writeSafetensors(join(dir, 'model.safetensors'), ts);
  return dir;
}

/** The gemma3 r8-all adapter with its keys under the language model (and vision-tower LoRA added). */
async function multimodalAdapter(adapters: string, prefix: string): Promise<void> {
  const src = join(adapterRoot('gemma3'), 'r8-all');
  const dir = join(adapters, 'r8-all');
  mkdirSync(dir, { recursive: true });
  copyFileSync(join(src, 'adapter_config.json'), join(dir, 'adapter_config.json'));
  const ts = tensors(join(src, 'adapter_model.safetensors'), (n) => n.replace('base_model.model.model.', `base_model.model.${prefix}`));
  for (const ab of ['lora_A', 'lora_B'])
    ts.push({ name: `base_model.model.model.vision_tower.encoder.layers.0.self_attn.q_proj.${ab}.weight`, dtype: 'F32', shape: [ab === 'lora_A' ? 8 : 16, ab === 'lora_A' ? 16 : 8], data: noise(128) });
  await writeSafetensors(join(dir, 'adapter_model.safetensors'), ts);
}

async function run(engine: Engine, c: GoldenCase): Promise<TokenEvent[]> {
  const out: TokenEvent[] = [];
  const adapter = c.adapter ? c.adapter.split('/').pop()! : null;
  for await (const t of engine.generate(c.prompt_ids, { maxTokens: c.greedy_ids.length, temperature: 0, ignoreEos: true, logprobs: 5 }, { adapter })) out.push(t);
  return out;
}

function check(c: GoldenCase, got: TokenEvent[]): void {
  const n = strictSteps(c);
  expect(got.map((t) => t.token).slice(0, n)).toEqual(c.greedy_ids.slice(0, n));
  for (let i = 0; i < n; i++)
    for (let k = 0; k < c.steps[i].top.length; k++) expect(Math.abs(got[i].top![k][1] - c.steps[i].top[k][1])).toBeLessThan(1e-3);
}

describe.each(['language_model.model.', 'model.language_model.'] as const)('Gemma3ForConditionalGeneration, weights under %s', (prefix) => {
  it('serves the text part: HF greedy ids and logprobs, base and adapter (keys under the language model, vision LoRA ignored)', async () => {
    const dir = await multimodalDir(prefix);
    const adapters = join(root, `adapters-${prefix.replace(/\./g, '-')}`);
    await multimodalAdapter(adapters, prefix === 'language_model.model.' ? 'language_model.model.' : 'model.language_model.');
    const engine = await Engine.create({ ...FP32, model: dir, adapterDir: adapters, memoryBudget: 8 << 20, device: 'cpu' });
    try {
      expect(engine.model.note).toMatch(/text only.*vision tower is not loaded/);
      const cases = golden.cases.filter((c) => c.adapter === null || c.adapter.endsWith('/r8-all'));
      expect(cases.some((c) => c.adapter)).toBe(true);
      for (const c of cases) check(c, await run(engine, c));
    } finally {
      await engine.close();
    }
  });
});

describe('Gemma3ForConditionalGeneration over HTTP', () => {
  it('/v1/models says the model is served as text only; an image part is a 400', async () => {
    const dir = await multimodalDir('language_model.model.');
    const srv = await startTestServer({ ...FP32, model: dir, device: 'cpu' });
    try {
      const list = (await (await fetch(`${srv.url}/v1/models`)).json()) as { data: Array<Record<string, unknown>> };
      expect(list.data[0].input_modalities).toEqual(['text']);
      expect(String(list.data[0].note)).toMatch(/Gemma3ForConditionalGeneration: text only/);
      const r = await fetch(`${srv.url}/v1/chat/completions`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ model: srv.engine.model.name, messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: 'data:image/png;base64,AAAA' } }] }] }),
      });
      expect(r.status).toBe(400);
      const c = golden.cases[0];
      const done = (await (await fetch(`${srv.url}/v1/completions`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ model: srv.engine.model.name, prompt: c.prompt, max_tokens: strictSteps(c), temperature: 0, ignore_eos: true }),
      })).json()) as { choices: Array<{ text: string }> };
      expect(done.choices[0].text).toBe(srv.engine.tokenizer.decode(c.greedy_ids.slice(0, strictSteps(c))));
    } finally {
      await srv.close();
    }
  });
});

