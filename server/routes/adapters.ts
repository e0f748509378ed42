// Adapter management: upload (multipart), list, get, delete, and vLLM's load/unload endpoints.
import { realpathSync, rmSync } from 'node:fs';
import multipart from '@fastify/multipart';
import { Type, type Static } from '@sinclair/typebox';
import type { FastifyInstance } from 'fastify';
import type { ServeConfig } from '../config.js';
import type { AdapterEntry } from '../engine/adapter-cache.js';
import type { Engine } from '../engine/engine.js';
import { isInside } from '../engine/adapter-files.js';
import { LoraplexError } from '../engine/errors.js';
import { checkAdapterId, receiveUpload, validateStaged } from '../services/adapter-upload.js';
import type { AdapterStore } from '../stores/adapter-store.js';

export interface AdapterRouteDeps {
  engine: Engine;
  store: AdapterStore;
  cfg: ServeConfig;
}

const LoadBody = Type.Object({ lora_name: Type.String(), lora_path: Type.String() }, { additionalProperties: true });
const UnloadBody = Type.Object({ lora_name: Type.String() }, { additionalProperties: true });

function notFound(id: string): LoraplexError {
  return new LoraplexError(`adapter ${JSON.stringify(id)} does not exist`, 404, 'invalid_request_error', 'id', 'model_not_found');
}

export async function adapterRoutes(app: FastifyInstance, deps: AdapterRouteDeps): Promise<void> {
  const { engine, store, cfg } = deps;
  const adapterDir = engine.adapters.opts.adapterDir!;
  engine.adapters.allowRoots(cfg.loraRoots);
  await app.register(multipart, { limits: { fileSize: cfg.maxAdapterBytes } });

  const describe = (e: AdapterEntry) => {
    const m = store.meta(e.id);
    const plan = e.plan;
    return {
      id: e.id,
      object: 'adapter',
      rank: m?.rank ?? plan?.rank ?? null,
      alpha: m?.alpha ?? plan?.alpha ?? null,
      target_modules: m?.target_modules ?? plan?.targetModules ?? null,
      size: m?.size ?? null,
      sha256: m?.sha256 ?? null,
      created: m?.created ?? null,
      resident: e.tier === 'pool',
      tier: e.tier,
      requests_served: e.requestsServed,
      parent: engine.model.name,
    };
  };

  app.post('/v1/adapters', async (req, reply) => {
    store.checkWritable();
    const up = await receiveUpload(req, reply, adapterDir, cfg.maxAdapterBytes);
    try {
      if (engine.adapters.lookup(up.id)) throw new LoraplexError(`adapter ${up.id} already exists`, 409, 'invalid_request_error', 'id', 'adapter_exists');
      const meta = await validateStaged(engine, up);
      await store.publish(up.id, up.dir, meta);
      engine.adapters.published(up.id);
    } finally {
      rmSync(up.dir, { recursive: true, force: true }); // gone after a publish (renamed) or any failure
    }
    const entry = engine.adapters.lookup(up.id);
    if (!entry) throw new LoraplexError(`adapter ${up.id} was published but is not visible`, 500, 'server_error');
    reply.code(201);
    return describe(entry);
  });

  app.get('/v1/adapters', async () => ({ object: 'list', data: engine.adapters.listKnown().map(describe) }));

  app.get<{ Params: { id: string } }>('/v1/adapters/:id', async (req) => {
    const e = engine.adapters.lookup(req.params.id);
    if (!e) throw notFound(req.params.id);
    return describe(e);
  });

  app.delete<{ Params: { id: string } }>('/v1/adapters/:id', async (req) => {
    const id = req.params.id;
    if (!engine.adapters.lookup(id)) throw notFound(id);
    store.checkWritable();
    await engine.adapters.retire(id); // new requests 404 from now; running ones finish first
    await store.remove(id);
    return { id, object: 'adapter', deleted: true };
  });

  // vLLM-compatible dynamic loading of an adapter directory that already exists on disk.
  app.post<{ Body: Static<typeof LoadBody> }>('/v1/load_lora_adapter', { schema: { body: LoadBody } }, async (req) => {
    const name = checkAdapterId(req.body.lora_name);
    if (engine.adapters.lookup(name)) throw new LoraplexError(`adapter ${name} already exists`, 409, 'invalid_request_error', 'lora_name', 'adapter_exists');
    let real: string;
    try {
      real = realpathSync(req.body.lora_path);
    } catch {
      throw new LoraplexError('lora_path does not exist', 400, 'invalid_request_error', 'lora_path', 'invalid_value');
    }
    // The folder must resolve inside a root; each of its files is checked again when it is read.
    if (!isInside(real, engine.adapters.roots))
      throw new LoraplexError('lora_path must be inside --adapter-dir or a --lora-roots folder', 400, 'invalid_request_error', 'lora_path', 'invalid_value');
    engine.adapters.register(name, real);
    try {
      await engine.adapters.loadNow(name); // validates now, so a bad adapter is a 400 here
    } catch (e) {
      engine.adapters.forget(name);
      throw e;
    }
    return `Success: LoRA adapter '${name}' added successfully.`;
  });

  app.post<{ Body: Static<typeof UnloadBody> }>('/v1/unload_lora_adapter', { schema: { body: UnloadBody } }, async (req) => {
    const name = req.body.lora_name;
    if (!engine.adapters.lookup(name)) throw notFound(name);
    await engine.adapters.retire(name, { sticky: true });
    return `Success: LoRA adapter '${name}' removed successfully.`;
  });
}
