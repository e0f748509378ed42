// A Dockerfile reader for linting without a Docker engine: instructions (with continuation lines
// and comments), build stages, and the flags and JSON arguments of each instruction. Plus a
// .dockerignore matcher. Both follow Docker's documented rules for the subset this repository
// uses; anything outside it (heredocs, another escape character) is reported, not guessed at.

export const INSTRUCTIONS = new Set([
  'FROM', 'RUN', 'CMD', 'LABEL', 'EXPOSE', 'ENV', 'ADD', 'COPY', 'ENTRYPOINT', 'VOLUME', 'USER',
  'WORKDIR', 'ARG', 'ONBUILD', 'STOPSIGNAL', 'HEALTHCHECK', 'SHELL', 'MAINTAINER',
]);

export interface Instruction {
  line: number; // 1-based line of the instruction's first line
  keyword: string; // upper case
  args: string; // everything after the keyword, continuation lines joined
  flags: Record<string, string>; // leading --name=value flags (COPY, ADD, FROM, RUN, HEALTHCHECK)
  rest: string; // args without the leading flags
  json: string[] | null; // exec form (a JSON array of strings), when rest is one
}

export interface Stage {
  index: number;
  name: string | null;
  base: string; // image or stage name, ARGs substituted
  line: number;
  instructions: Instruction[];
}

export interface Dockerfile {
  instructions: Instruction[];
  globalArgs: Record<string, string>;
  stages: Stage[];
  errors: string[];
}

function splitFlags(args: string): { flags: Record<string, string>; rest: string } {
  const flags: Record<string, string> = {};
  let rest = args;
  for (;;) {
    const m = /^--([a-z-]+)(?:=(\S*))?\s*/.exec(rest);
    if (!m) break;
    flags[m[1]] = m[2] ?? 'true';
    rest = rest.slice(m[0].length);
  }
  return { flags, rest: rest.trim() };
}

function execForm(rest: string): string[] | null {
  if (!rest.startsWith('[')) return null;
  try {
    const v = JSON.parse(rest) as unknown;
    return Array.isArray(v) && v.every((x) => typeof x === 'string') ? (v as string[]) : null;
  } catch {
    return null;
  }
}

/** `${NAME}`, `${NAME:-default}` and `$NAME` from vars (unknown names become ''). */
export function substitute(s: string, vars: Record<string, string>): string {
  return s.replace(/\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)/g, (_, a, def, b) => {
    const v = vars[a ?? b];
    return v !== undefined && v !== '' ? v : (def ?? '');
  });
}

function unquote(v: string): string {
  return /^".*"$|^'.*'$/.test(v) ? v.slice(1, -1) : v;
}

/** KEY=VALUE pairs of ENV, LABEL and ARG (quoted values allowed; the legacy `ENV KEY VALUE` too). */
export function keyValues(args: string): Record<string, string> {
  const out: Record<string, string> = {};
  const re = /([^\s=]+)=("(?:[^"\\]|\\.)*"|'[^']*'|\S*)/g;
  if (!args.includes('=')) {
    const [k, ...v] = args.split(/\s+/);
    out[k] = v.join(' ');
    return out;
  }
  for (const m of args.matchAll(re)) out[unquote(m[1])] = unquote(m[2]);
  return out;
}

export function parseDockerfile(text: string): Dockerfile {
  const errors: string[] = [];
  const lines = text.split('\n');
  const instructions: Instruction[] = [];
  let i = 0;
  // Parser directives: only at the very top, as `# name=value`.
  while (i < lines.length && /^#\s*[a-z]+\s*=/.test(lines[i])) {
    const m = /^#\s*([a-z]+)\s*=\s*(.*)$/.exec(lines[i])!;
    if (m[1] === 'escape' && m[2].trim() !== '\\') errors.push(`line ${i + 1}: only the default escape character is supported`);
    i++;
  }
  for (; i < lines.length; i++) {
    const raw = lines[i];
    if (/^\s*(#.*)?$/.test(raw)) continue;
    const start = i + 1;
    let joined = raw;
    // A trailing backslash continues the instruction; comment lines inside it are dropped.
    while (/\\\s*$/.test(joined) && i + 1 < lines.length) {
      joined = joined.replace(/\\\s*$/, '');
      i++;
      if (/^\s*#/.test(lines[i])) {
        joined += '\\';
        continue;
      }
      joined += ' ' + lines[i].trim();
    }
    if (/\\\s*$/.test(joined)) errors.push(`line ${start}: continuation at end of file`);
    const m = /^\s*([A-Za-z]+)(?:\s+(.*))?$/.exec(joined);
    if (!m) {
      errors.push(`line ${start}: cannot parse ${JSON.stringify(joined.slice(0, 60))}`);
      continue;
    }
    const keyword = m[1].toUpperCase();
    const args = (m[2] ?? '').trim();
    if (!INSTRUCTIONS.has(keyword)) errors.push(`line ${start}: unknown instruction ${m[1]}`);
    if (/<<-?["']?[A-Za-z_]+/.test(args) && (keyword === 'RUN' || keyword === 'COPY' || keyword === 'ADD'))
      errors.push(`line ${start}: heredocs are not supported by this linter`);
    const hasFlags = ['COPY', 'ADD', 'FROM', 'RUN', 'HEALTHCHECK'].includes(keyword);
    const { flags, rest } = hasFlags ? splitFlags(args) : { flags: {}, rest: args };
    const json = execForm(keyword === 'HEALTHCHECK' ? rest.replace(/^CMD\s+/i, '') : rest);
    if (rest.startsWith('[') && !json) errors.push(`line ${start}: ${keyword} argument looks like JSON but is not an array of strings`);
    instructions.push({ line: start, keyword, args, flags, rest, json });
  }

  const globalArgs: Record<string, string> = {};
  const stages: Stage[] = [];
  for (const ins of instructions) {
    if (ins.keyword === 'FROM') {
      const m = /^(\S+)(?:\s+AS\s+(\S+))?$/i.exec(ins.rest);
      if (!m) {
        errors.push(`line ${ins.line}: FROM needs an image and an optional "AS name"`);
        continue;
      }
      stages.push({ index: stages.length, name: m[2] ? m[2].toLowerCase() : null, base: substitute(m[1], globalArgs), line: ins.line, instructions: [] });
    } else if (!stages.length) {
      if (ins.keyword !== 'ARG') errors.push(`line ${ins.line}: only ARG may come before the first FROM`);
      else Object.assign(globalArgs, keyValues(ins.rest));
    } else {
      stages[stages.length - 1].instructions.push(ins);
    }
  }
  if (!stages.length) errors.push('no FROM');
  return { instructions, globalArgs, stages, errors };
}

/** COPY/ADD sources and destination (shell or JSON form). */
export function copyPaths(ins: Instruction): { sources: string[]; dest: string } {
  const parts = ins.json ?? ins.rest.split(/\s+/).filter(Boolean);
  return { sources: parts.slice(0, -1), dest: parts[parts.length - 1] };
}

// --- .dockerignore --------------------------------------------------------------------------------

interface IgnoreRule {
  negate: boolean;
  re: RegExp;
}

function globToRegExp(glob: string): RegExp {
  let re = '';
  for (let i = 0; i < glob.length; i++) {
    const c = glob[i];
    if (c === '*') {
      if (glob[i + 1] === '*') {
        // `**/` matches any number of directories (including none); a final `**` anything.
        i++;
        if (glob[i + 1] === '/') {
          i++;
          re += '(?:.*/)?';
        } else re += '.*';
      } else re += '[^/]*';
    } else if (c === '?') re += '[^/]';
    else re += c.replace(/[.+^${}()|[\]\\]/g, '\\$&');
  }
  return new RegExp(`^${re}$`);
}

export function parseDockerignore(text: string): IgnoreRule[] {
  return text
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l && !l.startsWith('#'))
    .map((l) => {
      const negate = l.startsWith('!');
      const pattern = (negate ? l.slice(1) : l).trim().replace(/^\/+/, '').replace(/\/+$/, '');
      return { negate, re: globToRegExp(pattern.replace(/^\.\//, '')) };
    });
}

/**
 * Whether the context path (relative, '/'-separated) is excluded. As in Docker: the last matching
 * rule wins, and a rule matching a parent directory applies to everything inside it.
 */
export function isIgnored(rules: IgnoreRule[], path: string): boolean {
  const parts = path.replace(/^\.\//, '').replace(/\/+$/, '').split('/');
  let ignored = false;
  for (const rule of rules) {
    for (let n = 1; n <= parts.length; n++) {
      if (rule.re.test(parts.slice(0, n).join('/'))) {
        ignored = !rule.negate;
        break;
      }
    }
  }
  return ignored;
}
