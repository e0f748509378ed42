// How a model load shows its progress (Engine.create's onLoadProgress): on a terminal, one progress
// bar line on stderr, redrawn in place and cleared at the end; elsewhere (tests, CI, containers),
// one JSON log line per finished phase through the pino logger, or nothing without one.
import type pino from 'pino';
import type { LoadPhase } from './engine/engine.js';

export interface LoadReporter {
  /** Every phase so far (Engine.create calls this about ten times a second). */
  update(phases: readonly LoadPhase[]): void;
  /** The load is over (ok or not): clears the bar. */
  end(): void;
}

const WHAT: Record<LoadPhase['phase'], string> = {
  config: 'read config.json and the tokenizer',
  read: 'opened and validated the safetensors files',
  pool: 'committed the memory pool',
  pack: 'packed the weights for the CPU kernels (reading them from disk)',
  upload: 'copied the weights to the GPU',
};
const DOING: Record<LoadPhase['phase'], string> = {
  config: 'config',
  read: 'reading',
  pool: 'allocating',
  pack: 'packing',
  upload: 'uploading',
};

export function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) [n, i] = [n / 1024, i + 1];
  return `${i === 0 ? n : n.toFixed(n < 10 ? 2 : n < 100 ? 1 : 0)} ${units[i]}`;
}

/** The bar's text for the current (last) phase: `loading model  packing  [#####-----]  52%  1.2 GiB / 2.4 GiB  3.4 s`. */
export function barLine(phases: readonly LoadPhase[], elapsedMs: number, width = 24): string {
  const p = phases.at(-1);
  if (!p) return '';
  const frac = p.total > 0 ? Math.min(1, p.done / p.total) : 1;
  const fill = Math.round(frac * width);
  const bar = '#'.repeat(fill) + '-'.repeat(width - fill);
  return `loading model  ${DOING[p.phase].padEnd(10)} [${bar}] ${String(Math.floor(frac * 100)).padStart(3)}%  ${formatBytes(p.done)} / ${formatBytes(p.total)}  ${(elapsedMs / 1000).toFixed(1)} s`;
}

export interface ReporterOptions {
  tty: boolean;
  stream: NodeJS.WritableStream;
  /** Where a non-terminal run logs one line per phase; null: nothing. */
  log: pino.Logger | null;
  /** A load faster than this never draws the bar (no flash for a small model). */
  barDelayMs?: number;
}

export function loadReporter(opts: ReporterOptions): LoadReporter {
  const t0 = performance.now();
  const logged = new Set<string>();
  let drawn = false;
  return {
    update(phases) {
      if (opts.tty) {
        const elapsed = performance.now() - t0;
        if (elapsed < (opts.barDelayMs ?? 300)) return;
        opts.stream.write(`\r${barLine(phases, elapsed)}\x1b[K`);
        drawn = true;
        return;
      }
      if (!opts.log) return;
      for (const p of phases) {
        if (!p.finished || logged.has(p.phase)) continue;
        logged.add(p.phase);
        opts.log.info({ phase: p.phase, bytes: p.total, ms: Math.round(p.ms) }, `load: ${WHAT[p.phase]}`);
      }
    },
    end() {
      if (drawn) opts.stream.write('\r\x1b[K');
      drawn = false;
    },
  };
}
