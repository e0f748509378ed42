// Tool-call parsers (--tool-call-parser) and the tool/schema checks, on fixed model outputs.
import { describe, expect, it } from 'vitest';
import { LoraplexError } from '../../server/engine/errors.js';
import { prepareJsonSchema } from '../../server/engine/json-schema-support.js';
import { structuredRequest } from '../../server/services/structured-output.js';
import { hermesParser } from '../../server/tools/hermes.js';
import { llama3JsonParser } from '../../server/tools/llama3-json.js';
import { mistralParser } from '../../server/tools/mistral.js';
import { ToolCallStream } from '../../server/tools/tool-stream.js';
import { parseToolOutput, toolGrammar, toolPlan } from '../../server/tools/tools.js';

const fn = (name: string, parameters: object = { type: 'object', properties: { q: { type: 'string' } } }) => ({ type: 'function', function: { name, parameters } });
const opts = { enableAutoToolChoice: true, toolCallParser: 'hermes' as const };

function refusal(f: () => unknown): LoraplexError {
  try {
    f();
  } catch (e) {
    if (e instanceof LoraplexError) return e;
    throw e;
  }
  throw new Error('expected a refusal');
}

describe('tool-call parsers', () => {
  it('hermes: text, then any number of <tool_call> blocks', () => {
    const out = hermesParser.parse('Let me check.\n<tool_call>\n{"name": "a", "arguments": {"q": "x"}}\n</tool_call>\n<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>');
    expect(out).toEqual({ content: 'Let me check.', calls: [{ name: 'a', arguments: '{"q":"x"}' }, { name: 'b', arguments: '{}' }] });
    expect(hermesParser.parse('no calls here')).toEqual({ content: 'no calls here', calls: [] });
    expect(hermesParser.parse('<tool_call>{"name": broken</tool_call>').calls).toEqual([]);
  });

  it('llama3_json: the answer is the call (optionally after <|python_tag|>), several separated by ;', () => {
    expect(llama3JsonParser.parse('{"name": "a", "parameters": {"q": "}"}}').calls).toEqual([{ name: 'a', arguments: '{"q":"}"}' }]);
    expect(llama3JsonParser.parse('<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"z": 1}}').calls).toEqual([
      { name: 'a', arguments: '{}' }, { name: 'b', arguments: '{"z":1}' }]);
    expect(llama3JsonParser.parse('Hello {"name": "a"}')).toEqual({ content: 'Hello {"name": "a"}', calls: [] });
  });

  it('mistral: [TOOL_CALLS] then a JSON list', () => {
    expect(mistralParser.parse('[TOOL_CALLS][{"name": "a", "arguments": {"q": "x"}}, {"name": "b", "arguments": {}}]')).toEqual({
      content: null, calls: [{ name: 'a', arguments: '{"q":"x"}' }, { name: 'b', arguments: '{}' }] });
    expect(mistralParser.parse('[TOOL_CALLS] nonsense').calls).toEqual([]);
  });

  it('structural tags trigger on each family\'s start and hold one tag per tool', () => {
    const tools = [{ name: 'a', schema: { type: 'object' } }, { name: 'b', schema: { type: 'object' } }];
    for (const [p, trigger] of [[hermesParser, '<tool_call>'], [llama3JsonParser, '{"name": '], [mistralParser, '[TOOL_CALLS]']] as const) {
      const tag = p.structuralTag(tools, false) as { format: { triggers: string[]; stop_after_first: boolean; tags: Array<{ begin: string }> } };
      expect(tag.format.stop_after_first).toBe(true);
      expect(tag.format.triggers).toEqual([trigger]);
      expect(tag.format.tags.map((t) => t.begin.startsWith(trigger))).toEqual([true, true]);
    }
  });
});

describe('tool plans', () => {
  it('named, required (a list, one item without parallel calls), auto and none', () => {
    const named = toolPlan({ tools: [fn('a'), fn('b')], tool_choice: { type: 'function', function: { name: 'b' } } }, opts)!;
    expect(named.mode).toBe('named');
    expect(JSON.parse((toolGrammar(named) as { schema: string }).schema)).toMatchObject({ type: 'object' });
    expect(parseToolOutput(named, '{"q": "z"}')).toEqual({ content: null, calls: [{ name: 'b', arguments: '{"q": "z"}' }] });
    const req = toolPlan({ tools: [fn('a')], tool_choice: 'required', parallel_tool_calls: false }, opts)!;
    expect(JSON.parse((toolGrammar(req) as { schema: string }).schema)).toMatchObject({ type: 'array', minItems: 1, maxItems: 1 });
    expect(parseToolOutput(req, '[{"name": "a", "parameters": {"q": "1"}}]').calls).toEqual([{ name: 'a', arguments: '{"q":"1"}' }]);
    expect(toolPlan({ tools: [fn('a')] }, opts)!.mode).toBe('auto');
    expect(toolGrammar(toolPlan({ tools: [fn('a')], tool_choice: 'none' }, opts)!)).toBeNull();
    const auto = toolPlan({ tools: [fn('a')] }, opts)!;
    expect(parseToolOutput(auto, '<tool_call>{"name": "zzz", "arguments": {}}</tool_call>').calls).toEqual([]); // not a tool: text
  });

  it('refuses bad tools with the parameter named', () => {
    expect(refusal(() => toolPlan({ tools: [fn('a')], tool_choice: { type: 'function', function: { name: 'x' } } }, opts)).param).toBe('tool_choice');
    expect(refusal(() => toolPlan({ tools: [fn('a b')] }, opts)).param).toBe('tools[0].function.name');
    expect(refusal(() => toolPlan({ tools: [fn('a'), fn('a')] }, opts)).param).toBe('tools[1].function.name');
    expect(refusal(() => toolPlan({ parallel_tool_calls: true }, opts)).param).toBe('parallel_tool_calls');
    expect(refusal(() => toolPlan({ tools: [fn('a', { type: 'object', properties: { n: { type: 'number', multipleOf: 2 } } })] }, opts)).param).toBe('tools[0].function.parameters');
    expect(refusal(() => toolPlan({ tools: [fn('a')] }, { enableAutoToolChoice: false, toolCallParser: null })).param).toBe('tool_choice');
  });
});

describe('JSON-schema subset', () => {
  it('names each keyword XGrammar would ignore', () => {
    for (const [schema, kw] of [
      [{ type: 'array', uniqueItems: true }, 'uniqueItems'],
      [{ type: 'array', contains: {} }, 'contains'],
      [{ type: 'integer', multipleOf: 3 }, 'multipleOf'],
      [{ type: 'number', maximum: 3 }, 'maximum'],
      [{ type: 'object', properties: { a: { if: {}, then: {} } } }, 'if'],
      [{ allOf: [{}, {}] }, 'allOf'],
      [{ type: 'string', format: 'credit-card' }, 'format'],
      [{ type: 'string', pattern: 'a', maxLength: 3 }, 'minLength'],
      [{ $ref: 'https://example.com/s.json' }, '$ref'],
    ] as const) {
      const e = refusal(() => prepareJsonSchema(schema, 'p'));
      expect([e.status, e.param]).toEqual([400, 'p']);
      expect(e.message).toContain(kw);
    }
  });

  it('rewrites what XGrammar gets wrong into what it enforces', () => {
    expect(JSON.parse(prepareJsonSchema({ type: 'integer', minimum: 3 }, 'p'))).toEqual({ type: 'integer', minimum: 3, maximum: Number.MAX_SAFE_INTEGER });
    const s = JSON.parse(prepareJsonSchema({ type: 'string', maxLength: 4 }, 'p'));
    expect(s.maxLength).toBeUndefined();
    expect(new RegExp(s.pattern).test('ab\\"c')).toBe(true);
    expect(new RegExp(s.pattern).test('a\u0001')).toBe(false);
    expect(new RegExp(s.pattern).test('abcde')).toBe(false);
  });

  it('refuses non-schemas and bounds size and depth', () => {
    expect(refusal(() => prepareJsonSchema('{oops', 'p')).message).toMatch(/not valid JSON/);
    expect(refusal(() => prepareJsonSchema(42, 'p')).code).toBe('invalid_schema');
    expect(refusal(() => prepareJsonSchema({ properties: { a: 5 } }, 'p')).code).toBe('invalid_schema');
    let deep: object = { type: 'integer' };
    for (let i = 0; i < 100; i++) deep = { type: 'array', items: deep };
    expect(refusal(() => prepareJsonSchema(deep, 'p')).code).toBe('grammar_too_complex');
    // Deep JSON anywhere (here an enum value) is refused before anything recursive touches it.
    let arr: unknown = 1;
    for (let i = 0; i < 100_000; i++) arr = [arr];
    expect(refusal(() => prepareJsonSchema({ enum: [arr] }, 'p')).code).toBe('grammar_too_complex');
  });

  it('one constraint per request', () => {
    expect(structuredRequest({ response_format: { type: 'text' } })).toBeNull();
    expect(structuredRequest({ guided_regex: 'a+' })).toEqual({ spec: { kind: 'regex', pattern: 'a+' }, param: 'guided_regex' });
    expect(refusal(() => structuredRequest({ response_format: { type: 'json_object' }, guided_regex: 'a' })).param).toBe('guided_regex');
  });
});

describe('required tool calls with pydantic-style $defs', () => {
  it('each tool\'s $defs move to the root under its own prefix, refs follow', () => {
    const addr = { type: 'object', properties: { street: { type: 'string' } }, required: ['street'] };
    const params = { type: 'object', properties: { home: { $ref: '#/$defs/Address' } }, required: ['home'], $defs: { Address: addr } };
    const plan = toolPlan({ tools: [fn('a', params), fn('b', params)], tool_choice: 'required' }, opts)!;
    const s = JSON.parse((toolGrammar(plan) as { schema: string }).schema);
    expect(Object.keys(s.$defs).sort()).toEqual(['t0_Address', 't0_root', 't1_Address', 't1_root']);
    expect(s.items.anyOf[1].properties.parameters.properties.home.$ref).toBe('#/$defs/t1_Address');
    expect(s.items.anyOf[0].properties.parameters.$defs).toBeUndefined();
  });
});

describe('streaming required and auto calls (ToolCallStream)', () => {
  it('auto: text streams up to the start tag (a possible beginning held back), calls come at the end', () => {
    const plan = toolPlan({ tools: [fn('a')] }, opts)!;
    const s = new ToolCallStream(plan);
    expect(s.push('Let me look <', null)).toEqual({ content: 'Let me look ', calls: [], finishReason: null });
    expect(s.push('b> is html <tool', null)).toEqual({ content: '<b> is html ', calls: [], finishReason: null });
    expect(s.push('_call>\n{"name": "a", "arguments": {"q": "x"}}', null)).toEqual({ content: null, calls: [], finishReason: null });
    expect(s.push('\n</tool_call>', 'stop')).toEqual({ content: null, calls: [{ name: 'a', arguments: '{"q":"x"}' }], finishReason: 'tool_calls' });
    const text = new ToolCallStream(plan);
    expect(text.push('just <tool', null).content).toBe('just ');
    expect(text.push('s', 'stop')).toEqual({ content: '<tools', calls: [], finishReason: 'stop' });
    const cut = new ToolCallStream(plan);
    cut.push('<tool_call>{"name": "a", "argu', null);
    expect(cut.push('ments', 'length')).toEqual({ content: '<tool_call>{"name": "a", "arguments', calls: [], finishReason: 'length' });
  });

  it('required: nothing until the end, then every call', () => {
    const s = new ToolCallStream(toolPlan({ tools: [fn('a'), fn('b')], tool_choice: 'required' }, opts)!);
    expect(s.push('[{"name": "a", "parameters": {}}, ', null)).toEqual({ content: null, calls: [], finishReason: null });
    expect(s.push('{"name": "b", "parameters": {"q": "1"}}]', 'stop')).toEqual({ content: null, calls: [{ name: 'a', arguments: '{}' }, { name: 'b', arguments: '{"q":"1"}' }], finishReason: 'tool_calls' });
  });
});
