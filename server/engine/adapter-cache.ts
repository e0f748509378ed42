// Adapter residency across the three tiers: disk (an adapter directory), host memory (parsed,
// validated and already laid out as its pool pages: an LRU bounded in bytes and in count) and the
// unified pool (pages addressable by a slot). Running sequences pin their adapter; unpinned
// resident adapters are evicted LRU-first when the pool or the slots run short. Loads start ahead
// of admission (prefetch, in arrival order, bounded) so an admitted request rarely waits for one.
import { createHash } from 'node:crypto';
import { existsSync, readdirSync, statSync } from 'node:fs';
import { join, resolve } from 'node:path';
import type { NativeAdapter, NativeEngine, NativeLoraPlan } from '../native/addon.js';
import { AdapterError, planAdapter, toNativePlan, type AdapterPlan } from './adapter-config.js';
import { confinedDir, confinedFile, resolveRoots } from './adapter-files.js';
import type { ModelInfo } from './model-config.js';
import type { PagingManager } from './paging-manager.js';
import type { Sequence } from './sequence.js';

export const ADAPTER_ID_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

type Tier = 'disk' | 'loading' | 'host' | 'pool';

export interface AdapterEntry {
  id: string;
  dir: string;
  /** The CLI's own --adapter: its files are not confined to the allowed roots. */
  trusted: boolean;
  tier: Tier;
  plan: AdapterPlan | null;
  parsed: NativeAdapter | null;
  pagesNeeded: number;
  slot: number; // 0 unless in the pool
  pages: number[];
  lastUsed: number;
  /**
   * Its identity in the prefix cache's keys (set at load): sha256 of the weights file's path and
   * identity (device, inode, size, mtime, ctime: any rewrite changes it) and the resolved plan
   * (ranks and scales from adapter_config.json). Hashing the file's bytes instead would cost more
   * than loading them.
   */
  digest: string;
  refs: number; // requests in flight (waiting or running) that name it
  requestsServed: number;
  loads: number;
  lastError: Error | null;
}

export interface AdapterCacheOptions {
  adapterDir: string | null;
  maxLoraRank: number;
  maxSlots: number;
  /** Host tier bound in bytes (default 1 GiB). */
  hostCacheBytes?: number;
  /** Host tier bound in adapters (--max-cpu-loras; default: the byte bound alone). */
  maxCpuLoras?: number;
  /** Loads from disk in flight at once (default 2). */
  maxConcurrentLoads?: number;
}

/** Where a request found its adapter when it was admitted. */
export type AdapterLookup = 'pool_hit' | 'host_hit' | 'miss';
/** The tier a load came from: disk -> host (read, checked, converted), host -> pool (copied). */
export type LoadTier = 'disk' | 'host';

export interface AdapterCacheStats {
  known: number;
  resident: number;
  hostCached: number;
  /** Host memory held by parsed adapters. */
  hostBytes: number;
  loading: number;
  /** Loads from disk into host memory. */
  loads: number;
  /** Loads by the tier they came from. */
  tierLoads: Record<LoadTier, number>;
  /** Admitted adapter requests by where their adapter was. */
  lookups: Record<AdapterLookup, number>;
  evictions: number;
  /** Adapters dropped from host memory (LRU, over the host bounds). */
  hostEvictions: number;
  loadFailures: number;
}

export class AdapterCache {
  private readonly entries = new Map<string, AdapterEntry>();
  private readonly retiring = new Set<string>();
  /** Adapter-dir adapters unloaded through the API: not found again until loaded again (in memory only). */
  private readonly unloaded = new Set<string>();
  /** --lora-roots: with --adapter-dir, the folders every adapter file must resolve into. */
  private extraRoots: string[] = [];
  private readonly slots: Array<AdapterEntry | null>;
  private evictions = 0;
  private hostEvictions = 0;
  private loadFailures = 0;
  private inFlight = 0;
  private readonly tierLoads: Record<LoadTier, number> = { disk: 0, host: 0 };
  private readonly lookups: Record<AdapterLookup, number> = { pool_hit: 0, host_hit: 0, miss: 0 };
  private progressWaiters: Array<() => void> = [];
  private readonly hostCacheBytes: number;
  private readonly maxCpuLoras: number;
  private readonly maxConcurrentLoads: number;
  /** Called with the seconds each load took, by tier (the load-time histogram). */
  onLoadTimed: (tier: LoadTier, seconds: number) => void = () => undefined;
  /** Slots used by running sequences (set by the engine): those adapters are pinned. */
  pinnedSlots: () => Set<number> = () => new Set();
  /** Called when an adapter's content is gone or changed (forget, replaced on disk): its prefix-cache blocks go. */
  onReplaced: (digest: string) => void = () => undefined;
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
    this.maxCpuLoras = opts.maxCpuLoras ?? Infinity;
    this.maxConcurrentLoads = Math.max(1, opts.maxConcurrentLoads ?? 2);
  }

  /** Adds folders (--lora-roots) that load_lora_adapter may register adapters from. */
  allowRoots(roots: string[]): void {
    this.extraRoots = [...this.extraRoots, ...roots];
  }

  /** The allowed roots, resolved now (a root created after start counts once it exists). */
  get roots(): string[] {
    return resolveRoots([this.opts.adapterDir, ...this.extraRoots]);
  }

  /**
   * Makes an adapter directory known under `id` (CLI --adapter, vLLM load_lora_adapter, uploads).
   * `trusted` (the CLI's own --adapter) lifts the root confinement for that adapter's files.
   */
  register(id: string, dir: string, opts: { trusted?: boolean } = {}): AdapterEntry {
    if (!ADAPTER_ID_RE.test(id)) throw new AdapterError(`invalid adapter id ${JSON.stringify(id)}`, 400, 'id');
    const existing = this.entries.get(id);
    if (existing) return existing;
    this.unloaded.delete(id);
    const e: AdapterEntry = {
      id, dir: resolve(dir), trusted: opts.trusted === true, tier: 'disk', plan: null, parsed: null, pagesNeeded: 0, slot: 0, pages: [],
      lastUsed: 0, digest: '', refs: 0, requestsServed: 0, loads: 0, lastError: null,
    };
    this.entries.set(id, e);
    return e;
  }

  /**
   * Known adapter, or one found as `<adapter-dir>/<id>/adapter_config.json`. A folder there that
   * resolves outside the allowed roots (a symlink to elsewhere) is not an adapter.
   */
  lookup(id: string): AdapterEntry | null {
    if (this.retiring.has(id)) return null;
    const e = this.entries.get(id);
    if (e) return e;
    if (!this.opts.adapterDir || !ADAPTER_ID_RE.test(id) || this.unloaded.has(id)) return null;
    const dir = join(this.opts.adapterDir, id);
    if (!existsSync(join(dir, 'adapter_config.json')) || !statSync(dir).isDirectory()) return null;
    const real = confinedDir(dir, resolveRoots([this.opts.adapterDir]));
    if (real === null) return null;
    return this.register(id, real);
  }

  /** A new adapter was written to `<adapter-dir>/<id>` (upload, registry sync): an unload of the old one no longer hides it. */
  published(id: string): void {
    this.unloaded.delete(id);
  }

  /** Adapters that can be named now (those being retired are already gone for new requests). */
  list(): AdapterEntry[] {
    return [...this.entries.values()].filter((e) => !this.retiring.has(e.id));
  }

  /** Every adapter that can be named: registered ones plus those found in the adapter directory. */
  listKnown(): AdapterEntry[] {
    const dir = this.opts.adapterDir;
    if (dir && existsSync(dir)) {
      for (const name of readdirSync(dir).sort()) if (!this.entries.has(name) && !this.retiring.has(name) && ADAPTER_ID_RE.test(name)) this.lookup(name);
    }
    return this.list().sort((a, b) => a.id.localeCompare(b.id));
  }

  /** A request names the adapter: count it (its load starts from prefetch()). Throws 404. */
  acquire(id: string): number {
    const e = this.lookup(id);
    if (!e) throw new AdapterError(`the model \`${id}\` does not exist`, 404, 'model', 'model_not_found');
    e.refs++;
    return 0; // the slot is assigned at admission
  }

  /**
   * Starts disk loads for the adapters of waiting requests, in arrival order: the first `window`
   * requests, at most maxConcurrentLoads loads at once, and no more than the host tier holds
   * (adapters of waiting requests are never dropped from it) - except the oldest request's
   * adapter, which always loads.
   */
  prefetch(waiting: readonly Sequence[], window: number): void {
    this.queue = waiting;
    this.window = window;
    if (this.inFlight >= this.maxConcurrentLoads) return;
    let { bytes: hostBytes, count: hostCount } = this.hostPinned();
    const seen = new Set<string>();
    for (let i = 0; i < waiting.length && i < window && this.inFlight < this.maxConcurrentLoads; i++) {
      const id = waiting[i].adapterId;
      if (id === null || seen.has(id)) continue;
      const oldest = seen.size === 0;
      seen.add(id);
      const e = this.entries.get(id);
      if (!e || e.tier !== 'disk') continue;
      // Size unknown before the first parse: assume the largest adapter seen.
      const est = e.pagesNeeded > 0 ? e.pagesNeeded * this.paging.pageBytes : this.largestBytes;
      if (!oldest && (hostBytes + est > this.hostCacheBytes || hostCount + 1 > this.maxCpuLoras)) break;
      hostBytes += est;
      hostCount++;
      void this.load(e);
    }
  }

  private largestBytes = 0;
  /** The queue prefetch() last saw (the scheduler's, updated in place): a finished load starts the next. */
  private queue: readonly Sequence[] = [];
  private window = 0;

  /** Host bytes and count of parsed (or loading) adapters that requests in flight name (never trimmed). */
  private hostPinned(): { bytes: number; count: number } {
    let bytes = 0;
    let count = 0;
    for (const e of this.entries.values())
      if ((e.parsed || e.tier === 'loading') && e.refs > 0) (bytes += e.parsed?.bytes ?? this.largestBytes), count++;
    return { bytes, count };
  }

  releaseRef(id: string): void {
    const e = this.entries.get(id);
    if (e && e.refs > 0) e.refs--;
    if (e && e.refs === 0) this.trimHostCache();
  }

  /** Content digest of a loaded adapter ('' for the base model or before its first load). */
  digestOf(id: string | null): string {
    return id === null ? '' : this.entries.get(id)?.digest ?? '';
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
    // Where the adapter was when the request first asked (a miss stays a miss while it loads).
    seq.adapterLookup ??= e.tier === 'pool' ? 'pool_hit' : e.tier === 'host' ? 'host_hit' : 'miss';
    if (e.tier === 'host' && !this.install(e)) return false;
    if (e.tier !== 'pool') return false;
    e.lastUsed = performance.now(); // one clock with the prefix cache: reclaim is LRU across both
    seq.adapterSlot = e.slot;
    if (!seq.servedCounted) {
      seq.servedCounted = true;
      e.requestsServed++;
      this.lookups[seq.adapterLookup]++;
    }
    return true;
  }

  /** Pool adapters no running sequence uses (never `keep`), least recently used first. */
  evictable(keep: string | null = null): AdapterEntry[] {
    const pinned = this.pinnedSlots();
    return [...this.entries.values()]
      .filter((e) => e.tier === 'pool' && !pinned.has(e.slot) && e.id !== keep)
      .sort((a, b) => a.lastUsed - b.lastUsed);
  }

  /** Pages held by pool adapters that could be evicted now. */
  evictablePages(): number {
    return this.evictable().reduce((n, e) => n + e.pages.length, 0);
  }

  /**
   * Frees `pages` pages of the pool for an install (never `keep`'s adapter). Set by the engine: its
   * policy (Engine.reclaimPool) is one LRU order across unpinned adapters and reclaimable
   * prefix-cache blocks.
   */
  reclaim: (pages: number, keep: string | null) => number = () => 0;

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
    let hostBytes = 0;
    let loading = 0;
    for (const e of this.entries.values()) {
      if (e.tier === 'pool') resident++;
      if (e.parsed) host++, (hostBytes += e.parsed.bytes);
      if (e.tier === 'loading') loading++;
    }
    return {
      known: this.entries.size, resident, hostCached: host, hostBytes, loading, loads: this.tierLoads.disk,
      tierLoads: { ...this.tierLoads }, lookups: { ...this.lookups },
      evictions: this.evictions, hostEvictions: this.hostEvictions, loadFailures: this.loadFailures,
    };
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
  async retire(id: string, opts: { sticky?: boolean } = {}): Promise<boolean> {
    const e = this.entries.get(id) ?? this.lookup(id);
    if (!e) return false;
    this.retiring.add(id);
    try {
      while (e.refs > 0) await this.waitForProgress();
      const inAdapterDir = this.opts.adapterDir !== null && e.dir === confinedDir(join(this.opts.adapterDir, id), resolveRoots([this.opts.adapterDir]));
      this.forget(id);
      // An unloaded adapter that lives in --adapter-dir would be found there again on the next
      // lookup: remember the unload (until it is loaded or published again; not across restarts).
      if (opts.sticky && inAdapterDir) this.unloaded.add(id);
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
    this.dropHostCopy(e);
    this.entries.delete(id);
    if (e.digest) this.onReplaced(e.digest);
  }

  private async load(e: AdapterEntry): Promise<void> {
    if (e.tier !== 'disk') return;
    e.tier = 'loading';
    this.inFlight++;
    const t0 = performance.now();
    try {
      if (e.parsed === null) {
        // Registered, then its folder went away: gone (404), not broken (400).
        if (!existsSync(e.dir)) throw new AdapterError(`the model \`${e.id}\` does not exist (its files are gone)`, 404, 'model', 'model_not_found');
        const roots = e.trusted ? ['/'] : this.roots;
        const plan = await planAdapter(e.dir, this.model, this.opts.maxLoraRank, roots);
        const name = 'adapter_model.safetensors';
        if (!existsSync(join(e.dir, name))) {
          const pickle = ['adapter_model.bin', 'adapter_model.pt'].find((f) => existsSync(join(e.dir, f)));
          if (pickle) throw new AdapterError(`${pickle}: pickle adapters are never loaded; convert to ${name}`, 415, name, 'unsupported_format');
        }
        const file = confinedFile(e.dir, name, roots);
        const nativePlan = toNativePlan(plan);
        let parsed: NativeAdapter;
        try {
          parsed = await this.native.parseAdapter(file, nativePlan, this.opts.maxLoraRank);
        } catch (err) {
          // The native message names the file by its path: say its name, never where it lives.
          throw new AdapterError(`adapter ${e.id}: ${(err as Error).message.split(file).join(name)}`);
        }
        if (this.retiring.has(e.id) || this.entries.get(e.id) !== e) {
          this.native.freeAdapter(parsed); // forgotten while it loaded
          return;
        }
        const pages = parsed.pages;
        if (pages > this.paging.totalPages) {
          this.native.freeAdapter(parsed);
          throw new AdapterError(`adapter ${e.id} needs ${pages} pages; the pool has ${this.paging.totalPages}`, 400, 'model', 'adapter_too_large');
        }
        const digest = planDigest(file, parsed.file, nativePlan);
        e.plan = plan;
        e.parsed = parsed;
        e.pagesNeeded = pages;
        this.largestBytes = Math.max(this.largestBytes, parsed.bytes);
        if (e.digest && e.digest !== digest) this.onReplaced(e.digest);
        e.digest = digest;
      }
      e.tier = 'host';
      e.lastError = null;
      e.loads++;
      this.tierLoads.disk++;
      this.onLoadTimed('disk', (performance.now() - t0) / 1000);
      this.trimHostCache();
    } catch (err) {
      if (e.tier === 'loading') e.tier = 'disk';
      this.dropHostCopy(e);
      e.pagesNeeded = 0;
      let error = err instanceof AdapterError ? err : new AdapterError(`adapter ${e.id}: ${(err as Error).message}`);
      // Its folder went away while it loaded: gone, whichever file the load missed first.
      if (error.status !== 404 && !existsSync(e.dir))
        error = new AdapterError(`the model \`${e.id}\` does not exist (its files are gone)`, 404, 'model', 'model_not_found');
      e.lastError = error;
      this.loadFailures++;
      this.onLoadFailed(e.id, e.lastError);
    } finally {
      this.inFlight--;
      if (e.tier === 'loading') e.tier = 'disk';
      this.prefetch(this.queue, this.window);
      const w = this.progressWaiters;
      this.progressWaiters = [];
      for (const r of w) r();
    }
  }

  /** Frees an adapter's host copy now (not whenever the garbage collector runs). */
  private dropHostCopy(e: AdapterEntry): void {
    if (e.parsed) this.native.freeAdapter(e.parsed);
    e.parsed = null;
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
    if (!this.paging.canAllocate(e.pagesNeeded)) this.reclaim(e.pagesNeeded - this.paging.freePages, e.id);
    if (!this.paging.canAllocate(e.pagesNeeded)) return false;
    const parsed = e.parsed;
    if (!parsed) return false;
    e.pages = this.paging.allocate(e.pagesNeeded, { kind: 'adapter', slot });
    e.slot = slot;
    e.tier = 'pool';
    this.slots[slot] = e;
    this.tierLoads.host++;
    const t0 = performance.now();
    // Queued on the engine thread ahead of the next step, so the step sees the rows.
    this.native.installAdapter(slot, parsed, Int32Array.from(e.pages)).then(
      () => this.onLoadTimed('host', (performance.now() - t0) / 1000),
      (err: Error) => {
        if (this.slots[slot] === e) this.evict(e);
        e.lastError = new AdapterError(`adapter ${e.id}: ${err.message}`);
        this.onLoadFailed(e.id, e.lastError);
      },
    );
    return true;
  }

  /** Takes an adapter out of the pool (its host copy stays if it has one). */
  evict(e: AdapterEntry): void {
    if (e.tier !== 'pool') return;
    void this.native.removeAdapter(e.slot).catch(() => undefined);
    this.paging.release(e.pages);
    this.slots[e.slot] = null;
    e.pages = [];
    e.slot = 0;
    e.tier = e.parsed ? 'host' : 'disk';
    this.evictions++;
    this.trimHostCache();
  }

  /** The adapter installed in a slot (null: none). */
  inSlot(slot: number): string | null {
    return this.slots[slot]?.id ?? null;
  }

  /** Cross-checks residency against the pool's owner table (tests run it after every step). */
  checkInvariants(): void {
    let pages = 0;
    for (const e of this.entries.values()) {
      if (e.refs < 0 || e.pagesNeeded < 0) throw new Error(`invariant: adapter ${e.id} has refs ${e.refs}, pagesNeeded ${e.pagesNeeded}`);
      if (e.pagesNeeded > this.paging.totalPages) throw new Error(`invariant: adapter ${e.id} needs ${e.pagesNeeded} pages of ${this.paging.totalPages}`);
      if (e.tier === 'pool') {
        if (this.slots[e.slot] !== e) throw new Error(`invariant: adapter ${e.id} in the pool without its slot ${e.slot}`);
        if (e.pages.length !== e.pagesNeeded) throw new Error(`invariant: adapter ${e.id} holds ${e.pages.length} pages, needs ${e.pagesNeeded}`);
        for (const p of e.pages) {
          const o = this.paging.ownerOf(p);
          if (!o || o.kind !== 'adapter' || o.slot !== e.slot) throw new Error(`invariant: page ${p} of adapter ${e.id} is owned by ${JSON.stringify(o)}`);
        }
        pages += e.pages.length;
      } else if (e.pages.length || e.slot !== 0) throw new Error(`invariant: adapter ${e.id} (${e.tier}) holds pool pages or a slot`);
    }
    this.slots.forEach((x, i) => {
      if (x && (x.tier !== 'pool' || x.slot !== i)) throw new Error(`invariant: slot ${i} holds ${x.id} (${x.tier}, slot ${x.slot})`);
    });
    if (pages !== this.paging.stats().adapterPages) throw new Error(`invariant: adapters hold ${pages} pages, the pool counts ${this.paging.stats().adapterPages}`);
  }

  /** Drops host copies of adapters no request names, LRU first, until within both bounds. */
  private trimHostCache(): void {
    let bytes = 0;
    let count = 0;
    for (const e of this.entries.values()) if (e.parsed) (bytes += e.parsed.bytes), count++;
    if (bytes <= this.hostCacheBytes && count <= this.maxCpuLoras) return;
    // A resident adapter's host copy may go too: it stays in the pool, and comes back from disk
    // if it is ever evicted from there.
    const cands = [...this.entries.values()]
      .filter((e) => e.parsed && (e.tier === 'host' || e.tier === 'pool') && e.refs === 0)
      .sort((a, b) => a.lastUsed - b.lastUsed);
    for (const e of cands) {
      if (bytes <= this.hostCacheBytes && count <= this.maxCpuLoras) break;
      bytes -= e.parsed!.bytes;
      count--;
      this.dropHostCopy(e);
      if (e.tier === 'host') e.tier = 'disk';
      this.hostEvictions++;
    }
  }
}

/** The prefix-cache identity of a load: the file read (path and identity) and the resolved plan. */
function planDigest(file: string, identity: string, plan: NativeLoraPlan): string {
  const h = createHash('sha256').update(file).update('\0').update(identity).update('\0');
  for (const a of [plan.layers, plan.projs, plan.ranks, plan.scales]) h.update(new Uint8Array(a.buffer, a.byteOffset, a.byteLength));
  return h.digest('hex');
}
