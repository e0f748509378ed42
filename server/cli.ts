// loraplex command line: `serve` (the OpenAI server) and `generate` (one prompt, text to stdout).
// Logs and errors go to stderr; a load problem is a one-line error and exit code 1.
import { resolve } from 'node:path';
import { ConfigError, parseFlags, serveConfig } from './config.js';
import { ensureDemoModel } from './demo/demo-model.js';
import { Engine } from './engine/engine.js';
import { LoraplexError } from './engine/errors.js';
import { IncrementalDecoder } from './engine/tokenizer.js';

const USAGE = `usage:
  loraplex serve [--model DIR] [--adapter-dir DIR] [--host H] [--port P] [--memory-budget SIZE] ...
  loraplex generate [--model DIR] [--adapter DIR] --prompt TEXT [--max-tokens N] [--temperature T]
                    [--top-p P] [--top-k K] [--seed S] [--chat] [--ignore-eos]
With no --model, the bundled demo model is used (generated locally on first use).`;

const GENERATE_FLAGS = {
  model: 'string', adapter: 'string', prompt: 'string', 'max-tokens': 'string', temperature: 'string',
  'top-p': 'string', 'top-k': 'string', seed: 'string', chat: 'boolean', 'ignore-eos': 'boolean',
  'memory-budget': 'string', threads: 'string', 'max-lora-rank': 'string',
} as const;

function num(v: string | boolean | undefined, flag: string): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (typeof v !== 'string' || v.trim() === '' || !Number.isFinite(n)) throw new ConfigError(`--${flag} must be a number`);
  return n;
}

async function generate(argv: string[]): Promise<void> {
  const { values: v } = parseFlags(argv, GENERATE_FLAGS);
  if (typeof v.prompt !== 'string') throw new ConfigError('--prompt TEXT is required');
  let model = v.model as string | undefined;
  if (!model) model = (await ensureDemoModel()).modelDir;
  const { parseSize } = await import('./config.js');
  const engine = await Engine.create({
    model,
    maxNumSeqs: 1,
    memoryBudget: typeof v['memory-budget'] === 'string' ? parseSize(v['memory-budget'], 'memory-budget') : undefined,
    threads: num(v.threads, 'threads'),
    maxLoraRank: num(v['max-lora-rank'], 'max-lora-rank'),
  });
  try {
    let adapter: string | null = null;
    if (typeof v.adapter === 'string') {
      adapter = 'cli-adapter';
      engine.adapters.register(adapter, resolve(v.adapter), { trusted: true }); // the user's own folder
      await engine.adapters.loadNow(adapter); // surfaces a bad adapter as a load error
    }
    const tok = engine.tokenizer;
    const ids = v.chat ? tok.encodeChat([{ role: 'user', content: v.prompt }]) : tok.encode(v.prompt);
    const dec = new IncrementalDecoder(tok);
    const params = {
      maxTokens: num(v['max-tokens'], 'max-tokens') ?? 64,
      temperature: num(v.temperature, 'temperature') ?? 0,
      topP: num(v['top-p'], 'top-p'),
      topK: num(v['top-k'], 'top-k'),
      seed: num(v.seed, 'seed') ?? null,
      ignoreEos: v['ignore-eos'] === true,
    };
    for await (const t of engine.generate(ids, params, { adapter })) process.stdout.write(dec.push([t.token]));
    process.stdout.write(dec.flush() + '\n');
  } finally {
    await engine.close();
  }
}

async function serve(argv: string[]): Promise<void> {
  const cfg = serveConfig(argv);
  const { startServer } = await import('./app.js');
  await startServer(cfg);
}

export async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  try {
    if (cmd === 'generate') await generate(rest);
    else if (cmd === 'serve') await serve(rest);
    else if (cmd === undefined || cmd === '--help' || cmd === '-h' || cmd === 'help') {
      process.stderr.write(USAGE + '\n');
      return cmd === undefined ? 1 : 0;
    } else throw new ConfigError(`unknown command ${JSON.stringify(cmd)}\n${USAGE}`);
    return 0;
  } catch (e) {
    if (e instanceof ConfigError || e instanceof LoraplexError) {
      process.stderr.write(`loraplex: error: ${e.message}\n`);
      return 1;
    }
    throw e;
  }
}
