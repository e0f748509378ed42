// Access to an adapter's files on disk, confined to the allowed roots (--adapter-dir and
// --lora-roots): every file is resolved (symlinks included) and must lie inside a root; the
// resolved path is opened with O_NOFOLLOW, so a link swapped in after the check is refused too.
// Error messages name the file, never its contents or a server-side absolute path.
import { closeSync, constants, fstatSync, openSync, readSync, realpathSync } from 'node:fs';
import { join, sep } from 'node:path';
import { AdapterError } from './errors.js';

/** adapter_config.json files are a few KB; anything near this is not a PEFT config. */
export const MAX_CONFIG_BYTES = 1 << 20;

/** Resolves each root (a missing one is skipped); callers pass the result to the checks below. */
export function resolveRoots(roots: Array<string | null | undefined>): string[] {
  const out: string[] = [];
  for (const r of roots) {
    if (!r) continue;
    try {
      out.push(realpathSync(r));
    } catch {
      // a root that does not exist (yet) allows nothing
    }
  }
  return out;
}

export function isInside(real: string, roots: string[]): boolean {
  return roots.some((r) => real === r || real.startsWith(r.endsWith(sep) ? r : r + sep));
}

/** The real path of `dir`, or null if it does not exist or lies outside every root. */
export function confinedDir(dir: string, roots: string[]): string | null {
  try {
    const real = realpathSync(dir);
    return isInside(real, roots) ? real : null;
  } catch {
    return null;
  }
}

/**
 * The real path of `<dir>/<name>`, checked to be inside a root. Throws AdapterError: 400 (or
 * `missingStatus`) when it does not exist, 400 when it resolves outside the allowed folders.
 */
export function confinedFile(dir: string, name: string, roots: string[], missingStatus = 400): string {
  let real: string;
  try {
    real = realpathSync(join(dir, name));
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENOTDIR') throw new AdapterError(`${name}: missing`, missingStatus, name);
    throw new AdapterError(`${name}: cannot be read (${code ?? 'error'})`, 400, name);
  }
  if (!isInside(real, roots)) throw new AdapterError(`${name}: resolves outside the allowed adapter folders (--adapter-dir, --lora-roots)`, 400, name);
  return real;
}

/** Reads a confined regular file of at most `maxBytes`, without following a final symlink. */
export function readConfinedFile(dir: string, name: string, roots: string[], maxBytes: number): Buffer {
  const real = confinedFile(dir, name, roots);
  let fd: number;
  try {
    fd = openSync(real, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
  } catch (e) {
    throw new AdapterError(`${name}: cannot be opened (${(e as NodeJS.ErrnoException).code ?? 'error'})`, 400, name);
  }
  try {
    const st = fstatSync(fd);
    if (!st.isFile()) throw new AdapterError(`${name}: not a regular file`, 400, name);
    if (st.size > maxBytes) throw new AdapterError(`${name}: ${st.size} bytes; at most ${maxBytes} are accepted`, 400, name);
    const buf = Buffer.alloc(st.size);
    let off = 0;
    while (off < buf.length) {
      const n = readSync(fd, buf, off, buf.length - off, off);
      if (n === 0) break;
      off += n;
    }
    return buf.subarray(0, off);
  } finally {
    closeSync(fd);
  }
}

/** Line and column (1-based) of the first JSON syntax error in `text`, or null if it parses. */
export function jsonErrorLocation(text: string): { line: number; column: number } | null {
  const n = text.length;
  let i = 0;
  class Stop extends Error {}
  const fail = (): never => {
    throw new Stop();
  };
  const ws = () => {
    while (i < n && (text[i] === ' ' || text[i] === '\t' || text[i] === '\n' || text[i] === '\r')) i++;
  };
  const expect = (c: string) => (text[i] === c ? i++ : fail());
  const str = () => {
    expect('"');
    for (;;) {
      if (i >= n || text.charCodeAt(i) < 0x20) fail();
      const c = text[i++];
      if (c === '"') return;
      if (c === '\\') {
        const e = text[i++];
        if (e === 'u') {
          if (!/^[0-9a-fA-F]{4}$/.test(text.slice(i, i + 4))) fail();
          i += 4;
        } else if (e === undefined || !'"\\/bfnrt'.includes(e)) fail();
      }
    }
  };
  // Depth-capped recursion: a hostile file nested a million deep ends here, not in a stack overflow.
  const value = (depth: number): void => {
    if (depth > 512) fail();
    ws();
    const c = text[i];
    if (c === '{' || c === '[') {
      const close = c === '{' ? '}' : ']';
      i++;
      ws();
      if (text[i] === close) {
        i++;
        return;
      }
      for (;;) {
        if (c === '{') {
          ws();
          str();
          ws();
          expect(':');
        }
        value(depth + 1);
        ws();
        if (text[i] === ',') {
          i++;
          continue;
        }
        expect(close);
        return;
      }
    }
    if (c === '"') return str();
    for (const w of ['true', 'false', 'null'])
      if (text.startsWith(w, i)) {
        i += w.length;
        return;
      }
    const m = /^-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?/.exec(text.slice(i, i + 512));
    if (!m) fail();
    i += m![0].length;
  };
  try {
    value(0);
    ws();
    if (i < n) fail();
    return null;
  } catch (e) {
    if (!(e instanceof Stop)) throw e;
    const before = text.slice(0, Math.min(i, n));
    const nl = before.lastIndexOf('\n');
    let line = 1;
    for (let k = 0; k < before.length; k++) if (before.charCodeAt(k) === 10) line++;
    return { line, column: before.length - nl };
  }
}

/** Parses adapter_config.json of an adapter folder, confined to the roots. Throws AdapterError. */
export function readAdapterConfig(dir: string, roots: string[]): Record<string, unknown> {
  const name = 'adapter_config.json';
  const text = readConfinedFile(dir, name, roots, MAX_CONFIG_BYTES).toString('utf8');
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    // V8's message quotes the file's first bytes: say where, never what.
    const at = jsonErrorLocation(text);
    throw new AdapterError(`${name}: not valid JSON${at ? ` at line ${at.line} column ${at.column}` : ''}`, 400, name);
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new AdapterError(`${name}: not a JSON object`, 400, name);
  return v as Record<string, unknown>;
}
