// CORS as vLLM configures Starlette's CORSMiddleware (--allowed-origins, --allowed-methods,
// --allowed-headers, --allow-credentials), through @fastify/cors. Registered before the API-key
// hook: a preflight is answered in @fastify/cors's onRequest hook and never needs the key, and
// every other response (errors and 401s included) carries the headers set there.
import cors, { type FastifyCorsOptions } from '@fastify/cors';
import type { FastifyInstance, FastifyRequest, RawReplyDefaultExpression, RawRequestDefaultExpression, RawServerDefault } from 'fastify';
import type { ServeConfig } from './config.js';

/** The app whatever its logger type (app.ts builds it with pino's). */
type AnyFastify = FastifyInstance<RawServerDefault, RawRequestDefaultExpression, RawReplyDefaultExpression, any>;

/** Starlette's ALL_METHODS: what `["*"]` allows. */
const ALL_METHODS = ['DELETE', 'GET', 'HEAD', 'OPTIONS', 'PATCH', 'POST', 'PUT'];

export function corsOptions(cfg: Pick<ServeConfig, 'allowedOrigins' | 'allowedMethods' | 'allowedHeaders' | 'allowCredentials'>): FastifyCorsOptions {
  const anyOrigin = cfg.allowedOrigins.includes('*');
  const o: FastifyCorsOptions = {
    // A credentialed request cannot be answered with `*` (browsers refuse it): echo the origin, as
    // Starlette does for credentialed or explicit-origin configurations.
    origin: anyOrigin ? (cfg.allowCredentials ? true : '*') : cfg.allowedOrigins,
    methods: cfg.allowedMethods.includes('*') ? ALL_METHODS : cfg.allowedMethods,
    credentials: cfg.allowCredentials,
    maxAge: 600, // Starlette's default
    strictPreflight: true,
  };
  // Left unset, @fastify/cors reflects Access-Control-Request-Headers (Starlette's ["*"]).
  if (!cfg.allowedHeaders.includes('*')) o.allowedHeaders = cfg.allowedHeaders;
  return o;
}

/** A CORS preflight, as Starlette tells one: OPTIONS with Origin and Access-Control-Request-Method. */
function isPreflight(req: FastifyRequest): boolean {
  return req.method === 'OPTIONS' && req.headers.origin !== undefined && req.headers['access-control-request-method'] !== undefined;
}

export async function registerCors(app: AnyFastify, cfg: ServeConfig): Promise<void> {
  const opts = corsOptions(cfg);
  const off: FastifyCorsOptions = { origin: false };
  // Any other OPTIONS request is no preflight: CORS stays off for it, so it reaches the router
  // (404 in the OpenAI shape) instead of @fastify/cors's plain-text 400.
  await app.register(cors, {
    hook: 'onRequest',
    delegator: (req, cb) => cb(null, req.method !== 'OPTIONS' || isPreflight(req as FastifyRequest) ? opts : off),
  });
}
