// loraplex command line: `serve` (the OpenAI server) and `generate` (one prompt, text to stdout).
// Help and --version go to stdout; logs and errors to stderr. An error is one line; the exit code
// is 2 for a usage error (an unknown flag, a bad value, a missing --prompt) and 1 for a runtime
// one (a model or adapter that fails to load, a port in use).
import { readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { commandHelp, mainHelp } from './cli-help.js';
import { ConfigError, engineOptions, toGenerateConfig, toServeConfig } from './config.js';
import { ensureDemoModel } from './demo/demo-model.js';
import { Engine } from './engine/engine.js';
import { LoraplexError } from './engine/errors.js';
import { IncrementalDecoder } from './engine/tokenizer.js';
import { closest, COMMANDS, parseCommandLine, type Command } from './flags.js';
import { loadReporter } from './load-progress.js';

export const EXIT_OK = 0;
export const EXIT_RUNTIME = 1;
export const EXIT_USAGE = 2;

/** The version in package.json (found from server/ under tsx and from dist/server/ compiled). */
export function version(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 4; i++, dir = dirname(dir)) {
    try {
      const pkg = JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8')) as { name?: string; version?: string };
      if (pkg.name === 'loraplex' && pkg.version) return pkg.version;
    } catch {
      // not here; one folder up
    }
  }
  return 'unknown';
}

async function generate(values: Record<string, unknown>): Promise<void> {
  const cfg = toGenerateConfig(values);
  const model = cfg.model ?? (await ensureDemoModel()).modelDir;
  // On a terminal, a progress bar on stderr while the model loads; otherwise nothing (stderr is for errors).
  const progress = loadReporter({ tty: process.stderr.isTTY === true, stream: process.stderr, log: null });
  let engine: Engine;
  try {
    engine = await Engine.create({ ...engineOptions(cfg, model), onLoadProgress: (p) => progress.update(p) });
  } finally {
    progress.end();
  }
  try {
    let adapter: string | null = null;
    if (cfg.adapter !== null) {
      adapter = 'cli-adapter';
      engine.adapters.register(adapter, resolve(cfg.adapter), { trusted: true }); // the user's own folder
      await engine.adapters.loadNow(adapter); // surfaces a bad adapter as a load error
    }
    const tok = engine.tokenizer;
    const ids = cfg.chat ? tok.encodeChat([{ role: 'user', content: cfg.prompt }]) : tok.encode(cfg.prompt);
    const dec = new IncrementalDecoder(tok);
    const params = {
      maxTokens: cfg.maxTokens,
      temperature: cfg.temperature,
      topP: cfg.topP,
      topK: cfg.topK,
      seed: cfg.seed,
      ignoreEos: cfg.ignoreEos,
    };
    for await (const t of engine.generate(ids, params, { adapter })) process.stdout.write(dec.push([t.token]));
    process.stdout.write(dec.flush() + '\n');
  } finally {
    await engine.close();
  }
}

async function serve(values: Record<string, unknown>): Promise<void> {
  const cfg = toServeConfig(values);
  const { startServer } = await import('./app.js');
  await startServer(cfg);
}

function isCommand(s: string): s is Command {
  return (COMMANDS as readonly string[]).includes(s);
}

export async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  try {
    if (cmd === undefined) {
      process.stderr.write(mainHelp());
      return EXIT_USAGE;
    }
    if (cmd === '--help' || cmd === '-h' || (cmd === 'help' && rest.length === 0)) {
      process.stdout.write(mainHelp());
      return EXIT_OK;
    }
    if (cmd === 'help' && isCommand(rest[0])) {
      process.stdout.write(commandHelp(rest[0]));
      return EXIT_OK;
    }
    if (cmd === '--version' || cmd === '-v' || cmd === 'version') {
      process.stdout.write(`loraplex ${version()}\n`);
      return EXIT_OK;
    }
    if (!isCommand(cmd)) {
      const name = cmd === 'help' ? rest[0] : cmd;
      const guess = closest(name.replace(/^-+/, ''), [...COMMANDS]);
      const what = name.startsWith('-') ? `a command comes first: loraplex serve ${name} ...` : `unknown command ${JSON.stringify(name)}`;
      throw new ConfigError(`${what}${guess && !name.startsWith('-') ? `; did you mean ${guess}?` : ''} (commands: ${COMMANDS.join(', ')}; loraplex --help)`);
    }
    const parsed = parseCommandLine(cmd, rest); // --help and --version win over any other problem
    if (parsed.help || parsed.version) {
      process.stdout.write(parsed.help ? commandHelp(cmd) : `loraplex ${version()}\n`);
      return EXIT_OK;
    }
    if (cmd === 'generate') await generate(parsed.values);
    else await serve(parsed.values);
    return EXIT_OK;
  } catch (e) {
    if (e instanceof ConfigError) {
      process.stderr.write(`loraplex: error: ${e.message}\n`);
      return EXIT_USAGE;
    }
    if (e instanceof LoraplexError) {
      process.stderr.write(`loraplex: error: ${e.message}\n`);
      return EXIT_RUNTIME;
    }
    // A system error at startup (a port in use, a folder we may not create): one line, not a stack.
    const code = (e as NodeJS.ErrnoException | null)?.code;
    if (e instanceof Error && typeof code === 'string' && /^E[A-Z]+$/.test(code)) {
      process.stderr.write(`loraplex: error: ${e.message}\n`);
      return EXIT_RUNTIME;
    }
    throw e;
  }
}
