// A tool-call parser for one model family (--tool-call-parser): how the model writes calls in
// `tool_choice: "auto"` mode, the structural tag that constrains a call once its start appears,
// and how a finished output splits into text and calls.
import type { ToolDef } from './tools.js';

export interface ParsedCall {
  name: string;
  arguments: string; // JSON text of the arguments object
}

export interface ParsedOutput {
  content: string | null;
  calls: ParsedCall[];
}

export interface ToolCallParser {
  readonly name: 'hermes' | 'llama3_json' | 'mistral';
  /** The text that starts a call: streamed content stops before it. */
  readonly trigger: string;
  /**
   * XGrammar structural tag for `auto`: free text until a trigger, then a call whose arguments
   * follow the named tool's schema (parameters already checked by json-schema-support.ts); one
   * call at most unless `parallel` (parallel_tool_calls).
   */
  structuralTag(tools: ToolDef[], parallel: boolean): unknown;
  /** Splits a finished output into content and calls (calls that do not parse stay content). */
  parse(text: string): ParsedOutput;
}

/**
 * The structural tag every family's `auto` mode uses: free text until `trigger`, then one call (or
 * several, with `parallel`) that opens with `begin(name)`, follows the tool's schema, and closes with
 * `end`.
 */
export function triggeredTags(trigger: string, tools: ToolDef[], parallel: boolean, begin: (quotedName: string) => string, end: string): unknown {
  return {
    type: 'structural_tag',
    format: {
      type: 'triggered_tags',
      stop_after_first: !parallel,
      triggers: [trigger],
      tags: tools.map((t) => ({
        type: 'tag',
        begin: begin(JSON.stringify(t.name)),
        content: { type: 'json_schema', json_schema: t.schema },
        end,
      })),
    },
  };
}

/** Parses `{"name": ..., <argsKey>: {...}}` objects; null if it is not one. */
export function callFromJson(text: string, argsKeys: string[]): ParsedCall | null {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    return null;
  }
  if (!v || typeof v !== 'object' || Array.isArray(v)) return null;
  const o = v as Record<string, unknown>;
  if (typeof o.name !== 'string') return null;
  const key = argsKeys.find((k) => k in o);
  const args = key === undefined ? {} : o[key];
  if (args === null || typeof args !== 'object' || Array.isArray(args)) return null;
  return { name: o.name, arguments: JSON.stringify(args) };
}
