import { spawn } from 'node:child_process';
import { mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, relative, resolve } from 'node:path';
import { Tokenizer } from '@huggingface/tokenizers';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DEMO_VERSION, defaultCacheDir, ensureDemoModel } from '../../server/demo/demo-model.js';

let root: string;
beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'loraplex-demo-'));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

async function listFiles(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const entry of await readdir(dir, { withFileTypes: true, recursive: true })) {
    if (entry.isFile()) out.push(relative(dir, join(entry.parentPath, entry.name)));
  }
  return out.sort();
}

function readHeader(buf: Buffer): Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }> {
  const n = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + n).toString('utf8')) as Record<string, unknown>;
  delete header['__metadata__'];
  return header as Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }>;
}

describe('ensureDemoModel', () => {
  it('generates byte-identical models in two directories', async () => {
    const [a, b] = [join(root, 'a'), join(root, 'b')];
    const pa = await ensureDemoModel(a);
    const pb = await ensureDemoModel(b);
    expect(pa.modelDir).toBe(join(a, DEMO_VERSION));
    expect(pa.adapterDir).toBe(join(a, DEMO_VERSION, 'adapters'));
    const files = await listFiles(pa.modelDir);
    expect(files).toEqual(await listFiles(pb.modelDir));
    for (const f of files) {
      expect((await readFile(join(pa.modelDir, f))).equals(await readFile(join(pb.modelDir, f))), f).toBe(true);
    }
    expect(files).toEqual(
      expect.arrayContaining([
        'config.json',
        'generation_config.json',
        'model.safetensors',
        'tokenizer.json',
        'tokenizer_config.json',
        'adapters/pirate/adapter_config.json',
        'adapters/pirate/adapter_model.safetensors',
        'adapters/poet/adapter_model.safetensors',
      ]),
    );
    // Nothing but the model is left in the cache directory (no temporary directories).
    expect(await readdir(a)).toEqual([DEMO_VERSION]);
  }, 60_000);

  it('writes a consistent Llama config, weights, tokenizer and PEFT adapters', async () => {
    const { modelDir, adapterDir } = await ensureDemoModel(join(root, 'a'));
    const config = JSON.parse(await readFile(join(modelDir, 'config.json'), 'utf8')) as Record<string, number & string[]>;
    expect(config['architectures']).toEqual(['LlamaForCausalLM']);
    const H = config['hidden_size'];
    const V = config['vocab_size'];
    expect(H).toBeGreaterThan(V);
    expect(config['num_hidden_layers']).toBe(2);
    const header = readHeader(await readFile(join(modelDir, 'model.safetensors')));
    expect(header['model.embed_tokens.weight']).toMatchObject({ dtype: 'F32', shape: [V, H] });
    expect(header['lm_head.weight']).toMatchObject({ dtype: 'F32', shape: [V, H] });
    expect(header['model.layers.1.mlp.down_proj.weight']?.shape).toEqual([H, config['intermediate_size']]);

    const tokJson = JSON.parse(await readFile(join(modelDir, 'tokenizer.json'), 'utf8')) as object;
    const tokConfig = JSON.parse(await readFile(join(modelDir, 'tokenizer_config.json'), 'utf8')) as Record<string, unknown>;
    const tok = new Tokenizer(tokJson, tokConfig);
    const ids = tok.encode('The town is by the sea.').ids;
    expect(ids[0]).toBe(config['bos_token_id']);
    expect(ids.every((id: number) => id < V)).toBe(true);
    expect(typeof tokConfig['chat_template']).toBe('string');

    const adapters = (await readdir(adapterDir)).sort();
    expect(adapters.length).toBeGreaterThanOrEqual(2);
    for (const name of adapters) {
      const cfg = JSON.parse(await readFile(join(adapterDir, name, 'adapter_config.json'), 'utf8')) as Record<string, unknown>;
      expect(cfg).toMatchObject({ peft_type: 'LORA', bias: 'none', use_dora: false });
      const r = cfg['r'] as number;
      const tensors = readHeader(await readFile(join(adapterDir, name, 'adapter_model.safetensors')));
      const last = 'base_model.model.model.layers.1.mlp.down_proj';
      expect(tensors[`${last}.lora_A.weight`]?.shape).toEqual([r, config['intermediate_size']]);
      expect(tensors[`${last}.lora_B.weight`]?.shape).toEqual([H, r]);
      for (const key of Object.keys(tensors)) {
        const module = /\.(\w+_proj)\.lora_[AB]\.weight$/.exec(key)?.[1];
        expect(cfg['target_modules']).toContain(module);
      }
    }
  }, 60_000);

  it('reuses a complete model without rewriting it', async () => {
    const { modelDir } = await ensureDemoModel(join(root, 'a'));
    const before = (await stat(join(modelDir, 'model.safetensors'))).mtimeMs;
    await ensureDemoModel(join(root, 'a'));
    expect((await stat(join(modelDir, 'model.safetensors'))).mtimeMs).toBe(before);
  });

  it('is safe to call concurrently and replaces an incomplete directory', async () => {
    const dir = join(root, 'c');
    // A directory without the version marker (e.g. copied by hand, or a crashed older layout).
    await mkdir(join(dir, DEMO_VERSION), { recursive: true });
    await writeFile(join(dir, DEMO_VERSION, 'config.json'), '{}');
    const results = await Promise.all([ensureDemoModel(dir), ensureDemoModel(dir), ensureDemoModel(dir)]);
    for (const r of results) expect(r.modelDir).toBe(join(dir, DEMO_VERSION));
    expect(await readdir(dir)).toEqual([DEMO_VERSION]);
    const reference = join(root, 'a', DEMO_VERSION);
    for (const f of await listFiles(reference)) {
      expect((await readFile(join(dir, DEMO_VERSION, f))).equals(await readFile(join(reference, f))), f).toBe(true);
    }
  }, 60_000);

  it('is safe across processes', async () => {
    const dir = join(root, 'p');
    const module = resolve('server/demo/demo-model.ts');
    const script = `import { ensureDemoModel } from ${JSON.stringify(module)}; console.log((await ensureDemoModel(process.argv[1])).modelDir);`;
    const runOne = () =>
      new Promise<string>((done, fail) => {
        const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script, dir], { stdio: ['ignore', 'pipe', 'inherit'] });
        let out = '';
        child.stdout.on('data', (d: Buffer) => (out += d.toString()));
        child.on('error', fail);
        child.on('exit', (code) => (code === 0 ? done(out.trim()) : fail(new Error(`child exited with ${code}`))));
      });
    const outs = await Promise.all([runOne(), runOne()]);
    expect(outs).toEqual([join(dir, DEMO_VERSION), join(dir, DEMO_VERSION)]);
    expect(await readdir(dir)).toEqual([DEMO_VERSION]);
    const reference = join(root, 'a', DEMO_VERSION);
    for (const f of await listFiles(reference)) {
      expect((await readFile(join(dir, DEMO_VERSION, f))).equals(await readFile(join(reference, f))), f).toBe(true);
    }
  }, 60_000);

  it('picks the cache directory from the environment', () => {
    const saved = { ...process.env };
    try {
      process.env['LORAPLEX_CACHE_DIR'] = '/x/loraplex-cache';
      expect(defaultCacheDir()).toBe('/x/loraplex-cache');
      delete process.env['LORAPLEX_CACHE_DIR'];
      process.env['XDG_CACHE_HOME'] = '/x/xdg';
      expect(defaultCacheDir()).toBe(join('/x/xdg', 'loraplex'));
      delete process.env['XDG_CACHE_HOME'];
      expect(defaultCacheDir()).toMatch(/\.cache[/\\]loraplex$/);
    } finally {
      process.env = saved;
    }
  });
});
