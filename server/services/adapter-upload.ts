// Receives a multipart adapter upload into a staging folder inside the adapter directory: streamed
// to disk with a size cap and sha256, never buffered whole; then fully validated against the base
// model. On any failure the staging folder is removed, so nothing half-written is ever left.
import { createHash } from 'node:crypto';
import { createWriteStream, mkdtempSync, rmSync, statSync, type WriteStream } from 'node:fs';
import { once } from 'node:events';
import { basename, join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { Transform } from 'node:stream';
import type { FastifyReply, FastifyRequest } from 'fastify';
import type { Engine } from '../engine/engine.js';
import { AdapterError, planAdapter, toNativePlan } from '../engine/adapter-config.js';
import { ADAPTER_ID_RE } from '../engine/adapter-cache.js';
import { confinedFile, resolveRoots } from '../engine/adapter-files.js';
import { LoraplexError } from '../engine/errors.js';
import { ADAPTER_FILES, type AdapterMeta } from '../stores/adapter-store.js';

const PICKLE_RE = /\.(bin|pt|pth|pkl|pickle|ckpt)$/i;

export function checkAdapterId(id: unknown): string {
  if (typeof id !== 'string' || !ADAPTER_ID_RE.test(id))
    throw new LoraplexError(
      `id must match ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$ (got ${JSON.stringify(typeof id === 'string' ? id.slice(0, 80) : id)})`,
      400, 'invalid_request_error', 'id', 'invalid_value');
  return id;
}

export interface StagedUpload {
  id: string;
  dir: string;
  sha256: Record<string, string>;
  size: number;
}

/** Streams the parts into `<adapterDir>/.upload-XXXX/`. Throws 400/413/415 LoraplexErrors. */
/** How long a multipart parse may stay pending after the request body has ended. */
const UPLOAD_STALL_MS = 2000;

export async function receiveUpload(req: FastifyRequest, reply: FastifyReply, adapterDir: string, maxBytes: number): Promise<StagedUpload> {
  if (!req.isMultipart())
    throw new LoraplexError('adapter uploads must be multipart/form-data', 415, 'invalid_request_error', null, 'unsupported_media_type');
  const dir = mkdtempSync(join(adapterDir, '.upload-'));
  const sha256: Record<string, string> = {};
  let id: unknown;
  let total = 0;
  const sinks: WriteStream[] = [];
  // busboy can stall on some malformed delimiters: it stops reading (so the request never emits
  // 'end') and neither finishes nor errors. Once every byte of the body has arrived
  // (req.raw.complete), a parse that makes no progress for a while is a malformed body.
  let lastProgress = performance.now();
  let stallTimer: NodeJS.Timeout | undefined;
  const stalled = new Promise<never>((_, reject) => {
    stallTimer = setInterval(() => {
      if (req.raw.complete && performance.now() - lastProgress > UPLOAD_STALL_MS)
        reject(new LoraplexError('malformed multipart body (its parts never end)', 400, 'invalid_request_error', null, 'invalid_upload'));
    }, 250);
  });
  stalled.catch(() => undefined);
  const parts = req.parts({ limits: { fileSize: maxBytes, files: 2, fields: 4, parts: 6 } })[Symbol.asyncIterator]();
  try {
    for (;;) {
      const next = await Promise.race([parts.next(), stalled]);
      lastProgress = performance.now();
      if (next.done) break;
      const part = next.value;
      if (part.type === 'field') {
        if (part.fieldname !== 'id') throw new LoraplexError(`unknown form field ${JSON.stringify(part.fieldname)}`, 400, 'invalid_request_error', part.fieldname, 'invalid_value');
        id = checkAdapterId(part.value);
        continue;
      }
      const name = part.filename && ADAPTER_FILES.includes(basename(part.filename) as never) ? basename(part.filename) : part.fieldname;
      if (PICKLE_RE.test(part.filename ?? '') || PICKLE_RE.test(part.fieldname))
        throw new LoraplexError(`${part.filename || part.fieldname}: pickle files are never accepted; upload adapter_model.safetensors`, 415, 'invalid_request_error', part.fieldname, 'unsupported_format');
      if (!ADAPTER_FILES.includes(name as never))
        throw new LoraplexError(`unexpected file ${JSON.stringify(part.filename || part.fieldname)}; send adapter_config.json and adapter_model.safetensors`, 415, 'invalid_request_error', part.fieldname, 'unsupported_format');
      if (sha256[name]) throw new LoraplexError(`${name} sent twice`, 400, 'invalid_request_error', name, 'invalid_value');
      const hash = createHash('sha256');
      const counter = new Transform({
        transform(chunk: Buffer, _enc, cb) {
          total += chunk.length;
          lastProgress = performance.now();
          if (total > maxBytes) return cb(new LoraplexError(`adapter is larger than --max-adapter-bytes (${maxBytes} bytes)`, 413, 'invalid_request_error', name, 'adapter_too_large'));
          hash.update(chunk);
          cb(null, chunk);
        },
      });
      const sink = createWriteStream(join(dir, name), { flags: 'wx' });
      sinks.push(sink);
      await pipeline(part.file, counter, sink);
      if (part.file.truncated)
        throw new LoraplexError(`adapter is larger than --max-adapter-bytes (${maxBytes} bytes)`, 413, 'invalid_request_error', name, 'adapter_too_large');
      sha256[name] = hash.digest('hex');
    }
    clearInterval(stallTimer);
    if (id === undefined) throw new LoraplexError('form field id is required', 400, 'invalid_request_error', 'id', 'invalid_value');
    for (const f of ADAPTER_FILES)
      if (!sha256[f]) throw new LoraplexError(`file ${f} is required`, 400, 'invalid_request_error', f, 'invalid_value');
    return { id: id as string, dir, sha256, size: total };
  } catch (e) {
    clearInterval(stallTimer);
    // Refused before the whole body was read: discard the rest as it arrives and close the
    // connection after the answer, so the next request on a keep-alive socket is never read
    // from the middle of this body.
    if (!req.raw.complete) {
      req.raw.unpipe();
      req.raw.resume();
      reply.header('connection', 'close');
    }
    // A failed pipeline rejects before a destroyed file stream has finished opening (and creating)
    // its file; wait for every sink to close so the folder is really empty-able, then remove it.
    await Promise.all(sinks.map((s) => (s.closed ? undefined : once(s, 'close').catch(() => undefined))));
    rmSync(dir, { recursive: true, force: true, maxRetries: 3 });
    const code = (e as { code?: string }).code;
    if (code === 'FST_REQ_FILE_TOO_LARGE')
      throw new LoraplexError(`adapter is larger than --max-adapter-bytes (${maxBytes} bytes)`, 413, 'invalid_request_error', null, 'adapter_too_large');
    if (code === 'FST_PARTS_LIMIT' || code === 'FST_FILES_LIMIT' || code === 'FST_FIELDS_LIMIT')
      throw new LoraplexError('too many parts in the upload', 400, 'invalid_request_error', null, 'invalid_value');
    if (e instanceof LoraplexError) throw e;
    throw new LoraplexError(`upload failed: ${(e as Error).message}`, 400, 'invalid_request_error', null, 'invalid_upload');
  }
}

/** Strict validation of a staged adapter against the base model; returns its metadata. */
export async function validateStaged(engine: Engine, up: StagedUpload): Promise<AdapterMeta> {
  const maxRank = engine.adapters.opts.maxLoraRank;
  const roots = resolveRoots([up.dir]);
  const plan = await planAdapter(up.dir, engine.model, maxRank, roots);
  const file = confinedFile(up.dir, 'adapter_model.safetensors', roots);
  try {
    await engine.parseAdapterFile(file, toNativePlan(plan), maxRank);
  } catch (e) {
    throw new AdapterError((e as Error).message.split(file).join('adapter_model.safetensors'), 400, 'adapter_model.safetensors');
  }
  return {
    id: up.id,
    rank: plan.rank,
    alpha: plan.alpha,
    target_modules: plan.targetModules,
    size: ADAPTER_FILES.reduce((n, f) => n + statSync(join(up.dir, f)).size, 0),
    sha256: up.sha256,
    created: Math.floor(Date.now() / 1000),
  };
}
