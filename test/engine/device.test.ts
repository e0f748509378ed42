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
    await expect(Engine.create({ model: modelDir('llama-gqa'), loraDtype: 'float16' as never })).rejects.toThrow(/loraDtype must be float32 or bfloat16/);
    expect(() => serveConfig(['--lora-dtype', 'fp8'], {})).toThrow(/--lora-dtype must be float32 or bfloat16/);
    expect(serveConfig([], {}).loraDtype).toBe('float32');
    expect(serveConfig([], { LORAPLEX_LORA_DTYPE: 'bfloat16' }).loraDtype).toBe('bfloat16');
  });

  it('rejects an unknown --compute-dtype or --kv-cache-dtype, in the engine and on the command line', async () => {
    await expect(Engine.create({ model: modelDir('llama-gqa'), computeDtype: 'float16' as never })).rejects.toThrow(/computeDtype must be float32 or bfloat16/);
    expect(() => serveConfig(['--compute-dtype', 'int8'], {})).toThrow(/--compute-dtype must be float32 or bfloat16/);
    expect(serveConfig([], {}).computeDtype).toBe('float32');
    expect(serveConfig(['--compute-dtype', 'bfloat16'], {}).computeDtype).toBe('bfloat16');
    await expect(Engine.create({ model: modelDir('llama-gqa'), kvCacheDtype: 'fp8' as never })).rejects.toThrow(/kvCacheDtype must be float32 or bfloat16/);
    expect(() => serveConfig(['--kv-cache-dtype', 'fp8'], {})).toThrow(/--kv-cache-dtype must be float32 or bfloat16/);
    expect(serveConfig([], {}).kvCacheDtype).toBe('float32');
    const e = await Engine.create({ model: modelDir('llama-gqa') });
    expect(e.computeDtype).toBe('float32');
    expect(e.kvCacheDtype).toBe('float32');
    await e.close();
  });
});
