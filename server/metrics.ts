// Prometheus metrics. Names follow vLLM's so dashboards, autoscalers and the Gateway API inference
// extension (which reads vllm:lora_requests_info for adapter affinity) work unchanged.
import { Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { Engine } from './engine/engine.js';
import type { GenerationRun } from './services/generation.js';

export class Metrics {
  readonly registry = new Registry();
  private readonly ttft: Histogram;
  private readonly e2e: Histogram;
  private readonly tpot: Histogram;
  private readonly success: Counter;
  private readonly promptTokens: Counter;
  private readonly genTokens: Counter;

  constructor(private readonly engine: Engine) {
    const r = this.registry;
    const model = engine.model.name;
    const labels = { model_name: model };
    const gauge = (name: string, help: string, read: () => number) =>
      new Gauge({ name, help, labelNames: ['model_name'], registers: [r], collect() { this.set(labels, read()); } });
    gauge('vllm:num_requests_running', 'Requests running on the engine.', () => engine.scheduler.running.length);
    gauge('vllm:num_requests_waiting', 'Requests waiting to be scheduled.', () => engine.scheduler.waiting.length);
    // Only pages that cannot be reclaimed count as used (KV of running sequences, cached blocks
    // they reference, adapters they pin), as vLLM counts evictable cached blocks as free: an idle
    // server with adapters and prefixes cached reads 0, not 94%.
    const kvUse = () => {
      const s = engine.paging.stats();
      return s.totalPages ? (s.totalPages - engine.reclaimablePages()) / s.totalPages : 0;
    };
    gauge('vllm:kv_cache_usage_perc', 'Fraction of the unified pool that cannot be reclaimed (KV and cached blocks of running sequences, pinned adapters).', kvUse);
    gauge('vllm:gpu_cache_usage_perc', 'Alias of vllm:kv_cache_usage_perc for older dashboards.', kvUse);
    gauge('vllm:num_preemptions_total', 'Preemptions (recompute) so far.', () => engine.scheduler.numPreemptions);
    const maxLora = engine.adapters.opts.maxSlots;
    new Gauge({
      name: 'vllm:lora_requests_info',
      help: 'Running and waiting LoRA adapters (value: scrape time).',
      labelNames: ['running_lora_adapters', 'waiting_lora_adapters', 'max_lora'],
      registers: [r],
      collect() {
        this.reset();
        const uniq = (xs: Array<string | null>) => [...new Set(xs.filter((x): x is string => x !== null))].sort().join(',');
        this.set(
          {
            running_lora_adapters: uniq(engine.scheduler.running.map((s) => s.adapterId)),
            waiting_lora_adapters: uniq(engine.scheduler.waiting.map((s) => s.adapterId)),
            max_lora: String(maxLora),
          },
          Date.now() / 1000,
        );
      },
    });
    new Gauge({
      name: 'loraplex_pool_pages',
      help: 'Pages of the unified pool by kind: KV of sequences, cached prefix blocks, adapter rows, free (and the total).',
      labelNames: ['kind'],
      registers: [r],
      collect() {
        const s = engine.paging.stats();
        this.set({ kind: 'kv' }, s.kvPages);
        this.set({ kind: 'prefix_cache' }, s.prefixPages);
        this.set({ kind: 'adapter' }, s.adapterPages);
        this.set({ kind: 'free' }, s.freePages);
        this.set({ kind: 'total' }, s.totalPages);
      },
    });
    new Gauge({
      name: 'loraplex_adapter_requests',
      help: 'Requests per adapter by state.',
      labelNames: ['adapter', 'state'],
      registers: [r],
      collect() {
        this.reset();
        for (const [id, c] of Object.entries(engine.stats().perAdapter)) {
          this.set({ adapter: id, state: 'waiting' }, c.waiting);
          this.set({ adapter: id, state: 'running' }, c.running);
        }
      },
    });
    new Gauge({ name: 'loraplex_pool_page_bytes', help: 'Bytes per pool page.', registers: [r], collect() { this.set(engine.paging.pageBytes); } });
    new Gauge({ name: 'loraplex_resident_adapters', help: 'Adapters in the unified pool.', registers: [r], collect() { this.set(engine.adapters.stats().resident); } });
    new Gauge({ name: 'loraplex_host_cached_adapters', help: 'Adapters parsed in host memory.', registers: [r], collect() { this.set(engine.adapters.stats().hostCached); } });
    // Counters mirrored from engine totals at scrape time.
    const monotonic = (name: string, help: string, read: () => number, withModel = false) => {
      let last = 0;
      new Counter({
        name, help, registers: [r], labelNames: withModel ? ['model_name'] : [],
        collect() {
          const v = read();
          if (v > last) (withModel ? this.inc(labels, v - last) : this.inc(v - last));
          last = Math.max(last, v);
        },
      });
    };
    // Adapter tiers: loads by the tier they came from (disk -> host: read, checked, converted;
    // host -> pool: copied), where admitted requests found their adapter, and load times.
    // A counter per label value, from totals read at scrape time.
    const monotonicBy = (name: string, help: string, label: string, read: () => Record<string, number>) => {
      const last: Record<string, number> = {};
      new Counter({
        name, help, labelNames: [label], registers: [r],
        collect() {
          for (const [value, v] of Object.entries(read())) {
            const prev = last[value];
            if (prev === undefined || v > prev) this.inc({ [label]: value }, v - (prev ?? 0));
            last[value] = Math.max(prev ?? 0, v);
          }
        },
      });
    };
    monotonicBy('loraplex_adapter_loads_total', 'Adapter loads by source tier: disk (read into host memory), host (copied into the pool).', 'tier', () => engine.adapters.stats().tierLoads);
    monotonicBy('loraplex_adapter_lookups_total', 'Adapter requests at admission by where their adapter was: pool_hit, host_hit, miss (on disk).', 'result', () => engine.adapters.stats().lookups);
    const loadSeconds = new Histogram({
      name: 'loraplex_adapter_load_seconds', help: 'Adapter load time by source tier (disk: config, read, checks, conversion; host: the copy into the pool).',
      labelNames: ['tier'], buckets: [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10], registers: [r],
    });
    engine.adapters.onLoadTimed = (tier, seconds) => loadSeconds.observe({ tier }, seconds);
    new Gauge({ name: 'loraplex_host_adapter_bytes', help: 'Host memory held by parsed adapters (the host tier).', registers: [r], collect() { this.set(engine.adapters.stats().hostBytes); } });
    monotonic('loraplex_adapter_host_evictions_total', 'Adapters dropped from host memory (LRU over --max-cpu-loras / --max-cpu-lora-bytes).', () => engine.adapters.stats().hostEvictions);
    monotonic('loraplex_adapter_evictions_total', 'Adapters evicted from the pool.', () => engine.adapters.stats().evictions);
    monotonic('loraplex_preemptions_total', 'Sequences preempted (recompute).', () => engine.scheduler.numPreemptions);
    monotonic('loraplex_engine_steps_total', 'Engine steps run.', () => engine.stats().steps);
    // vLLM's prefix-cache counters, in tokens (prometheus_client exposes them with _total).
    monotonic('vllm:prefix_cache_queries_total', 'Prompt tokens looked up in the prefix cache.', () => engine.prefix.stats().queries, true);
    monotonic('vllm:prefix_cache_hits_total', 'Prompt tokens found in the prefix cache.', () => engine.prefix.stats().hits, true);
    this.promptTokens = new Counter({ name: 'vllm:prompt_tokens_total', help: 'Prompt tokens processed.', labelNames: ['model_name'], registers: [r] });
    this.genTokens = new Counter({ name: 'vllm:generation_tokens_total', help: 'Generated tokens.', labelNames: ['model_name'], registers: [r] });
    this.success = new Counter({ name: 'vllm:request_success_total', help: 'Finished requests by finish reason.', labelNames: ['model_name', 'finished_reason'], registers: [r] });
    const buckets = [0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80];
    this.ttft = new Histogram({ name: 'vllm:time_to_first_token_seconds', help: 'Time to first token.', labelNames: ['model_name'], buckets, registers: [r] });
    this.e2e = new Histogram({ name: 'vllm:e2e_request_latency_seconds', help: 'End-to-end request latency.', labelNames: ['model_name'], buckets, registers: [r] });
    this.tpot = new Histogram({ name: 'vllm:time_per_output_token_seconds', help: 'Mean inter-token latency per request.', labelNames: ['model_name'], buckets, registers: [r] });
  }

  requestDone(run: GenerationRun, _mode: string, t0: number): void {
    const labels = { model_name: this.engine.model.name };
    const end = performance.now();
    this.promptTokens.inc(labels, run.promptTokens);
    this.genTokens.inc(labels, run.completionTokens);
    for (const s of run.streams) {
      const seq = s.seq;
      // The choice's own ending: a stop string is 'stop' (the engine saw an abort); a choice cut
      // short because the client went away is 'abort' (vLLM's label for aborted requests).
      const reason = s.reason ?? 'abort';
      this.success.inc({ ...labels, finished_reason: reason });
      if (seq.firstTokenAt !== null) {
        this.ttft.observe(labels, (seq.firstTokenAt - t0) / 1000);
        if (seq.outputIds.length > 1) this.tpot.observe(labels, (end - seq.firstTokenAt) / 1000 / (seq.outputIds.length - 1));
      }
    }
    this.e2e.observe(labels, (end - t0) / 1000);
  }
}
