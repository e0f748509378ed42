// Where uploaded adapters persist. The filesystem store (default) keeps each adapter as
// `<adapter-dir>/<id>/` with a `loraplex.json` metadata file; the Redis store (redis-store.ts)
// keeps files and metadata in Redis so replicas need no shared disk.
import { closeSync, existsSync, fsyncSync, openSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { FastifyBaseLogger } from 'fastify';
import type { ServeConfig } from '../config.js';
import type { Engine } from '../engine/engine.js';
import { LoraplexError } from '../engine/errors.js';

export interface AdapterMeta {
  id: string;
  rank: number;
  alpha: number;
  target_modules: string[];
  size: number;
  sha256: Record<string, string>;
  created: number;
}

export const META_FILE = 'loraplex.json';
export const ADAPTER_FILES = ['adapter_config.json', 'adapter_model.safetensors'] as const;

export interface AdapterStore {
  readonly kind: 'filesystem' | 'redis';
  /** Makes a validated staging folder the adapter `id`, atomically; 409 if the id is taken. */
  publish(id: string, stagingDir: string, meta: AdapterMeta): Promise<void>;
  /** Removes the adapter's persisted files (the engine has already stopped serving it). */
  remove(id: string): Promise<void>;
  /** Metadata of an uploaded adapter (null for adapters placed on disk by hand). */
  meta(id: string): AdapterMeta | null;
  /** Throws 503 when the store cannot accept writes (Redis down). */
  checkWritable(): void;
  close(): Promise<void>;
}

export function fsyncPath(path: string): void {
  const fd = openSync(path, 'r');
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

export class FilesystemStore implements AdapterStore {
  readonly kind = 'filesystem' as const;
  constructor(private readonly adapterDir: string) {}

  async publish(id: string, stagingDir: string, meta: AdapterMeta): Promise<void> {
    writeFileSync(join(stagingDir, META_FILE), JSON.stringify(meta, null, 2));
    for (const f of [...ADAPTER_FILES, META_FILE]) fsyncPath(join(stagingDir, f));
    fsyncPath(stagingDir);
    const target = join(this.adapterDir, id);
    if (existsSync(target)) throw new LoraplexError(`adapter ${id} already exists`, 409, 'invalid_request_error', 'id', 'adapter_exists');
    try {
      // rename(2) of a directory onto an existing non-empty one fails: of two racing uploads, one wins.
      renameSync(stagingDir, target);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'ENOTEMPTY' || code === 'EEXIST')
        throw new LoraplexError(`adapter ${id} already exists`, 409, 'invalid_request_error', 'id', 'adapter_exists');
      throw e;
    }
    fsyncPath(this.adapterDir);
  }

  async remove(id: string): Promise<void> {
    const dir = join(this.adapterDir, id);
    if (!existsSync(dir)) return;
    // Rename first so a half-deleted folder is never visible under the id.
    const trash = join(this.adapterDir, `.trash-${id}-${process.pid}-${Date.now()}`);
    renameSync(dir, trash);
    rmSync(trash, { recursive: true, force: true });
  }

  meta(id: string): AdapterMeta | null {
    try {
      return JSON.parse(readFileSync(join(this.adapterDir, id, META_FILE), 'utf8')) as AdapterMeta;
    } catch {
      return null;
    }
  }

  checkWritable(): void {}

  async close(): Promise<void> {}
}

/** Leftovers of uploads, deletes or syncs cut short by a crash: hidden, never listed, removed at start. */
export function removeCrashLeftovers(adapterDir: string): string[] {
  const gone: string[] = [];
  for (const name of readdirSync(adapterDir)) {
    if (/^\.(upload|trash|sync)-/.test(name)) {
      rmSync(join(adapterDir, name), { recursive: true, force: true });
      gone.push(name);
    }
  }
  return gone;
}

export async function createAdapterStore(engine: Engine, cfg: ServeConfig, log: FastifyBaseLogger): Promise<AdapterStore> {
  const dir = engine.adapters.opts.adapterDir ?? cfg.adapterDir;
  if (!dir) throw new Error('adapter directory not configured');
  const leftovers = removeCrashLeftovers(dir);
  if (leftovers.length) log.warn({ leftovers }, 'removed unfinished uploads/deletes from an earlier run');
  if (cfg.redisUrl) {
    const { RedisStore } = await import('./redis-store.js');
    return RedisStore.connect(cfg.redisUrl, dir, engine, log);
  }
  return new FilesystemStore(dir);
}
