// JSON request bodies: Fastify's own parser (secure-json-parse; __proto__ and constructor keys
// refused, the same errors), plus the exact value of a top-level integer `seed` that a double
// cannot hold. vLLM (Python ints) accepts any seed in the signed 64-bit range, and JSON.parse
// rounds 9223372036854775807 to 2^63: one past the range, and the same double as
// 9223372036854775806. Node 20 has no reviver source text, so the literal is read back from the
// body text, only when the parsed seed is past 2^53 (all other bodies cost nothing extra).
import type { FastifyInstance, RawReplyDefaultExpression, RawRequestDefaultExpression, RawServerDefault } from 'fastify';

/** The app whatever its logger type (app.ts builds it with pino's). */
type AnyFastify = FastifyInstance<RawServerDefault, RawRequestDefaultExpression, RawReplyDefaultExpression, any>;

const exactSeeds = new WeakMap<object, bigint>();

/** The exact integer a body's top-level `seed` was written as, when a double could not hold it. */
export function exactSeed(body: object): bigint | undefined {
  return exactSeeds.get(body);
}

/**
 * The source text of the value of the last top-level `key` of a JSON object text, when it is a
 * number (JSON.parse keeps the last of duplicate keys too); null otherwise. `text` must be valid
 * JSON: strings are skipped by their quotes and escapes, nesting by brackets.
 */
export function topLevelNumberText(text: string, key: string): string | null {
  let depth = 0;
  let found: string | null = null;
  let expectKey = false; // at depth 1, after '{' or ','
  let lastKey: string | null = null;
  const num = /-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?/y;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (c === '"') {
      let j = i + 1;
      while (text[j] !== '"') j += text[j] === '\\' ? 2 : 1;
      if (depth === 1 && expectKey) {
        const raw = text.slice(i, j + 1);
        lastKey = raw.includes('\\') ? (JSON.parse(raw) as string) : raw.slice(1, -1);
        expectKey = false;
      }
      i = j;
    } else if (c === '{' || c === '[') {
      depth++;
      if (depth === 1) expectKey = c === '{';
    } else if (c === '}' || c === ']') {
      depth--;
    } else if (depth === 1 && c === ',') {
      expectKey = true;
      lastKey = null;
    } else if (depth === 1 && c === ':' && lastKey === key) {
      let j = i + 1;
      while (text[j] === ' ' || text[j] === '\t' || text[j] === '\n' || text[j] === '\r') j++;
      num.lastIndex = j;
      const m = num.exec(text);
      found = m ? m[0] : null;
    }
  }
  return found;
}

/** Replaces Fastify's application/json parser with the same parser plus the exact-seed lookup. */
export function installJsonBodyParser(app: AnyFastify): void {
  const parse = app.getDefaultJsonParser('error', 'error');
  app.removeContentTypeParser('application/json');
  app.addContentTypeParser('application/json', { parseAs: 'string' }, (req, body, done) => {
    parse(req, body as string, (err, value) => {
      if (!err && value !== null && typeof value === 'object' && !Array.isArray(value)) {
        const seed = (value as Record<string, unknown>).seed;
        if (typeof seed === 'number' && Number.isInteger(seed) && !Number.isSafeInteger(seed)) {
          const lit = topLevelNumberText(body as string, 'seed');
          if (lit !== null && /^-?\d+$/.test(lit)) exactSeeds.set(value, BigInt(lit));
        }
      }
      done(err ?? null, value);
    });
  });
}
