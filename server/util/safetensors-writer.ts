// Writes safetensors files: an 8-byte little-endian header length, a JSON header (padded with
// spaces to a multiple of 8 so the data section stays 8-byte aligned), then the tensors' bytes
// back to back in the order given. Used to generate the demo model, test fixtures and bench
// models; the loader that reads these files lives in the addon.
import { open } from 'node:fs/promises';
import { endianness } from 'node:os';

export type SafetensorsDtype = 'F32' | 'BF16' | 'F16';

export interface TensorSpec {
  name: string;
  dtype: SafetensorsDtype;
  shape: number[];
  // Values in fp32; converted to `dtype` while writing. A function is called once, right before
  // the tensor is written, so a caller can produce large models one tensor at a time.
  data: Float32Array | (() => Float32Array);
}

const BYTES_PER_ELEMENT: Record<SafetensorsDtype, number> = { F32: 4, BF16: 2, F16: 2 };
const LITTLE_ENDIAN_HOST = endianness() === 'LE';

// Scratch views for reinterpreting one float's bits.
const f32Scratch = new Float32Array(1);
const u32Scratch = new Uint32Array(f32Scratch.buffer);

/** Bits of a float32 value (after rounding `x` to float32). */
function float32Bits(x: number): number {
  f32Scratch[0] = x;
  return u32Scratch[0]!;
}

/** float32 -> bfloat16 bits, round to nearest, ties to even; NaN stays a (quiet) NaN. */
export function float32ToBf16(x: number): number {
  return bitsToBf16(float32Bits(x));
}

function bitsToBf16(bits: number): number {
  if ((bits & 0x7fffffff) > 0x7f800000) return ((bits >>> 16) | 0x0040) & 0xffff; // NaN: keep quiet
  // Adding 0x7fff plus the lowest kept bit rounds half-way cases towards an even result; a carry
  // into the exponent is the correct result (up to and including overflow to infinity).
  const rounded = bits + 0x7fff + ((bits >>> 16) & 1);
  return (rounded >>> 16) & 0xffff;
}

/** float32 -> IEEE half bits, round to nearest, ties to even, with subnormals and overflow to inf. */
export function float32ToF16(x: number): number {
  return bitsToF16(float32Bits(x));
}

function bitsToF16(bits: number): number {
  const sign = (bits >>> 16) & 0x8000;
  const exp = (bits >>> 23) & 0xff;
  const mant = bits & 0x7fffff;
  if (exp === 0xff) {
    // inf stays inf; NaN keeps its top payload bits and is forced quiet.
    return mant === 0 ? sign | 0x7c00 : sign | 0x7e00 | (mant >>> 13);
  }
  const e = exp - 127; // unbiased exponent
  if (e > 15) return sign | 0x7c00; // beyond the largest finite half even before rounding
  if (e >= -14) {
    // Normal half: keep 10 mantissa bits, round on the 13 dropped ones. A carry out of the
    // mantissa bumps the exponent, which is exactly right (65520 and up become inf).
    let h = ((e + 15) << 10) | (mant >>> 13);
    const rest = mant & 0x1fff;
    if (rest > 0x1000 || (rest === 0x1000 && (h & 1) === 1)) h += 1;
    return sign | h;
  }
  // Subnormal half (unit 2^-24). The full significand m (24 bits) is worth m * 2^(e-23), i.e.
  // m * 2^(e+1) units, so shift right by -(e+1) and round the dropped bits.
  const shift = -(e + 1); // 14 for e = -15 ... 24 for e = -25
  if (shift > 24) return sign; // below half the smallest subnormal: rounds to zero
  const m = mant | 0x800000;
  let q = m >>> shift;
  const rest = m & ((1 << shift) - 1);
  const half = 1 << (shift - 1);
  if (rest > half || (rest === half && (q & 1) === 1)) q += 1; // q = 0x400 is the smallest normal
  return sign | q;
}

/** Encodes fp32 values as little-endian bytes of `dtype`. */
export function encodeTensorData(data: Float32Array, dtype: SafetensorsDtype): Buffer {
  if (dtype === 'F32') {
    if (LITTLE_ENDIAN_HOST) return Buffer.from(data.buffer, data.byteOffset, data.byteLength);
    const out = Buffer.allocUnsafe(data.length * 4);
    for (let i = 0; i < data.length; i++) out.writeFloatLE(data[i]!, i * 4);
    return out;
  }
  const bits = new Uint32Array(data.buffer, data.byteOffset, data.length);
  const convert = dtype === 'BF16' ? bitsToBf16 : bitsToF16;
  const out = Buffer.allocUnsafe(data.length * 2);
  if (LITTLE_ENDIAN_HOST) {
    const halves = new Uint16Array(out.buffer, out.byteOffset, data.length);
    for (let i = 0; i < data.length; i++) halves[i] = convert(bits[i]!);
  } else {
    for (let i = 0; i < data.length; i++) out.writeUInt16LE(convert(bits[i]!), i * 2);
  }
  return out;
}

function elementCount(shape: number[]): number {
  let n = 1;
  for (const d of shape) {
    if (!Number.isInteger(d) || d < 0) throw new Error(`invalid dimension ${d} in shape [${shape.join(', ')}]`);
    n *= d;
  }
  return n;
}

/**
 * Builds the header bytes (length prefix + padded JSON) for `tensors` laid out in the given order.
 * Entries appear in the JSON in offset order, after `__metadata__`.
 */
export function buildSafetensorsHeader(
  tensors: Pick<TensorSpec, 'name' | 'dtype' | 'shape'>[],
  metadata?: Record<string, string>,
): Buffer {
  const header: Record<string, unknown> = {};
  if (metadata && Object.keys(metadata).length > 0) header['__metadata__'] = metadata;
  const seen = new Set<string>();
  let offset = 0;
  for (const t of tensors) {
    if (t.name === '__metadata__' || seen.has(t.name)) throw new Error(`duplicate or reserved tensor name ${JSON.stringify(t.name)}`);
    seen.add(t.name);
    if (!(t.dtype in BYTES_PER_ELEMENT)) throw new Error(`tensor ${t.name}: unsupported dtype ${String(t.dtype)}`);
    const bytes = elementCount(t.shape) * BYTES_PER_ELEMENT[t.dtype];
    header[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let json = JSON.stringify(header);
  const jsonBytes = Buffer.byteLength(json, 'utf8');
  json += ' '.repeat((8 - (jsonBytes % 8)) % 8);
  const body = Buffer.from(json, 'utf8');
  const prefix = Buffer.alloc(8);
  prefix.writeBigUInt64LE(BigInt(body.length));
  return Buffer.concat([prefix, body]);
}

/**
 * Writes `tensors` to `path` as a safetensors file. Data is converted and written one tensor at a
 * time, so peak memory is one tensor (plus its converted copy), never the whole file.
 */
export async function writeSafetensors(
  path: string,
  tensors: TensorSpec[],
  metadata?: Record<string, string>,
): Promise<void> {
  const header = buildSafetensorsHeader(tensors, metadata);
  const file = await open(path, 'w');
  try {
    await writeAll(file, header);
    for (const t of tensors) {
      const data = typeof t.data === 'function' ? t.data() : t.data;
      const expected = elementCount(t.shape);
      if (data.length !== expected) {
        throw new Error(`tensor ${t.name}: shape [${t.shape.join(', ')}] needs ${expected} values, got ${data.length}`);
      }
      await writeAll(file, encodeTensorData(data, t.dtype));
    }
  } finally {
    await file.close();
  }
}

async function writeAll(file: Awaited<ReturnType<typeof open>>, buf: Buffer): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    const { bytesWritten } = await file.write(buf, done, buf.length - done);
    done += bytesWritten;
  }
}
