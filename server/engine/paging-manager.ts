// All page accounting of the unified pool, in one place: which page is free, KV of one sequence,
// a cached prefix block (shared by the sequences that reference it; prefix-cache.ts keeps the
// index and reference counts) or adapter rows, the free list, and the invariants (a page is never
// owned twice, frees are exact). The C++ pool only holds bytes; it never decides.

export type PageOwner = { kind: 'kv'; seqId: number } | { kind: 'prefix' } | { kind: 'adapter'; slot: number };

export interface PoolStats {
  totalPages: number;
  freePages: number;
  kvPages: number;
  /** Cached prefix blocks, in use by a sequence or reclaimable. */
  prefixPages: number;
  adapterPages: number;
}

export class PagingManager {
  private readonly free: number[] = [];
  private readonly owner: Array<PageOwner | null>;
  private kvPages = 0;
  private prefixPages = 0;
  private adapterPages = 0;

  constructor(
    readonly totalPages: number,
    readonly pageBytes: number,
    readonly blockSize: number,
  ) {
    this.owner = new Array<PageOwner | null>(totalPages).fill(null);
    // Pop from the end: low page ids are handed out first (deterministic, easy to read in tests).
    for (let p = totalPages - 1; p >= 0; p--) this.free.push(p);
  }

  get freePages(): number {
    return this.free.length;
  }

  /** KV pages a sequence needs to hold `tokens` tokens. */
  blocksFor(tokens: number): number {
    return Math.ceil(tokens / this.blockSize);
  }

  canAllocate(n: number): boolean {
    return n <= this.free.length;
  }

  allocate(n: number, owner: PageOwner): number[] {
    if (!this.canAllocate(n)) throw new Error(`pool exhausted: need ${n} pages, ${this.free.length} free`);
    const pages = this.free.splice(this.free.length - n, n).reverse();
    for (const p of pages) {
      if (this.owner[p] !== null) throw new Error(`invariant: page ${p} handed out twice`);
      this.owner[p] = owner;
    }
    this.count(owner, n);
    return pages;
  }

  private count(owner: PageOwner, n: number): void {
    if (owner.kind === 'kv') this.kvPages += n;
    else if (owner.kind === 'prefix') this.prefixPages += n;
    else this.adapterPages += n;
  }

  /** Hands an owned page to a new owner (a sequence's full KV block becomes a cached prefix block). */
  transfer(page: number, owner: PageOwner): void {
    const o = this.owner[page];
    if (o === null || o === undefined) throw new Error(`invariant: page ${page} transferred while free`);
    this.count(o, -1);
    this.count(owner, 1);
    this.owner[page] = owner;
  }

  release(pages: number[]): void {
    for (const p of pages) {
      const o = this.owner[p];
      if (o === null || o === undefined) throw new Error(`invariant: page ${p} freed twice or never allocated`);
      this.count(o, -1);
      this.owner[p] = null;
      this.free.push(p);
    }
  }

  ownerOf(page: number): PageOwner | null {
    return this.owner[page] ?? null;
  }

  stats(): PoolStats {
    return { totalPages: this.totalPages, freePages: this.free.length, kvPages: this.kvPages, prefixPages: this.prefixPages, adapterPages: this.adapterPages };
  }

  /** Cross-checks the counters against the owner table (tests call this after every step). */
  checkInvariants(): void {
    let kv = 0;
    let pre = 0;
    let ad = 0;
    let none = 0;
    for (const o of this.owner) {
      if (o === null) none++;
      else if (o.kind === 'kv') kv++;
      else if (o.kind === 'prefix') pre++;
      else ad++;
    }
    const uniqueFree = new Set(this.free);
    if (uniqueFree.size !== this.free.length) throw new Error('invariant: duplicate page in the free list');
    if (none !== this.free.length || kv !== this.kvPages || pre !== this.prefixPages || ad !== this.adapterPages)
      throw new Error(`invariant: counters disagree (free ${this.free.length}/${none}, kv ${this.kvPages}/${kv}, prefix ${this.prefixPages}/${pre}, adapter ${this.adapterPages}/${ad})`);
    for (const p of this.free) if (this.owner[p] !== null) throw new Error(`invariant: free page ${p} has an owner`);
  }
}
