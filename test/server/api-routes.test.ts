// API completeness (issue #14): GET /v1/models/{id} through the openai client (base names with
// slashes too), vLLM's tokenizer routes (/tokenize, /detokenize, /tokenizer_info) against HF's
// own tokenisation of the golden fixture, and CORS as vLLM's flags configure it (preflights,
// headers on errors and on API-key 401s, credentials, streaming).
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ConfigError, serveConfig } from '../../server/config.js';
import { adapterRoot, loadGolden, modelDir } from '../helpers/fixtures.js';
import { startTestServer, type TestServer } from '../helpers/server.js';

const M = 'llama-gqa';
const golden = loadGolden(M);

async function post(url: string, body: unknown, headers: Record<string, string> = {}): Promise<{ status: number; json: any; headers: Headers }> {
  const res = await fetch(url, { method: 'POST', headers: { 'content-type': 'application/json', ...headers }, body: JSON.stringify(body) });
  return { status: res.status, json: await res.json(), headers: res.headers };
}

function expectError(r: { status: number; json: any }, status: number, param: string | null, code?: string): void {
  expect(r.status, JSON.stringify(r.json)).toBe(status);
  expect(Object.keys(r.json)).toEqual(['error']);
  expect(r.json.error.param).toBe(param);
  if (code) expect(r.json.error.code).toBe(code);
}

describe('models retrieve and tokenizer routes (llama-gqa)', () => {
  let srv: TestServer;
  let client: OpenAI;
  beforeAll(async () => {
    srv = await startTestServer({ model: modelDir(M), adapterDir: adapterRoot(M) });
    client = new OpenAI({ baseURL: `${srv.url}/v1`, apiKey: 'unused', maxRetries: 0 });
  });
  afterAll(async () => srv?.close());

  it('retrieves the base model and each adapter with the shape of the list entries', async () => {
    const listed = new Map<string, unknown>();
    for await (const m of client.models.list()) listed.set(m.id, m);
    expect(listed.size).toBe(5);
    for (const [id, entry] of listed) {
      const got = await client.models.retrieve(id);
      expect({ ...got, created: 0 }).toEqual({ ...(entry as object), created: 0 });
    }
    const base = (await client.models.retrieve(M)) as unknown as Record<string, unknown>;
    expect(base).toMatchObject({ id: M, object: 'model', parent: null, max_model_len: srv.engine.maxModelLen });
    expect(await client.models.retrieve('r8-all')).toMatchObject({ id: 'r8-all', parent: M });
  });

  it('answers 404 model_not_found in the OpenAI shape for an unknown model', async () => {
    const err = await client.models.retrieve('no-such-model').catch((e: unknown) => e);
    expect(err).toBeInstanceOf(OpenAI.NotFoundError);
    const e = err as InstanceType<typeof OpenAI.NotFoundError>;
    expect(e.status).toBe(404);
    expect(e.param).toBe('model');
    expect(e.code).toBe('model_not_found');
    for (const path of ['/v1/models/', '/v1/models/r8-all/extra', '/v1/models/..%2Fllama-gqa']) {
      const res = await fetch(`${srv.url}${path}`);
      expectError({ status: res.status, json: await res.json() }, 404, 'model', 'model_not_found');
    }
  });

  it('tokenizes prompts exactly as HF does, with and without special tokens', async () => {
    for (const t of golden.tokenize) {
      const r = await post(`${srv.url}/tokenize`, { model: M, prompt: t.text, add_special_tokens: t.add_special_tokens });
      expect(r.status).toBe(200);
      expect(r.json).toEqual({ count: t.ids.length, max_model_len: srv.engine.maxModelLen, tokens: t.ids });
    }
    // add_special_tokens defaults to true for a prompt; model is optional (as in vLLM); an adapter works too.
    const withBos = golden.tokenize.find((t) => t.add_special_tokens)!;
    expect((await post(`${srv.url}/tokenize`, { prompt: withBos.text })).json.tokens).toEqual(withBos.ids);
    expect((await post(`${srv.url}/tokenize`, { model: 'r4-mlp', prompt: withBos.text })).json.tokens).toEqual(withBos.ids);
  });

  it('tokenizes chats as HF apply_chat_template does, and honours continue_final_message', async () => {
    for (const c of golden.chat) {
      const r = await post(`${srv.url}/tokenize`, { model: M, messages: c.messages, add_generation_prompt: c.add_generation_prompt });
      expect(r.status).toBe(200);
      expect(r.json.tokens).toEqual(c.ids);
      expect(r.json.count).toBe(c.ids.length);
    }
    // add_generation_prompt defaults to true; add_special_tokens (false by default) adds BOS on top.
    const gen = golden.chat.find((c) => c.add_generation_prompt)!;
    const dflt = await post(`${srv.url}/tokenize`, { messages: gen.messages });
    expect(dflt.json.tokens).toEqual(gen.ids);
    const bos = golden.tokenize.find((t) => t.add_special_tokens)!.ids[0];
    expect((await post(`${srv.url}/tokenize`, { messages: gen.messages, add_special_tokens: true })).json.tokens).toEqual([bos, ...gen.ids]);
    // continue_final_message: the text ends with the last message's content, no end-of-turn after it.
    const messages = [{ role: 'user', content: 'Hi' }, { role: 'assistant', content: 'The answer is' }];
    const cont = await post(`${srv.url}/tokenize`, { messages, continue_final_message: true, add_generation_prompt: false });
    expect(cont.status).toBe(200);
    const text = (await post(`${srv.url}/detokenize`, { tokens: cont.json.tokens })).json.prompt as string;
    expect(text.endsWith('The answer is')).toBe(true);
    const closed = await post(`${srv.url}/tokenize`, { messages, add_generation_prompt: false });
    expect(closed.json.tokens.length).toBeGreaterThan(cont.json.tokens.length);
    expect(closed.json.tokens.slice(0, cont.json.tokens.length)).toEqual(cont.json.tokens);
  });

  it('returns token_strs only when asked, as the vocabulary spells them', async () => {
    const plain = await post(`${srv.url}/tokenize`, { prompt: 'Hello, world!' });
    expect(plain.json).not.toHaveProperty('token_strs');
    const r = await post(`${srv.url}/tokenize`, { prompt: 'Hello, world!', return_token_strs: true });
    expect(r.json.token_strs).toHaveLength(r.json.tokens.length);
    expect(r.json.token_strs).toEqual(r.json.tokens.map((id: number) => srv.engine.tokenizer.idToToken(id)));
    expect(r.json.token_strs[0]).toBe('<|begin_of_text|>');
  });

  it('detokenizes back to the text, keeping special tokens as transformers decode() does', async () => {
    for (const t of golden.tokenize) {
      const r = await post(`${srv.url}/detokenize`, { model: M, tokens: t.ids });
      expect(r.status).toBe(200);
      expect(r.json).toEqual({ prompt: (t.add_special_tokens ? '<|begin_of_text|>' : '') + t.text });
    }
    expect((await post(`${srv.url}/detokenize`, { tokens: [] })).json).toEqual({ prompt: '' });
  });

  it('serves tokenizer_info with the fields lm-eval reads, then its tokenize probe', async () => {
    const res = await fetch(`${srv.url}/tokenizer_info`);
    expect(res.status).toBe(200);
    const info = (await res.json()) as Record<string, unknown>;
    expect(info).toMatchObject({
      tokenizer_class: 'PreTrainedTokenizerFast',
      bos_token: '<|begin_of_text|>',
      eos_token: '<|eot_id|>',
      pad_token: null,
      unk_token: null,
      model_max_length: 256,
      clean_up_tokenization_spaces: false,
    });
    expect(typeof info.chat_template).toBe('string');
    expect(info.chat_template).toBe(srv.engine.tokenizer.chatTemplate);
    // lm-eval's check_remote_tokenizer_support: eos_token present, then this exact probe.
    const probe = await post(`${srv.url}/tokenize`, { prompt: 'test', add_special_tokens: false });
    expect(probe.status).toBe(200);
    expect(probe.json.tokens).toEqual(srv.engine.tokenizer.encode('test', false));
  });

  it('refuses bad tokenizer requests naming the parameter', async () => {
    expectError(await post(`${srv.url}/tokenize`, { prompt: 'x', messages: [{ role: 'user', content: 'x' }] }), 400, 'messages');
    expectError(await post(`${srv.url}/tokenize`, { model: M }), 400, 'prompt');
    expectError(await post(`${srv.url}/tokenize`, { prompt: 5 }), 400, 'prompt');
    expectError(await post(`${srv.url}/tokenize`, { messages: [{ role: 'user', content: 'x' }], continue_final_message: true, add_generation_prompt: true }), 400, 'continue_final_message');
    expectError(await post(`${srv.url}/tokenize`, { messages: [{ role: 'wizard', content: 'x' }] }), 400, 'messages[0].role');
    expectError(await post(`${srv.url}/tokenize`, { model: 'ghost', prompt: 'x' }), 404, 'model', 'model_not_found');
    expectError(await post(`${srv.url}/detokenize`, { model: 'ghost', tokens: [1] }), 404, 'model', 'model_not_found');
    expectError(await post(`${srv.url}/detokenize`, { tokens: [1, 600] }), 400, 'tokens');
    expectError(await post(`${srv.url}/detokenize`, { tokens: [-1] }), 400, 'tokens');
    expectError(await post(`${srv.url}/detokenize`, { tokens: [1.5] }), 400, 'tokens.0');
    expectError(await post(`${srv.url}/detokenize`, {}), 400, 'tokens');
  });
});

describe('models retrieve with a base name holding a slash', () => {
  let srv: TestServer;
  const NAME = 'meta-llama/Llama-3.2-1B';
  beforeAll(async () => {
    srv = await startTestServer({ model: modelDir(M), servedModelName: NAME, adapterDir: adapterRoot(M) });
  });
  afterAll(async () => srv?.close());

  it('retrieves it encoded (the openai client) and raw', async () => {
    const client = new OpenAI({ baseURL: `${srv.url}/v1`, apiKey: 'unused', maxRetries: 0 });
    expect(await client.models.retrieve(NAME)).toMatchObject({ id: NAME, object: 'model', parent: null });
    const raw = await fetch(`${srv.url}/v1/models/${NAME}`);
    expect(raw.status).toBe(200);
    expect(((await raw.json()) as { id: string }).id).toBe(NAME);
    expect((await fetch(`${srv.url}/v1/models/meta-llama`)).status).toBe(404);
    expect(await client.models.retrieve('r8-all')).toMatchObject({ parent: NAME });
  });
});

describe('CORS', () => {
  const ORIGIN = 'https://app.example';
  const preflight = (url: string, origin = ORIGIN, headers = 'content-type, authorization') =>
    fetch(url, { method: 'OPTIONS', headers: { origin, 'access-control-request-method': 'POST', 'access-control-request-headers': headers } });

  describe('defaults (every origin, method and header) with --api-key', () => {
    let srv: TestServer;
    beforeAll(async () => {
      srv = await startTestServer({ model: modelDir(M) }, ['--api-key', 'sekrit']);
    });
    afterAll(async () => srv?.close());
    const auth = { authorization: 'Bearer sekrit' };

    it('answers a preflight 2xx without the key, reflecting the requested headers', async () => {
      const res = await preflight(`${srv.url}/v1/chat/completions`);
      expect(res.status).toBeGreaterThanOrEqual(200);
      expect(res.status).toBeLessThan(300);
      expect(res.headers.get('access-control-allow-origin')).toBe('*');
      expect(res.headers.get('access-control-allow-methods')).toContain('POST');
      expect(res.headers.get('access-control-allow-methods')).toContain('DELETE');
      expect(res.headers.get('access-control-allow-headers')).toBe('content-type, authorization');
      expect(res.headers.get('access-control-allow-credentials')).toBeNull();
    });

    it('puts Access-Control-Allow-Origin on answers, errors and 401s alike', async () => {
      const h = { origin: ORIGIN };
      const ok = await fetch(`${srv.url}/v1/models`, { headers: { ...h, ...auth } });
      expect(ok.status).toBe(200);
      expect(ok.headers.get('access-control-allow-origin')).toBe('*');
      const noKey = await fetch(`${srv.url}/v1/models`, { headers: h });
      expect(noKey.status).toBe(401);
      expect(noKey.headers.get('access-control-allow-origin')).toBe('*');
      const bad = await post(`${srv.url}/v1/completions`, { model: M, prompt: 'x', temperature: 9 }, { ...h, ...auth });
      expect(bad.status).toBe(400);
      expect(bad.headers.get('access-control-allow-origin')).toBe('*');
      const missing = await fetch(`${srv.url}/v1/nothing`, { headers: { ...h, ...auth } });
      expect(missing.status).toBe(404);
      expect(missing.headers.get('access-control-allow-origin')).toBe('*');
      const unknown = await post(`${srv.url}/tokenize`, { model: 'ghost', prompt: 'x' }, { ...h, ...auth });
      expect(unknown.status).toBe(404);
      expect(unknown.headers.get('access-control-allow-origin')).toBe('*');
    });

    it('puts it on a streamed (SSE) answer too', async () => {
      const res = await fetch(`${srv.url}/v1/completions`, {
        method: 'POST',
        headers: { 'content-type': 'application/json', origin: ORIGIN, ...auth },
        body: JSON.stringify({ model: M, prompt: 'Hi', max_tokens: 2, stream: true }),
      });
      expect(res.status).toBe(200);
      expect(res.headers.get('content-type')).toMatch(/^text\/event-stream/);
      expect(res.headers.get('access-control-allow-origin')).toBe('*');
      expect(await res.text()).toContain('[DONE]');
    });

    it('leaves an OPTIONS request that is no preflight to the router (OpenAI-shaped 404)', async () => {
      const res = await fetch(`${srv.url}/v1/models`, { method: 'OPTIONS', headers: auth });
      expect(res.status).toBe(404);
      expect(((await res.json()) as { error: unknown }).error).toBeDefined();
    });
  });

  describe('explicit origins, methods and headers, with credentials', () => {
    let srv: TestServer;
    beforeAll(async () => {
      srv = await startTestServer({ model: modelDir(M) }, [
        '--allowed-origins', JSON.stringify([ORIGIN]),
        '--allowed-methods', '["GET", "POST"]',
        '--allowed-headers', '["content-type"]',
        '--allow-credentials',
        '--disable-tokenizer-info-endpoint',
      ]);
    });
    afterAll(async () => srv?.close());

    it('allows the listed origin with credentials and the listed methods and headers', async () => {
      const res = await preflight(`${srv.url}/v1/completions`);
      expect(res.status).toBeLessThan(300);
      expect(res.headers.get('access-control-allow-origin')).toBe(ORIGIN);
      expect(res.headers.get('access-control-allow-credentials')).toBe('true');
      expect(res.headers.get('access-control-allow-methods')).toBe('GET, POST');
      expect(res.headers.get('access-control-allow-headers')).toBe('content-type');
      const get = await fetch(`${srv.url}/v1/models`, { headers: { origin: ORIGIN } });
      expect(get.headers.get('access-control-allow-origin')).toBe(ORIGIN);
      expect(get.headers.get('access-control-allow-credentials')).toBe('true');
    });

    it('gives another origin no Access-Control-Allow-Origin', async () => {
      expect((await preflight(`${srv.url}/v1/completions`, 'https://evil.example')).headers.get('access-control-allow-origin')).toBeNull();
      const get = await fetch(`${srv.url}/v1/models`, { headers: { origin: 'https://evil.example' } });
      expect(get.status).toBe(200);
      expect(get.headers.get('access-control-allow-origin')).toBeNull();
    });

    it('does not serve tokenizer_info with --disable-tokenizer-info-endpoint (tokenize stays)', async () => {
      expect((await fetch(`${srv.url}/tokenizer_info`)).status).toBe(404);
      expect((await post(`${srv.url}/tokenize`, { prompt: 'test' })).status).toBe(200);
    });
  });

  it('reads the flags from the environment and refuses values that are not JSON lists of strings', () => {
    const env = { LORAPLEX_ALLOWED_ORIGINS: '["https://a.example"]', LORAPLEX_ALLOW_CREDENTIALS: 'true', LORAPLEX_DISABLE_TOKENIZER_INFO_ENDPOINT: '1' };
    const cfg = serveConfig([], env);
    expect(cfg.allowedOrigins).toEqual(['https://a.example']);
    expect(cfg.allowCredentials).toBe(true);
    expect(cfg.tokenizerInfoEndpoint).toBe(false);
    const dflt = serveConfig([], {});
    expect([dflt.allowedOrigins, dflt.allowedMethods, dflt.allowedHeaders, dflt.allowCredentials, dflt.tokenizerInfoEndpoint]).toEqual([['*'], ['*'], ['*'], false, true]);
    for (const [flag, value] of [['allowed-origins', 'https://a.example'], ['allowed-methods', '"GET"'], ['allowed-headers', '[1]'], ['allowed-origins', '{}']]) {
      expect(() => serveConfig([`--${flag}`, value], {})).toThrow(ConfigError);
      expect(() => serveConfig([`--${flag}`, value], {})).toThrow(`--${flag}`);
    }
    expect(() => serveConfig([], { LORAPLEX_ALLOWED_HEADERS: 'x' })).toThrow(/--allowed-headers must be a JSON list/);
  });
});
