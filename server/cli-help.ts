// `--help` text for every command and the README's flag tables, both rendered from the flag table
// (server/flags.ts), so neither can drift from what the parser accepts. test/engine/cli-flags.test.ts
// regenerates the README blocks and compares.
import { COMMANDS, FLAGS, defaultOf, flagsOf, type Command, type FlagGroup, type FlagSpec } from './flags.js';

const WIDTH = 100;
const NAME_COL = 34;

const ABOUT: Record<Command, { line: string; text: string[] }> = {
  serve: {
    line: 'serve the OpenAI API and the playground for one base model and its LoRA adapters',
    text: [
      'Serves the OpenAI API (and the playground at GET /) for one base model and its LoRA adapters.',
      'With no --model, the bundled demo model is used (built locally on first use, no download).',
    ],
  },
  generate: {
    line: 'one completion of one prompt, the text on stdout',
    text: [
      'Generates one completion of --prompt and writes the text to stdout (errors go to stderr).',
      'With no --model, the bundled demo model is used (built locally on first use, no download).',
    ],
  },
};

const GROUP_TITLES: Record<FlagGroup, string> = {
  sampling: 'Generation:',
  engine: 'Model and engine:',
  server: 'Server:',
};
const GROUP_ORDER: Record<Command, FlagGroup[]> = { serve: ['engine', 'server'], generate: ['sampling', 'engine'] };

const EXIT_CODES = 'Exit codes: 0 success, 1 runtime error (a model or adapter that fails to load), 2 usage error.';

/** Markdown -> terminal text: `code` -> code, [text](#anchor) -> text ("below" -> README#anchor), \| -> |. */
function plain(md: string): string {
  return md
    .replace(/\[([^\]]+)\]\(([^)]+)\)/g, (_, text: string, href: string) => (/^(below|above)$/.test(text) ? `see README${href}` : text))
    .replace(/`([^`]*)`/g, '$1')
    .replace(/\\\|/g, '|');
}

function wrap(text: string | string[], width: number): string[] {
  const lines: string[] = [];
  let line = '';
  for (const word of Array.isArray(text) ? text : text.split(/\s+/).filter(Boolean)) {
    if (line && line.length + 1 + word.length > width) {
      lines.push(line);
      line = word;
    } else line = line ? `${line} ${word}` : word;
  }
  if (line) lines.push(line);
  return lines;
}

function usageName(f: FlagSpec): string {
  return `--${f.name}${f.arg ? ` ${f.arg}` : ''}`;
}

/** The default as words: the table's text, or the value itself. */
function defaultWords(f: FlagSpec, command: Command | null, markdown: boolean): string {
  const v = command && !markdown ? defaultOf(f, command) : f.default;
  // --help shows this command's own default; the README the text that covers both commands.
  const own = command !== null && !markdown && f.defaultIn !== undefined;
  if (f.defaultText && !own) return markdown ? f.defaultText : plain(f.defaultText);
  if (typeof v === 'string' || Array.isArray(v)) return markdown ? `\`${JSON.stringify(v).replace(/^"|"$/g, '')}\`` : JSON.stringify(v).replace(/^"|"$/g, '');
  return String(v);
}

function row(name: string, text: string): string[] {
  const out: string[] = [];
  const body = wrap(text, WIDTH - NAME_COL);
  const first = `  ${name}`;
  if (first.length < NAME_COL) out.push(first.padEnd(NAME_COL) + (body[0] ?? ''));
  else out.push(first, ' '.repeat(NAME_COL) + (body[0] ?? ''));
  for (const l of body.slice(1)) out.push(' '.repeat(NAME_COL) + l);
  return out;
}

/** `loraplex COMMAND --help`. */
export function commandHelp(command: Command): string {
  const out = [`usage: loraplex ${command} [flags]${command === 'generate' ? ' --prompt TEXT' : ''}`, '', ...ABOUT[command].text];
  out.push('Every flag also reads from LORAPLEX_<NAME> (--memory-budget: LORAPLEX_MEMORY_BUDGET);', 'one on the command line wins.');
  for (const g of GROUP_ORDER[command]) {
    out.push('', GROUP_TITLES[g]);
    for (const f of flagsOf(command).filter((x) => x.group === g)) {
      const dflt = defaultWords(f, command, false);
      const note = dflt === 'required' ? ' (required)' : f.type === 'boolean' && dflt === 'off' ? '' : ` [default: ${dflt}]`;
      out.push(...row(usageName(f), plain(f.help) + note));
    }
  }
  out.push('', 'Other:', ...row('-h, --help', 'this help'), ...row('--version', 'the version of loraplex'));
  out.push('', EXIT_CODES);
  return out.join('\n') + '\n';
}

/** `loraplex --help`: the commands, each with its flags in one line each. */
export function mainHelp(): string {
  const out = ['usage: loraplex <command> [flags]', '', 'Commands:'];
  for (const c of COMMANDS) out.push(...row(c, ABOUT[c].line));
  for (const c of COMMANDS) {
    out.push('', `loraplex ${c} flags (loraplex ${c} --help says what each does):`);
    out.push(...wrap(flagsOf(c).map((f) => `[${usageName(f)}]`), WIDTH - 2).map((l) => `  ${l}`));
  }
  out.push('', 'Every flag also reads from LORAPLEX_<NAME>, e.g. LORAPLEX_MEMORY_BUDGET=2GiB.');
  out.push('Other: -h, --help (this help; after a command, that command\'s), --version.');
  out.push(EXIT_CODES);
  return out.join('\n') + '\n';
}

function mdRow(f: FlagSpec, command: Command): string {
  const cell = (s: string) => s.replace(/(?<!\\)\|/g, '\\|');
  const name = `\`--${f.name}${f.arg ? ` ${f.arg}` : ''}\``;
  return `| ${cell(name)} | ${cell(f.help)} | ${cell(defaultWords(f, command, true))} |`;
}

/**
 * The README's flag tables, between `<!-- flags:serve:begin -->` / `<!-- flags:serve:end -->` and
 * `<!-- flags:generate:begin -->` / `<!-- flags:generate:end -->`.
 */
export function readmeFlagBlock(block: Command): string {
  if (block === 'serve') {
    return ['| flag | meaning | default |', '|---|---|---|', ...flagsOf('serve').map((f) => mdRow(f, 'serve'))].join('\n');
  }
  const own = FLAGS.filter((f) => f.commands.length === 1 && f.commands[0] === 'generate');
  const shared = flagsOf('generate').filter((f) => f.commands.includes('serve'));
  return [
    '| flag | meaning | default |',
    '|---|---|---|',
    ...own.map((f) => mdRow(f, 'generate')),
    '',
    `and the engine flags of \`serve\`: ${shared.map((f) => `\`--${f.name}\``).join(', ')}.`,
  ].join('\n');
}
