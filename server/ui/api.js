// The page's only way to the server: fetch with the API key (if any) as a Bearer header, OpenAI
// error bodies turned into Error(error.message), and an SSE reader for streamed generations.

const KEY = 'loraplex.apiKey';
let apiKey = sessionStorage.getItem(KEY); // this tab only; never sent anywhere but this server

export function setApiKey(key) {
  apiKey = key || null;
  if (apiKey) sessionStorage.setItem(KEY, apiKey);
  else sessionStorage.removeItem(KEY);
}

export function hasApiKey() {
  return apiKey !== null;
}

/** An API error: `message` is the server's error.message, `status` the HTTP status. */
export class ApiError extends Error {
  constructor(message, status, code) {
    super(message);
    this.status = status;
    this.code = code ?? null;
  }
}

async function errorOf(res) {
  let body = null;
  try {
    body = await res.json();
  } catch {
    // not JSON: fall back to the status line
  }
  const e = body && body.error;
  return new ApiError(e && e.message ? e.message : `${res.status} ${res.statusText}`, res.status, e && e.code);
}

/** fetch() on this server with the key; throws ApiError for any status >= 400. */
export async function api(path, init = {}) {
  const headers = new Headers(init.headers);
  if (apiKey) headers.set('authorization', `Bearer ${apiKey}`);
  const res = await fetch(path, { ...init, headers });
  if (!res.ok) throw await errorOf(res);
  return res;
}

export async function apiJson(path, init) {
  return (await api(path, init)).json();
}

/**
 * POSTs a streaming request and calls onChunk(json) for every SSE data event until [DONE].
 * An SSE error event (an error after the first token) is thrown as ApiError.
 */
export async function stream(path, body, onChunk, signal) {
  const res = await api(path, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
    signal,
  });
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    let end;
    while ((end = buf.indexOf('\n\n')) >= 0) {
      const event = buf.slice(0, end);
      buf = buf.slice(end + 2);
      const data = event.split('\n').filter((l) => l.startsWith('data:')).map((l) => l.slice(5).trimStart()).join('\n');
      if (!data) continue;
      if (data === '[DONE]') return;
      const json = JSON.parse(data);
      if (json.error) throw new ApiError(json.error.message, 500, json.error.code);
      onChunk(json);
    }
  }
}

/** The request body for one generation in the page's current settings. */
export function generationBody(settings, model, input) {
  const body = { model, max_tokens: settings.maxTokens, temperature: settings.temperature };
  if (settings.stop.length) body.stop = settings.stop;
  if (settings.mode === 'chat') body.messages = Array.isArray(input) ? input : [{ role: 'user', content: input }];
  else body.prompt = input;
  return body;
}

export function endpointOf(mode) {
  return mode === 'chat' ? '/v1/chat/completions' : '/v1/completions';
}

/** The text a streamed chunk adds, for either endpoint. */
export function chunkText(chunk) {
  const c = chunk.choices && chunk.choices[0];
  if (!c) return '';
  return (c.delta ? c.delta.content : c.text) || '';
}

/**
 * Times a stream: time to first token, and tokens/s over the tokens after the first (the decode
 * rate, as benchmarks report it). Token counts come from the usage chunk when there is one.
 */
export class StreamTimer {
  constructor() {
    this.t0 = performance.now();
    this.first = null;
    this.last = null;
    this.chunks = 0;
    this.tokens = null;
    this.finish = null;
  }

  chunk(json) {
    if (json.usage) this.tokens = json.usage.completion_tokens;
    const c = json.choices && json.choices[0];
    if (!c) return;
    if (c.finish_reason) this.finish = c.finish_reason;
    if (!chunkText(json)) return;
    const now = performance.now();
    this.first ??= now;
    this.last = now;
    this.chunks++;
  }

  summary() {
    const n = this.tokens ?? this.chunks;
    const parts = [];
    if (this.first !== null) parts.push(`TTFT ${Math.round(this.first - this.t0)} ms`);
    if (n > 1 && this.last > this.first) parts.push(`${((n - 1) / ((this.last - this.first) / 1000)).toFixed(1)} tok/s`);
    parts.push(`${n} tokens`);
    if (this.finish) parts.push(this.finish);
    return parts.join(' · ');
  }
}
