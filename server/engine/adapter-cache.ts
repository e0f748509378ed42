// Adapter residency across the three tiers: disk (an adapter directory), host memory (parsed and
// validated, an LRU bounded in bytes) and the unified pool (packed into pages, addressable by a
// slot). Running sequences pin their adapter; unpinned resident adapters are evicted LRU-first
// when the pool or the slots run short.
import { existsSync, readdirSync, statSync } from 'node:fs';
import { join, resolve } from 'node:path';
import type { NativeAdapter, NativeEngine } from '../native/addon.js';
import { AdapterError, planAdapter, toNativePlan, type AdapterPlan } from './adapter-config.js';
import type { ModelInfo } from './model-config.js';
import type { PagingManager } from './paging-manager.js';
import type { Sequence } from './sequence.js';

export const ADAPTER_ID_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

type Tier = 'disk' | 'loading' | 'host' | 'pool';

export interface AdapterEntry {
  id: string;
  dir: string;
  tier: Tier;
  plan: AdapterPlan | null;
  parsed: NativeAdapter | null;
  pagesNeeded: number;
  slot: number; // 0 unless in the pool
  pages: number[];
  lastUsed: number;
  refs: number; // requests in flight (waiting or running) that name it
  requestsServed: number;
  loads: number;
  lastError: Error | null;
}

export interface AdapterCacheOptions {
  adapterDir: string | null;
  maxLoraRank: number;
  maxSlots: number;
  hostCacheBytes?: number;
}

export interface AdapterCacheStats {
  known: number;
  resident: number;
  hostCached: number;
  loading: number;
  loads: number;
  evictions: number;
  loadFailures: number;
}

export class AdapterCache {
  private readonly entries = new Map<string, AdapterEntry>();
  private readonly retiring = new Set<string>();
  private readonly slots: Array<AdapterEntry | null>;
  private clock = 0;
  private loadsTotal = 0;
  private evictions = 0;
  private loadFailures = 0;
  private progressWaiters: Array<() => void> = [];
  private readonly hostCacheBytes: number;
  /** Slots used by running sequences (set by the engine): those adapters are pinned. */
  pinnedSlots: () => Set<number> = () => new Set();
  /** Called when an adapter fails to load, to fail the requests waiting for it. */
  onLoadFailed: (id: string, error: Error) => void = () => undefined;

  constructor(
    private readonly native: NativeEngine,
    private readonly paging: PagingManager,
    private readonly model: ModelInfo,
    readonly opts: AdapterCacheOptions,
  ) {
    this.slots = new Array<AdapterEntry | null>(opts.maxSlots + 1).fill(null);
    this.hostCacheBytes = opts.hostCacheBytes ?? 1024 * 1024 * 1024;
  }

  /** Makes an adapter directory known under `id` (CLI --adapter, vLLM load_lora_adapter, uploads). */
  register(id: string, dir: string): AdapterEntry {
    if (!ADAPTER_ID_RE.test(id)) throw new AdapterError(`invalid adapter id ${JSON.stringify(id)}`, 400, 'id');
    const existing = this.entries.get(id);
    if (existing) return existing;
    const e: AdapterEntry = {
      id, dir: resolve(dir), tier: 'disk', plan: null, parsed: null, pagesNeeded: 0, slot: 0, pages: [],
      lastUsed: 0, refs: 0, requestsServed: 0, loads: 0, lastError: null,
    };
    this.entries.set(id, e);
    return e;
  }

  /** Known adapter, or one found as `<adapter-dir>/<id>/adapter_config.json`. */
  lookup(id: string): AdapterEntry | null {
    if (this.retiring.has(id)) return null;
    const e = this.entries.get(id);
    if (e) return e;
    if (!this.opts.adapterDir || !ADAPTER_ID_RE.test(id)) return null;
    const dir = join(this.opts.adapterDir, id);
    if (existsSync(join(dir, 'adapter_config.json')) && statSync(dir).isDirectory()) return this.register(id, dir);
    return null;
  }

  /** Adapters that can be named now (those being retired are already gone for new requests). */
  list(): AdapterEntry[] {
    return [...this.entries.values()].filter((e) => !this.retiring.has(e.id));
  }

  /** Every adapter that can be named: registered ones plus those found in the adapter directory. */
  listKnown(): AdapterEntry[] {
    const dir = this.opts.adapterDir;
    if (dir && existsSync(dir)) {
      for (const name of readdirSync(dir).sort()) if (!this.entries.has(name) && !this.retiring.has(name)) this.lookup(name);
    }
    return this.list().sort((a, b) => a.id.localeCompare(b.id));
  }

  /** A request names the adapter: count it and start loading it towards the pool. Throws 404. */
  acquire(id: string): number {
    const e = this.lookup(id);
    if (!e) throw new AdapterError(`the model \`${id}\` does not exist`, 404, 'model', 'model_not_found');
    e.refs++;
    if (e.tier === 'disk') void this.load(e);
    return 0; // the slot is assigned at admission
  }

  releaseRef(id: string): void {
    const e = this.entries.get(id);
    if (e && e.refs > 0) e.refs--;
  }

  /** Pages the adapter takes in the pool, once known (0 before it is parsed). */
  pagesFor(id: string | null): number {
    return id === null ? 0 : this.entries.get(id)?.pagesNeeded ?? 0;
  }

  /**
   * Scheduler hook: can `seq` run now? Base-model sequences always can. An adapter sequence can
   * once its adapter is in the pool (installing it now if it is parsed and room can be made).
   */
  admit(seq: Sequence): boolean {
    if (seq.adapterId === null) {
      seq.adapterSlot = 0;
      return true;
    }
    const e = this.entries.get(seq.adapterId);
    if (!e) return false;
    if (e.tier === 'disk') void this.load(e);
    if (e.tier === 'host' && !this.install(e)) return false;
    if (e.tier !== 'pool') return false;
    e.lastUsed = ++this.clock;
    seq.adapterSlot = e.slot;
    if (seq.numPreemptions === 0 && seq.numComputed === 0) e.requestsServed++;
    return true;
  }

  /** Evicts unpinned pool adapters (least recently used first) until `pages` pages were freed. */
  reclaim(pages: number, keep: string | null = null): number {
    let freed = 0;
    const pinned = this.pinnedSlots();
    const victims = [...this.entries.values()]
      .filter((e) => e.tier === 'pool' && !pinned.has(e.slot) && e.id !== keep)
      .sort((a, b) => a.lastUsed - b.lastUsed);
    for (const v of victims) {
      if (freed >= pages) break;
      freed += v.pages.length;
      this.evict(v);
    }
    return freed;
  }

  /** Resolves when an adapter load finishes (or soon, so the engine loop re-checks). */
  waitForProgress(): Promise<void> {
    return new Promise((r) => {
      const done = () => {
        clearTimeout(timer);
        const i = this.progressWaiters.indexOf(done);
        if (i >= 0) this.progressWaiters.splice(i, 1);
        r();
      };
      const timer = setTimeout(done, 5);
      this.progressWaiters.push(done);
    });
  }

  stats(): AdapterCacheStats {
    let resident = 0;
    let host = 0;
    let loading = 0;
    for (const e of this.entries.values()) {
      if (e.tier === 'pool') resident++;
      if (e.parsed) host++;
      if (e.tier === 'loading') loading++;
    }
    return { known: this.entries.size, resident, hostCached: host, loading, loads: this.loadsTotal, evictions: this.evictions, loadFailures: this.loadFailures };
  }

  /** Loads an adapter from disk into host memory and waits for it (used by load_lora_adapter). */
  async loadNow(id: string): Promise<AdapterEntry> {
    const e = this.lookup(id);
    if (!e) throw new AdapterError(`the model \`${id}\` does not exist`, 404, 'model', 'model_not_found');
    if (e.tier === 'disk') await this.load(e);
    while (e.tier === 'loading') await this.waitForProgress();
    if (e.lastError && e.tier === 'disk') throw e.lastError;
    return e;
  }

  /**
   * Stops serving an adapter: new requests get 404 at once, requests already queued or running
   * finish, then its pages and host copy are freed. Resolves when nothing uses it any more.
   */
  async retire(id: string): Promise<boolean> {
    const e = this.entries.get(id) ?? this.lookup(id);
    if (!e) return false;
    this.retiring.add(id);
    try {
      while (e.refs > 0) await this.waitForProgress();
      this.forget(id);
    } finally {
      this.retiring.delete(id);
    }
    return true;
  }

  /** Forgets an adapter: frees its pool pages and host copy. Callers ensure nothing runs on it. */
  forget(id: string): void {
    const e = this.entries.get(id);
    if (!e) return;
    if (e.tier === 'pool') this.evict(e);
    e.parsed = null;
    this.entries.delete(id);
  }

  private async load(e: AdapterEntry): Promise<void> {
    if (e.tier !== 'disk') return;
    e.tier = 'loading';
    try {
      if (e.parsed === null) {
        const plan = planAdapter(e.dir, this.model, this.opts.maxLoraRank);
        const file = join(e.dir, 'adapter_model.safetensors');
        if (!existsSync(file)) {
          const pickle = ['adapter_model.bin', 'adapter_model.pt'].find((f) => existsSync(join(e.dir, f)));
          throw new AdapterError(
            pickle ? `${pickle}: pickle adapters are never loaded; convert to adapter_model.safetensors` : 'adapter_model.safetensors: missing',
            pickle ? 415 : 400, 'adapter_model.safetensors', pickle ? 'unsupported_format' : 'invalid_adapter');
        }
        let parsed: NativeAdapter;
        try {
          parsed = await this.native.parseAdapter(file, toNativePlan(plan), this.opts.maxLoraRank);
        } catch (err) {
          throw new AdapterError(`adapter ${e.id}: ${(err as Error).message}`);
        }
        e.plan = plan;
        e.parsed = parsed;
        e.pagesNeeded = this.native.adapterPages(parsed);
        if (e.pagesNeeded > this.paging.totalPages)
          throw new AdapterError(`adapter ${e.id} needs ${e.pagesNeeded} pages; the pool has ${this.paging.totalPages}`, 400, 'model', 'adapter_too_large');
      }
      e.tier = 'host';
      e.lastError = null;
      e.loads++;
      this.loadsTotal++;
      this.trimHostCache();
    } catch (err) {
      e.tier = 'disk';
      e.parsed = null;
      e.lastError = err instanceof AdapterError ? err : new AdapterError(`adapter ${e.id}: ${(err as Error).message}`);
      this.loadFailures++;
      this.onLoadFailed(e.id, e.lastError);
    } finally {
      const w = this.progressWaiters;
      this.progressWaiters = [];
      for (const r of w) r();
    }
  }

  /** Host tier -> pool: find a slot and pages (evicting unpinned adapters), copy the rows in. */
  private install(e: AdapterEntry): boolean {
    let slot = this.slots.findIndex((s, i) => i > 0 && s === null);
    if (slot < 0) {
      const pinned = this.pinnedSlots();
      const victim = [...this.entries.values()]
        .filter((x) => x.tier === 'pool' && !pinned.has(x.slot))
        .sort((a, b) => a.lastUsed - b.lastUsed)[0];
      if (!victim) return false;
      slot = victim.slot;
      this.evict(victim);
    }
    if (!this.paging.canAllocate(e.pagesNeeded)) this.reclaim(e.pagesNeeded - this.paging.freePages);
    if (!this.paging.canAllocate(e.pagesNeeded)) return false;
    const parsed = e.parsed;
    if (!parsed) return false;
    e.pages = this.paging.allocate(e.pagesNeeded, { kind: 'adapter', slot });
    e.slot = slot;
    e.tier = 'pool';
    this.slots[slot] = e;
    // Queued on the engine thread ahead of the next step, so the step sees the rows.
    this.native.installAdapter(slot, parsed, Int32Array.from(e.pages)).catch((err: Error) => {
      if (this.slots[slot] === e) this.evict(e);
      e.lastError = new AdapterError(`adapter ${e.id}: ${err.message}`);
      this.onLoadFailed(e.id, e.lastError);
    });
    return true;
  }

  private evict(e: AdapterEntry): void {
    if (e.tier !== 'pool') return;
    void this.native.removeAdapter(e.slot).catch(() => undefined);
    this.paging.release(e.pages);
    this.slots[e.slot] = null;
    e.pages = [];
    e.slot = 0;
    e.tier = e.parsed ? 'host' : 'disk';
    this.evictions++;
  }

  private trimHostCache(): void {
    let bytes = 0;
    for (const e of this.entries.values()) if (e.parsed) bytes += e.parsed.bytes;
    if (bytes <= this.hostCacheBytes) return;
    const cands = [...this.entries.values()]
      .filter((e) => e.parsed && e.tier === 'host' && e.refs === 0)
      .sort((a, b) => a.lastUsed - b.lastUsed);
    for (const e of cands) {
      if (bytes <= this.hostCacheBytes) break;
      bytes -= e.parsed!.bytes;
      e.parsed = null;
      e.tier = 'disk';
    }
  }
}
