// Every validation rule through inject(): each bad input is a 4xx in the OpenAI error shape naming
// the parameter, and the server keeps serving afterwards.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { adapterRoot, modelDir } from '../helpers/fixtures.js';
import { startTestServer, type TestServer } from '../helpers/server.js';

const M = 'llama-gqa';
const chat = (extra: Record<string, unknown> = {}) => ({ model: M, messages: [{ role: 'user', content: 'hi' }], max_tokens: 2, ...extra });
const cmpl = (extra: Record<string, unknown> = {}) => ({ model: M, prompt: 'hi', max_tokens: 2, ...extra });

const CASES: Array<[string, string, Record<string, unknown>, number, string | null, string?]> = [
  ['completions', 'max_tokens 0', cmpl({ max_tokens: 0 }), 400, 'max_tokens'],
  ['completions', 'max_tokens not an integer', cmpl({ max_tokens: 1.5 }), 400, 'max_tokens'],
  ['completions', 'max_tokens a string', cmpl({ max_tokens: '5' }), 400, 'max_tokens'],
  ['completions', 'max_tokens over the context window', cmpl({ max_tokens: 5000 }), 400, 'max_tokens', 'context_length_exceeded'],
  ['completions', 'prompt + max_tokens over the window', cmpl({ prompt: new Array(200).fill(5), max_tokens: 100 }), 400, 'max_tokens', 'context_length_exceeded'],
  ['completions', 'temperature 2.5', cmpl({ temperature: 2.5 }), 400, 'temperature'],
  ['completions', 'temperature -1', cmpl({ temperature: -1 }), 400, 'temperature'],
  ['completions', 'top_p 0', cmpl({ top_p: 0 }), 400, 'top_p'],
  ['completions', 'top_p 1.5', cmpl({ top_p: 1.5 }), 400, 'top_p'],
  ['completions', 'top_k -2', cmpl({ top_k: -2 }), 400, 'top_k'],
  ['completions', 'top_k 0', cmpl({ top_k: 0 }), 400, 'top_k'],
  ['completions', 'presence_penalty 3', cmpl({ presence_penalty: 3 }), 400, 'presence_penalty'],
  ['completions', 'frequency_penalty -3', cmpl({ frequency_penalty: -3 }), 400, 'frequency_penalty'],
  ['completions', 'repetition_penalty 0', cmpl({ repetition_penalty: 0 }), 400, 'repetition_penalty'],
  ['completions', 'min_p 2', cmpl({ min_p: 2 }), 400, 'min_p'],
  ['completions', 'n over the cap', cmpl({ n: 1000 }), 400, 'n'],
  ['completions', 'n 0', cmpl({ n: 0 }), 400, 'n'],
  ['completions', 'empty prompt string', cmpl({ prompt: '' }), 400, 'prompt'],
  ['completions', 'empty prompt list', cmpl({ prompt: [] }), 400, 'prompt'],
  ['completions', 'token id out of the vocabulary', cmpl({ prompt: [1, 2, 99999] }), 400, 'prompt'],
  ['completions', 'negative token id', cmpl({ prompt: [-1] }), 400, 'prompt'],
  ['completions', 'empty stop string', cmpl({ stop: '' }), 400, 'stop'],
  ['completions', 'empty string in stop list', cmpl({ stop: ['a', ''] }), 400, 'stop'],
  ['completions', 'logprobs 50', cmpl({ logprobs: 50 }), 400, 'logprobs'],
  ['completions', 'seed past the int64 range', cmpl({ seed: 2 ** 64 }), 400, 'seed'],
  ['completions', 'seed not an integer', cmpl({ seed: 1.5 }), 400, 'seed'],
  ['completions', 'missing model', { prompt: 'x' }, 400, 'model'],
  ['completions', 'missing prompt', { model: M }, 400, 'prompt'],
  ['completions', 'unknown model', cmpl({ model: 'ghost' }), 404, 'model', 'model_not_found'],
  ['completions', 'logit_bias over 100', cmpl({ logit_bias: { '5': 150 } }), 400, 'logit_bias'],
  ['completions', 'logit_bias key not a token id', cmpl({ logit_bias: { five: 10 } }), 400, 'logit_bias'],
  ['chat/completions', 'logit_bias token outside the vocabulary', chat({ logit_bias: { '99999': 10 } }), 400, 'logit_bias'],
  ['completions', 'suffix', cmpl({ suffix: 'x' }), 400, 'suffix'],
  ['chat/completions', 'empty messages', chat({ messages: [] }), 400, 'messages'],
  ['chat/completions', 'unknown role', chat({ messages: [{ role: 'wizard', content: 'x' }] }), 400, 'messages[0].role'],
  ['chat/completions', 'image content part', chat({ messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: 'x' } }] }] }), 400, 'messages[0].content[0]'],
  ['chat/completions', 'messages not a list', chat({ messages: 'hi' }), 400, 'messages'],
  ['chat/completions', 'max_completion_tokens 0', chat({ max_completion_tokens: 0 }), 400, 'max_completion_tokens'],
  ['chat/completions', 'max_completion_tokens over the window', chat({ max_completion_tokens: 100000 }), 400, 'max_completion_tokens', 'context_length_exceeded'],
  ['chat/completions', 'top_logprobs without logprobs', chat({ top_logprobs: 3 }), 400, 'top_logprobs'],
  ['chat/completions', 'top_logprobs 21', chat({ logprobs: true, top_logprobs: 21 }), 400, 'top_logprobs'],
  ['chat/completions', 'response_format of an unknown type', chat({ response_format: { type: 'xml' } }), 400, 'response_format.type'],
  ['chat/completions', 'response_format json_schema without a name', chat({ response_format: { type: 'json_schema', json_schema: { schema: {} } } }), 400, 'response_format.json_schema.name'],
  // Tools without tool_choice mean "auto", which needs --enable-auto-tool-choice (vLLM's rule).
  ['chat/completions', 'tools (auto) without --enable-auto-tool-choice', chat({ tools: [{ type: 'function', function: { name: 'f' } }] }), 400, 'tool_choice'],
  ['chat/completions', 'a tool name with a space', chat({ tools: [{ type: 'function', function: { name: 'f g' } }], tool_choice: 'required' }), 400, 'tools[0].function.name'],
  ['chat/completions', 'temperature a string', chat({ temperature: 'hot' }), 400, 'temperature'],
  ['chat/completions', 'unknown adapter', chat({ model: 'no-such-adapter' }), 404, 'model', 'model_not_found'],
];

describe('request validation', () => {
  let srv: TestServer;
  beforeAll(async () => {
    srv = await startTestServer({ model: modelDir(M), adapterDir: adapterRoot(M) }, ['--max-n', '8', '--max-body-bytes', '65536']);
  });
  afterAll(async () => srv?.close());

  it.each(CASES)('%s: %s', async (route, _what, body, status, param, code) => {
    const res = await srv.app.inject({ method: 'POST', url: `/v1/${route}`, payload: body });
    expect(res.statusCode, res.body).toBe(status);
    const j = res.json();
    expect(Object.keys(j)).toEqual(['error']);
    expect(typeof j.error.message).toBe('string');
    expect(typeof j.error.type).toBe('string');
    expect(j.error.param).toBe(param);
    if (code) expect(j.error.code).toBe(code);
    expect(srv.engine.scheduler.waiting.length + srv.engine.scheduler.running.length).toBe(0);
  });

  it('answers 413 for an oversized body, 415 for a wrong content type, 400 for broken JSON', async () => {
    const big = await srv.app.inject({ method: 'POST', url: '/v1/completions', payload: { ...cmpl(), prompt: 'x'.repeat(100_000) } });
    expect(big.statusCode).toBe(413);
    expect(big.json().error.code).toBe('request_too_large');
    const txt = await srv.app.inject({ method: 'POST', url: '/v1/completions', headers: { 'content-type': 'text/plain' }, payload: 'hello' });
    expect(txt.statusCode).toBe(415);
    expect(txt.json().error.type).toBe('invalid_request_error');
    const broken = await srv.app.inject({ method: 'POST', url: '/v1/completions', headers: { 'content-type': 'application/json' }, payload: '{"model": ' });
    expect(broken.statusCode).toBe(400);
    expect(broken.json().error.code).toBe('invalid_json');
    const nf = await srv.app.inject({ method: 'GET', url: '/v1/nothing' });
    expect(nf.statusCode).toBe(404);
    expect(nf.json().error).toBeDefined();
  });

  it('keeps serving after all of that', async () => {
    const res = await srv.app.inject({ method: 'POST', url: '/v1/completions', payload: cmpl({ max_tokens: 3, temperature: 0 }) });
    expect(res.statusCode).toBe(200);
    expect(res.json().usage.completion_tokens).toBe(3);
    expect(srv.engine.stats().kvPages).toBe(0);
  });
});

describe('API key', () => {
  let srv: TestServer;
  beforeAll(async () => {
    srv = await startTestServer({ model: modelDir(M) }, ['--api-key', 'sekrit']);
  });
  afterAll(async () => srv?.close());

  it('protects every route but health, ready and metrics', async () => {
    for (const url of ['/health', '/ready', '/metrics']) expect((await srv.app.inject({ url })).statusCode).toBe(200);
    const none = await srv.app.inject({ url: '/v1/models' });
    expect(none.statusCode).toBe(401);
    expect(none.json().error.code).toBe('invalid_api_key');
    expect((await srv.app.inject({ url: '/v1/models', headers: { authorization: 'Bearer wrong' } })).statusCode).toBe(401);
    expect((await srv.app.inject({ url: '/v1/adapters', headers: { authorization: 'Bearer sekri' } })).statusCode).toBe(401);
    expect((await srv.app.inject({ url: '/v1/models', headers: { authorization: 'Bearer sekrit' } })).statusCode).toBe(200);
  });
});

describe('backpressure', () => {
  let srv: TestServer;
  beforeAll(async () => {
    srv = await startTestServer({ model: modelDir(M) }, ['--max-queue', '1']);
  });
  afterAll(async () => srv?.close());

  it('answers 429 with Retry-After when the queue is full, and serves again once it drains', async () => {
    const long = fetch(`${srv.url}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(cmpl({ max_tokens: 200, ignore_eos: true, prompt: [1, 2] })) });
    while (srv.engine.scheduler.running.length + srv.engine.scheduler.waiting.length === 0) await new Promise((r) => setTimeout(r, 2));
    const res = await srv.app.inject({ method: 'POST', url: '/v1/completions', payload: cmpl() });
    expect(res.statusCode).toBe(429);
    expect(res.headers['retry-after']).toBeDefined();
    expect(res.json().error.type).toBe('rate_limit_error');
    expect((await long).status).toBe(200);
    expect((await srv.app.inject({ method: 'POST', url: '/v1/completions', payload: cmpl() })).statusCode).toBe(200);
  });
});
