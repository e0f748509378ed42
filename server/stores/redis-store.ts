// Redis adapter registry: metadata and the files themselves (in chunks) live in Redis, so replicas
// need no shared disk. Each replica materialises adapters into its own --adapter-dir (the local
// disk tier) and learns of uploads and deletes by pub/sub, with a periodic resync for anything it
// missed while disconnected. Redis down: writes answer 503; cached adapters keep serving.
import { randomUUID } from 'node:crypto';
import { createReadStream, existsSync, mkdtempSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { FastifyBaseLogger } from 'fastify';
import { Redis } from 'ioredis';
import type { Engine } from '../engine/engine.js';
import { LoraplexError } from '../engine/errors.js';
import { ADAPTER_FILES, FilesystemStore, META_FILE, fsyncPath, type AdapterMeta, type AdapterStore } from './adapter-store.js';

const PREFIX = 'loraplex:';
const IDS = `${PREFIX}adapters`;
const CHANNEL = `${PREFIX}adapter-events`;
const EPOCH = `${PREFIX}epoch`; // set once per registry lifetime; a new value means data was lost
const CHUNK = 1024 * 1024;

interface StoredMeta extends AdapterMeta {
  upload: string; // names this upload's blob keys
  chunks: Record<string, number>;
}

const metaKey = (id: string) => `${PREFIX}adapter:${id}`;
const blobKey = (upload: string, file: string, i: number) => `${PREFIX}blob:${upload}:${file}:${i}`;

export class RedisStore implements AdapterStore {
  readonly kind = 'redis' as const;
  private readonly metas = new Map<string, StoredMeta>();
  private readonly local: FilesystemStore;
  private resyncTimer: NodeJS.Timeout | null = null;
  private syncing: Promise<void> | null = null;
  private epoch: string | null = null;

  private constructor(
    private readonly redis: Redis,
    private readonly sub: Redis,
    private readonly adapterDir: string,
    private readonly engine: Engine,
    private readonly log: FastifyBaseLogger,
  ) {
    this.local = new FilesystemStore(adapterDir);
  }

  static async connect(url: string, adapterDir: string, engine: Engine, log: FastifyBaseLogger): Promise<RedisStore> {
    const opts = { lazyConnect: true, maxRetriesPerRequest: 1, enableOfflineQueue: false, retryStrategy: (n: number) => Math.min(200 * n, 2000) };
    const redis = new Redis(url, opts);
    const sub = new Redis(url, { ...opts, maxRetriesPerRequest: null });
    for (const c of [redis, sub]) c.on('error', (e: Error) => log.warn({ err: e.message }, 'redis'));
    const store = new RedisStore(redis, sub, adapterDir, engine, log);
    await redis.connect();
    await sub.connect();
    sub.on('message', (_ch: string, msg: string) => void store.onEvent(msg));
    await sub.subscribe(CHANNEL);
    redis.on('ready', () => void store.resync());
    await store.resync();
    store.resyncTimer = setInterval(() => void store.resync(), 10_000);
    store.resyncTimer.unref();
    return store;
  }

  checkWritable(): void {
    if (this.redis.status !== 'ready')
      throw new LoraplexError('the adapter registry (Redis) is unavailable; retry later', 503, 'server_error', null, 'registry_unavailable');
  }

  async publish(id: string, stagingDir: string, meta: AdapterMeta): Promise<void> {
    this.checkWritable();
    const upload = randomUUID();
    const chunks: Record<string, number> = {};
    try {
      const stored = await this.register(id, stagingDir, meta, upload, chunks);
      if (!stored) throw new LoraplexError(`adapter ${id} already exists`, 409, 'invalid_request_error', 'id', 'adapter_exists');
      await this.local.publish(id, stagingDir, meta);
      this.metas.set(id, stored);
      await this.redis.publish(CHANNEL, JSON.stringify({ op: 'add', id }));
    } catch (e) {
      await this.dropBlobs(upload, chunks).catch(() => undefined);
      if (e instanceof LoraplexError) throw e;
      throw new LoraplexError(`adapter registry write failed: ${(e as Error).message}`, 503, 'server_error', null, 'registry_unavailable');
    }
  }

  /** Writes the files as chunks, then the metadata with SET NX (of two racing writers one wins). */
  private async register(id: string, dir: string, meta: AdapterMeta, upload: string, chunks: Record<string, number>): Promise<StoredMeta | null> {
    for (const f of ADAPTER_FILES) {
      let i = 0;
      for await (const buf of createReadStream(join(dir, f), { highWaterMark: CHUNK })) await this.redis.set(blobKey(upload, f, i++), buf as Buffer);
      chunks[f] = i;
    }
    const { upload: _u, chunks: _c, ...plain } = meta as StoredMeta;
    const stored: StoredMeta = { ...plain, upload, chunks };
    if ((await this.redis.set(metaKey(id), JSON.stringify(stored), 'NX')) !== 'OK') return null;
    await this.redis.sadd(IDS, id);
    return stored;
  }

  /**
   * Redis came back without the data it had (restarted without persistence, or flushed): the
   * epoch key changed. Absence then means "lost", not "deleted", so put our copies back.
   */
  private async republish(): Promise<void> {
    for (const [id, meta] of this.metas) {
      const dir = join(this.adapterDir, id);
      if (!existsSync(dir)) continue;
      const upload = randomUUID();
      const chunks: Record<string, number> = {};
      try {
        const stored = await this.register(id, dir, meta, upload, chunks);
        if (stored) {
          this.metas.set(id, stored);
          await this.redis.publish(CHANNEL, JSON.stringify({ op: 'add', id }));
        } else {
          await this.dropBlobs(upload, chunks); // another replica put it back first
        }
        this.log.info({ id }, 'republished adapter to a registry that lost it');
      } catch (e) {
        await this.dropBlobs(upload, chunks).catch(() => undefined);
        this.log.warn({ id, err: (e as Error).message }, 'republish failed');
      }
    }
  }

  async remove(id: string): Promise<void> {
    this.checkWritable();
    const m = this.metas.get(id);
    try {
      await this.redis.del(metaKey(id));
      await this.redis.srem(IDS, id);
      if (m) await this.dropBlobs(m.upload, m.chunks);
      await this.redis.publish(CHANNEL, JSON.stringify({ op: 'delete', id }));
    } catch (e) {
      throw new LoraplexError(`adapter registry write failed: ${(e as Error).message}`, 503, 'server_error', null, 'registry_unavailable');
    }
    this.metas.delete(id);
    await this.local.remove(id);
  }

  meta(id: string): AdapterMeta | null {
    return this.metas.get(id) ?? this.local.meta(id);
  }

  async close(): Promise<void> {
    if (this.resyncTimer) clearInterval(this.resyncTimer);
    this.redis.disconnect();
    this.sub.disconnect();
  }

  private async dropBlobs(upload: string, chunks: Record<string, number>): Promise<void> {
    const keys: string[] = [];
    for (const [f, n] of Object.entries(chunks)) for (let i = 0; i < n; i++) keys.push(blobKey(upload, f, i));
    if (keys.length) await this.redis.del(...keys);
  }

  private async onEvent(msg: string): Promise<void> {
    try {
      const ev = JSON.parse(msg) as { op: string; id: string };
      if (ev.op === 'delete') await this.dropLocal(ev.id);
      else await this.resync();
    } catch (e) {
      this.log.warn({ err: (e as Error).message }, 'bad adapter event');
    }
  }

  private async dropLocal(id: string): Promise<void> {
    this.metas.delete(id);
    await this.engine.adapters.retire(id);
    await this.local.remove(id);
  }

  /** Makes the local tier match Redis: fetch new adapters, drop deleted ones. */
  resync(): Promise<void> {
    if (!this.syncing) this.syncing = this.doResync().finally(() => (this.syncing = null));
    return this.syncing;
  }

  private async doResync(): Promise<void> {
    if (this.redis.status !== 'ready') return;
    let ids: string[];
    try {
      await this.redis.set(EPOCH, randomUUID(), 'NX');
      const epoch = await this.redis.get(EPOCH);
      if (this.epoch !== null && epoch !== this.epoch) await this.republish();
      this.epoch = epoch;
      ids = await this.redis.smembers(IDS);
    } catch {
      return;
    }
    const live = new Set(ids);
    for (const id of ids) {
      if (this.metas.has(id) && existsSync(join(this.adapterDir, id))) continue;
      try {
        const raw = await this.redis.get(metaKey(id));
        if (!raw) continue;
        const meta = JSON.parse(raw) as StoredMeta;
        if (!existsSync(join(this.adapterDir, id))) await this.materialise(id, meta);
        this.metas.set(id, meta);
      } catch (e) {
        this.log.warn({ id, err: (e as Error).message }, 'adapter sync failed');
      }
    }
    // Adapters this replica got from Redis earlier but that are gone there now.
    for (const id of [...this.metas.keys()]) if (!live.has(id)) await this.dropLocal(id);
  }

  private async materialise(id: string, meta: StoredMeta): Promise<void> {
    const staging = mkdtempSync(join(this.adapterDir, '.sync-'));
    try {
      for (const f of ADAPTER_FILES) {
        const parts: Buffer[] = [];
        for (let i = 0; i < (meta.chunks[f] ?? 0); i++) {
          const b = await this.redis.getBuffer(blobKey(meta.upload, f, i));
          if (!b) throw new Error(`missing chunk ${i} of ${f}`);
          parts.push(b);
        }
        writeFileSync(join(staging, f), Buffer.concat(parts));
      }
      writeFileSync(join(staging, META_FILE), JSON.stringify(meta, null, 2));
      for (const f of [...ADAPTER_FILES, META_FILE]) fsyncPath(join(staging, f));
      renameSync(staging, join(this.adapterDir, id));
      this.engine.adapters.published(id); // a new adapter under the id: an earlier unload no longer applies
    } finally {
      rmSync(staging, { recursive: true, force: true });
    }
  }
}
