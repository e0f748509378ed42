// Operational routes: liveness (/health), readiness (/ready) and Prometheus metrics (/metrics).
import type { FastifyInstance } from 'fastify';
import type { Engine } from '../engine/engine.js';
import type { Metrics } from '../metrics.js';

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
    reply.code(stalled ? 503 : 200);
    return { status: stalled ? 'stalled' : 'ok' };
  });
  app.get('/ready', async (_req, reply) => {
    const draining = deps.isDraining();
    reply.code(draining ? 503 : 200);
    if (draining) reply.header('retry-after', '5');
    return { status: draining ? 'draining' : 'ready', model: engine.model.name };
  });
  app.get('/metrics', async (_req, reply) => {
    reply.header('content-type', deps.metrics.registry.contentType);
    return deps.metrics.registry.metrics();
  });
}
