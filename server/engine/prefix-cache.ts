// Automatic prefix caching inside the unified pool. Every full KV block a sequence has computed
// gets a key: sha256(parent key, the block's token ids), chained from a root key that holds the
// model's KV identity, the adapter's content digest (the KV of a prefix depends on the adapter;
// a replaced adapter has a new digest, so its old blocks are never hit) and the request's
// cache_salt. A new sequence takes the longest cached chain of full blocks and prefills only the
// rest. Only full blocks are shared, and a sequence writes only positions past its shared blocks,
// so shared pages are never written (no copy-on-write).
//
// Page ownership stays in the PagingManager (owner kind 'prefix'); this index holds the key and a
// reference count per cached page. Pages whose count drops to 0 stay cached but reclaimable: the
// engine reclaims least recently used first across them and unpinned adapters (one policy).
import { createHash } from 'node:crypto';
import type { PagingManager } from './paging-manager.js';
import type { Sequence } from './sequence.js';

interface Entry {
  key: string;
  page: number;
  refs: number;
  lastUsed: number;
  /** Content digest of the adapter whose KV this is ('' for the base model). */
  adapter: string;
}

export interface PrefixCacheStats {
  /** Prompt tokens looked up (first admission of each sequence). */
  queries: number;
  /** Of them, tokens found cached. */
  hits: number;
  cachedPages: number;
  reclaimablePages: number;
}

export class PrefixCache {
  private readonly byKey = new Map<string, Entry>();
  private readonly byPage = new Map<number, Entry>();
  /** Entries no sequence references, least recently used first (Map keeps insertion order). */
  private readonly idle = new Map<number, Entry>();
  private queries = 0;
  private hits = 0;

  constructor(
    private readonly paging: PagingManager,
    /** Everything besides tokens and adapter that changes the bytes of a KV block. */
    private readonly rootKey: string,
    readonly enabled: boolean,
  ) {}

  private get blockSize(): number {
    return this.paging.blockSize;
  }

  /** Key of the sequence's block `i` (its tokens must be known), computed once and kept on it. */
  private keyOf(seq: Sequence, i: number, adapterDigest: string): string {
    const ks = seq.blockKeys;
    while (ks.length <= i) {
      const j = ks.length;
      const parent = j === 0 ? this.rootOf(seq, adapterDigest) : ks[j - 1];
      const toks = new Int32Array(this.blockSize);
      for (let k = 0; k < this.blockSize; k++) toks[k] = seq.tokenAt(j * this.blockSize + k);
      ks.push(createHash('sha256').update(parent).update(Buffer.from(toks.buffer)).digest('base64'));
    }
    return ks[i];
  }

  private rootOf(seq: Sequence, adapterDigest: string): string {
    // LongRoPE: blocks computed with the long factors are another regime's bytes (seq.ropeLong).
    return createHash('sha256').update(this.rootKey).update('\0').update(adapterDigest).update('\0').update(seq.cacheSalt ?? '')
      .update(seq.ropeLong ? '\0longrope' : '').digest('base64');
  }

  /**
   * Admission: gives `seq` (holding no pages) the longest chain of cached blocks of its tokens,
   * never its last token (the step must compute it to sample). Returns the tokens it skips.
   */
  match(seq: Sequence, adapterDigest: string): number {
    if (seq.blocks.length || seq.numComputed) throw new Error('invariant: prefix match on a sequence that holds pages');
    let hit = 0;
    if (this.enabled && !seq.noPrefixMatch) {
      const max = Math.floor((seq.numTokens - 1) / this.blockSize);
      for (let i = 0; i < max; i++) {
        const e = this.byKey.get(this.keyOf(seq, i, adapterDigest));
        if (!e) break;
        this.ref(e);
        seq.blocks.push(e.page);
      }
      hit = seq.blocks.length * this.blockSize;
      seq.numComputed = hit;
      seq.promotedBlocks = seq.blocks.length;
    }
    return hit;
  }

  /** Counts one request's lookup (prompt tokens, of them cached) for the hit-rate metrics. */
  count(promptTokens: number, cachedTokens: number): void {
    this.queries += promptTokens;
    this.hits += cachedTokens;
  }

  /** After a step: the sequence's newly completed full blocks become cached blocks it references. */
  promote(seq: Sequence, adapterDigest: string): void {
    if (!this.enabled) return;
    const full = Math.min(Math.floor(seq.numComputed / this.blockSize), seq.blocks.length);
    for (let i = seq.promotedBlocks; i < full; i++) {
      const page = seq.blocks[i];
      const key = this.keyOf(seq, i, adapterDigest);
      // Another sequence computed the same block meanwhile: this copy stays private to `seq`.
      if (this.byKey.has(key)) continue;
      this.paging.transfer(page, { kind: 'prefix' });
      const e: Entry = { key, page, refs: 1, lastUsed: performance.now(), adapter: adapterDigest };
      this.byKey.set(key, e);
      this.byPage.set(page, e);
    }
    seq.promotedBlocks = Math.max(seq.promotedBlocks, full);
  }

  /** The sequence lets go of its pages (finished, cancelled, preempted): cached ones stay cached. */
  release(seq: Sequence): void {
    const own: number[] = [];
    for (const p of seq.blocks) {
      const e = this.byPage.get(p);
      if (e) this.unref(e);
      else own.push(p);
    }
    if (own.length) this.paging.release(own);
    seq.blocks = [];
    seq.promotedBlocks = 0;
  }

  private ref(e: Entry): void {
    if (e.refs++ === 0) this.idle.delete(e.page);
    e.lastUsed = performance.now();
  }

  private unref(e: Entry): void {
    if (--e.refs === 0) {
      e.lastUsed = performance.now();
      this.idle.set(e.page, e);
    }
  }

  /** Reclaimable cached pages with their last use, least recently used first. */
  *reclaimable(): Generator<{ page: number; lastUsed: number }> {
    for (const e of this.idle.values()) yield { page: e.page, lastUsed: e.lastUsed };
  }

  get reclaimableCount(): number {
    return this.idle.size;
  }

  /** Frees a reclaimable cached page. */
  evict(page: number): void {
    const e = this.idle.get(page);
    if (!e) throw new Error(`invariant: evicting cached page ${page} that is in use or not cached`);
    this.idle.delete(page);
    this.byKey.delete(e.key);
    this.byPage.delete(page);
    this.paging.release([page]);
  }

  /** An adapter was unloaded, deleted or replaced: its unreferenced cached blocks go now. */
  dropAdapter(adapterDigest: string): number {
    let n = 0;
    for (const e of [...this.idle.values()]) if (e.adapter === adapterDigest) (this.evict(e.page), n++);
    return n;
  }

  /** Frees every unreferenced cached page. */
  clear(): number {
    let n = 0;
    for (const e of [...this.idle.values()]) (this.evict(e.page), n++);
    return n;
  }

  stats(): PrefixCacheStats {
    return { queries: this.queries, hits: this.hits, cachedPages: this.byPage.size, reclaimablePages: this.idle.size };
  }

  /** The index agrees with page ownership and with the sequences' references. */
  checkInvariants(seqs: Sequence[]): void {
    const refs = new Map<number, number>();
    for (const q of seqs) for (const p of q.blocks) if (this.byPage.has(p)) refs.set(p, (refs.get(p) ?? 0) + 1);
    for (const [page, e] of this.byPage) {
      if (this.byKey.get(e.key) !== e) throw new Error(`invariant: cached page ${page} is not indexed by its key`);
      if (this.paging.ownerOf(page)?.kind !== 'prefix') throw new Error(`invariant: cached page ${page} is owned by ${JSON.stringify(this.paging.ownerOf(page))}`);
      if ((refs.get(page) ?? 0) !== e.refs) throw new Error(`invariant: cached page ${page} has ${e.refs} references, sequences hold ${refs.get(page) ?? 0}`);
      if ((e.refs === 0) !== this.idle.has(page)) throw new Error(`invariant: cached page ${page} (refs ${e.refs}) ${this.idle.has(page) ? 'is' : 'is not'} reclaimable`);
    }
    if (this.byKey.size !== this.byPage.size) throw new Error('invariant: prefix index sizes disagree');
    if (this.byPage.size !== this.paging.stats().prefixPages) throw new Error(`invariant: ${this.byPage.size} cached pages indexed, the pool counts ${this.paging.stats().prefixPages}`);
  }
}
