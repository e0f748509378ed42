// Owns every HTTP-level error that never reaches a route, so that each is answered in the OpenAI
// error shape (DESIGN.md section 6) instead of Fastify's or Node's own body (or none):
//  - requests the HTTP parser (llhttp) rejects, and the request timeout: Fastify's
//    `clientErrorHandler`, which writes a raw HTTP/1.1 answer to the socket;
//  - Node's checks before a request is emitted: a bogus `Expect` (417), a missing or repeated
//    `Host` on HTTP/1.1 (Node's own check is turned off so that we answer it), an HTTP version we
//    do not speak, and CONNECT (we are not a proxy);
//  - the router's URL errors (bad percent-encoding, an over-long path parameter): `frameworkErrors`.
// `Expect: 100-continue` is left to Node, which answers 100 and runs the request as before.
import http, { type IncomingMessage, type ServerResponse } from 'node:http';
import type { Socket } from 'node:net';
import type { FastifyError, FastifyInstance, FastifyReply, FastifyRequest, FastifyServerOptions } from 'fastify';
import { errorBody, type OpenAIErrorBody } from './openai-error.js';

/** How an HTTP-level failure is answered. */
export interface HttpFailure {
  status: number;
  code: string;
  message: string;
}

/** What Node attaches to a parser error (see `prepareError` in node's _http_server.js). */
export interface ClientError extends Error {
  code?: string;
  reason?: string;
  /** The buffer being parsed when the error hit (typed loosely by Fastify). */
  rawPacket?: unknown;
}

// After answering we keep reading (and discarding) for this long before closing: closing a socket
// with unread input sends a RST, which can make the client drop our answer before reading it.
const LINGER_MS = 2000;

const noop = () => {};

function failure(status: number, code: string, message: string): HttpFailure {
  return { status, code, message };
}

/** The start of a request line: a method, then an origin-form or absolute-form target. */
const REQUEST_START = /^[A-Z]+ (?:\/|[A-Za-z][A-Za-z0-9+.-]*:\/\/)/;

/** A request line with a well-formed version, `METHOD target HTTP/x.y`, within `raw`. */
const REQUEST_LINE = /(?:^|\n)[!-~]+ [^ \r\n]+ HTTP\/(\d)\.(\d)\r?\n/;

/** Maps a parser error (llhttp's HPE_* codes) or Node's request timeout to its answer. */
export function classifyClientError(err: ClientError): HttpFailure {
  const why = err.reason ?? err.message;
  switch (err.code) {
    case 'HPE_HEADER_OVERFLOW':
      // The buffer being parsed starts a request whose first line alone is over the limit: the URL
      // is too long. (Read in several pieces, the request line cannot be told from the headers.)
      if (Buffer.isBuffer(err.rawPacket) && REQUEST_START.test(err.rawPacket.subarray(0, 64).toString('latin1'))) {
        const eol = err.rawPacket.indexOf(10);
        if (eol < 0 || eol >= http.maxHeaderSize) return failure(414, 'url_too_long', `the request URL exceeds ${http.maxHeaderSize} bytes`);
      }
      return failure(431, 'header_too_large', `the request line and headers exceed ${http.maxHeaderSize} bytes`);
    case 'HPE_CHUNK_EXTENSIONS_OVERFLOW':
      return failure(413, 'request_too_large', 'the chunk extensions of the request body are too large');
    case 'ERR_HTTP_REQUEST_TIMEOUT':
      return failure(408, 'request_timeout', 'the request was not received in time');
    case 'HPE_PAUSED_H2_UPGRADE':
      return failure(505, 'http_version_not_supported', 'HTTP/2 over cleartext is not supported; use HTTP/1.1');
    case 'HPE_INVALID_METHOD':
      return failure(400, 'invalid_method', `malformed HTTP request: ${why}`);
    case 'HPE_INVALID_URL':
      return failure(400, 'invalid_url', `malformed HTTP request: ${why}`);
    case 'HPE_INVALID_VERSION': {
      // A well-formed version we do not speak (HTTP/9.9) is a 505; anything else is malformed.
      const m = Buffer.isBuffer(err.rawPacket) ? REQUEST_LINE.exec(err.rawPacket.toString('latin1')) : null;
      if (m && m[1] !== '1')
        return failure(505, 'http_version_not_supported', `HTTP/${m[1]}.${m[2]} is not supported; use HTTP/1.1`);
      return failure(400, 'invalid_http_version', `malformed HTTP request: ${why}`);
    }
    case 'HPE_INVALID_CONTENT_LENGTH':
    case 'HPE_UNEXPECTED_CONTENT_LENGTH':
      return failure(400, 'invalid_content_length', `malformed HTTP request: ${why}`);
    case 'HPE_INVALID_TRANSFER_ENCODING':
      return failure(400, 'invalid_transfer_encoding', `malformed HTTP request: ${why}`);
    case 'HPE_INVALID_CHUNK_SIZE':
      return failure(400, 'invalid_chunk', `malformed HTTP request: ${why}`);
    case 'HPE_INVALID_HEADER_TOKEN':
      return failure(400, 'invalid_header', `malformed HTTP request: ${why}`);
  }
  return failure(400, 'bad_request', `malformed HTTP request: ${why}`);
}

function openAIBody(f: HttpFailure): OpenAIErrorBody {
  return errorBody(f.message, f.status >= 500 && f.status !== 505 ? 'server_error' : 'invalid_request_error', null, f.code);
}

/** A complete HTTP/1.1 answer that closes the connection. */
export function rawHttpResponse(f: HttpFailure): string {
  const json = JSON.stringify(openAIBody(f));
  return (
    `HTTP/1.1 ${f.status} ${http.STATUS_CODES[f.status] ?? 'Error'}\r\n` +
    'content-type: application/json; charset=utf-8\r\n' +
    `content-length: ${Buffer.byteLength(json)}\r\n` +
    `date: ${new Date().toUTCString()}\r\n` +
    'connection: close\r\n\r\n' +
    json
  );
}

/** Closes `socket` once the client is done sending, or after LINGER_MS at most. */
function lingerThenClose(socket: Socket): void {
  const timer = setTimeout(() => socket.destroy(), LINGER_MS);
  timer.unref();
  socket.once('close', () => clearTimeout(timer));
  socket.once('end', () => socket.destroySoon()); // flushes what we wrote, then closes
}

/** Writes `f` straight to the socket (once) and closes it without losing the answer. */
function answerOnSocket(socket: Socket, f: HttpFailure): void {
  if (socket.destroyed) return;
  if (socket.writable) socket.end(rawHttpResponse(f));
  // Not writable: Node is already ending it (a `Connection: close` answer is flushing); the timer
  // only bounds how long it may stay open.
  lingerThenClose(socket);
}

/** Node's own fields on a server socket; used read-only and guarded, since they are internal. */
type HttpServerSocket = Socket & {
  _httpMessage?: ServerResponse | null;
  parser?: { incoming?: IncomingMessage | null } | null;
};

/**
 * Runs `answer` when no response of an earlier request is in flight on the socket, so that an
 * error answer is never interleaved with (or written into) another response.
 */
function whenNoResponseInFlight(socket: Socket, answer: () => void): void {
  const s = socket as HttpServerSocket;
  const res = s._httpMessage;
  if (!res || socket.destroyed) return answer();
  const parsing = s.parser?.incoming;
  if (!parsing || !parsing.complete) {
    // The error is inside the request that owns this response (its body cannot complete): answer
    // it in its place unless that response has started, which one more write would corrupt.
    if (res.headersSent) socket.destroy();
    else answer();
    return;
  }
  // The error follows complete, pipelined requests: let their responses go out first, in order.
  let done = false;
  const next = () => {
    if (done) return;
    done = true;
    whenNoResponseInFlight(socket, answer);
  };
  res.once('finish', next);
  res.once('close', next);
}

// The parser reports an error again for every chunk that arrives after the first one.
const answered = new WeakSet<Socket>();

/**
 * Fastify's `clientErrorHandler` (bound to the instance): a request the parser rejects, or one
 * that timed out, answered with a raw response in the OpenAI error shape.
 */
export function clientErrorHandler(this: FastifyInstance | undefined, err: ClientError, socket: Socket): void {
  if (answered.has(socket)) return;
  answered.add(socket);
  socket.on('error', noop); // a reset while we answer is not our error
  if (err.code === 'ECONNRESET' || err.code === 'EPIPE' || socket.destroyed) {
    socket.destroy();
    return;
  }
  const f = classifyClientError(err);
  this?.log?.debug({ code: err.code, reason: err.reason, status: f.status }, 'malformed request');
  whenNoResponseInFlight(socket, () => answerOnSocket(socket, f));
}

/** Fastify's `frameworkErrors`: the router's URL failures, before any route or hook runs. */
export function frameworkErrors(err: FastifyError, _req: FastifyRequest, reply: FastifyReply): void {
  let f: HttpFailure;
  if (err.code === 'FST_ERR_MAX_PARAM_LENGTH') f = failure(414, 'url_too_long', err.message);
  else if (err.code === 'FST_ERR_BAD_URL') f = failure(400, 'invalid_url', err.message);
  else {
    const status = err.statusCode && err.statusCode >= 400 ? err.statusCode : 400;
    f = failure(status, status >= 500 ? 'server_error' : 'bad_request', status >= 500 ? 'internal server error' : err.message);
  }
  reply.code(f.status).send(openAIBody(f));
}

/** Options to spread into `Fastify({...})`. */
export function fastifyHttpErrorOptions() {
  return {
    // Node answers a Host-less HTTP/1.1 request with an empty 400; `checkHostAndVersion` answers it.
    http: { requireHostHeader: false },
    clientErrorHandler,
    frameworkErrors: frameworkErrors as unknown as FastifyServerOptions['frameworkErrors'],
  } satisfies Partial<FastifyServerOptions> & { http: http.ServerOptions };
}

/** onRequest: the Host and version checks Node would make (or does not), in the OpenAI shape. */
export async function checkHostAndVersion(req: FastifyRequest, reply: FastifyReply): Promise<FastifyReply | undefined> {
  const raw = req.raw;
  let f: HttpFailure | null = null;
  if (raw.httpVersionMajor !== 1) {
    f = failure(505, 'http_version_not_supported', `HTTP/${raw.httpVersion} is not supported; use HTTP/1.1`);
  } else {
    let hosts = 0;
    for (let i = 0; i < raw.rawHeaders.length; i += 2) if (raw.rawHeaders[i].toLowerCase() === 'host') hosts++;
    if (hosts > 1) f = failure(400, 'invalid_host', 'the request has more than one Host header');
    else if (hosts === 0 && raw.httpVersionMinor === 1) f = failure(400, 'missing_host', 'an HTTP/1.1 request must have a Host header');
  }
  if (!f) return undefined;
  reply.code(f.status).header('connection', 'close').send(openAIBody(f));
  return reply;
}

function answerResponse(res: ServerResponse, f: HttpFailure): void {
  const json = JSON.stringify(openAIBody(f));
  res.writeHead(f.status, { 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(json), connection: 'close' });
  res.end(json);
}

/** Installs the server listeners and the hook; call right after the app is created. */
export function installHttpErrorHandling(app: { server: http.Server; addHook(name: 'onRequest', hook: typeof checkHostAndVersion): unknown }): void {
  const server = app.server;
  // Any `Expect` but 100-continue. (100-continue goes to 'checkContinue', which we leave unset so
  // that Node answers 100 and emits the request as usual.)
  server.on('checkExpectation', (req: IncomingMessage, res: ServerResponse) => {
    const what = String(req.headers.expect).slice(0, 100);
    answerResponse(res, failure(417, 'expectation_failed', `unsupported Expect: ${JSON.stringify(what)}; only 100-continue is supported`));
  });
  // CONNECT: Node drops the connection without a word when nobody listens. (We do not listen for
  // 'upgrade': without a listener Node serves an `Upgrade` request as a plain request.)
  server.on('connect', (_req: IncomingMessage, socket: Socket) => {
    socket.on('error', noop); // Node has handed the socket over without its error listener
    socket.resume(); // keep reading and discarding while we answer
    answerOnSocket(socket, failure(405, 'method_not_allowed', 'CONNECT is not supported: this server is not a proxy'));
  });
  app.addHook('onRequest', checkHostAndVersion);
}
