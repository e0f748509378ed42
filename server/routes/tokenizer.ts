// vLLM's tokenizer routes: POST /tokenize, POST /detokenize and GET /tokenizer_info (on by default
// here, off with --disable-tokenizer-info-endpoint; vLLM has it off unless asked). lm-eval's
// remote tokenizer uses all three. Adapters share the base model's tokenizer: `model` (optional,
// as in vLLM) only has to name the base or a known adapter.
import type { FastifyInstance } from 'fastify';
import type { Engine } from '../engine/engine.js';
import { DetokenizeRequest, TokenizeRequest } from '../schemas/tokenizer.js';
import { templateMessages } from '../services/chat-messages.js';
import { invalid, resolveAdapter } from '../services/request-params.js';

export interface TokenizerRouteDeps {
  engine: Engine;
  /** Serve GET /tokenizer_info. */
  tokenizerInfo: boolean;
}

/** transformers' AddedToken objects ({content, lstrip, ...}) as their text, as vLLM reports init_kwargs. */
function plain(v: unknown): unknown {
  if (Array.isArray(v)) return v.map(plain);
  if (v !== null && typeof v === 'object') {
    const o = v as Record<string, unknown>;
    if (typeof o.content === 'string' && ('__type' in o || 'special' in o || 'lstrip' in o)) return o.content;
    return Object.fromEntries(Object.entries(o).map(([k, x]) => [k, plain(x)]));
  }
  return v;
}

/**
 * GET /tokenizer_info's body: tokenizer_config.json as vLLM reports it (file paths dropped, added
 * tokens as text, `tokenizer_class`), with the fields clients read always present: the special
 * tokens (null when the model has none), `model_max_length` (the context window when the config
 * has none) and `chat_template` (the template in use, or null).
 */
export function tokenizerInfo(engine: Engine): Record<string, unknown> {
  const tok = engine.tokenizer;
  const cfg = plain(tok.config) as Record<string, unknown>;
  delete cfg.vocab_file;
  delete cfg.merges_file;
  const text = (v: unknown) => (typeof v === 'string' ? v : null);
  const eosId = engine.model.eosTokenIds[0];
  return {
    ...cfg,
    tokenizer_class: text(cfg.tokenizer_class) ?? 'PreTrainedTokenizerFast',
    bos_token: text(cfg.bos_token),
    eos_token: text(cfg.eos_token) ?? (eosId === undefined ? null : (tok.idToToken(eosId) ?? null)),
    pad_token: text(cfg.pad_token),
    unk_token: text(cfg.unk_token),
    model_max_length: typeof cfg.model_max_length === 'number' ? cfg.model_max_length : engine.maxModelLen,
    chat_template: tok.chatTemplate,
  };
}

export async function tokenizerRoutes(app: FastifyInstance, deps: TokenizerRouteDeps): Promise<void> {
  const { engine } = deps;
  const tok = engine.tokenizer;
  const checkModel = (model: string | null | undefined) => {
    if (model != null) resolveAdapter(engine, model); // 404 model_not_found
  };

  app.post<{ Body: TokenizeRequest }>('/tokenize', { schema: { body: TokenizeRequest } }, async (req) => {
    const b = req.body;
    checkModel(b.model);
    let ids: number[];
    if (b.messages !== undefined) {
      if (b.prompt !== undefined) invalid('messages', 'give either `prompt` or `messages`, not both');
      const cont = b.continue_final_message ?? false;
      if (cont && b.add_generation_prompt === true)
        invalid('continue_final_message', 'Cannot set both `continue_final_message` and `add_generation_prompt` to True.');
      const messages = templateMessages(b.messages);
      if (!tok.hasChatTemplate) invalid('messages', 'this model has no chat template; tokenize a `prompt` instead', 'no_chat_template');
      // continue_final_message alone implies no generation prompt (vLLM would make the caller say so).
      ids = tok.encodeChat(messages, cont ? false : (b.add_generation_prompt ?? true), {
        continueFinalMessage: cont,
        addSpecialTokens: b.add_special_tokens ?? false,
        // vLLM's /tokenize takes `tools` as chat does: the template renders them.
        tools: Array.isArray((b as { tools?: unknown }).tools) ? (b as { tools: unknown[] }).tools : undefined,
      });
    } else if (b.prompt !== undefined) {
      ids = tok.encode(b.prompt, b.add_special_tokens ?? true);
    } else {
      invalid('prompt', '`prompt` or `messages` is required');
    }
    const out: { count: number; max_model_len: number; tokens: number[]; token_strs?: string[] } = {
      count: ids.length,
      max_model_len: engine.maxModelLen,
      tokens: ids,
    };
    // The vocabulary's own strings (byte-level marks included), as convert_ids_to_tokens gives.
    if (b.return_token_strs) out.token_strs = ids.map((id) => tok.idToToken(id) ?? '');
    return out;
  });

  app.post<{ Body: DetokenizeRequest }>('/detokenize', { schema: { body: DetokenizeRequest } }, async (req) => {
    const b = req.body;
    checkModel(b.model);
    const V = engine.model.spec.vocabSize;
    for (const [i, id] of b.tokens.entries())
      if (id < 0 || id >= V || tok.idToToken(id) === undefined)
        invalid('tokens', `tokens[${i}] = ${id} is not a token id of the vocabulary [0, ${V})`);
    // Special tokens are kept, as transformers' decode() (vLLM's detokenize) keeps them.
    return { prompt: tok.decode(b.tokens, false) };
  });

  if (deps.tokenizerInfo) {
    const info = tokenizerInfo(engine);
    app.get('/tokenizer_info', async () => info);
  }
}
