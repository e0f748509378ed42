// The live panel: polls /metrics (Prometheus text) once a second and shows the engine's queue,
// the unified pool's composition and the adapter cache's loads and evictions.
import { api } from './api.js';
import { $ } from './shared.js';

const PERIOD_MS = 1000;

function unescapeLabel(v) {
  return v.replace(/\\(["\\n])/g, (_, c) => (c === 'n' ? '\n' : c));
}

/** Parses the Prometheus text format into [{ name, labels, value }] (comments skipped). */
export function parsePrometheus(text) {
  const out = [];
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels = {};
    for (const l of (m[2] ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = unescapeLabel(l[2]);
    const v = m[3] === '+Inf' ? Infinity : m[3] === '-Inf' ? -Infinity : Number(m[3]);
    out.push({ name: m[1], labels, value: v });
  }
  return out;
}

/** Sum of a metric's samples whose labels include `match`; null when it has none. */
function sum(samples, name, match = {}) {
  let total = null;
  for (const s of samples) {
    if (s.name !== name || !Object.entries(match).every(([k, v]) => s.labels[k] === v)) continue;
    total = (total ?? 0) + s.value;
  }
  return total;
}

const fmt = (v) => (v === null ? '–' : Number.isInteger(v) ? String(v) : v.toFixed(2));

let last = null; // { t, gen } of the previous scrape, for the token rate

function render(samples) {
  const now = performance.now();
  $('m-running').textContent = fmt(sum(samples, 'vllm:num_requests_running'));
  $('m-waiting').textContent = fmt(sum(samples, 'vllm:num_requests_waiting'));
  const kv = sum(samples, 'vllm:kv_cache_usage_perc');
  $('m-kv').textContent = kv === null ? '–' : `${(kv * 100).toFixed(1)} %`;
  $('m-loads').textContent = fmt(sum(samples, 'loraplex_adapter_loads_total'));
  $('m-evictions').textContent = fmt(sum(samples, 'loraplex_adapter_evictions_total'));
  $('m-resident').textContent = fmt(sum(samples, 'loraplex_resident_adapters'));
  const gen = sum(samples, 'vllm:generation_tokens_total');
  let rate = '';
  if (gen !== null && last && now > last.t) rate = ` (${((gen - last.gen) / ((now - last.t) / 1000)).toFixed(1)} tok/s)`;
  $('m-gen').textContent = fmt(gen) + rate;
  if (gen !== null) last = { t: now, gen };

  // Pool pages by kind (kv, prefix_cache, adapter, free; and total): one bar segment per kind.
  const pages = samples.filter((s) => s.name === 'loraplex_pool_pages').map((s) => [s.labels.kind ?? s.labels.use, s.value]);
  const total = pages.find(([k]) => k === 'total')?.[1] ?? 0;
  const parts = pages.filter(([k]) => k !== 'total');
  $('pool-bar').replaceChildren(...parts.map(([k, n]) => {
    const seg = document.createElement('span');
    seg.className = `seg-${k}`;
    seg.title = `${k}: ${n} pages`;
    seg.style.width = `${total ? (100 * n) / total : 0}%`;
    return seg;
  }));
  $('pool-legend').replaceChildren(...parts.flatMap(([k, n], i) => {
    const item = document.createElement('span');
    item.className = `key seg-${k}`;
    item.textContent = `${k.replace('_', ' ')} ${n}`;
    return i ? [' · ', item] : [item];
  }), ` of ${total} pages`);

  const info = samples.find((s) => s.name === 'vllm:lora_requests_info');
  if (info) {
    const running = info.labels.running_lora_adapters || 'none';
    const waiting = info.labels.waiting_lora_adapters || 'none';
    $('m-loras').textContent = `running: ${running} · waiting: ${waiting} · max ${info.labels.max_lora}`;
  }
  $('metrics-age').textContent = new Date().toLocaleTimeString();
}

async function poll() {
  if (!document.hidden) {
    try {
      const res = await api('/metrics');
      render(parsePrometheus(await res.text()));
      $('metrics-error').textContent = '';
    } catch (e) {
      $('metrics-error').textContent = `metrics: ${e.message}`;
    }
  }
  setTimeout(poll, PERIOD_MS);
}

export function startMetrics() {
  void poll();
}
