// The LORAPLEX_* environment variables the server really reads: one per `loraplex serve` flag
// (server/config.ts), plus the few that server code reads directly (e.g. LORAPLEX_CACHE_DIR).
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { envName, SERVE_FLAG_NAMES } from '../../server/config.js';
import { ROOT } from './render.js';

function tsFiles(dir: string, out: string[] = []): string[] {
  for (const name of readdirSync(dir)) {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) tsFiles(p, out);
    else if (p.endsWith('.ts')) out.push(p);
  }
  return out;
}

export const FLAG_ENV_NAMES: ReadonlySet<string> = new Set(SERVE_FLAG_NAMES.map(envName));

/** LORAPLEX_* names that server code reads as string literals (not flags). */
export const DIRECT_ENV_NAMES: ReadonlySet<string> = new Set(
  tsFiles(join(ROOT, 'server'))
    .flatMap((f) => [...readFileSync(f, 'utf8').matchAll(/['"`](LORAPLEX_[A-Z0-9_]+)['"`]/g)].map((m) => m[1]))
    .filter((n) => !FLAG_ENV_NAMES.has(n)),
);

/** Why `name` is not something the server reads, or null when it is. */
export function unknownEnv(name: string): string | null {
  if (FLAG_ENV_NAMES.has(name) || DIRECT_ENV_NAMES.has(name)) return null;
  return `${name} is neither a flag's variable (${[...FLAG_ENV_NAMES].join(', ')}) nor read by server code (${[...DIRECT_ENV_NAMES].join(', ') || 'none'})`;
}
