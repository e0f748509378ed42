// Structured outputs and tool calling over HTTP with the official `openai` client: response_format
// (json_schema, json_object, Zod via chat.completions.parse), vLLM's structured_outputs and guided_*
// fields, tools (named, required, auto with --tool-call-parser), streaming tool calls, adapters as
// `model`, mixed adapters at once, and every bad input as a 400 naming its parameter. The models
// have random weights: only the constraint makes their output valid, so validity is the assertion.
import { Ajv } from 'ajv';
import OpenAI from 'openai';
import { zodResponseFormat } from 'openai/helpers/zod';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { z } from 'zod';
import { adapterRoot, modelDir } from '../helpers/fixtures.js';
import { startTestServer, type TestServer } from '../helpers/server.js';

const BASE = 'llama-gqa';
const ADAPTERS = ['r2-attn-named-keys', 'r4-mlp', 'r64-qv-rslora', 'r8-all'];
const ajv = new Ajv();

const person = {
  type: 'object',
  properties: {
    name: { type: 'string', maxLength: 10 },
    age: { type: 'integer', minimum: 0, maximum: 120 },
    pets: { type: 'array', items: { type: 'string', enum: ['cat', 'dog'] }, maxItems: 2 },
    married: { type: 'boolean' },
  },
  required: ['name', 'age', 'pets', 'married'],
  additionalProperties: false,
};

const weatherTool = {
  type: 'function' as const,
  function: {
    name: 'get_weather',
    description: 'Current weather in a city',
    parameters: {
      type: 'object',
      properties: { city: { type: 'string', enum: ['Paris', 'Tokyo', 'Lima'] }, unit: { type: 'string', enum: ['c', 'f'] } },
      required: ['city', 'unit'],
      additionalProperties: false,
    },
  },
};
const timeTool = {
  type: 'function' as const,
  function: {
    name: 'get_time',
    parameters: { type: 'object', properties: { zone: { type: 'integer', minimum: -12, maximum: 14 } }, required: ['zone'], additionalProperties: false },
  },
};
const toolSchemas: Record<string, object> = { get_weather: weatherTool.function.parameters, get_time: timeTool.function.parameters };

async function errorOf(p: Promise<unknown>): Promise<{ status: number; param: string | null; code: string | null; message: string }> {
  try {
    await p;
  } catch (e) {
    const err = e as InstanceType<typeof OpenAI.APIError>;
    const body = err.error as { param: string | null; code: string | null; message: string };
    return { status: err.status ?? 0, param: body?.param ?? null, code: body?.code ?? null, message: body?.message ?? '' };
  }
  throw new Error('expected the request to fail');
}

describe('structured outputs (response_format, structured_outputs, guided_*)', () => {
  let srv: TestServer;
  let client: OpenAI;
  beforeAll(async () => {
    srv = await startTestServer({ model: modelDir(BASE), adapterDir: adapterRoot(BASE), memoryBudget: 32 << 20 });
    client = new OpenAI({ baseURL: `${srv.url}/v1`, apiKey: 'unused', maxRetries: 0 });
  });
  afterAll(async () => srv?.close());

  it('chat.completions.parse with a Zod schema, on an adapter', async () => {
    const Person = z.object({ name: z.string().max(8), age: z.number().int().min(1).max(99), mood: z.enum(['happy', 'sad']), tags: z.array(z.enum(['x', 'y'])).max(2) });
    for (const seed of [1, 2]) {
      const r = await client.chat.completions.parse({
        model: 'r8-all', messages: [{ role: 'user', content: 'Make up a person.' }], response_format: zodResponseFormat(Person, 'person'), seed, max_tokens: 200,
      });
      const parsed = r.choices[0].message.parsed;
      expect(r.choices[0].finish_reason).toBe('stop');
      expect(Person.safeParse(parsed).success, r.choices[0].message.content ?? '').toBe(true);
    }
  });

  it('json_schema and json_object on chat; the unconstrained answer is no JSON', async () => {
    const validate = ajv.compile(person);
    const r = await client.chat.completions.create({
      model: BASE, messages: [{ role: 'user', content: 'Describe someone' }], max_tokens: 200, seed: 3, n: 2,
      response_format: { type: 'json_schema', json_schema: { name: 'person', schema: person, strict: true } },
    });
    for (const c of r.choices) {
      expect(c.finish_reason).toBe('stop');
      expect(validate(JSON.parse(c.message.content!)), c.message.content!).toBe(true);
    }
    const free = await client.chat.completions.create({ model: BASE, messages: [{ role: 'user', content: 'Describe someone' }], max_tokens: 30, temperature: 0 });
    expect(() => JSON.parse(free.choices[0].message.content!)).toThrow();
    const obj = await client.chat.completions.create({
      model: 'r4-mlp', messages: [{ role: 'user', content: 'JSON please' }], max_tokens: 200, temperature: 0, response_format: { type: 'json_object' },
    });
    // JSON mode: an object (never a bare array or scalar), compact.
    expect(obj.choices[0].message.content!.startsWith('{')).toBe(true);
    if (obj.choices[0].finish_reason === 'stop') expect(JSON.parse(obj.choices[0].message.content!)).toBeTypeOf('object');
  });

  it('structured_outputs and the legacy guided_* fields on /v1/completions and chat', async () => {
    const base = { model: BASE, prompt: 'The answer is', max_tokens: 40, seed: 7 };
    const choice = await client.completions.create({ ...base, structured_outputs: { choice: ['alpha', 'beta gamma'] } } as never) as OpenAI.Completion;
    expect(['alpha', 'beta gamma']).toContain(choice.choices[0].text);
    const regex = await client.completions.create({ ...base, guided_regex: '[0-9]{2}-[a-f]{3}' } as never) as OpenAI.Completion;
    expect(regex.choices[0].text).toMatch(/^[0-9]{2}-[a-f]{3}$/);
    const legacy = await client.completions.create({ ...base, max_tokens: 200, guided_json: person } as never) as OpenAI.Completion;
    expect(ajv.validate(person, JSON.parse(legacy.choices[0].text))).toBe(true);
    const gc = await client.chat.completions.create({ model: 'r2-attn-named-keys', messages: [{ role: 'user', content: 'pick' }], guided_choice: ['left', 'right'] } as never) as OpenAI.ChatCompletion;
    expect(['left', 'right']).toContain(gc.choices[0].message.content);
    const grammar = await client.completions.create({ ...base, structured_outputs: { grammar: 'root ::= "<" ("a" | "b")+ ">"' }, max_tokens: 10 } as never) as OpenAI.Completion;
    if (grammar.choices[0].finish_reason === 'stop') expect(grammar.choices[0].text).toMatch(/^<[ab]+>$/);
    else expect(grammar.choices[0].text).toMatch(/^<[ab]*$/);
  });

  it('logprobs of a constrained request are over the tokens the grammar allows (vLLM v1)', async () => {
    const r = await client.chat.completions.create({
      model: 'r8-all', messages: [{ role: 'user', content: 'pick' }], max_tokens: 10, logprobs: true, top_logprobs: 20,
      response_format: { type: 'json_schema', json_schema: { name: 'c', schema: { enum: ['yes', 'no'] } } },
    } as never) as OpenAI.ChatCompletion;
    const first = r.choices[0].logprobs!.content![0];
    // The mask comes before the log-softmax: the allowed tokens (a handful) hold all the mass;
    // masked ones are reported as -9999, as vLLM clamps -inf.
    const mass = first.top_logprobs.reduce((m, t) => m + Math.exp(t.logprob), 0);
    expect(mass).toBeCloseTo(1, 3);
    expect(first.top_logprobs.some((t) => t.logprob === -9999)).toBe(true);
    const free = await client.chat.completions.create({ model: 'r8-all', messages: [{ role: 'user', content: 'pick' }], max_tokens: 1, logprobs: true, top_logprobs: 20 });
    expect(free.choices[0].logprobs!.content![0].top_logprobs.reduce((m, t) => m + Math.exp(t.logprob), 0)).toBeLessThan(0.9);
  });

  it('streams a constrained answer whose concatenation validates', async () => {
    const stream = await client.chat.completions.create({
      model: 'r64-qv-rslora', messages: [{ role: 'user', content: 'Describe someone' }], max_tokens: 200, seed: 11, stream: true,
      response_format: { type: 'json_schema', json_schema: { name: 'person', schema: person } },
    });
    let text = '';
    for await (const c of stream) text += c.choices[0]?.delta?.content ?? '';
    expect(ajv.validate(person, JSON.parse(text))).toBe(true);
  });

  it('mixed adapters at once: each constrained answer validates, the unconstrained one is unchanged', async () => {
    const req = { messages: [{ role: 'user' as const, content: 'Tell me a story' }], max_tokens: 16, temperature: 0 };
    const alone = await client.chat.completions.create({ ...req, model: 'r4-mlp' });
    const constrained = [BASE, ...ADAPTERS].map((model, i) =>
      client.chat.completions.create({ model, messages: req.messages, max_tokens: 200, seed: i, response_format: { type: 'json_schema', json_schema: { name: 'p', schema: person } } }));
    const [free, ...rest] = await Promise.all([client.chat.completions.create({ ...req, model: 'r4-mlp' }), ...constrained]);
    expect(free.choices[0].message.content).toBe(alone.choices[0].message.content);
    const validate = ajv.compile(person);
    for (const r of rest) expect(validate(JSON.parse(r.choices[0].message.content!)), r.choices[0].message.content!).toBe(true);
  });

  it('bad input: a 400 naming the parameter, and the server keeps serving', async () => {
    const chat = (extra: Record<string, unknown>) => client.chat.completions.create({ model: BASE, messages: [{ role: 'user', content: 'hi' }], max_tokens: 5, ...extra } as never);
    const cases: Array<[Record<string, unknown>, string, RegExp?]> = [
      [{ guided_json: '{not json' }, 'guided_json', /not valid JSON/],
      [{ response_format: { type: 'json_schema', json_schema: { name: 'x', schema: { type: 5 } } } }, 'response_format.json_schema.schema'],
      [{ response_format: { type: 'json_schema', json_schema: { name: 'x', schema: [1, 2] } } }, 'response_format.json_schema.schema'],
      [{ response_format: { type: 'json_schema', json_schema: { name: 'x', schema: { type: 'array', items: { type: 'integer' }, uniqueItems: true } } } }, 'response_format.json_schema.schema', /uniqueItems/],
      [{ response_format: { type: 'json_schema', json_schema: { name: 'x', schema: { type: 'array', contains: { const: 1 } } } } }, 'response_format.json_schema.schema', /contains/],
      [{ response_format: { type: 'json_schema', json_schema: { name: 'x', schema: { type: 'number', multipleOf: 0.5 } } } }, 'response_format.json_schema.schema', /multipleOf/],
      [{ response_format: { type: 'json_schema', json_schema: { name: 'x', schema: { type: 'number', minimum: 0.5 } } } }, 'response_format.json_schema.schema', /minimum/],
      [{ response_format: { type: 'json_schema', json_schema: { name: 'bad name!', schema: {} } } }, 'response_format.json_schema.name'],
      [{ response_format: { type: 'yaml' } }, 'response_format.type'],
      [{ structured_outputs: { regex: '' } }, 'structured_outputs.regex'],
      [{ structured_outputs: { choice: [] } }, 'structured_outputs.choice'],
      [{ structured_outputs: { grammar: 'root ::= (' } }, 'structured_outputs.grammar'],
      [{ guided_regex: 'a', guided_choice: ['b'] }, 'guided_choice'],
    ];
    for (const [extra, param, msg] of cases) {
      const e = await errorOf(chat(extra));
      expect(e.status, JSON.stringify(extra)).toBe(400);
      expect(e.param, JSON.stringify(extra)).toBe(param);
      if (msg) expect(e.message).toMatch(msg);
    }
    const ce = await errorOf(client.completions.create({ model: BASE, prompt: 'x', max_tokens: 3, guided_json: { type: 'object', not: {} } } as never));
    expect([ce.status, ce.param]).toEqual([400, 'guided_json']);
    expect(ce.message).toMatch(/not/);
    const ok = await client.chat.completions.create({ model: BASE, messages: [{ role: 'user', content: 'hi' }], max_tokens: 3 });
    expect(ok.choices[0].message.content).toBeTypeOf('string');
  });

  it('a schema that compiles too long is grammar_too_complex; the event loop and other streams keep going', async () => {
    const hostile = { type: 'string', enum: Array.from({ length: 30000 }, (_, i) => `option-${i}-${'z'.repeat(i % 40)}`) };
    let settled = false;
    const slow = errorOf(client.chat.completions.create({ model: BASE, messages: [{ role: 'user', content: 'hi' }], max_tokens: 5, guided_json: hostile } as never)).finally(() => (settled = true));
    // While it compiles: health answers and a generation completes.
    const health = await fetch(`${srv.url}/health`);
    expect(health.status).toBe(200);
    const other = await client.chat.completions.create({ model: 'r8-all', messages: [{ role: 'user', content: 'hi' }], max_tokens: 8 });
    expect(other.choices[0].finish_reason).toBeTruthy();
    expect(settled).toBe(false);
    const e = await slow;
    expect([e.status, e.param, e.code]).toEqual([400, 'guided_json', 'grammar_too_complex']);
    const after = await client.chat.completions.create({ model: BASE, messages: [{ role: 'user', content: 'hi' }], max_tokens: 40, response_format: { type: 'json_schema', json_schema: { name: 'c', schema: { enum: ['ok', 'fine'] } } } });
    expect(['"ok"', '"fine"']).toContain(after.choices[0].message.content);
  });
});

describe('tools (hermes parser, auto tool choice on)', () => {
  let srv: TestServer;
  let client: OpenAI;
  beforeAll(async () => {
    srv = await startTestServer({ model: modelDir(BASE), adapterDir: adapterRoot(BASE), memoryBudget: 32 << 20 }, ['--enable-auto-tool-choice', '--tool-call-parser', 'hermes']);
    client = new OpenAI({ baseURL: `${srv.url}/v1`, apiKey: 'unused', maxRetries: 0 });
  });
  afterAll(async () => srv?.close());

  const checkCalls = (calls: OpenAI.ChatCompletionMessageToolCall[] | undefined) => {
    expect(calls?.length).toBeGreaterThan(0);
    for (const c of calls!) {
      if (c.type !== 'function') throw new Error('not a function call');
      expect(c.id).toMatch(/^call_/);
      expect(Object.keys(toolSchemas)).toContain(c.function.name);
      expect(ajv.validate(toolSchemas[c.function.name], JSON.parse(c.function.arguments)), c.function.arguments).toBe(true);
    }
  };

  it('a tool round trip: required call -> tool message -> final answer, on adapters', async () => {
    const messages: OpenAI.ChatCompletionMessageParam[] = [{ role: 'user', content: 'Weather in Paris?' }];
    const first = await client.chat.completions.create({ model: 'r8-all', messages, tools: [weatherTool, timeTool], tool_choice: 'required', max_tokens: 200, seed: 1 });
    expect(first.choices[0].finish_reason).toBe('tool_calls');
    const msg = first.choices[0].message;
    checkCalls(msg.tool_calls);
    messages.push(msg);
    for (const c of msg.tool_calls!) messages.push({ role: 'tool', tool_call_id: c.id, content: '{"temperature": 21}' });
    const final = await client.chat.completions.create({ model: 'r4-mlp', messages, tools: [weatherTool, timeTool], tool_choice: 'none', max_tokens: 12 });
    expect(final.choices[0].message.tool_calls ?? []).toEqual([]);
    expect(final.choices[0].message.content).toBeTypeOf('string');
  });

  it('named tool_choice: arguments follow that function, finish_reason stop; parallel_tool_calls false: one call', async () => {
    const r = await client.chat.completions.create({
      model: 'r64-qv-rslora', messages: [{ role: 'user', content: 'time?' }], tools: [weatherTool, timeTool], max_tokens: 60,
      tool_choice: { type: 'function', function: { name: 'get_time' } },
    });
    expect(r.choices[0].finish_reason).toBe('stop');
    checkCalls(r.choices[0].message.tool_calls);
    expect(r.choices[0].message.tool_calls![0].type === 'function' && r.choices[0].message.tool_calls![0].function.name).toBe('get_time');
    for (const seed of [1, 2, 3]) {
      const one = await client.chat.completions.create({ model: BASE, messages: [{ role: 'user', content: 'go' }], tools: [weatherTool, timeTool], tool_choice: 'required', parallel_tool_calls: false, max_tokens: 200, seed });
      expect(one.choices[0].message.tool_calls).toHaveLength(1);
    }
  });

  it('streams tool calls as OpenAI does: index on every delta, id/type/name first, then arguments', async () => {
    for (const tool_choice of [{ type: 'function' as const, function: { name: 'get_weather' } }, 'required' as const]) {
      const stream = await client.chat.completions.create({ model: 'r2-attn-named-keys', messages: [{ role: 'user', content: 'weather' }], tools: [weatherTool, timeTool], tool_choice, max_tokens: 200, seed: 5, stream: true });
      const calls: Array<{ id: string; name: string; args: string }> = [];
      let finish: string | null = null;
      for await (const chunk of stream) {
        const ch = chunk.choices[0];
        if (!ch) continue;
        if (ch.finish_reason) finish = ch.finish_reason;
        for (const d of ch.delta.tool_calls ?? []) {
          expect(d.index).toBeTypeOf('number');
          if (!calls[d.index]) {
            expect(d.id).toMatch(/^call_/);
            expect(d.type).toBe('function');
            calls[d.index] = { id: d.id!, name: d.function!.name!, args: '' };
          } else expect(d.id).toBeUndefined();
          calls[d.index].args += d.function?.arguments ?? '';
        }
      }
      expect(finish).toBe(typeof tool_choice === 'string' ? 'tool_calls' : 'stop');
      checkCalls(calls.map((c) => ({ id: c.id, type: 'function', function: { name: c.name, arguments: c.args } })));
    }
  });

  it('auto: the answer is text or well-formed calls; adapters concurrently', async () => {
    const rs = await Promise.all(ADAPTERS.map((model, i) => client.chat.completions.create({ model, messages: [{ role: 'user', content: 'hello' }], tools: [weatherTool], max_tokens: 20, seed: i })));
    for (const r of rs) {
      const m = r.choices[0].message;
      if (m.tool_calls?.length) {
        expect(r.choices[0].finish_reason).toBe('tool_calls');
        checkCalls(m.tool_calls);
      } else expect(m.content).toBeTypeOf('string');
    }
  });

  it('bad tool input: a 400 naming the parameter', async () => {
    const chat = (extra: Record<string, unknown>) => client.chat.completions.create({ model: BASE, messages: [{ role: 'user', content: 'hi' }], max_tokens: 5, ...extra } as never);
    const fn = (name: string) => ({ type: 'function', function: { name, parameters: { type: 'object', properties: {} } } });
    const cases: Array<[Record<string, unknown>, string]> = [
      [{ tools: [weatherTool], tool_choice: { type: 'function', function: { name: 'nope' } } }, 'tool_choice'],
      [{ tools: [fn('has space')] }, 'tools[0].function.name'],
      [{ tools: [fn('x'.repeat(65))] }, 'tools[0].function.name'],
      [{ tools: [fn('a'), fn('b'), fn('a')] }, 'tools[2].function.name'],
      [{ parallel_tool_calls: false }, 'parallel_tool_calls'],
      [{ tool_choice: 'required' }, 'tool_choice'],
      [{ tools: [{ type: 'function', function: { name: 'f', parameters: { type: 'array', uniqueItems: true } } }], tool_choice: 'required' }, 'tools[0].function.parameters'],
      [{ tools: [{ type: 'retrieval' }] }, 'tools[0]'],
      [{ tools: [weatherTool], tool_choice: 'sometimes' }, 'tool_choice'],
    ];
    for (const [extra, param] of cases) {
      const e = await errorOf(chat(extra));
      expect([e.status, e.param], JSON.stringify(extra)).toEqual([400, param]);
    }
    expect((await chat({})).choices[0].message.content).toBeTypeOf('string');
  });
});

describe('tools without --enable-auto-tool-choice', () => {
  let srv: TestServer;
  beforeAll(async () => {
    srv = await startTestServer({ model: modelDir(BASE), memoryBudget: 16 << 20 });
  });
  afterAll(async () => srv?.close());

  it('auto (also the default with tools) is a 400 naming tool_choice; required works', async () => {
    const client = new OpenAI({ baseURL: `${srv.url}/v1`, apiKey: 'unused', maxRetries: 0 });
    const e = await errorOf(client.chat.completions.create({ model: BASE, messages: [{ role: 'user', content: 'hi' }], tools: [weatherTool] }));
    expect([e.status, e.param]).toEqual([400, 'tool_choice']);
    expect(e.message).toMatch(/--enable-auto-tool-choice/);
    const r = await client.chat.completions.create({ model: BASE, messages: [{ role: 'user', content: 'hi' }], tools: [weatherTool], tool_choice: 'required', parallel_tool_calls: false, max_tokens: 200 });
    expect(r.choices[0].finish_reason).toBe('tool_calls');
  });
});
