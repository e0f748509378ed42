// OpenAI `tools`, `tool_choice` and `parallel_tool_calls` on chat: validation (each failure a 400
// naming the parameter), the grammar each mode decodes under, and the assistant message a finished
// choice becomes. The route picks the parser (--tool-call-parser) and nothing else.
import { randomBytes } from 'node:crypto';
import { LoraplexError } from '../engine/errors.js';
import type { GrammarSpec } from '../engine/grammar.js';
import { prepareJsonSchema } from '../engine/json-schema-support.js';
import { hermesParser } from './hermes.js';
import { llama3JsonParser } from './llama3-json.js';
import { mistralParser } from './mistral.js';
import type { ParsedCall, ToolCallParser } from './parser.js';

export interface ToolDef {
  name: string;
  /** The parameters schema as constrained decoding enforces it (json-schema-support.ts). */
  schema: Record<string, unknown>;
}

export type ToolMode = 'none' | 'auto' | 'required' | 'named';

export interface ToolPlan {
  tools: ToolDef[];
  mode: ToolMode;
  named: string | null;
  parallel: boolean;
  /** What the chat template receives as `tools` (OpenAI's objects, as transformers takes them). */
  templateTools: unknown[];
  parser: ToolCallParser | null;
}

export interface ToolOptions {
  enableAutoToolChoice: boolean;
  toolCallParser: 'hermes' | 'llama3_json' | 'mistral' | null;
}

const NAME = /^[a-zA-Z0-9_-]{1,64}$/;
const PARSERS: Record<string, ToolCallParser> = { hermes: hermesParser, llama3_json: llama3JsonParser, mistral: mistralParser };

function bad(param: string, message: string, code = 'invalid_value'): never {
  throw new LoraplexError(message, 400, 'invalid_request_error', param, code);
}

const isObj = (v: unknown): v is Record<string, unknown> => v !== null && typeof v === 'object' && !Array.isArray(v);

/** The request's tool fields as a plan; null when the request has no tools. */
export function toolPlan(body: { tools?: unknown; tool_choice?: unknown; parallel_tool_calls?: unknown }, opts: ToolOptions): ToolPlan | null {
  const { tools, tool_choice: choice, parallel_tool_calls: parallel } = body;
  if (parallel !== undefined && parallel !== null && typeof parallel !== 'boolean') bad('parallel_tool_calls', 'parallel_tool_calls must be a boolean');
  if (tools === undefined || tools === null || (Array.isArray(tools) && tools.length === 0)) {
    if (parallel !== undefined && parallel !== null) bad('parallel_tool_calls', 'parallel_tool_calls is only allowed when tools are specified');
    if (choice !== undefined && choice !== null && choice !== 'none') bad('tool_choice', 'tool_choice is only allowed when tools are specified');
    return null;
  }
  if (!Array.isArray(tools)) bad('tools', 'tools must be a list');
  if (tools.length > 128) bad('tools', 'at most 128 tools are allowed');
  const defs: ToolDef[] = [];
  const seen = new Set<string>();
  tools.forEach((t, i) => {
    if (!isObj(t) || t.type !== 'function' || !isObj(t.function)) bad(`tools[${i}]`, 'each tool must be {"type": "function", "function": {...}}');
    const f = t.function as Record<string, unknown>;
    if (typeof f.name !== 'string' || !NAME.test(f.name)) bad(`tools[${i}].function.name`, 'tool names must match ^[a-zA-Z0-9_-]{1,64}$');
    if (seen.has(f.name)) bad(`tools[${i}].function.name`, `duplicate tool name ${JSON.stringify(f.name)}`);
    seen.add(f.name);
    if (f.description !== undefined && f.description !== null && typeof f.description !== 'string') bad(`tools[${i}].function.description`, 'description must be a string');
    const params = f.parameters ?? { type: 'object', properties: {} };
    const schema = JSON.parse(prepareJsonSchema(params, `tools[${i}].function.parameters`)) as Record<string, unknown>;
    defs.push({ name: f.name, schema });
  });
  let mode: ToolMode;
  let named: string | null = null;
  if (choice === undefined || choice === null || choice === 'auto') mode = 'auto';
  else if (choice === 'none' || choice === 'required') mode = choice;
  else if (isObj(choice) && choice.type === 'function' && isObj(choice.function) && typeof choice.function.name === 'string') {
    named = choice.function.name;
    if (!seen.has(named)) bad('tool_choice', `tool_choice names the function ${JSON.stringify(named)}, which is not in tools`);
    mode = 'named';
  } else bad('tool_choice', 'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}');
  const parser = opts.toolCallParser ? PARSERS[opts.toolCallParser] : null;
  if (mode === 'auto' && !(opts.enableAutoToolChoice && parser))
    bad('tool_choice', '"auto" tool choice (the default when tools are sent) requires the server to run with --enable-auto-tool-choice and --tool-call-parser; send tool_choice "required", "none" or a named function');
  return { tools: defs, mode, named, parallel: parallel !== false, templateTools: tools, parser };
}

/** The grammar a plan decodes under: named and required follow the tools' schemas, auto a structural tag. */
export function toolGrammar(plan: ToolPlan): GrammarSpec | null {
  switch (plan.mode) {
    case 'none':
      return null;
    case 'named':
      return { kind: 'json_schema', schema: JSON.stringify(plan.tools.find((t) => t.name === plan.named)!.schema) };
    case 'required': {
      // A list of calls (one with parallel_tool_calls false), each {"name": <a tool>, "parameters":
      // <its schema>}. Each tool's $defs move to the root under its own prefix (pydantic schemas
      // refer to them as #/$defs/X, which would not resolve once nested).
      const defs: Record<string, unknown> = {};
      const anyOf = plan.tools.map((t, i) => {
        const params = hoistDefs(t.schema, `t${i}_`, defs);
        return { type: 'object', properties: { name: { type: 'string', enum: [t.name] }, parameters: params }, required: ['name', 'parameters'], additionalProperties: false };
      });
      return {
        kind: 'json_schema',
        schema: JSON.stringify({ type: 'array', minItems: 1, ...(plan.parallel ? {} : { maxItems: 1 }), items: { anyOf }, ...(Object.keys(defs).length ? { $defs: defs } : {}) }),
      };
    }
    case 'auto':
      return { kind: 'structural_tag', tag: plan.parser!.structuralTag(plan.tools, plan.parallel) };
  }
}

/**
 * A copy of `schema` without its $defs/definitions, which go into `into` as `<prefix><name>`, and
 * with every local $ref rewritten to match (`#` itself: the schema, also moved into `into`).
 */
function hoistDefs(schema: Record<string, unknown>, prefix: string, into: Record<string, unknown>): unknown {
  const hasRefs = JSON.stringify(schema).includes('"$ref"');
  if (!hasRefs) return schema;
  const rewrite = (v: unknown): unknown => {
    if (Array.isArray(v)) return v.map(rewrite);
    if (!isObj(v)) return v;
    const out: Record<string, unknown> = {};
    for (const [k, x] of Object.entries(v)) {
      if (k === '$ref' && typeof x === 'string' && x.startsWith('#')) {
        const m = /^#\/(?:\$defs|definitions)\/(.+)$/.exec(x);
        out[k] = m ? `#/$defs/${prefix}${m[1]}` : x === '#' ? `#/$defs/${prefix}root` : x;
      } else out[k] = rewrite(x);
    }
    return out;
  };
  const { $defs, definitions, ...body } = schema;
  for (const table of [$defs, definitions]) if (isObj(table)) for (const [name, sub] of Object.entries(table)) into[`${prefix}${name}`] = rewrite(sub);
  const moved = rewrite(body);
  into[`${prefix}root`] = moved;
  return moved;
}

export function toolCallId(): string {
  return `call_${randomBytes(12).toString('hex')}`;
}

/** A finished choice's text as content and calls, by mode. */
export function parseToolOutput(plan: ToolPlan, text: string): { content: string | null; calls: ParsedCall[] } {
  switch (plan.mode) {
    case 'none':
      return { content: text, calls: [] };
    case 'named':
      return { content: null, calls: [{ name: plan.named!, arguments: text }] };
    case 'required': {
      try {
        const list = JSON.parse(text) as Array<{ name: string; parameters: unknown }>;
        return { content: null, calls: list.map((c) => ({ name: c.name, arguments: JSON.stringify(c.parameters) })) };
      } catch {
        return { content: text, calls: [] }; // cut short (max_tokens): no calls
      }
    }
    case 'auto': {
      const r = plan.parser!.parse(text);
      // Calls to functions that are not in tools stay text.
      return r.calls.every((c) => plan.tools.some((t) => t.name === c.name)) ? r : { content: text, calls: [] };
    }
  }
}
