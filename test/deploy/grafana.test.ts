// deploy/grafana/loraplex.json against a real server: the dashboard imports (the fields Grafana
// needs: schemaVersion, panels with unique ids and a gridPos inside 24 columns, a Prometheus
// datasource variable every query uses, so it works imported or provisioned) and every metric its
// PromQL names, and every label it filters on, is one that loraplex's /metrics exports (after one
// request, so the histograms have series).
import { cpSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { adapterRoot, modelDir, ROOT } from '../helpers/fixtures.js';
import { startTestServer, type TestServer } from '../helpers/server.js';

interface Target {
  expr?: string;
  refId?: string;
  datasource?: { type?: string; uid?: string };
}
interface Panel {
  id: number;
  type: string;
  title: string;
  gridPos: { h: number; w: number; x: number; y: number };
  datasource?: { type?: string; uid?: string };
  targets?: Target[];
  panels?: Panel[];
}
interface Dashboard {
  schemaVersion: number;
  title: string;
  uid: string;
  panels: Panel[];
  templating: { list: Array<{ name: string; type: string; datasource?: { uid?: string }; query?: unknown }> };
}

const FILE = join(ROOT, 'deploy', 'grafana', 'loraplex.json');
const dash = JSON.parse(readFileSync(FILE, 'utf8')) as Dashboard;
const allPanels = (ps: Panel[]): Panel[] => ps.flatMap((p) => [p, ...allPanels(p.panels ?? [])]);
const panels = allPanels(dash.panels);
const queryPanels = panels.filter((p) => p.type !== 'row');

// PromQL words that are not metric names.
const KEYWORDS = new Set([
  'sum', 'avg', 'min', 'max', 'count', 'stddev', 'stdvar', 'topk', 'bottomk', 'quantile', 'count_values', 'group',
  'by', 'without', 'on', 'ignoring', 'group_left', 'group_right', 'bool', 'and', 'or', 'unless', 'offset', 'inf', 'nan',
]);

interface Selector {
  metric: string;
  labels: string[];
}

/** The metric selectors of a PromQL expression: each metric name with the labels it matches on. */
function selectors(expr: string): Selector[] {
  let e = expr.replace(/"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'/g, '""'); // strings
  e = e.replace(/\[[^\]]*\]/g, ''); // range and subquery durations ([5m], [$__rate_interval])
  e = e.replace(/\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)/g, ''); // grouping label lists
  const out: Selector[] = [];
  for (const m of e.matchAll(/([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?(\s*\()?/g)) {
    const [, name, matchers, call] = m;
    if (call && !matchers) continue; // a function or aggregation
    if (KEYWORDS.has(name.toLowerCase()) || /^\d/.test(name)) continue;
    const labels = matchers ? [...matchers.matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)/g)].map((l) => l[1]) : [];
    out.push({ metric: name, labels });
  }
  // Bare numbers (0.99) and Grafana variables ($model_name inside strings are already gone).
  return out.filter((s) => !/^\$/.test(s.metric));
}

/**
 * Series names and the labels each carries, from the Prometheus text format. A metric declared by
 * `# TYPE` without samples (a per-adapter gauge while nothing runs) is there with no labels.
 */
function scrape(text: string): Map<string, Set<string>> {
  const out = new Map<string, Set<string>>();
  for (const line of text.split('\n')) {
    const t = /^# TYPE (\S+) (gauge|counter)$/.exec(line);
    if (t && !out.has(t[1])) out.set(t[1], new Set());
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+\S+/.exec(line);
    if (!m) continue;
    const labels = out.get(m[1]) ?? new Set<string>();
    for (const l of (m[2] ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="/g)) labels.add(l[1]);
    out.set(m[1], labels);
  }
  return out;
}

describe('selectors() reads PromQL', () => {
  it('finds metric names and matcher labels, not functions, keywords, groupings or variables', () => {
    expect(selectors('histogram_quantile(0.99, sum by (le) (rate(vllm:x_bucket{model_name=~"$m", a!="b"}[$__rate_interval])))')).toEqual([
      { metric: 'vllm:x_bucket', labels: ['model_name', 'a'] },
    ]);
    expect(selectors('sum(rate(a_total[5m])) / sum(rate(b_total[5m])) > bool 0')).toEqual([
      { metric: 'a_total', labels: [] },
      { metric: 'b_total', labels: [] },
    ]);
    expect(selectors('max by (instance, x) (vllm:lora_requests_info)')).toEqual([{ metric: 'vllm:lora_requests_info', labels: [] }]);
  });
});

describe('deploy/grafana/loraplex.json', () => {
  it('has what Grafana needs to import it', () => {
    expect(dash.title).toBe('loraplex');
    expect(dash.uid).toMatch(/^[a-zA-Z0-9_-]{1,40}$/);
    expect(dash.schemaVersion).toBeGreaterThanOrEqual(36);
    const ds = dash.templating.list.filter((v) => v.type === 'datasource');
    expect(ds).toEqual([expect.objectContaining({ name: 'datasource', query: 'prometheus' })]);
    const DS = '${datasource}';
    const ids = panels.map((p) => p.id);
    expect(ids.every((id) => Number.isInteger(id) && id > 0)).toBe(true);
    expect(new Set(ids).size).toBe(ids.length);
    // Every panel on the 24-column grid, none overlapping another.
    const cells = new Set<string>();
    for (const p of panels) {
      const g = p.gridPos;
      expect(g, p.title).toBeDefined();
      for (const k of ['h', 'w', 'x', 'y'] as const) expect(Number.isInteger(g[k]) && g[k] >= 0, `${p.title}.gridPos.${k}`).toBe(true);
      expect(g.w > 0 && g.h > 0 && g.x + g.w <= 24, p.title).toBe(true);
      for (let x = g.x; x < g.x + g.w; x++)
        for (let y = g.y; y < g.y + g.h; y++) {
          expect(cells.has(`${x},${y}`), `${p.title} overlaps at ${x},${y}`).toBe(false);
          cells.add(`${x},${y}`);
        }
    }
    // Every query goes to the Prometheus the variable picks.
    for (const p of queryPanels) {
      expect(p.datasource?.uid, p.title).toBe(DS);
      expect(p.targets?.length, p.title).toBeGreaterThan(0);
      const refs = p.targets!.map((t) => t.refId);
      expect(new Set(refs).size, p.title).toBe(refs.length);
      for (const t of p.targets!) {
        expect(t.datasource?.uid, p.title).toBe(DS);
        expect(t.expr, p.title).toMatch(/\S/);
      }
    }
    for (const v of dash.templating.list) if (v.type === 'query') expect(v.datasource?.uid, v.name).toBe(DS);
    // Nothing refers to a variable the dashboard does not define.
    const names = new Set([...dash.templating.list.map((v) => v.name), '__rate_interval', '__interval', '__all']);
    for (const m of readFileSync(FILE, 'utf8').matchAll(/\$\{?([A-Za-z_][A-Za-z0-9_]*)/g)) expect(names.has(m[1]), `$${m[1]}`).toBe(true);
  });

  it('covers what the brief asks for', () => {
    const exprs = queryPanels.flatMap((p) => p.targets!.map((t) => t.expr!)).join('\n');
    for (const needle of [
      'vllm:request_success_total', 'histogram_quantile(0.99, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket',
      'vllm:time_per_output_token_seconds_bucket', 'vllm:prompt_tokens_total', 'vllm:generation_tokens_total',
      'vllm:num_requests_running', 'vllm:num_requests_waiting', 'vllm:kv_cache_usage_perc', 'loraplex_pool_pages',
      'loraplex_adapter_loads_total', 'loraplex_adapter_evictions_total', 'vllm:lora_requests_info',
    ]) expect(exprs, needle).toContain(needle);
    const table = queryPanels.find((p) => p.type === 'table' && p.targets!.some((t) => t.expr!.includes('vllm:lora_requests_info')));
    expect(table?.targets?.[0]).toMatchObject({ format: 'table', instant: true });
  });

  describe('against a real server', () => {
    let tmp: string;
    let srv: TestServer;
    let series: Map<string, Set<string>>;
    beforeAll(async () => {
      tmp = mkdtempSync(join(tmpdir(), 'loraplex-grafana-'));
      cpSync(join(adapterRoot('llama-gqa'), 'r4-mlp'), join(tmp, 'r4-mlp'), { recursive: true });
      srv = await startTestServer({ model: modelDir('llama-gqa'), adapterDir: tmp });
      // One request through an adapter, so the histograms, token counters and adapter counters have series.
      const res = await fetch(`${srv.url}/v1/completions`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ model: 'r4-mlp', prompt: 'hello', max_tokens: 4, temperature: 0 }),
      });
      expect(res.status).toBe(200);
      series = scrape(await (await fetch(`${srv.url}/metrics`)).text());
    });
    afterAll(async () => {
      await srv?.close();
      rmSync(tmp, { recursive: true, force: true });
    });

    it('every metric in every panel is exported by /metrics, with the labels the panel filters on', () => {
      let checked = 0;
      for (const p of queryPanels) {
        for (const t of p.targets!) {
          const sel = selectors(t.expr!);
          expect(sel.length, `${p.title}: ${t.expr}`).toBeGreaterThan(0);
          for (const s of sel) {
            expect(series.has(s.metric), `${p.title}: ${s.metric} is not in /metrics`).toBe(true);
            for (const l of s.labels) expect(series.get(s.metric)!.has(l), `${p.title}: ${s.metric} has no label ${l}`).toBe(true);
            checked++;
          }
        }
      }
      for (const v of dash.templating.list) {
        const q = JSON.stringify(v.query ?? '');
        const m = /label_values\(([^,]+),\s*([a-zA-Z_]+)\)/.exec(q);
        if (m) expect(series.get(m[1].trim())?.has(m[2]), `variable ${v.name}`).toBe(true);
      }
      expect(checked).toBeGreaterThan(20);
    });
  });
});
