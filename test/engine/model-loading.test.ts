// Bad model directories: each case copies the tiny fp32 llama-gqa fixture into a temp dir and
// breaks exactly one thing. Engine.create must reject with a message naming the file and the
// problem, and the CLI must exit 1 with a single `loraplex: error: ...` line (no native crash).
import { spawn } from 'node:child_process';
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, truncateSync, unlinkSync, writeFileSync, appendFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Engine } from '../../server/engine/engine.js';
import { LoraplexError } from '../../server/engine/errors.js';
import { writeSafetensors, type SafetensorsDtype, type TensorSpec } from '../../server/util/safetensors-writer.js';
import { ROOT, loadGolden, modelDir } from '../helpers/fixtures.js';

const SRC = modelDir('llama-gqa');
let root: string;
let n = 0;

beforeAll(() => {
  root = mkdtempSync(join(tmpdir(), 'loraplex-badmodel-'));
});
afterAll(() => {
  rmSync(root, { recursive: true, force: true });
});

// ---- small safetensors reader / raw writer (the test's own, independent of the addon) ----

interface Entry {
  dtype: string;
  shape: number[];
  data_offsets: [number, number];
}

interface StFile {
  header: Record<string, unknown>; // includes __metadata__ when present
  data: Buffer;
}

function readSt(path: string): StFile {
  const buf = readFileSync(path);
  const len = Number(buf.readBigUInt64LE(0));
  return { header: JSON.parse(buf.subarray(8, 8 + len).toString('utf8')), data: buf.subarray(8 + len) };
}

/** Raw file: 8-byte LE header length, the header text (space padded to 8), then `data` as is. */
function rawSt(headerText: string, data: Buffer = Buffer.alloc(0)): Buffer {
  const pad = (8 - (Buffer.byteLength(headerText) % 8)) % 8;
  const h = Buffer.from(headerText + ' '.repeat(pad), 'utf8');
  const prefix = Buffer.alloc(8);
  prefix.writeBigUInt64LE(BigInt(h.length));
  return Buffer.concat([prefix, h, data]);
}

/** Rewrites a safetensors file's header (data section untouched unless `data` is given). */
function editHeader(path: string, edit: (h: Record<string, Entry>) => void, data?: Buffer): void {
  const f = readSt(path);
  edit(f.header as Record<string, Entry>);
  writeFileSync(path, rawSt(JSON.stringify(f.header), data ?? f.data));
}

/** The tensors of a (F32/F16/BF16) safetensors file as fp32 TensorSpecs, in offset order. */
function tensorsOf(path: string): TensorSpec[] {
  const f = readSt(path);
  const out: TensorSpec[] = [];
  const entries = Object.entries(f.header).filter(([k]) => k !== '__metadata__') as Array<[string, Entry]>;
  entries.sort((a, b) => a[1].data_offsets[0] - b[1].data_offsets[0]);
  for (const [name, e] of entries) {
    expect(e.dtype).toBe('F32'); // the fixture is fp32
    const bytes = f.data.subarray(e.data_offsets[0], e.data_offsets[1]);
    const copy = Buffer.from(bytes); // aligned copy
    out.push({ name, dtype: e.dtype as SafetensorsDtype, shape: e.shape, data: new Float32Array(copy.buffer, copy.byteOffset, copy.length / 4) });
  }
  return out;
}

function copyModel(): string {
  const dir = join(root, `m${n++}`);
  mkdirSync(dir);
  for (const f of readdirSync(SRC)) copyFileSync(join(SRC, f), join(dir, f));
  return dir;
}

// ---- the cases ----

interface Case {
  name: string;
  make: (dir: string) => void | Promise<void>;
  /** File the message must name (relative to the model dir; '' = the directory itself). */
  file: string;
  problem: RegExp;
}

const st = (d: string) => join(d, 'model.safetensors');
const cfgPath = (d: string) => join(d, 'config.json');
const editConfig = (d: string, edit: (c: Record<string, unknown>) => void) => {
  const c = JSON.parse(readFileSync(cfgPath(d), 'utf8'));
  edit(c);
  writeFileSync(cfgPath(d), JSON.stringify(c, null, 2));
};

const CASES: Case[] = [
  { name: 'missing config.json', make: (d) => unlinkSync(cfgPath(d)), file: 'config.json', problem: /cannot read|ENOENT|missing|not found/i },
  { name: 'config.json not JSON', make: (d) => writeFileSync(cfgPath(d), '{"architectures": ["LlamaForCausalLM"],'), file: 'config.json', problem: /not valid JSON/ },
  {
    name: 'unsupported architecture',
    make: (d) => editConfig(d, (c) => { c.architectures = ['GPT2LMHeadModel']; c.model_type = 'gpt2'; }),
    file: 'config.json',
    problem: /unsupported architecture "GPT2LMHeadModel"/,
  },
  {
    name: 'no safetensors at all',
    make: (d) => unlinkSync(st(d)),
    file: '',
    problem: /no model\.safetensors/,
  },
  {
    name: 'only pytorch_model.bin (pickle)',
    make: (d) => {
      unlinkSync(st(d));
      // A zip-ish/pickle-ish payload; it must never be opened, let alone unpickled.
      writeFileSync(join(d, 'pytorch_model.bin'), Buffer.from('PK\x03\x04\x80\x02cos\nsystem\n(S\'exit 3\'\ntR.', 'latin1'));
    },
    file: '',
    problem: /pytorch_model\.bin.*never loads pickle|pickle.*pytorch_model\.bin/,
  },
  {
    name: 'truncated safetensors (cut in the data)',
    make: (d) => {
      const len = Number(readFileSync(st(d)).readBigUInt64LE(0));
      truncateSync(st(d), 8 + len + 300_000);
    },
    file: 'model.safetensors',
    problem: /out of bounds.*truncated/,
  },
  { name: 'file shorter than 8 bytes', make: (d) => writeFileSync(st(d), Buffer.from([1, 2, 3])), file: 'model.safetensors', problem: /truncated.*3 bytes.*at least 8/ },
  {
    name: 'header length larger than the file',
    make: (d) => {
      const b = Buffer.alloc(100, 0x20);
      b.writeBigUInt64LE(5000n);
      writeFileSync(st(d), b);
    },
    file: 'model.safetensors',
    problem: /header length 5000 does not fit in a 100-byte file/,
  },
  {
    name: 'header length over the 100 MB cap',
    make: (d) => {
      const b = Buffer.alloc(4096, 0x20);
      b.writeBigUInt64LE(200_000_000n);
      b.write('{}', 8);
      writeFileSync(st(d), b);
    },
    file: 'model.safetensors',
    problem: /header length 200000000 exceeds the 100 MB cap/,
  },
  {
    name: 'header not JSON',
    make: (d) => writeFileSync(st(d), rawSt('{"lm_head.weight": {"dtype": "F32", "shape": [600, 64], "data_offsets": [0, 153600]', Buffer.alloc(16))),
    file: 'model.safetensors',
    problem: /header is not valid JSON/,
  },
  {
    name: 'header a JSON array',
    make: (d) => writeFileSync(st(d), rawSt('[{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}]', Buffer.alloc(4))),
    file: 'model.safetensors',
    problem: /header is not a JSON object/,
  },
  ...(['F8_E4M3', 'Q4'] as const).map<Case>((dt) => ({
    name: `unknown dtype ${dt}`,
    make: (d) => editHeader(st(d), (h) => { h['model.norm.weight'].dtype = dt; }),
    file: 'model.safetensors',
    problem: new RegExp(`model\\.norm\\.weight.*unknown dtype '${dt}'`),
  })),
  {
    name: 'known but unsupported dtype I32 for a needed weight',
    // I32 has F32's size, so the file is structurally valid; the loader must refuse the dtype.
    make: (d) => editHeader(st(d), (h) => { h['model.norm.weight'].dtype = 'I32'; }),
    file: 'model.safetensors',
    problem: /model\.norm\.weight.*unsupported dtype I32/,
  },
  {
    name: 'offsets with a gap',
    make: (d) => {
      const f = readSt(st(d));
      const e = f.header['model.norm.weight'] as Entry; // the last tensor: move it 256 bytes on
      const [b0, b1] = e.data_offsets;
      e.data_offsets = [b0 + 256, b1 + 256];
      const data = Buffer.concat([f.data.subarray(0, b0), Buffer.alloc(256), f.data.subarray(b0)]);
      writeFileSync(st(d), rawSt(JSON.stringify(f.header), data));
    },
    file: 'model.safetensors',
    problem: /gap of 256 bytes before tensor 'model\.norm\.weight'/,
  },
  {
    name: 'overlapping offsets',
    make: (d) =>
      editHeader(st(d), (h) => {
        // norm (last, 256 bytes) now starts 64 bytes inside the previous tensor
        const e = h['model.norm.weight'];
        e.data_offsets = [e.data_offsets[0] - 64, e.data_offsets[1] - 64];
      }),
    file: 'model.safetensors',
    problem: /model\.norm\.weight' overlaps/,
  },
  {
    name: 'trailing bytes after the last tensor',
    make: (d) => appendFileSync(st(d), Buffer.alloc(24)),
    file: 'model.safetensors',
    problem: /24 trailing bytes after the last tensor/,
  },
  {
    name: 'byte size not matching shape x dtype',
    make: (d) => editHeader(st(d), (h) => { h['model.norm.weight'].shape = [63]; }),
    file: 'model.safetensors',
    problem: /model\.norm\.weight.*byte size 256 does not match shape \[63\] x F32 \(252 bytes\)/,
  },
  {
    name: 'weight shape not matching config.json',
    make: (d) => editConfig(d, (c) => { c.intermediate_size = 128; }),
    file: 'model.safetensors',
    problem: /mlp\.\w+_proj\.weight' has shape \[(176, 64|64, 176)\] but the config implies \[(128, 64|64, 128)\]/,
  },
  {
    name: 'missing tensor model.norm.weight',
    make: async (d) => {
      const tensors = tensorsOf(st(d)).filter((t) => t.name !== 'model.norm.weight');
      await writeSafetensors(st(d), tensors, { format: 'pt' });
    },
    file: 'model.safetensors',
    problem: /missing tensor 'model\.norm\.weight'/,
  },
  {
    name: 'sharded index naming a missing shard',
    make: async (d) => {
      const tensors = tensorsOf(st(d));
      unlinkSync(st(d));
      const a = tensors.slice(0, 10);
      const b = tensors.slice(10);
      await writeSafetensors(join(d, 'model-00001-of-00002.safetensors'), a);
      // shard 2 is never written
      const weight_map: Record<string, string> = {};
      for (const t of a) weight_map[t.name] = 'model-00001-of-00002.safetensors';
      for (const t of b) weight_map[t.name] = 'model-00002-of-00002.safetensors';
      writeFileSync(join(d, 'model.safetensors.index.json'), JSON.stringify({ metadata: {}, weight_map }));
    },
    file: 'model-00002-of-00002.safetensors',
    problem: /missing shard/,
  },
  {
    name: 'index with a path-traversal shard name',
    make: async (d) => {
      const tensors = tensorsOf(st(d));
      const outside = `x-${basename(d)}.safetensors`;
      // The file it points at exists (one level up), so only the name check can stop it.
      await writeSafetensors(join(d, '..', outside), tensors);
      const weight_map: Record<string, string> = {};
      for (const t of tensors) weight_map[t.name] = `../${outside}`;
      writeFileSync(join(d, 'model.safetensors.index.json'), JSON.stringify({ metadata: {}, weight_map }));
    },
    file: 'model.safetensors.index.json',
    problem: /shard name "\.\.\/x-m\d+\.safetensors" is not a plain file name/,
  },
];

// ---- running a case: in-process and through the CLI ----

function escapeRe(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

function expectNamesFileAndProblem(message: string, dir: string, c: Case): void {
  expect(message).toContain(c.file === '' ? dir : join(dir, c.file));
  expect(message).toMatch(c.problem);
}

interface CliResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

function runCli(args: string[], timeoutMs = 25_000): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, ['--import', 'tsx', join(ROOT, 'server', 'main.ts'), ...args], {
      cwd: ROOT,
      env: { ...process.env, OMP_NUM_THREADS: '1' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (d) => (stdout += d));
    p.stderr.on('data', (d) => (stderr += d));
    const timer = setTimeout(() => {
      p.kill('SIGKILL');
      reject(new Error(`CLI timed out; stderr so far:\n${stderr}`));
    }, timeoutMs);
    p.on('error', reject);
    p.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
  });
}

describe('Engine.create on a broken model directory', () => {
  for (const c of CASES) {
    it(`rejects: ${c.name}`, async () => {
      const dir = copyModel();
      await c.make(dir);
      let err: unknown = null;
      try {
        const e = await Engine.create({ model: dir, memoryBudget: 8 << 20, maxNumSeqs: 2 });
        await e.close();
      } catch (x) {
        err = x;
      }
      expect(err, 'Engine.create should have rejected').toBeInstanceOf(LoraplexError);
      expectNamesFileAndProblem((err as Error).message, dir, c);
    });
  }
});

describe.concurrent('CLI generate on a broken model directory', () => {
  for (const c of CASES) {
    it(`exits 1 with one error line: ${c.name}`, async () => {
      const dir = copyModel();
      await c.make(dir);
      const r = await runCli(['generate', '--model', dir, '--prompt', 'hi', '--max-tokens', '2']);
      expect(r.signal, `native crash? stderr:\n${r.stderr}`).toBeNull();
      expect(r.code, r.stderr).toBe(1);
      expect(r.stdout).toBe('');
      const lines = r.stderr.split('\n').filter((l) => l !== '');
      expect(lines, r.stderr).toHaveLength(1);
      expect(r.stderr.endsWith('\n')).toBe(true);
      expect(lines[0]).toMatch(new RegExp(`^loraplex: error: .*${escapeRe(c.file === '' ? dir : join(dir, c.file))}`));
      expect(lines[0]).toMatch(c.problem);
    });
  }
});

describe('positive control: the unbroken copy', () => {
  it('loads and generates the golden greedy ids in process', async () => {
    const dir = copyModel();
    const golden = loadGolden('llama-gqa').cases.find((c) => c.adapter === null)!;
    const engine = await Engine.create({ model: dir, memoryBudget: 8 << 20, maxNumSeqs: 2 });
    try {
      const ids: number[] = [];
      for await (const t of engine.generate(golden.prompt_ids, { maxTokens: 8, temperature: 0, ignoreEos: true })) ids.push(t.token);
      expect(ids).toEqual(golden.greedy_ids.slice(0, 8));
    } finally {
      await engine.close();
    }
  });

  it('generates through the CLI with exit code 0', async () => {
    const dir = copyModel();
    const r = await runCli(['generate', '--model', dir, '--prompt', 'hi', '--max-tokens', '2']);
    expect(r.signal).toBeNull();
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).not.toMatch(/error/);
    expect(r.stdout.endsWith('\n')).toBe(true);
    expect(r.stdout.trim().length).toBeGreaterThan(0);
  });
});
