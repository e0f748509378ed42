import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { float32ToBf16, float32ToF16, writeSafetensors } from '../../server/util/safetensors-writer.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'loraplex-st-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

interface Entry {
  dtype: string;
  shape: number[];
  data_offsets: [number, number];
}

function parse(buf: Buffer): { header: Record<string, unknown>; data: Buffer; headerLen: number } {
  const headerLen = Number(buf.readBigUInt64LE(0));
  const json = buf.subarray(8, 8 + headerLen).toString('utf8');
  return { header: JSON.parse(json) as Record<string, unknown>, data: buf.subarray(8 + headerLen), headerLen };
}

describe('writeSafetensors', () => {
  it('writes a parseable header with contiguous offsets and the data after it', async () => {
    const path = join(dir, 'a.safetensors');
    const a = Float32Array.from([1, -2, 3.5, 0.25, 1e-3, 65504]);
    const b = Float32Array.from([1, 2, 3]);
    const c = Float32Array.from([0.1, -0.1]);
    await writeSafetensors(
      path,
      [
        { name: 'a', dtype: 'F32', shape: [2, 3], data: a },
        { name: 'b.weight', dtype: 'BF16', shape: [3], data: () => b },
        { name: 'c', dtype: 'F16', shape: [1, 2], data: c },
      ],
      { format: 'pt' },
    );
    const buf = await readFile(path);
    const { header, data, headerLen } = parse(buf);
    expect((8 + headerLen) % 8).toBe(0);
    expect(header['__metadata__']).toEqual({ format: 'pt' });
    const ea = header['a'] as Entry;
    const eb = header['b.weight'] as Entry;
    const ec = header['c'] as Entry;
    expect(ea).toEqual({ dtype: 'F32', shape: [2, 3], data_offsets: [0, 24] });
    expect(eb).toEqual({ dtype: 'BF16', shape: [3], data_offsets: [24, 30] });
    expect(ec).toEqual({ dtype: 'F16', shape: [1, 2], data_offsets: [30, 34] });
    expect(data.length).toBe(34); // no trailing bytes
    // JSON keys come in offset order, metadata first.
    expect(Object.keys(header)).toEqual(['__metadata__', 'a', 'b.weight', 'c']);

    const fa = new Float32Array(data.buffer.slice(data.byteOffset, data.byteOffset + 24));
    expect([...fa]).toEqual([...a]);
    expect([0, 1, 2].map((i) => data.readUInt16LE(24 + 2 * i))).toEqual([0x3f80, 0x4000, 0x4040]);
    expect([0, 1].map((i) => data.readUInt16LE(30 + 2 * i))).toEqual([float32ToF16(0.1), float32ToF16(-0.1)]);
    expect(data.readUInt16LE(30)).toBe(0x2e66);
  });

  it('pads the header with spaces and writes scalars and empty tensors', async () => {
    const path = join(dir, 'b.safetensors');
    await writeSafetensors(path, [
      { name: 's', dtype: 'F32', shape: [], data: Float32Array.from([7]) },
      { name: 'e', dtype: 'F16', shape: [0, 4], data: new Float32Array(0) },
    ]);
    const buf = await readFile(path);
    const { header, data, headerLen } = parse(buf);
    expect(headerLen % 8).toBe(0);
    const raw = buf.subarray(8, 8 + headerLen).toString('utf8');
    expect(raw.endsWith('}') || /} +$/.test(raw)).toBe(true); // only spaces after the JSON
    expect(header['__metadata__']).toBeUndefined();
    expect(header['s']).toEqual({ dtype: 'F32', shape: [], data_offsets: [0, 4] });
    expect(header['e']).toEqual({ dtype: 'F16', shape: [0, 4], data_offsets: [4, 4] });
    expect(data.readFloatLE(0)).toBe(7);
    expect(data.length).toBe(4);
  });

  it('rejects data that does not match the shape, and duplicate names', async () => {
    await expect(
      writeSafetensors(join(dir, 'c.safetensors'), [{ name: 'x', dtype: 'F32', shape: [2, 2], data: new Float32Array(3) }]),
    ).rejects.toThrow(/shape \[2, 2\] needs 4 values, got 3/);
    await expect(
      writeSafetensors(join(dir, 'd.safetensors'), [
        { name: 'x', dtype: 'F32', shape: [1], data: new Float32Array(1) },
        { name: 'x', dtype: 'F32', shape: [1], data: new Float32Array(1) },
      ]),
    ).rejects.toThrow(/duplicate/);
  });
});

describe('float32ToBf16', () => {
  it('rounds to nearest, ties to even', () => {
    expect(float32ToBf16(1)).toBe(0x3f80);
    expect(float32ToBf16(-2)).toBe(0xc000);
    expect(float32ToBf16(0)).toBe(0x0000);
    expect(float32ToBf16(-0)).toBe(0x8000);
    // 1 + 2^-8 is exactly half-way between 1 and 1 + 2^-7: ties to even (down to 1).
    expect(float32ToBf16(1 + 2 ** -8)).toBe(0x3f80);
    // 1 + 3 * 2^-8 is half-way between 1 + 2^-7 (odd) and 1 + 2^-6: ties to even (up).
    expect(float32ToBf16(1 + 3 * 2 ** -8)).toBe(0x3f82);
    // Just above half-way rounds up.
    expect(float32ToBf16(1 + 2 ** -8 + 2 ** -20)).toBe(0x3f81);
    expect(float32ToBf16(Math.PI)).toBe(0x4049);
  });

  it('handles infinities, overflow and NaN', () => {
    expect(float32ToBf16(Infinity)).toBe(0x7f80);
    expect(float32ToBf16(-Infinity)).toBe(0xff80);
    expect(float32ToBf16(3.4028234663852886e38)).toBe(0x7f80); // max float rounds up to inf
    const nan = float32ToBf16(NaN);
    expect(nan & 0x7f80).toBe(0x7f80);
    expect(nan & 0x007f).not.toBe(0);
  });
});

describe('float32ToF16', () => {
  it('converts normal values with round to nearest even', () => {
    expect(float32ToF16(1)).toBe(0x3c00);
    expect(float32ToF16(-2)).toBe(0xc000);
    expect(float32ToF16(0.1)).toBe(0x2e66);
    expect(float32ToF16(65504)).toBe(0x7bff);
    expect(float32ToF16(1 + 2 ** -11)).toBe(0x3c00); // tie -> even
    expect(float32ToF16(1 + 3 * 2 ** -11)).toBe(0x3c02); // tie -> even (up)
    expect(float32ToF16(2 ** -14)).toBe(0x0400); // smallest normal
  });

  it('overflows to infinity at 65520 and keeps NaN', () => {
    expect(float32ToF16(65519)).toBe(0x7bff);
    expect(float32ToF16(65520)).toBe(0x7c00);
    expect(float32ToF16(1e6)).toBe(0x7c00);
    expect(float32ToF16(-1e6)).toBe(0xfc00);
    expect(float32ToF16(Infinity)).toBe(0x7c00);
    expect(float32ToF16(-Infinity)).toBe(0xfc00);
    const nan = float32ToF16(NaN);
    expect(nan & 0x7c00).toBe(0x7c00);
    expect(nan & 0x03ff).not.toBe(0);
  });

  it('rounds into and out of subnormals', () => {
    expect(float32ToF16(2 ** -24)).toBe(0x0001); // smallest subnormal
    expect(float32ToF16(2 ** -25)).toBe(0x0000); // half of it: tie -> even (zero)
    expect(float32ToF16(-(2 ** -25))).toBe(0x8000);
    expect(float32ToF16(2 ** -25 * 1.5)).toBe(0x0001);
    expect(float32ToF16(3 * 2 ** -25)).toBe(0x0002); // 1.5 units: tie -> even (2)
    expect(float32ToF16(2 ** -26)).toBe(0x0000);
    expect(float32ToF16(1e-8)).toBe(0x0000);
    expect(float32ToF16(2 ** -14 - 2 ** -25)).toBe(0x0400); // rounds up into the smallest normal
    expect(float32ToF16(1023 * 2 ** -24)).toBe(0x03ff); // largest subnormal
  });
});
