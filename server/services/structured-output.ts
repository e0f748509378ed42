// Structured-output request fields -> one GrammarSpec: OpenAI's `response_format` (text,
// json_object, json_schema with strict), vLLM's `structured_outputs` {json, regex, choice, grammar}
// and its older `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` (legacy aliases).
// At most one of them per request; every failure a 400 naming the parameter.
import type { GrammarSpec } from '../engine/grammar.js';
import { prepareJsonSchema } from '../engine/json-schema-support.js';
import { invalid } from './request-params.js';

export interface StructuredFields {
  response_format?: unknown;
  structured_outputs?: unknown;
  guided_json?: unknown;
  guided_regex?: unknown;
  guided_choice?: unknown;
  guided_grammar?: unknown;
}

export interface StructuredRequest {
  spec: GrammarSpec;
  /** The parameter a compile error names. */
  param: string;
}

const isObj = (v: unknown): v is Record<string, unknown> => v !== null && typeof v === 'object' && !Array.isArray(v);
const MAX_TEXT = 64 * 1024;

function text(v: unknown, param: string): string {
  if (typeof v !== 'string' || v.length === 0) invalid(param, `${param} must be a non-empty string`);
  if (v.length > MAX_TEXT) invalid(param, `${param} may hold at most ${MAX_TEXT} characters`);
  return v;
}

/** One vLLM-style constraint: json (a schema), regex, choice or grammar (EBNF). */
function vllmSpec(kind: 'json' | 'regex' | 'choice' | 'grammar', v: unknown, param: string): GrammarSpec {
  switch (kind) {
    case 'json':
      return { kind: 'json_schema', schema: prepareJsonSchema(v, param) };
    case 'regex':
      return { kind: 'regex', pattern: text(v, param) };
    case 'grammar':
      return { kind: 'grammar', grammar: text(v, param) };
    case 'choice':
      if (!Array.isArray(v) || v.length === 0 || v.some((c) => typeof c !== 'string')) invalid(param, `${param} must be a non-empty list of strings`);
      if (v.length > 4096) invalid(param, `${param} may hold at most 4096 choices`);
      return { kind: 'choice', choices: v as string[] };
  }
}

/** The request's constraint, or null for free text. */
export function structuredRequest(body: StructuredFields): StructuredRequest | null {
  const found: StructuredRequest[] = [];
  const rf = body.response_format;
  if (rf !== undefined && rf !== null) {
    if (!isObj(rf) || typeof rf.type !== 'string') invalid('response_format', 'response_format must be {"type": "text" | "json_object" | "json_schema", ...}');
    if (rf.type === 'json_object') found.push({ spec: { kind: 'json_object' }, param: 'response_format' });
    else if (rf.type === 'json_schema') {
      const js = rf.json_schema;
      if (!isObj(js)) invalid('response_format.json_schema', 'response_format.json_schema must be an object with name and schema');
      if (typeof js.name !== 'string' || !/^[a-zA-Z0-9_-]{1,64}$/.test(js.name))
        invalid('response_format.json_schema.name', 'response_format.json_schema.name must match ^[a-zA-Z0-9_-]{1,64}$');
      if (js.strict !== undefined && js.strict !== null && typeof js.strict !== 'boolean') invalid('response_format.json_schema.strict', 'strict must be a boolean');
      const param = 'response_format.json_schema.schema';
      // No schema: any JSON value, as vLLM.
      found.push(js.schema === undefined || js.schema === null ? { spec: { kind: 'json_object' }, param } : { spec: { kind: 'json_schema', schema: prepareJsonSchema(js.schema, param) }, param });
    } else if (rf.type !== 'text') invalid('response_format.type', `response_format type ${JSON.stringify(rf.type)} is not supported (text, json_object, json_schema)`);
  }
  const so = body.structured_outputs;
  if (so !== undefined && so !== null) {
    if (!isObj(so)) invalid('structured_outputs', 'structured_outputs must be an object with one of json, regex, choice, grammar');
    const keys = (['json', 'regex', 'choice', 'grammar'] as const).filter((k) => so[k] !== undefined && so[k] !== null);
    if (so.json_object === true) found.push({ spec: { kind: 'json_object' }, param: 'structured_outputs.json_object' });
    for (const k of keys) found.push({ spec: vllmSpec(k, so[k], `structured_outputs.${k}`), param: `structured_outputs.${k}` });
    if (keys.length === 0 && so.json_object !== true) invalid('structured_outputs', 'structured_outputs needs one of json, regex, choice, grammar');
  }
  for (const k of ['json', 'regex', 'choice', 'grammar'] as const) {
    const v = body[`guided_${k}`];
    if (v !== undefined && v !== null) found.push({ spec: vllmSpec(k, v, `guided_${k}`), param: `guided_${k}` });
  }
  if (found.length > 1) invalid(found[1].param.split('.')[0], `only one constraint per request: ${found.map((f) => f.param).join(' and ')} were both given`);
  return found[0] ?? null;
}
