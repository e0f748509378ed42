// Backend selection: the CPU backend by default here; --device cuda is refused with the reason
// when this build has no CUDA backend or no GPU is present (never a silent CPU fallback).
import { describe, expect, it } from 'vitest';
import { serveConfig } from '../../server/config.js';
import { Engine } from '../../server/engine/engine.js';
import { modelDir } from '../helpers/fixtures.js';

describe('device selection', () => {
  it('uses the CPU backend when no GPU is usable', async () => {
    const e = await Engine.create({ model: modelDir('llama-gqa') });
    expect(e.backend).toBe('cpu');
    await e.close();
  });

  it('refuses --device cuda with the reason instead of falling back', async () => {
    await expect(Engine.create({ model: modelDir('llama-gqa'), device: 'cuda' })).rejects.toThrow(/--device cuda: (this build has no CUDA backend|.*(GPU|device|driver))/i);
  });

  it('rejects an unknown --lora-dtype, in the engine and on the command line', async () => {
    await expect(Engine.create({ model: modelDir('llama-gqa'), loraDtype: 'float16' as never })).rejects.toThrow(/loraDtype must be auto, float32 or bfloat16/);
    expect(() => serveConfig(['--lora-dtype', 'fp8'], {})).toThrow(/--lora-dtype must be auto, float32 or bfloat16/);
    expect(serveConfig([], {}).loraDtype).toBe('auto');
    expect(serveConfig([], { LORAPLEX_LORA_DTYPE: 'bfloat16' }).loraDtype).toBe('bfloat16');
  });

  it('rejects an unknown --compute-dtype or --kv-cache-dtype, in the engine and on the command line', async () => {
    await expect(Engine.create({ model: modelDir('llama-gqa'), computeDtype: 'float16' as never })).rejects.toThrow(/computeDtype must be auto, float32 or bfloat16/);
    expect(() => serveConfig(['--compute-dtype', 'int8'], {})).toThrow(/--compute-dtype must be auto, float32 or bfloat16/);
    expect(serveConfig([], {}).computeDtype).toBe('auto');
    expect(serveConfig(['--compute-dtype', 'bfloat16'], {}).computeDtype).toBe('bfloat16');
    await expect(Engine.create({ model: modelDir('llama-gqa'), kvCacheDtype: 'fp8' as never })).rejects.toThrow(/kvCacheDtype must be auto, float32 or bfloat16/);
    expect(() => serveConfig(['--kv-cache-dtype', 'fp8'], {})).toThrow(/--kv-cache-dtype must be auto, float32 or bfloat16/);
    expect(serveConfig([], {}).kvCacheDtype).toBe('auto');
  });

  it('refuses a memory budget below two pages of the resolved KV dtype', async () => {
    await expect(Engine.create({ model: modelDir('llama-gqa'), memoryBudget: 1000 })).rejects.toMatchObject({
      message: expect.stringMatching(/--memory-budget 1000 bytes holds fewer than 2 pages of \d+ bytes/),
      param: 'memory_budget',
    });
  });

  it('resolves auto from the weights: fp32 and F16 models stay fp32, a BF16 model runs BF16', async () => {
    for (const name of ['llama-gqa', 'llama-f16'] as const) {
      const e = await Engine.create({ model: modelDir(name) });
      expect([e.computeDtype, e.kvCacheDtype, e.loraDtype], name).toEqual(['float32', 'float32', 'float32']);
      await e.close();
    }
    const e = await Engine.create({ model: modelDir('llama3-bf16') });
    expect(e.kvCacheDtype).toBe('bfloat16');
    expect(e.loraDtype).toBe('bfloat16');
    // The BF16 matmul needs AVX512-BF16; without it auto stays fp32 (an explicit bfloat16 is refused).
    expect(['float32', 'bfloat16']).toContain(e.computeDtype);
    await e.close();
    const f = await Engine.create({ model: modelDir('llama3-bf16'), computeDtype: 'float32', kvCacheDtype: 'float32', loraDtype: 'float32' });
    expect([f.computeDtype, f.kvCacheDtype, f.loraDtype]).toEqual(['float32', 'float32', 'float32']);
    await f.close();
  });
});
