// Operational routes: liveness (/health), readiness (/ready) and Prometheus metrics (/metrics).
import type { FastifyInstance } from 'fastify';
import type { Engine } from '../engine/engine.js';
import type { Metrics } from '../metrics.js';
import { errorBody } from '../openai-error.js';

export interface OpsDeps {
  engine: Engine;
  metrics: Metrics;
  isDraining: () => boolean;
  /** Liveness: the engine loop made progress recently whenever it had work. */
  stallSeconds: number;
}

export async function opsRoutes(app: FastifyInstance, deps: OpsDeps): Promise<void> {
  const { engine } = deps;
  app.get('/health', async (_req, reply) => {
    const stalled = engine.secondsSinceProgress() > deps.stallSeconds;
    if (!stalled) return { status: 'ok' };
    reply.code(503);
    return { status: 'stalled', ...errorBody(`the engine made no progress for ${deps.stallSeconds} s`, 'server_error', null, 'engine_stalled') };
  });
  app.get('/ready', async (_req, reply) => {
    const draining = deps.isDraining();
    if (!draining) return { status: 'ready', model: engine.model.name };
    reply.code(503).header('retry-after', '5');
    return { status: 'draining', model: engine.model.name, ...errorBody('server is shutting down', 'server_error', null, 'shutting_down') };
  });
  app.get('/metrics', async (_req, reply) => {
    reply.header('content-type', deps.metrics.registry.contentType);
    return deps.metrics.registry.metrics();
  });
}
