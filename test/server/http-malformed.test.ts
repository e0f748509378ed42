// Malformed HTTP over raw sockets: every answer with a status >= 400 that the server gives to a
// request the HTTP parser, the router or Node's own checks reject before any route runs is in the
// OpenAI error shape, with a JSON content type; and the server keeps serving afterwards.
import { EventEmitter } from 'node:events';
import { connect, type Socket } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { clientErrorHandler } from '../../server/http-errors.js';
import { adapterRoot, modelDir } from '../helpers/fixtures.js';
import { startTestServer, type TestServer } from '../helpers/server.js';

const M = 'llama-gqa';
const H = 'Host: 127.0.0.1\r\n';

interface RawResponse {
  status: number;
  headers: Record<string, string>;
  body: string;
}

/** A piece to send, or a pause until the bytes received so far match (then the next piece goes). */
type Step = string | Buffer | { waitFor: RegExp };

interface Case {
  name: string;
  send: Step[];
  /**
   * Final (non-1xx) statuses expected, in order (a list where one of several is right); 'any'
   * where no answer at all is also correct.
   */
  expect: Array<number | number[]> | 'any';
  /** The request is a HEAD: its responses carry no body. */
  head?: boolean;
  /** Half-close the socket after sending. */
  end?: boolean;
}

/** Parses as many complete HTTP/1.x responses as `buf` (latin1, one char per byte) holds. */
function parseResponses(buf: string, closed: boolean, head = false): { responses: RawResponse[]; rest: string } {
  const responses: RawResponse[] = [];
  let at = 0;
  for (;;) {
    const eoh = buf.indexOf('\r\n\r\n', at);
    if (eoh < 0) break;
    const lines = buf.slice(at, eoh).split('\r\n');
    const m = /^HTTP\/1\.[01] (\d{3})/.exec(lines[0]);
    if (!m) break;
    const status = Number(m[1]);
    const headers: Record<string, string> = {};
    for (const l of lines.slice(1)) {
      const i = l.indexOf(':');
      headers[l.slice(0, i).trim().toLowerCase()] = l.slice(i + 1).trim();
    }
    let p = eoh + 4;
    let body = '';
    if (status >= 200 && !head && status !== 204 && status !== 304) {
      if (headers['content-length'] !== undefined) {
        const n = Number(headers['content-length']);
        if (buf.length < p + n) break;
        body = buf.slice(p, p + n);
        p += n;
      } else if (/chunked/i.test(headers['transfer-encoding'] ?? '')) {
        let done = false;
        for (;;) {
          const le = buf.indexOf('\r\n', p);
          if (le < 0) break;
          const size = parseInt(buf.slice(p, le), 16);
          if (size === 0) {
            if (buf.length < le + 4) break;
            p = le + 4;
            done = true;
            break;
          }
          if (buf.length < le + 2 + size + 2) break;
          body += buf.slice(le + 2, le + 2 + size);
          p = le + 2 + size + 2;
        }
        if (!done) break;
      } else {
        if (!closed) break;
        body = buf.slice(p);
        p = buf.length;
      }
    }
    responses.push({ status, headers, body: Buffer.from(body, 'latin1').toString('utf8') });
    at = p;
  }
  return { responses, rest: buf.slice(at) };
}

/**
 * Sends `steps` on a fresh connection and collects what comes back: until the server closes, or
 * until `finals` final responses are complete and 200 ms pass quietly, or `timeoutMs` at most.
 */
async function rawExchange(port: number, c: Case, finals: number, timeoutMs = 4000): Promise<{ responses: RawResponse[]; rest: string; closed: boolean }> {
  const sock = connect(port, '127.0.0.1');
  sock.setNoDelay(true);
  let buf = '';
  let closed = false;
  let wake: (() => void) | null = null;
  sock.on('data', (d: Buffer) => {
    buf += d.toString('latin1');
    wake?.();
  });
  sock.on('error', () => {});
  const gone = new Promise<void>((r) => sock.once('close', () => {
    closed = true;
    wake?.();
    r();
  }));
  await new Promise<void>((r, j) => {
    sock.once('connect', () => r());
    sock.once('error', j);
  });
  const deadline = Date.now() + timeoutMs;
  const waitChange = (ms: number) => new Promise<void>((r) => {
    const t = setTimeout(() => { wake = null; r(); }, Math.max(1, ms));
    wake = () => { clearTimeout(t); wake = null; r(); };
  });
  for (const s of c.send) {
    if (typeof s === 'object' && !Buffer.isBuffer(s)) {
      while (!s.waitFor.test(buf) && !closed && Date.now() < deadline) await waitChange(deadline - Date.now());
      continue;
    }
    if (closed || sock.destroyed) break;
    sock.write(s);
    await new Promise((r) => setTimeout(r, 5)); // separate packets, so each step reaches the parser on its own
  }
  if (c.end && !sock.destroyed) sock.end();
  for (;;) {
    if (closed || Date.now() >= deadline) break;
    const { responses } = parseResponses(buf, false, c.head);
    if (responses.filter((r) => r.status >= 200).length >= finals) {
      const before = buf.length;
      await waitChange(200);
      if (buf.length === before && !closed) break;
      continue;
    }
    await waitChange(deadline - Date.now());
  }
  sock.destroy();
  await gone;
  const { responses, rest } = parseResponses(buf, closed, c.head);
  return { responses, rest, closed };
}

/** Asserts an error response is the OpenAI error shape: only `error`, with its four fields. */
function expectOpenAIShape(r: RawResponse, what: string) {
  expect(r.headers['content-type'] ?? '', `${what}: content-type`).toMatch(/^application\/json/);
  let j: unknown;
  try {
    j = JSON.parse(r.body);
  } catch {
    throw new Error(`${what}: ${r.status} body is not JSON: ${JSON.stringify(r.body.slice(0, 200))}`);
  }
  expect(j && typeof j === 'object' && !Array.isArray(j), `${what}: body is an object`).toBe(true);
  const o = j as Record<string, unknown>;
  expect(Object.keys(o), `${what}: top-level keys of ${r.body}`).toEqual(['error']);
  const e = o.error as Record<string, unknown>;
  expect(e && typeof e === 'object', `${what}: error is an object`).toBe(true);
  for (const k of ['message', 'type', 'code']) expect(typeof e[k], `${what}: error.${k} in ${r.body}`).toBe('string');
  expect('param' in e, `${what}: error.param present in ${r.body}`).toBe(true);
  expect(e.param === null || typeof e.param === 'string', `${what}: error.param null or a string`).toBe(true);
}

const completion = JSON.stringify({ model: M, prompt: 'hi', max_tokens: 2, temperature: 0 });
const streamed = JSON.stringify({ model: M, prompt: 'hi', max_tokens: 4, temperature: 0, stream: true });
const post = (path: string, headers: string, body = '') => `POST ${path} HTTP/1.1\r\n${H}${headers}\r\n${body}`;

const CASES: Case[] = [
  // Header section size (llhttp: HPE_HEADER_OVERFLOW, Node's limit is 16 KiB).
  { name: 'header section over 16 KB', send: [`GET /health HTTP/1.1\r\n${H}${Array.from({ length: 24 }, (_, i) => `X-Pad-${i}: ${'a'.repeat(1000)}\r\n`).join('')}\r\n`], expect: [431] },
  { name: 'a single 20 KB header', send: [`GET /health HTTP/1.1\r\n${H}X-Huge: ${'b'.repeat(20_000)}\r\n\r\n`], expect: [431] },
  // 414 when the whole request line is in one read (the usual case on loopback), else 431.
  { name: 'URL over 16 KB', send: [`GET /${'u'.repeat(20_000)} HTTP/1.1\r\n${H}\r\n`], expect: [[414, 431]] },
  // Framing.
  { name: 'Content-Length with Transfer-Encoding: chunked', send: [post('/v1/completions', 'Content-Type: application/json\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n', '0\r\n\r\n')], expect: [400] },
  { name: 'two different Content-Length headers', send: [post('/v1/completions', 'Content-Type: application/json\r\nContent-Length: 2\r\nContent-Length: 3\r\n', '{}x')], expect: [400] },
  { name: 'negative Content-Length', send: [post('/v1/completions', 'Content-Type: application/json\r\nContent-Length: -1\r\n', '{}')], expect: [400] },
  { name: 'non-numeric Content-Length', send: [post('/v1/completions', 'Content-Type: application/json\r\nContent-Length: abc\r\n', '{}')], expect: [400] },
  { name: 'Content-Length past 2^64', send: [post('/v1/completions', 'Content-Type: application/json\r\nContent-Length: 99999999999999999999999\r\n', '{}')], expect: [400] },
  { name: 'Transfer-Encoding without chunked last', send: [post('/v1/completions', 'Content-Type: application/json\r\nTransfer-Encoding: gzip\r\n', '{}')], expect: [400] },
  { name: 'bad chunk size', send: [post('/v1/completions', 'Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n', 'zz\r\n{}\r\n0\r\n\r\n')], expect: [400] },
  { name: 'chunk data without its CRLF', send: [post('/v1/completions', 'Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n', '2\r\n{}XX0\r\n\r\n')], expect: [400] },
  { name: 'chunk extensions over the limit', send: [post('/v1/completions', 'Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n', `2;${'e'.repeat(20_000)}\r\n{}\r\n0\r\n\r\n`)], expect: [413] },
  { name: 'body shorter than Content-Length, then close', send: [post('/v1/completions', 'Content-Type: application/json\r\nContent-Length: 100\r\n', '{"model":')], end: true, expect: 'any' },
  // Header syntax.
  { name: 'NUL in a header value', send: [`GET /health HTTP/1.1\r\n${H}X-Bad: a\0b\r\n\r\n`], expect: [400] },
  { name: 'DEL control character in a header value', send: [`GET /health HTTP/1.1\r\n${H}X-Bad: a\x7fb\r\n\r\n`], expect: [400] },
  { name: 'CR in a header name', send: [`GET /health HTTP/1.1\r\n${H}X-B\rad: a\r\n\r\n`], expect: [400] },
  { name: 'space before the colon', send: [`GET /health HTTP/1.1\r\n${H}X-Bad : a\r\n\r\n`], expect: [400] },
  { name: 'header line without a colon', send: [`GET /health HTTP/1.1\r\n${H}NoColonHere\r\n\r\n`], expect: [400] },
  { name: 'obsolete line folding', send: [`GET /health HTTP/1.1\r\n${H}X-Fold: a\r\n  b\r\n\r\n`], expect: [400] },
  { name: 'bare LF line endings', send: [`GET /health HTTP/1.1\nHost: 127.0.0.1\nX-A: b\n\n`], expect: [400] },
  // Request line.
  { name: 'invalid method token', send: [`G@T /health HTTP/1.1\r\n${H}\r\n`], expect: [400] },
  { name: 'unknown method', send: [`FROB /health HTTP/1.1\r\n${H}\r\n`], expect: [400] },
  { name: 'HTTP/9.9', send: [`GET /health HTTP/9.9\r\n${H}\r\n`], expect: [505] },
  { name: 'garbage HTTP version', send: [`GET /health HTTP/1.x\r\n${H}\r\n`], expect: [400] },
  { name: 'request line without a version (HTTP/0.9)', send: [`GET /health\r\n${H}\r\n`], expect: [505] },
  { name: 'control character in the URL', send: [`GET /he\x01alth HTTP/1.1\r\n${H}\r\n`], expect: [400] },
  { name: 'HTTP/2 prior-knowledge preface', send: ['PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n'], expect: [505] },
  { name: 'CONNECT (not a proxy)', send: [`CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n`], expect: [405] },
  // Node's own checks.
  { name: 'missing Host on HTTP/1.1', send: ['GET /health HTTP/1.1\r\n\r\n'], expect: [400] },
  { name: 'two Host headers', send: ['GET /health HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n'], expect: [400] },
  { name: 'bogus Expect', send: [post('/v1/completions', `Content-Type: application/json\r\nExpect: the-unexpected\r\nContent-Length: ${Buffer.byteLength(completion)}\r\n`, completion)], expect: [417] },
  // Router level (frameworkErrors).
  { name: 'bad percent-encoding in a path parameter', send: [`GET /v1/adapters/%zz HTTP/1.1\r\n${H}\r\n`], expect: [400] },
  { name: 'path parameter over the router limit', send: [`GET /v1/adapters/${'p'.repeat(300)} HTTP/1.1\r\n${H}\r\n`], expect: [414] },
  // Pipelining: the valid request is answered, then the garbage.
  { name: 'pipelined garbage after a valid request', send: [`GET /health HTTP/1.1\r\n${H}\r\n\x00\x01garbage\r\n\r\n`], expect: [200, 400] },
  { name: 'pipelined garbage after a streaming completion', send: [post('/v1/completions', `Content-Type: application/json\r\nContent-Length: ${Buffer.byteLength(streamed)}\r\n`, `${streamed}\x00garbage\r\n\r\n`)], expect: [200, 400] },
  { name: 'pipelined bad header after two valid requests', send: [`GET /health HTTP/1.1\r\n${H}\r\nGET /v1/models HTTP/1.1\r\n${H}\r\nGET /health HTTP/1.1\r\n${H}X-Bad: \0\r\n\r\n`], expect: [200, 200, 400] },
  // Well-formed but unusual: the normal path answers (these must keep working).
  { name: 'Expect: 100-continue', send: [post('/v1/completions', `Content-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: ${Buffer.byteLength(completion)}\r\n`), { waitFor: /HTTP\/1\.1 100 Continue\r\n\r\n/ }, completion], expect: [200] },
  { name: 'HTTP/1.0 without Host', send: ['GET /health HTTP/1.0\r\n\r\n'], expect: [200] },
  { name: 'Upgrade: websocket on a plain route', send: [`GET /health HTTP/1.1\r\n${H}Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n`], expect: [200] },
  { name: 'GET with a body', send: [`GET /health HTTP/1.1\r\n${H}Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}`], expect: [200] },
  { name: 'HEAD of an unknown route', send: [`HEAD /nope HTTP/1.1\r\n${H}\r\n`], head: true, expect: [404] },
  { name: 'OPTIONS *', send: [`OPTIONS * HTTP/1.1\r\n${H}\r\n`], expect: 'any' },
  { name: 'absolute-form URL', send: [`GET http://127.0.0.1/health HTTP/1.1\r\n${H}\r\n`], expect: 'any' },
  { name: 'unknown but valid method on a route', send: [`PROPFIND /health HTTP/1.1\r\n${H}\r\n`], expect: [404] },
];

describe('malformed HTTP is answered in the OpenAI error shape', () => {
  let srv: TestServer;
  let port: number;
  const seen: string[] = [];
  beforeAll(async () => {
    srv = await startTestServer({ model: modelDir(M), adapterDir: adapterRoot(M) });
    port = Number(new URL(srv.url).port);
  });
  afterAll(async () => {
    if (process.env.LORAPLEX_HTTP_MALFORMED_REPORT) console.log(seen.join('\n'));
    await srv?.close();
  });

  it.each(CASES.map((c) => [c.name, c] as const))('%s', async (_name, c) => {
    const finals = c.expect === 'any' ? 1 : c.expect.length;
    const { responses } = await rawExchange(port, c, finals);
    const got = responses.filter((r) => r.status >= 200);
    seen.push(`${c.name}: ${responses.map((r) => `${r.status} ${r.body.slice(0, 160)}`).join(' | ') || '(no response)'}`);
    for (const r of responses) {
      if (r.status < 400) continue;
      if (c.head) expect(r.headers['content-type'] ?? '', `${c.name}: content-type`).toMatch(/^application\/json/);
      else expectOpenAIShape(r, c.name);
    }
    if (c.expect !== 'any') {
      expect(got.length, `${c.name}: ${got.map((r) => r.status).join(', ')}`).toBe(c.expect.length);
      c.expect.forEach((want, i) => expect([want].flat(), `${c.name}: response ${i}`).toContain(got[i].status));
    }
  });

  it('answers a request timeout (408) in the shape', async () => {
    // Node raises ERR_HTTP_REQUEST_TIMEOUT through 'clientError' after headersTimeout (60 s);
    // raise it directly on the server side of a fresh connection.
    const server = srv.app.server;
    const accepted = new Promise<Socket>((r) => server.once('connection', r));
    const sock = connect(port, '127.0.0.1');
    let buf = '';
    sock.on('data', (d: Buffer) => (buf += d.toString('latin1')));
    sock.on('error', () => {});
    const closed = new Promise<void>((r) => sock.once('close', () => r()));
    sock.write(`GET /health HTTP/1.1\r\n${H}`); // headers never finish
    const serverSide = await accepted;
    await new Promise((r) => setTimeout(r, 20));
    server.emit('clientError', Object.assign(new Error('Request timeout'), { code: 'ERR_HTTP_REQUEST_TIMEOUT' }), serverSide);
    await Promise.race([closed, new Promise((r) => setTimeout(r, 3000))]);
    sock.destroy();
    const { responses } = parseResponses(buf, true);
    seen.push(`request timeout: ${responses.map((r) => `${r.status} ${r.body.slice(0, 160)}`).join(' | ') || '(no response)'}`);
    expect(responses.map((r) => r.status)).toEqual([408]);
    expectOpenAIShape(responses[0], 'request timeout');
  });

  it('does not mistake injected requests (light-my-request) for Host-less ones', async () => {
    const res = await srv.app.inject({ url: '/health' });
    expect(res.statusCode).toBe(200);
  });

  it('keeps serving: health and a completion over fetch', async () => {
    const h = await fetch(`${srv.url}/health`);
    expect(h.status).toBe(200);
    const r = await fetch(`${srv.url}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: completion });
    expect(r.status).toBe(200);
    const j = (await r.json()) as { usage: { completion_tokens: number } };
    expect(j.usage.completion_tokens).toBe(2);
    expect(srv.engine.scheduler.waiting.length + srv.engine.scheduler.running.length).toBe(0);
  });
});

/** Just enough of a server-side socket for the client error handler. */
class FakeSocket extends EventEmitter {
  writable = true;
  destroyed = false;
  writes: string[] = [];
  _httpMessage: (EventEmitter & { headersSent: boolean }) | null = null;
  parser: { incoming: { complete: boolean } | null } | null = null;
  end(data?: string) {
    if (data) this.writes.push(data);
    this.writable = false;
  }
  write(data: string) {
    this.writes.push(data);
  }
  destroy() {
    if (this.destroyed) return;
    this.destroyed = true;
    this.writable = false;
    this.emit('close');
  }
  destroySoon() {
    this.destroy();
  }
}

const parseError = (code: string, reason: string) => Object.assign(new Error(`Parse Error: ${reason}`), { code, reason });
const handle = (s: FakeSocket, err: Error) => clientErrorHandler.call(undefined, err, s as unknown as Socket);
const inFlight = (headersSent: boolean) => Object.assign(new EventEmitter(), { headersSent });

describe('the client error handler guards the socket', () => {
  it('answers once, in the shape, however often the parser reports', () => {
    const s = new FakeSocket();
    handle(s, parseError('HPE_INVALID_METHOD', 'Invalid method encountered'));
    handle(s, parseError('HPE_INVALID_METHOD', 'Invalid method encountered'));
    expect(s.writes).toHaveLength(1);
    const { responses } = parseResponses(s.writes[0], true);
    expect(responses.map((r) => r.status)).toEqual([400]);
    expectOpenAIShape(responses[0], 'fake socket');
    expect(responses[0].headers.connection).toBe('close');
    expect(Number(responses[0].headers['content-length'])).toBe(Buffer.byteLength(responses[0].body));
    s.destroy();
  });

  it('writes nothing to a socket that is not writable, or after a reset', () => {
    const s = new FakeSocket();
    s.writable = false;
    handle(s, parseError('HPE_INVALID_METHOD', 'Invalid method encountered'));
    expect(s.writes).toHaveLength(0);
    s.destroy();
    const r = new FakeSocket();
    handle(r, Object.assign(new Error('read ECONNRESET'), { code: 'ECONNRESET' }));
    expect(r.writes).toHaveLength(0);
    expect(r.destroyed).toBe(true);
  });

  it('never writes into a response that has started; closes instead', () => {
    const s = new FakeSocket();
    s._httpMessage = inFlight(true);
    s.parser = { incoming: { complete: false } }; // the error is in the body of that request
    handle(s, parseError('HPE_INVALID_CHUNK_SIZE', 'Invalid character in chunk size'));
    expect(s.writes).toHaveLength(0);
    expect(s.destroyed).toBe(true);
  });

  it('answers the request whose body is broken in place of its unstarted response', () => {
    const s = new FakeSocket();
    s._httpMessage = inFlight(false);
    s.parser = { incoming: { complete: false } };
    handle(s, parseError('HPE_INVALID_CHUNK_SIZE', 'Invalid character in chunk size'));
    expect(s.writes).toHaveLength(1);
    expect(parseResponses(s.writes[0], true).responses[0].status).toBe(400);
    s.destroy();
  });

  it('waits for the responses of complete pipelined requests, then answers', () => {
    const s = new FakeSocket();
    const first = inFlight(true);
    s._httpMessage = first;
    s.parser = { incoming: { complete: true } }; // the error is in a request after complete ones
    handle(s, parseError('HPE_INVALID_HEADER_TOKEN', 'Invalid header token'));
    expect(s.writes).toHaveLength(0);
    s._httpMessage = null; // Node detaches the finished response before its other listeners run
    first.emit('finish');
    first.emit('close');
    expect(s.writes).toHaveLength(1);
    expect(parseResponses(s.writes[0], true).responses[0].status).toBe(400);
    s.destroy();
  });
});
