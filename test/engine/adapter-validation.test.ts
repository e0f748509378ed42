// Bad adapters against a running engine (llama-gqa base). For each broken adapter, requests that
// name it fail with an error naming the problem, while base-model and good-adapter requests in
// flight at the same time complete with the golden greedy ids. The pool stays consistent.
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, truncateSync, unlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { planFromConfig, toNativePlan } from '../../server/engine/adapter-config.js';
import { Engine } from '../../server/engine/engine.js';
import { LoraplexError } from '../../server/engine/errors.js';
import { writeSafetensors, type SafetensorsDtype, type TensorSpec } from '../../server/util/safetensors-writer.js';
import { adapterRoot, loadGolden, modelDir, strictSteps, type GoldenCase } from '../helpers/fixtures.js';

const MAX_RANK = 8;
const GOOD = ['r8-all', 'r4-mlp'] as const;
const golden = loadGolden('llama-gqa');
const baseCase = golden.cases.find((c) => c.adapter === null)!;
// Golden cases of the good adapters whose first steps are decided by a clear margin.
const goodCase: Record<string, GoldenCase> = {
  'r8-all': golden.cases.find((c) => c.adapter?.endsWith('/r8-all') && strictSteps(c) >= 8)!,
  'r4-mlp': golden.cases.find((c) => c.adapter?.endsWith('/r4-mlp') && strictSteps(c) >= 8)!,
};

let root: string;
let engine: Engine;
let stepChecks = 0;

beforeAll(async () => {
  root = mkdtempSync(join(tmpdir(), 'loraplex-badadapter-'));
  for (const id of GOOD) copyAdapter(id, id);
  engine = await Engine.create({ model: modelDir('llama-gqa'), adapterDir: root, memoryBudget: 16 << 20, maxLoraRank: MAX_RANK, maxNumSeqs: 8 });
  engine.onStep = () => {
    engine.paging.checkInvariants();
    stepChecks++;
  };
});
afterAll(async () => {
  await engine?.close();
  rmSync(root, { recursive: true, force: true });
});

// ---- fixture helpers ----

interface Entry {
  dtype: string;
  shape: number[];
  data_offsets: [number, number];
}

function copyAdapter(src: string, id: string): string {
  const from = join(adapterRoot('llama-gqa'), src);
  const dir = join(root, id);
  mkdirSync(dir);
  for (const f of readdirSync(from)) copyFileSync(join(from, f), join(dir, f));
  return dir;
}

function readSt(path: string): { header: Record<string, unknown>; data: Buffer } {
  const buf = readFileSync(path);
  const len = Number(buf.readBigUInt64LE(0));
  return { header: JSON.parse(buf.subarray(8, 8 + len).toString('utf8')), data: buf.subarray(8 + len) };
}

function rawSt(headerText: string, data: Buffer): Buffer {
  const pad = (8 - (Buffer.byteLength(headerText) % 8)) % 8;
  const h = Buffer.from(headerText + ' '.repeat(pad), 'utf8');
  const prefix = Buffer.alloc(8);
  prefix.writeBigUInt64LE(BigInt(h.length));
  return Buffer.concat([prefix, h, data]);
}

/** fp32 tensors of an F32 safetensors file, in offset order. */
function tensorsOf(path: string): TensorSpec[] {
  const f = readSt(path);
  const entries = Object.entries(f.header).filter(([k]) => k !== '__metadata__') as Array<[string, Entry]>;
  entries.sort((a, b) => a[1].data_offsets[0] - b[1].data_offsets[0]);
  return entries.map(([name, e]) => {
    expect(e.dtype).toBe('F32');
    const copy = Buffer.from(f.data.subarray(e.data_offsets[0], e.data_offsets[1]));
    return { name, dtype: e.dtype as SafetensorsDtype, shape: e.shape, data: new Float32Array(copy.buffer, copy.byteOffset, copy.length / 4) };
  });
}

const stPath = (d: string) => join(d, 'adapter_model.safetensors');
const cfgPath = (d: string) => join(d, 'adapter_config.json');

function editConfig(d: string, edit: (c: Record<string, unknown>) => void): void {
  const c = JSON.parse(readFileSync(cfgPath(d), 'utf8'));
  edit(c);
  writeFileSync(cfgPath(d), JSON.stringify(c, null, 2));
}

async function editTensors(d: string, edit: (ts: TensorSpec[]) => TensorSpec[]): Promise<void> {
  await writeSafetensors(stPath(d), edit(tensorsOf(stPath(d))), { format: 'pt' });
}

const T = (layer: number, mod: string, ab: 'A' | 'B') =>
  `base_model.model.model.layers.${layer}.${mod}.lora_${ab}.weight`;

/** r8-all zero-padded to rank 16: a valid adapter in every way but its rank. */
async function makeRank16(d: string): Promise<void> {
  editConfig(d, (c) => { c.r = 16; c.lora_alpha = 32; });
  await editTensors(d, (ts) =>
    ts.map((t) => {
      const [rows, cols] = t.shape as [number, number];
      const data = t.data as Float32Array;
      if (t.name.includes('lora_A')) {
        const out = new Float32Array(16 * cols);
        out.set(data); // [8, in] rows first, then 8 zero rows
        return { ...t, shape: [16, cols], data: out };
      }
      const out = new Float32Array(rows * 16);
      for (let o = 0; o < rows; o++) out.set(data.subarray(o * cols, (o + 1) * cols), o * 16);
      return { ...t, shape: [rows, 16], data: out };
    }),
  );
}

// ---- the cases ----

interface Case {
  name: string;
  from: (typeof GOOD)[number];
  make: (dir: string) => void | Promise<void>;
  problem: RegExp;
  status?: number;
}

const CASES: Case[] = [
  {
    name: 'truncated safetensors',
    from: 'r4-mlp',
    make: (d) => {
      const len = Number(readFileSync(stPath(d)).readBigUInt64LE(0));
      truncateSync(stPath(d), 8 + len + 5000);
    },
    problem: /adapter_model\.safetensors.*out of bounds.*truncated/,
  },
  {
    name: 'garbage safetensors header',
    from: 'r4-mlp',
    make: (d) => writeFileSync(stPath(d), rawSt('this is not json at all!', Buffer.alloc(64))),
    problem: /adapter_model\.safetensors.*header is not valid JSON/,
  },
  {
    name: 'missing lora_B tensor for a targeted module',
    from: 'r4-mlp',
    make: (d) => editTensors(d, (ts) => ts.filter((t) => t.name !== T(1, 'mlp.up_proj', 'B'))),
    problem: /missing tensor '.*layers\.1\.mlp\.up_proj\.lora_B\.weight'/,
  },
  {
    name: 'extra tensor for an untargeted module',
    from: 'r4-mlp',
    make: (d) => editTensors(d, (ts) => [...ts, { name: T(0, 'self_attn.q_proj', 'A'), dtype: 'F32', shape: [4, 64], data: new Float32Array(256).fill(0.01) }]),
    problem: /layers\.0\.self_attn\.q_proj\.lora_A\.weight' is not a LoRA A\/B weight of a module targeted/,
  },
  {
    name: 'wrong lora_A shape',
    from: 'r4-mlp',
    make: (d) => editTensors(d, (ts) => ts.map((t) => (t.name === T(0, 'mlp.gate_proj', 'A') ? { ...t, shape: [4, 32], data: new Float32Array(128).fill(0.01) } : t))),
    problem: /layers\.0\.mlp\.gate_proj\.lora_A\.weight' has shape \[4, 32\], expected \[4, 64\]/,
  },
  {
    name: 'wrong lora_B shape',
    from: 'r4-mlp',
    make: (d) => editTensors(d, (ts) => ts.map((t) => (t.name === T(1, 'mlp.down_proj', 'B') ? { ...t, shape: [32, 4], data: new Float32Array(128).fill(0.01) } : t))),
    problem: /layers\.1\.mlp\.down_proj\.lora_B\.weight' has shape \[32, 4\], expected \[64, 4\]/,
  },
  { name: 'rank 0 in adapter_config.json', from: 'r4-mlp', make: (d) => editConfig(d, (c) => { c.r = 0; }), problem: /rank 0 .*outside 1\.\.8/ },
  { name: 'rank above --max-lora-rank', from: 'r8-all', make: makeRank16, problem: /rank 16 .*outside 1\.\.8 \(--max-lora-rank\)/ },
  { name: 'use_dora true', from: 'r4-mlp', make: (d) => editConfig(d, (c) => { c.use_dora = true; }), problem: /use_dora \(DoRA\) is not supported/ },
  { name: 'modules_to_save set', from: 'r4-mlp', make: (d) => editConfig(d, (c) => { c.modules_to_save = ['lm_head']; }), problem: /modules_to_save is not supported/ },
  {
    name: 'target_modules including embed_tokens',
    from: 'r4-mlp',
    make: (d) => editConfig(d, (c) => { c.target_modules = ['gate_proj', 'up_proj', 'down_proj', 'embed_tokens']; }),
    problem: /embed_tokens.*embedding and lm_head LoRA are not supported/,
  },
  {
    name: 'target_modules including lm_head',
    from: 'r4-mlp',
    make: (d) => editConfig(d, (c) => { c.target_modules = ['lm_head', 'gate_proj', 'up_proj', 'down_proj']; }),
    problem: /lm_head.*embedding and lm_head LoRA are not supported/,
  },
  {
    name: 'target_modules regex matching lm_head',
    from: 'r4-mlp',
    make: (d) => editConfig(d, (c) => { c.target_modules = '.*(gate_proj|up_proj|down_proj|lm_head)'; }),
    problem: /target_modules matches lm_head/,
  },
  { name: 'bias "all"', from: 'r4-mlp', make: (d) => editConfig(d, (c) => { c.bias = 'all'; }), problem: /bias "all" is not supported/ },
  { name: 'fan_in_fan_out true', from: 'r4-mlp', make: (d) => editConfig(d, (c) => { c.fan_in_fan_out = true; }), problem: /fan_in_fan_out is not supported/ },
  {
    name: 'adapter_config.json not JSON',
    from: 'r4-mlp',
    make: (d) => writeFileSync(cfgPath(d), '{"r": 4, "target_modules": ['),
    problem: /adapter_config\.json: .*(JSON|Unexpected|Expected)/,
  },
  {
    name: 'adapter_model.bin only (pickle)',
    from: 'r4-mlp',
    make: (d) => {
      unlinkSync(stPath(d));
      writeFileSync(join(d, 'adapter_model.bin'), Buffer.from('\x80\x02cos\nsystem\n(S\'exit 3\'\ntR.', 'latin1'));
    },
    problem: /adapter_model\.bin.*pickle/,
    status: 415,
  },
  {
    name: 'NaN in a LoRA weight',
    from: 'r4-mlp',
    make: (d) =>
      editTensors(d, (ts) =>
        ts.map((t) => {
          if (t.name !== T(1, 'mlp.gate_proj', 'B')) return t;
          const data = Float32Array.from(t.data as Float32Array);
          data[7] = Number.NaN;
          return { ...t, data };
        }),
      ),
    problem: /non-finite value in '.*layers\.1\.mlp\.gate_proj' LoRA weights/,
  },
  {
    name: 'non-float dtype (I32) LoRA tensor',
    from: 'r4-mlp',
    make: (d) => {
      // I32 has F32's size: the file stays structurally valid; only the dtype is wrong.
      const f = readSt(stPath(d));
      (f.header[T(0, 'mlp.up_proj', 'A')] as Entry).dtype = 'I32';
      writeFileSync(stPath(d), rawSt(JSON.stringify(f.header), f.data));
    },
    problem: /layers\.0\.mlp\.up_proj\.lora_A\.weight' has unsupported dtype I32/,
  },
  {
    name: 'layers_to_transform naming a layer the model lacks',
    from: 'r4-mlp',
    make: (d) => editConfig(d, (c) => { c.layers_to_transform = [0, 5]; }),
    problem: /layers_to_transform entry 5 is not a layer of this 2-layer model/,
  },
  { name: 'peft_type not LORA', from: 'r4-mlp', make: (d) => editConfig(d, (c) => { c.peft_type = 'IA3'; }), problem: /peft_type "IA3" is not supported/ },
];

// ---- running requests ----

const PARAMS = { temperature: 0, maxTokens: 16, ignoreEos: true };

async function collect(gen: AsyncGenerator<{ token: number }, unknown>): Promise<number[]> {
  const ids: number[] = [];
  for await (const t of gen) ids.push(t.token);
  return ids;
}

function expectGolden(ids: number[], c: GoldenCase, what: string): void {
  const k = strictSteps(c);
  expect(k, `${what}: golden case has too few clear steps`).toBeGreaterThanOrEqual(8);
  expect(ids, what).toHaveLength(16);
  expect(ids.slice(0, k), what).toEqual(c.greedy_ids.slice(0, k));
}

describe('bad adapters fail only their own requests', () => {
  it('the good adapters and the base produce the golden ids (control)', async () => {
    const [b, g1, g2] = await Promise.all([
      collect(engine.generate(baseCase.prompt_ids, PARAMS)),
      collect(engine.generate(goodCase['r8-all'].prompt_ids, PARAMS, { adapter: 'r8-all' })),
      collect(engine.generate(goodCase['r4-mlp'].prompt_ids, PARAMS, { adapter: 'r4-mlp' })),
    ]);
    expectGolden(b, baseCase, 'base');
    expectGolden(g1, goodCase['r8-all'], 'r8-all');
    expectGolden(g2, goodCase['r4-mlp'], 'r4-mlp');
  });

  CASES.forEach((c, i) => {
    it(`refuses: ${c.name}`, async () => {
      const id = `bad-${i}`;
      const dir = copyAdapter(c.from, id);
      await c.make(dir);
      const good = GOOD[i % GOOD.length];
      const failuresBefore = engine.adapters.stats().loadFailures;
      // All five are submitted before any of them runs: base, good adapter and two requests for
      // the bad adapter are in flight together.
      const results = await Promise.allSettled([
        collect(engine.generate(baseCase.prompt_ids, PARAMS)),
        collect(engine.generate(baseCase.prompt_ids, PARAMS, { adapter: id })),
        collect(engine.generate(goodCase[good].prompt_ids, PARAMS, { adapter: good })),
        collect(engine.generate(goodCase[good].prompt_ids, PARAMS, { adapter: id })),
      ]);
      const [base, bad1, goodRes, bad2] = results;
      expect(base.status, String((base as PromiseRejectedResult).reason)).toBe('fulfilled');
      expect(goodRes.status, String((goodRes as PromiseRejectedResult).reason)).toBe('fulfilled');
      expectGolden((base as PromiseFulfilledResult<number[]>).value, baseCase, 'base');
      expectGolden((goodRes as PromiseFulfilledResult<number[]>).value, goodCase[good], good);
      for (const bad of [bad1, bad2]) {
        expect(bad.status).toBe('rejected');
        const err = (bad as PromiseRejectedResult).reason as Error;
        expect(err).toBeInstanceOf(LoraplexError);
        expect(err.message).toMatch(c.problem);
        expect((err as LoraplexError).status).toBe(c.status ?? 400);
      }
      expect(engine.adapters.stats().loadFailures).toBeGreaterThan(failuresBefore);
      expect(engine.adapters.list().find((e) => e.id === id)?.tier).not.toBe('pool');
    });
  });

  it('the rank-16 adapter is otherwise valid (it parses with a rank limit of 64)', async () => {
    const dir = join(root, 'rank16-control');
    copyAdapter('r8-all', 'rank16-control');
    await makeRank16(dir);
    const cfg = JSON.parse(readFileSync(cfgPath(dir), 'utf8'));
    const plan = planFromConfig(cfg, engine.model, 64);
    expect(plan.modules.every((m) => m.rank === 16)).toBe(true);
    await expect(engine.parseAdapterFile(stPath(dir), toNativePlan(plan), 64)).resolves.toBeUndefined();
    // and the engine's own limit refuses it at the native layer too
    await expect(engine.parseAdapterFile(stPath(dir), toNativePlan(plan), MAX_RANK)).rejects.toThrow(/rank 16 .*outside 1\.\.8/);
  });

  it('an unknown adapter id is a 404 at submit', async () => {
    let err: unknown = null;
    try {
      engine.submit(baseCase.prompt_ids, PARAMS, { adapter: 'no-such-adapter' });
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(LoraplexError);
    expect((err as LoraplexError).status).toBe(404);
    expect((err as Error).message).toContain('no-such-adapter');
    await expect(collect(engine.generate(baseCase.prompt_ids, PARAMS, { adapter: 'no-such-adapter' }))).rejects.toMatchObject({ status: 404 });
    expect(engine.stats().waiting + engine.stats().running).toBe(0);
  });

  it('leaves the pool consistent and frees every KV page', async () => {
    await engine.idle();
    expect(stepChecks).toBeGreaterThan(0);
    engine.paging.checkInvariants();
    const s = engine.paging.stats();
    expect(s.kvPages).toBe(0);
    expect(s.freePages + s.prefixPages + s.adapterPages).toBe(s.totalPages);
    expect(engine.prefix.stats().reclaimablePages).toBe(s.prefixPages);
    expect(engine.stats().waiting).toBe(0);
    expect(engine.stats().running).toBe(0);
    // Nothing still counts as using a bad adapter.
    for (const e of engine.adapters.list()) expect(e.refs, e.id).toBe(0);
    // The good adapters still work after all that.
    const ids = await collect(engine.generate(goodCase['r4-mlp'].prompt_ids, PARAMS, { adapter: 'r4-mlp' }));
    expectGolden(ids, goodCase['r4-mlp'], 'r4-mlp after');
    await engine.idle();
    expect(engine.paging.stats().kvPages).toBe(0);
  });
});
