// XGrammar (the WASM build @mlc-ai/web-xgrammar) in a worker thread: compiles grammars and runs the
// per-sequence matchers, so no compilation or mask computation ever runs on the JS thread.
// Plain JavaScript (not TypeScript) so that the same file runs under tsx, vitest and the compiled
// server: a worker is started from a file path, outside any loader.
// Owned by server/engine/grammar.ts, which is the only module that talks to it. Messages (one
// reply per request, matched by `id`):
//   {op:'compile', id, key, spec}              -> {id, ok, ms} | {id, ok:false, message, fatal}
//   {op:'open', id, seq, key, spec}            -> {id, ok}      a matcher for sequence `seq`
//   {op:'masks', id, seqs: Int32Array, tokens: Int32Array}
//        each seq accepts its token (-1: none), then computes its next bitmask
//        -> {id, ok, words, masks: Int32Array [n*words], flags: Uint8Array [n]}
//           flags: 1 = terminated (no mask), 2 = the token was rejected
//   {op:'close', seqs: number[]}               (no reply)
// A compile that fails may leave the WASM module unusable (XGrammar aborts on schemas it cannot
// convert; deep ones exhaust its stack): the reply says `fatal` and the owner replaces the worker.
import { createRequire } from 'node:module';
import { readFileSync } from 'node:fs';
import { parentPort, workerData } from 'node:worker_threads';

const require = createRequire(import.meta.url);
const bundle = require.resolve('@mlc-ai/web-xgrammar/lib/index.js');

// XGrammar prints fatal checks (console.error) and warnings (console.log); keep the last lines as
// the error message instead of writing them to the server's stderr.
const printed = [];
const keep = (...a) => {
  printed.push(a.join(' '));
  if (printed.length > 20) printed.shift();
};
console.error = keep;
console.log = keep;
console.warn = keep;

// The bundle is UMD: evaluated as a script with CommonJS shims, it defines globalThis.xgrammar.
globalThis.require = require;
globalThis.__filename = bundle;
(0, eval)(readFileSync(bundle, 'utf8'));
const xg = globalThis.xgrammar;

const { vocab, vocabType, vocabSize, stopIds, maxGrammars } = workerData;
const tokenizerInfo = await xg.TokenizerInfo.createTokenizerInfo(vocab, vocabType, false, vocabSize, stopIds);
const compiler = await xg.GrammarCompiler.createGrammarCompiler(tokenizerInfo, false);
const words = Math.ceil(vocabSize / 32);

/** key -> {compiled, users}; Map order is the LRU order (oldest first). */
const grammars = new Map();
/** seq -> {matcher, key} */
const matchers = new Map();

function escapeEbnf(s) {
  return JSON.stringify(s); // EBNF string literals take JSON's escapes
}

async function compileSpec(spec) {
  switch (spec.kind) {
    case 'json_schema':
      // Compact separators, no free whitespace: one canonical layout per value, so a model cannot
      // pad its output with whitespace until max_tokens.
      return compiler.compileJSONSchema(spec.schema, false, -1, [', ', ': '], true);
    case 'json_object':
      // OpenAI's JSON mode promises an object; XGrammar's builtin JSON grammar also takes arrays
      // and free whitespace, so a schema of any object with the same compact layout instead.
      return compiler.compileJSONSchema('{"type": "object"}', false, -1, [', ', ': '], true);
    case 'regex':
      return compiler.compileStructuralTag({ type: 'structural_tag', format: { type: 'regex', pattern: spec.pattern } });
    case 'choice':
      return compiler.compileGrammar(`root ::= ${spec.choices.map(escapeEbnf).join(' | ')}`);
    case 'grammar':
      return compiler.compileGrammar(spec.grammar);
    case 'structural_tag':
      return compiler.compileStructuralTag(spec.tag);
    default:
      throw new Error(`unknown grammar kind ${spec.kind}`);
  }
}

async function ensure(key, spec) {
  const hit = grammars.get(key);
  if (hit) {
    grammars.delete(key);
    grammars.set(key, hit);
    return { entry: hit, ms: 0 };
  }
  const t0 = performance.now();
  const compiled = await compileSpec(spec);
  const entry = { compiled, users: 0 };
  grammars.set(key, entry);
  // Bounded: drop the least recently used grammars no matcher uses.
  for (const [k, e] of grammars) {
    if (grammars.size <= maxGrammars) break;
    if (e.users === 0 && k !== key) {
      e.compiled.dispose();
      grammars.delete(k);
    }
  }
  return { entry, ms: performance.now() - t0 };
}

/** The most useful line XGrammar printed: its fatal check, without the build's source path. */
function lastMessage(e) {
  const line = [...printed].reverse().find((l) => l.includes('[FATAL]') || l.includes('Check failed')) ?? printed.at(-1) ?? String(e?.message ?? e);
  return line.replace(/^\[FATAL\]\s*\S+:\d+:\s*/, '').replace(/^Check failed: \(.*?\) is false:\s*/, '').trim();
}

async function handle(msg) {
  switch (msg.op) {
    case 'compile': {
      printed.length = 0;
      try {
        const { ms } = await ensure(msg.key, msg.spec);
        return { id: msg.id, ok: true, ms };
      } catch (e) {
        // An abort (XGrammar's fatal checks) or a WASM trap (out of bounds, stack exhausted) can
        // leave the module unusable: `fatal` tells the owner to replace this worker.
        return { id: msg.id, ok: false, message: lastMessage(e), fatal: true };
      }
    }
    case 'open': {
      const { entry } = await ensure(msg.key, msg.spec);
      const matcher = await xg.GrammarMatcher.createGrammarMatcher(entry.compiled);
      entry.users++;
      matchers.set(msg.seq, { matcher, key: msg.key });
      return { id: msg.id, ok: true };
    }
    case 'masks': {
      const n = msg.seqs.length;
      const masks = new Int32Array(n * words);
      const flags = new Uint8Array(n);
      for (let i = 0; i < n; i++) {
        const m = matchers.get(msg.seqs[i]);
        if (!m) {
          flags[i] = 1;
          continue;
        }
        const t = msg.tokens[i];
        if (t >= 0 && !m.matcher.acceptToken(t)) flags[i] |= 2;
        if (m.matcher.isTerminated()) {
          flags[i] |= 1;
          continue;
        }
        masks.set(await m.matcher.getNextTokenBitmask(), i * words);
      }
      return { id: msg.id, ok: true, words, masks, flags, transfer: [masks.buffer, flags.buffer] };
    }
    case 'close':
      for (const s of msg.seqs) {
        const m = matchers.get(s);
        if (!m) continue;
        m.matcher.dispose();
        matchers.delete(s);
        const e = grammars.get(m.key);
        if (e) e.users--;
      }
      return null;
    default:
      return { id: msg.id, ok: false, message: `unknown op ${msg.op}` };
  }
}

// One message at a time, in order: the matchers' state depends on it.
let chain = Promise.resolve();
parentPort.on('message', (msg) => {
  chain = chain.then(async () => {
    try {
      const r = await handle(msg);
      if (r) {
        const { transfer, ...body } = r;
        parentPort.postMessage(body, transfer ?? []);
      }
    } catch (e) {
      if (msg.id !== undefined) parentPort.postMessage({ id: msg.id, ok: false, message: lastMessage(e) });
    }
  });
});
parentPort.postMessage({ ready: true });
