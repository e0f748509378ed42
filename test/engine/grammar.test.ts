// Grammar-constrained decoding in the engine: XGrammar's workers compile and match, the C++ sampler
// applies the bitmask, in batches mixed with unconstrained sequences and adapters. The models have
// random weights: only the constraint makes their output valid.
import { Ajv } from 'ajv';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Engine } from '../../server/engine/engine.js';
import { LoraplexError } from '../../server/engine/errors.js';
import { GrammarService, grammarVocab } from '../../server/engine/grammar.js';
import { prepareJsonSchema } from '../../server/engine/json-schema-support.js';
import { parseToolOutput, toolGrammar, toolPlan } from '../../server/tools/tools.js';
import { adapterId, adapterRoot, modelDir } from '../helpers/fixtures.js';
import { readdirSync } from 'node:fs';

const MODEL = 'llama-gqa';
const person = {
  type: 'object',
  properties: { name: { type: 'string', maxLength: 12 }, age: { type: 'integer', minimum: 0, maximum: 150 }, tags: { type: 'array', items: { enum: ['a', 'b'] }, maxItems: 3 } },
  required: ['name', 'age', 'tags'],
  additionalProperties: false,
};

async function text(e: Engine, ids: number[], params: Parameters<Engine['generate']>[1], adapter: string | null = null) {
  const out: number[] = [];
  const gen = e.generate(ids, params, { adapter });
  let r = await gen.next();
  while (!r.done) {
    out.push(r.value.token);
    r = await gen.next();
  }
  return { ids: out, text: e.tokenizer.decode(out), finish: r.value };
}

describe('grammar-constrained decoding (engine)', () => {
  let e: Engine;
  let adapters: string[];
  beforeAll(async () => {
    e = await Engine.create({ model: modelDir(MODEL), adapterDir: adapterRoot(MODEL), memoryBudget: 32 << 20 });
    adapters = readdirSync(adapterRoot(MODEL)).map((d) => adapterId(d));
  });
  afterAll(async () => e?.close());

  it('a JSON schema makes random weights produce valid JSON, ending with stop at the grammar end', async () => {
    const ref = await e.grammars.prepare({ kind: 'json_schema', schema: prepareJsonSchema(person, 'response_format') }, 'response_format');
    const validate = new Ajv().compile(person);
    const prompt = e.tokenizer.encode('Describe a person:');
    for (const seed of [1, 2, 3]) {
      const r = await text(e, prompt, { maxTokens: 120, temperature: 1, seed, grammar: ref });
      expect(r.finish).toBe('stop');
      const v = JSON.parse(r.text);
      expect(validate(v), `${r.text}: ${JSON.stringify(validate.errors)}`).toBe(true);
    }
  });

  it('unconstrained sequences in a mixed batch are bit-for-bit what they are alone', async () => {
    const ref = await e.grammars.prepare({ kind: 'json_schema', schema: prepareJsonSchema(person, 'response_format') }, 'response_format');
    const prompt = e.tokenizer.encode('Once upon a time');
    const solo = await text(e, prompt, { maxTokens: 24, temperature: 0, ignoreEos: true });
    const soloAd = await text(e, prompt, { maxTokens: 24, temperature: 0, ignoreEos: true }, adapters[0]);
    const [mixed, mixedAd, c1, c2] = await Promise.all([
      text(e, prompt, { maxTokens: 24, temperature: 0, ignoreEos: true }),
      text(e, prompt, { maxTokens: 24, temperature: 0, ignoreEos: true }, adapters[0]),
      text(e, prompt, { maxTokens: 120, temperature: 0, grammar: ref }, adapters[1]),
      text(e, prompt, { maxTokens: 120, temperature: 0.8, seed: 5, grammar: ref }),
    ]);
    expect(mixed.ids).toEqual(solo.ids);
    expect(mixedAd.ids).toEqual(soloAd.ids);
    const validate = new Ajv().compile(person);
    for (const c of [c1, c2]) expect(validate(JSON.parse(c.text)), c.text).toBe(true);
    // The constraint changed the output: the unconstrained greedy text is no JSON.
    expect(() => JSON.parse(solo.text)).toThrow();
  });

  it('regex, choice and EBNF grammars', async () => {
    const prompt = e.tokenizer.encode('Answer:');
    const re = await e.grammars.prepare({ kind: 'regex', pattern: '[0-9]{3}-[a-c]{2}' }, 'structured_outputs.regex');
    expect((await text(e, prompt, { maxTokens: 20, temperature: 1, seed: 9, grammar: re })).text).toMatch(/^[0-9]{3}-[a-c]{2}$/);
    const ch = await e.grammars.prepare({ kind: 'choice', choices: ['yes', 'no', 'maybe "so"'] }, 'structured_outputs.choice');
    for (const seed of [1, 2, 3]) expect(['yes', 'no', 'maybe "so"']).toContain((await text(e, prompt, { maxTokens: 20, temperature: 1, seed, grammar: ch })).text);
    const gr = await e.grammars.prepare({ kind: 'grammar', grammar: 'root ::= "(" [a-z] [a-z]? [a-z]? ")"' }, 'structured_outputs.grammar');
    expect((await text(e, prompt, { maxTokens: 20, temperature: 1, seed: 4, grammar: gr })).text).toMatch(/^\([a-z]{1,3}\)$/);
  });

  it('required tool calls over tools whose parameters use $defs (pydantic) compile and validate', async () => {
    const addr = { type: 'object', properties: { zip: { type: 'string', maxLength: 5 } }, required: ['zip'], additionalProperties: false };
    const params = { type: 'object', properties: { home: { $ref: '#/$defs/Address' } }, required: ['home'], additionalProperties: false, $defs: { Address: addr } };
    const fn = (name: string) => ({ type: 'function', function: { name, parameters: params } });
    const plan = toolPlan({ tools: [fn('a'), fn('b')], tool_choice: 'required', parallel_tool_calls: false }, { enableAutoToolChoice: false, toolCallParser: null })!;
    const ref = await e.grammars.prepare(toolGrammar(plan)!, 'tools');
    const r = await text(e, e.tokenizer.encode('Call:'), { maxTokens: 80, temperature: 1, seed: 2, grammar: ref });
    const calls = parseToolOutput(plan, r.text).calls;
    expect(calls).toHaveLength(1);
    expect(new Ajv().validate(params, JSON.parse(calls[0].arguments)), r.text).toBe(true);
  });

  it('each tool-call parser\'s structural tag compiles and decodes (auto tool choice)', async () => {
    const params = { type: 'object', properties: { n: { type: 'integer', minimum: 0, maximum: 9 } }, required: ['n'], additionalProperties: false };
    for (const parser of ['hermes', 'llama3_json', 'mistral'] as const) {
      for (const parallel of [true, false]) {
        const plan = toolPlan({ tools: [{ type: 'function', function: { name: 'f', parameters: params } }], parallel_tool_calls: parallel }, { enableAutoToolChoice: true, toolCallParser: parser })!;
        const ref = await e.grammars.prepare(toolGrammar(plan)!, 'tools');
        const r = await text(e, e.tokenizer.encode('Hi'), { maxTokens: 12, temperature: 1, seed: 1, grammar: ref });
        expect(r.ids.length).toBeGreaterThan(0);
        for (const c of parseToolOutput(plan, r.text).calls) expect(new Ajv().validate(params, JSON.parse(c.arguments))).toBe(true);
      }
    }
  });

  it('refuses what XGrammar cannot compile with a 400 naming the parameter, and keeps working', async () => {
    const err = await e.grammars.prepare({ kind: 'json_schema', schema: '{"type": 5}' }, 'response_format.json_schema.schema').catch((x) => x);
    expect(err).toBeInstanceOf(LoraplexError);
    expect(err.status).toBe(400);
    expect(err.param).toBe('response_format.json_schema.schema');
    const bad = await e.grammars.prepare({ kind: 'grammar', grammar: 'root ::= ' }, 'structured_outputs.grammar').catch((x) => x);
    expect(bad.status).toBe(400);
    const ok = await e.grammars.prepare({ kind: 'regex', pattern: 'ok' }, 'x');
    expect((await text(e, e.tokenizer.encode('A'), { maxTokens: 5, grammar: ok })).text).toBe('ok');
  });
});

describe('masks later than the step allows', () => {
  it('leave their rows unsampled (recomputed next step): output stays valid, unconstrained output unchanged', async () => {
    // maskWaitMs 0: a step never waits for masks still in flight, so constrained rows are often
    // skipped (token -2) and their positions run again in the next step.
    const e = await Engine.create({ model: modelDir(MODEL), adapterDir: adapterRoot(MODEL), memoryBudget: 32 << 20, maskWaitMs: 0 });
    try {
      const ref = await e.grammars.prepare({ kind: 'json_schema', schema: prepareJsonSchema(person, 'response_format') }, 'response_format');
      const prompt = e.tokenizer.encode('Once upon a time');
      const solo = await text(e, prompt, { maxTokens: 20, temperature: 0, ignoreEos: true });
      const [free, c1, c2] = await Promise.all([
        text(e, prompt, { maxTokens: 20, temperature: 0, ignoreEos: true }),
        text(e, prompt, { maxTokens: 120, temperature: 0.7, seed: 1, grammar: ref }),
        text(e, prompt, { maxTokens: 120, temperature: 0, grammar: ref }, 'r4-mlp'),
      ]);
      expect(free.ids).toEqual(solo.ids);
      const validate = new Ajv().compile(person);
      for (const c of [c1, c2]) expect(validate(JSON.parse(c.text)), c.text).toBe(true);
      expect(e.maskStats.lateRows).toBeGreaterThan(0);
    } finally {
      await e.close();
    }
  });
});

describe('GrammarService', () => {
  it('a grammar that compiles longer than the bound is grammar_too_complex; the event loop keeps turning', async () => {
    const V = 600;
    const g = new GrammarService({ ...grammarVocab(modelDir(MODEL), V), vocabSize: V, stopIds: [4], compileTimeoutMs: 1000 });
    try {
      // A huge enum: seconds of compilation (about 3 s for 3,000 values here) against a 1 s bound.
      const s = { enum: Array.from({ length: 6000 }, (_, i) => `value-${i}-${'x'.repeat(i % 50)}`) };
      let ticks = 0;
      const timer = setInterval(() => ticks++, 10);
      const err = await g.prepare({ kind: 'json_schema', schema: JSON.stringify(s) }, 'response_format').catch((x) => x);
      clearInterval(timer);
      expect(err.code).toBe('grammar_too_complex');
      expect(err.param).toBe('response_format');
      expect(ticks).toBeGreaterThan(5);
      // The same schema again: refused at once from the verdict cache; others still compile.
      expect((await g.prepare({ kind: 'json_schema', schema: JSON.stringify(s) }, 'p').catch((x) => x)).code).toBe('grammar_too_complex');
      await expect(g.prepare({ kind: 'json_object' }, 'response_format')).resolves.toBeTruthy();
    } finally {
      g.close();
    }
  });
});
