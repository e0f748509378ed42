// The HTTP application: Fastify with the OpenAI, adapter and ops routes, one error path to the
// OpenAI error shape, Bearer-key auth, backpressure and graceful drain on SIGTERM.
import { createHash, timingSafeEqual } from 'node:crypto';
import { mkdirSync } from 'node:fs';
import { resolve } from 'node:path';
import Fastify, { LogController, type FastifyInstance, type FastifyReply } from 'fastify';
import pino from 'pino';
import { engineOptions, type ServeConfig } from './config.js';
import { ensureDemoModel } from './demo/demo-model.js';
import { Engine } from './engine/engine.js';
import { LoraplexError } from './engine/errors.js';
import { Metrics } from './metrics.js';
import { registerCors } from './cors.js';
import { installJsonBodyParser } from './json-body.js';
import { adapterRoutes } from './routes/adapters.js';
import { modelRoutes } from './routes/models.js';
import { openaiRoutes } from './routes/openai.js';
import { opsRoutes } from './routes/ops.js';
import { tokenizerRoutes } from './routes/tokenizer.js';
import { readyHints, uiDir, uiOpenPaths, uiRoutes } from './routes/ui.js';
import { fastifyHttpErrorOptions, installHttpErrorHandling } from './http-errors.js';
import { errorBody, toOpenAIError } from './openai-error.js';
import { createAdapterStore } from './stores/adapter-store.js';
import { loadReporter } from './load-progress.js';

export interface AppState {
  draining: boolean;
}

const OPEN_ROUTES = new Set(['/health', '/ready', '/metrics']);

function keyDigest(s: string): Buffer {
  return createHash('sha256').update(s).digest();
}

export interface BuildOptions {
  logger?: pino.Logger | false;
  state?: AppState;
}

export async function buildApp(engine: Engine, cfg: ServeConfig, opts: BuildOptions = {}): Promise<FastifyInstance> {
  const state = opts.state ?? { draining: false };
  const app = Fastify({
    loggerInstance: opts.logger === false || opts.logger === undefined ? pino({ level: 'silent' }) : opts.logger,
    logController: new LogController({ disableRequestLogging: true }), // one line per request, our own (onResponse)
    bodyLimit: cfg.maxBodyBytes,
    ajv: { customOptions: { coerceTypes: false, removeAdditional: false, useDefaults: false, allErrors: false } },
    return503OnClosing: false,
    // Parser, Node and router failures (malformed HTTP, bad URLs) in the same shape: http-errors.ts.
    ...fastifyHttpErrorOptions(),
  });
  installHttpErrorHandling(app);
  // JSON everywhere (multipart only for uploads): a text/plain body is a 415, not a schema error.
  app.removeContentTypeParser('text/plain');
  installJsonBodyParser(app); // Fastify's JSON parser, plus exact 64-bit seeds
  const metrics = new Metrics(engine);
  const store = await createAdapterStore(engine, cfg, app.log);
  app.addHook('onClose', async () => store.close());

  // Before the key check: preflights never need the key, and 401s carry the CORS headers too.
  await registerCors(app, cfg);
  const wantKey = cfg.apiKey ? keyDigest(cfg.apiKey) : null;
  const ui = cfg.ui ? uiDir() : null;
  const uiPaths = uiOpenPaths(ui); // the playground's page and assets need no key; its API calls do
  app.addHook('onRequest', async (req, reply) => {
    const path = req.url.split('?')[0];
    if (wantKey && !OPEN_ROUTES.has(path) && !uiPaths.has(path)) {
      const h = req.headers.authorization ?? '';
      const m = /^Bearer\s+(.+)$/i.exec(h);
      if (!m || !timingSafeEqual(keyDigest(m[1].trim()), wantKey)) {
        reply.code(401).send(errorBody('invalid or missing API key (Authorization: Bearer <key>)', 'invalid_request_error', null, 'invalid_api_key'));
        return reply;
      }
    }
    if (state.draining && !OPEN_ROUTES.has(path)) {
      reply.code(503).header('retry-after', '5').send(errorBody('server is shutting down', 'server_error', null, 'shutting_down'));
      return reply;
    }
  });
  app.addHook('onResponse', async (req, reply) => {
    const l = req.loraplex;
    req.log.info({
      method: req.method, url: req.url, status: reply.statusCode,
      model: l?.model, adapter: l?.adapter ?? undefined,
      prompt_tokens: l?.run.promptTokens, completion_tokens: l?.run.completionTokens,
      latency_ms: Math.round(reply.elapsedTime),
    }, 'request');
  });
  app.setErrorHandler((err, req, reply) => {
    const { status, body, retryAfter, expected } = toOpenAIError(err);
    // Conditions the server reports on purpose (registry down, draining, full) are warnings without
    // a stack; only errors nobody anticipated (our bugs) are logged with one.
    if (!expected) req.log.error({ err }, 'request failed');
    else if (status >= 500 || status === 429) req.log.warn({ status, code: body.error.code, msg: body.error.message }, 'request refused');
    if (retryAfter) reply.header('retry-after', String(retryAfter));
    reply.code(status).send(body);
  });
  app.setNotFoundHandler((req, reply) => {
    reply.code(404).send(errorBody(`no route ${req.method} ${req.url.split('?')[0]}`, 'invalid_request_error', null, 'not_found'));
  });

  // --max-queue counts sequences (prompts x n), the unit that takes memory and engine time: a
  // request that fans out past the whole queue is refused outright, one that does not fit now waits
  // for a retry.
  const admit = (sequences: number, param: string) => {
    if (state.draining) throw new LoraplexError('server is shutting down', 503, 'server_error', null, 'shutting_down');
    if (sequences > cfg.maxQueue)
      throw new LoraplexError(
        `the request fans out to ${sequences} sequences (prompts x n); at most ${cfg.maxQueue} are allowed (--max-queue)`,
        400, 'invalid_request_error', param, 'too_many_sequences');
    const s = engine.scheduler;
    if (s.waiting.length + s.running.length + sequences > cfg.maxQueue)
      throw new LoraplexError('too many requests in flight; retry later', 429, 'rate_limit_error', null, 'queue_full');
  };
  await app.register(openaiRoutes, { engine, metrics, maxN: cfg.maxN, admit, tools: { enableAutoToolChoice: cfg.enableAutoToolChoice ?? false, toolCallParser: cfg.toolCallParser ?? null } });
  await app.register(modelRoutes, { engine });
  await app.register(tokenizerRoutes, { engine, tokenizerInfo: cfg.tokenizerInfoEndpoint });
  await app.register(opsRoutes, { engine, metrics, isDraining: () => state.draining, stallSeconds: 120 });
  await app.register(adapterRoutes, { engine, store, cfg });
  if (ui) await app.register(uiRoutes, { dir: ui });
  else if (cfg.ui) app.log.warn('server/ui/ not found: the playground is off');
  return app as unknown as FastifyInstance;
}

function makeLogger(level: string): pino.Logger {
  if (process.stderr.isTTY) {
    return pino({ level, transport: { target: 'pino-pretty', options: { destination: 2, colorize: true } } });
  }
  return pino({ level }, pino.destination(2));
}

/** `loraplex serve`: loads the model, listens, drains on SIGTERM/SIGINT and exits 0. */
export async function startServer(cfg: ServeConfig): Promise<void> {
  const log = makeLogger(cfg.logLevel);
  let modelDir = cfg.model;
  let adapterDir = cfg.adapterDir;
  let servedName = cfg.servedModelName;
  if (!modelDir) {
    const demo = await ensureDemoModel();
    modelDir = demo.modelDir;
    adapterDir ??= demo.adapterDir;
    servedName ??= 'loraplex-demo';
    log.info({ modelDir, adapterDir }, 'serving the bundled demo model');
  }
  adapterDir = resolve(adapterDir ?? './adapters');
  mkdirSync(adapterDir, { recursive: true });
  const t0 = performance.now();
  // A progress bar on a terminal; one JSON line per load phase otherwise (server/load-progress.ts).
  const progress = loadReporter({ tty: process.stderr.isTTY === true, stream: process.stderr, log });
  let engine: Engine;
  try {
    engine = await Engine.create({
      ...engineOptions(cfg, modelDir),
      servedModelName: servedName ?? undefined,
      adapterDir,
      onLoadProgress: (p) => progress.update(p),
    });
  } finally {
    progress.end();
  }
  const pool = engine.paging.stats();
  log.info(
    { model: engine.model.name, backend: engine.backend, loraDtype: engine.loraDtype, computeDtype: engine.computeDtype, kvCacheDtype: engine.kvCacheDtype, pages: pool.totalPages, pageBytes: engine.paging.pageBytes, loadMs: Math.round(performance.now() - t0) },
    'model loaded',
  );
  log.info({ phase: 'adapters', adapterDir, adapters: engine.adapters.listKnown().length }, 'load: adapters found (each loads into the pool on first use)');
  const state: AppState = { draining: false };
  const app = await buildApp(engine, { ...cfg, adapterDir }, { logger: log, state });
  await app.listen({ host: cfg.host, port: cfg.port });
  const addr = app.server.address();
  log.info({ phase: 'listening', address: typeof addr === 'object' && addr ? `http://${cfg.host}:${addr.port}` : addr, startMs: Math.round(performance.now() - t0) }, 'listening');
  for (const line of readyHints({ host: cfg.host, port: typeof addr === 'object' && addr ? addr.port : cfg.port, model: engine.model.name, ui: cfg.ui, apiKey: cfg.apiKey !== null })) log.info(line);

  let stopping = false;
  const shutdown = async (signal: string) => {
    if (stopping) return;
    stopping = true;
    state.draining = true;
    log.info({ signal, inFlight: engine.scheduler.running.length + engine.scheduler.waiting.length }, 'draining');
    const deadline = performance.now() + cfg.shutdownTimeout * 1000;
    while (engine.scheduler.hasWork && performance.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    await engine.close(); // aborts whatever outlived the timeout, so its streams end
    await app.close();
    log.info('stopped');
    log.flush?.();
    process.exit(0);
  };
  process.on('SIGTERM', () => void shutdown('SIGTERM'));
  process.on('SIGINT', () => void shutdown('SIGINT'));
}
