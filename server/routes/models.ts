// GET /v1/models (the base model and every adapter) and GET /v1/models/{id} (one of them, as the
// openai client's models.retrieve() asks; 404 model_not_found otherwise). A base name may hold
// slashes (`meta-llama/Llama-3.2-1B`): the id is the rest of the path, sent raw or encoded.
import type { FastifyInstance } from 'fastify';
import type { Engine } from '../engine/engine.js';
import { LoraplexError } from '../engine/errors.js';

export interface ModelRouteDeps {
  engine: Engine;
}

export async function modelRoutes(app: FastifyInstance, deps: ModelRouteDeps): Promise<void> {
  const { engine } = deps;
  const now = () => Math.floor(Date.now() / 1000);
  // `root` names the model, never where it lives on the server.
  // A multimodal checkpoint served as text only says so (`input_modalities`, `note`).
  const textOnly = engine.model.note ? { input_modalities: ['text'], note: engine.model.note } : {};
  const baseCard = (created: number) => ({ id: engine.model.name, object: 'model', created, owned_by: 'loraplex', root: engine.model.name, parent: null, max_model_len: engine.maxModelLen, ...textOnly });
  const adapterCard = (id: string, created: number) => ({ id, object: 'model', created, owned_by: 'loraplex', root: id, parent: engine.model.name });

  app.get('/v1/models', async () => {
    const created = now();
    const adapters = engine.adapters.listKnown().map((a) => adapterCard(a.id, created));
    return { object: 'list', data: [baseCard(created), ...adapters] };
  });

  app.get<{ Params: { '*': string } }>('/v1/models/*', async (req) => {
    const id = req.params['*'];
    if (id === engine.model.name) return baseCard(now());
    if (id !== '' && engine.adapters.lookup(id)) return adapterCard(id, now());
    throw new LoraplexError(`The model \`${id}\` does not exist.`, 404, 'invalid_request_error', 'model', 'model_not_found');
  });
}
