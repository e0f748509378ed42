// The JSON-schema subset that constrained decoding enforces, checked before XGrammar sees a schema.
// XGrammar (0.1.27) ignores some keywords with at most a warning, and gets a few wrong; a schema
// using one would produce output that silently violates it. Each such keyword is a 400 naming it,
// or is rewritten into an equivalent that XGrammar enforces:
// - integer `minimum`/`exclusiveMinimum` without an upper bound: its range regex lets 1 and 2 through
//   for `minimum: 3`; with an upper bound (2^53 - 1 added) the range is exact.
// - string `minLength`/`maxLength`: its length rule lets control characters into the string (invalid
//   JSON); rewritten to a `pattern` over JSON string characters and escapes, which it enforces.
// Found by compiling each keyword and asking XGrammar whether it accepts a violating instance.
import { LoraplexError } from './errors.js';

/** Keywords XGrammar does not enforce: any use is refused. */
const IGNORED = ['contains', 'minContains', 'maxContains', 'multipleOf', 'not', 'if', 'then', 'else', 'dependentRequired', 'dependentSchemas', 'dependencies', '$dynamicRef', '$recursiveRef'];
/** `format` values XGrammar enforces. */
const FORMATS = new Set(['date-time', 'date', 'time', 'email', 'uuid', 'uri', 'ipv4', 'ipv6', 'hostname', 'duration', 'uri-reference']);
const RANGE = ['minimum', 'maximum', 'exclusiveMinimum', 'exclusiveMaximum'];
/** Subschema-valued keywords: an object of schemas, one schema, or a list of schemas. */
const MAP_OF = ['properties', 'patternProperties', '$defs', 'definitions'];
const ONE = ['additionalProperties', 'items', 'propertyNames', 'unevaluatedProperties', 'unevaluatedItems', 'additionalItems'];
const LIST_OF = ['anyOf', 'oneOf', 'allOf', 'prefixItems'];
const MAX_NODES = 20_000;
const MAX_DEPTH = 64;
const BIG = Number.MAX_SAFE_INTEGER;
const MAX_JSON_DEPTH = 128;
const MAX_TEXT = 4 * 1024 * 1024;

/** True if `v` nests objects/arrays deeper than `max` (iterative: no stack for hostile input). */
function jsonDepthOver(v: unknown, max: number): boolean {
  const stack: Array<[unknown, number]> = [[v, 0]];
  while (stack.length) {
    const [x, d] = stack.pop()!;
    if (x === null || typeof x !== 'object') continue;
    if (d >= max) return true;
    for (const c of Array.isArray(x) ? x : Object.values(x)) if (c !== null && typeof c === 'object') stack.push([c, d + 1]);
  }
  return false;
}

function refuse(param: string, message: string, code = 'unsupported_schema_keyword'): never {
  throw new LoraplexError(message, 400, 'invalid_request_error', param, code);
}

/**
 * Checks and normalises a JSON schema for constrained decoding: returns its text for XGrammar, or
 * throws a 400 naming `param` (and the keyword with its JSON pointer in the message).
 */
export function prepareJsonSchema(schema: unknown, param: string): string {
  if (typeof schema === 'string') {
    if (schema.length > MAX_TEXT) refuse(param, `the schema may be at most ${MAX_TEXT} characters`, 'grammar_too_complex');
    try {
      schema = JSON.parse(schema);
    } catch {
      refuse(param, 'the schema is not valid JSON', 'invalid_schema');
    }
  }
  if (typeof schema === 'boolean') schema = schema ? {} : refuse(param, 'the schema `false` allows no value', 'invalid_schema');
  if (schema === null || typeof schema !== 'object' || Array.isArray(schema)) refuse(param, 'the schema must be a JSON object', 'invalid_schema');
  // Any JSON nesting (not only subschemas: enum and const values, unknown keywords) is bounded
  // before anything recursive (structuredClone, JSON.stringify, XGrammar) sees it.
  if (jsonDepthOver(schema, MAX_JSON_DEPTH)) refuse(param, `the schema nests deeper than ${MAX_JSON_DEPTH} levels`, 'grammar_too_complex');
  const root = structuredClone(schema) as Record<string, unknown>;
  // Iterative walk (no recursion on untrusted depth), bounded in nodes and depth.
  const stack: Array<{ node: unknown; path: string; depth: number }> = [{ node: root, path: '#', depth: 0 }];
  let nodes = 0;
  while (stack.length) {
    const { node, path, depth } = stack.pop()!;
    if (typeof node === 'boolean') continue;
    if (node === null || typeof node !== 'object' || Array.isArray(node)) refuse(param, `${path} is not a schema (an object or a boolean)`, 'invalid_schema');
    if (++nodes > MAX_NODES) refuse(param, `the schema has more than ${MAX_NODES} subschemas`, 'grammar_too_complex');
    if (depth > MAX_DEPTH) refuse(param, `the schema nests deeper than ${MAX_DEPTH} levels`, 'grammar_too_complex');
    const s = node as Record<string, unknown>;
    for (const k of IGNORED) if (k in s) refuse(param, `JSON schema keyword \`${k}\` (at ${path}) is not supported by constrained decoding`);
    if (s.uniqueItems === true) refuse(param, `JSON schema keyword \`uniqueItems\` (at ${path}) is not supported by constrained decoding`);
    if (Array.isArray(s.allOf) && s.allOf.length > 1) refuse(param, `JSON schema keyword \`allOf\` with more than one schema (at ${path}) is not supported by constrained decoding`);
    if (typeof s.$ref === 'string' && !s.$ref.startsWith('#')) refuse(param, `JSON schema keyword \`$ref\` (at ${path}) may only point inside the schema (#/...)`);
    if ('format' in s && !FORMATS.has(String(s.format))) refuse(param, `JSON schema keyword \`format\` value ${JSON.stringify(s.format)} (at ${path}) is not supported; supported: ${[...FORMATS].join(', ')}`);
    const ranges = RANGE.filter((k) => k in s);
    if (ranges.length) {
      if (s.type !== 'integer') refuse(param, `JSON schema keyword \`${ranges[0]}\` (at ${path}) is only supported on "type": "integer"`);
      for (const k of ranges) if (typeof s[k] !== 'number' || !Number.isFinite(s[k])) refuse(param, `JSON schema keyword \`${k}\` (at ${path}) must be a number`, 'invalid_schema');
      if (!('maximum' in s) && !('exclusiveMaximum' in s)) s.maximum = BIG;
      if (!('minimum' in s) && !('exclusiveMinimum' in s)) s.minimum = -BIG;
    }
    if ('minLength' in s || 'maxLength' in s) {
      if ('pattern' in s) refuse(param, `JSON schema keywords \`minLength\`/\`maxLength\` together with \`pattern\` (at ${path}) are not supported by constrained decoding`);
      const lo = Number(s.minLength ?? 0);
      const hi = s.maxLength === undefined ? '' : Number(s.maxLength);
      if (!Number.isInteger(lo) || lo < 0 || (hi !== '' && (!Number.isInteger(hi) || hi < lo)))
        refuse(param, `\`minLength\`/\`maxLength\` (at ${path}) must be integers with 0 <= minLength <= maxLength`, 'invalid_schema');
      delete s.minLength;
      delete s.maxLength;
      // One JSON string character: anything but a quote, backslash or control character, or an escape.
      s.pattern = `^([ !#-\\[\\]-~\\u0080-\\uffff]|\\\\["\\\\/bfnrt]){${lo},${hi}}$`;
    }
    for (const k of MAP_OF) {
      const m = s[k];
      if (m === undefined) continue;
      if (m === null || typeof m !== 'object' || Array.isArray(m)) refuse(param, `${path}/${k} must be an object of schemas`, 'invalid_schema');
      for (const [name, sub] of Object.entries(m)) stack.push({ node: sub, path: `${path}/${k}/${name}`, depth: depth + 1 });
    }
    for (const k of ONE) if (s[k] !== undefined && !Array.isArray(s[k])) stack.push({ node: s[k], path: `${path}/${k}`, depth: depth + 1 });
    if (Array.isArray(s.items)) s.items.forEach((sub, i) => stack.push({ node: sub, path: `${path}/items/${i}`, depth: depth + 1 }));
    for (const k of LIST_OF) {
      const l = s[k];
      if (l === undefined) continue;
      if (!Array.isArray(l)) refuse(param, `${path}/${k} must be a list of schemas`, 'invalid_schema');
      l.forEach((sub, i) => stack.push({ node: sub, path: `${path}/${k}/${i}`, depth: depth + 1 }));
    }
  }
  return JSON.stringify(root);
}
