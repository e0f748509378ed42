// OpenAI-compatible routes: /v1/completions, /v1/chat/completions (models.ts: /v1/models). Thin: validation
// helpers and the generation service do the work; this file shapes responses and SSE.
import { randomUUID } from 'node:crypto';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { Engine } from '../engine/engine.js';
import { LoraplexError } from '../engine/errors.js';
import type { PromptLogprob, TokenEvent } from '../engine/sequence.js';
import type { ChatMessage as TplMessage } from '../engine/tokenizer.js';
import { ChatCompletionRequest, CompletionRequest } from '../schemas/openai.js';
import { GenerationRun, type ChoiceEvent, type ChoiceInput } from '../services/generation.js';
import { toOpenAIError } from '../openai-error.js';
import { templateMessages } from '../services/chat-messages.js';
import { choiceCount, invalid, normalizePrompts, resolveAdapter, samplingParams, stopStrings } from '../services/request-params.js';
import { choiceSeed } from '../engine/sampling-params.js';
import type { Metrics } from '../metrics.js';
import type { GrammarRef } from '../engine/grammar.js';
import { structuredRequest, type StructuredFields } from '../services/structured-output.js';
import { parseToolOutput, toolCallId, toolGrammar, toolPlan, type ToolOptions } from '../tools/tools.js';
import { ToolCallStream } from '../tools/tool-stream.js';

export interface OpenAIRouteDeps {
  engine: Engine;
  metrics: Metrics;
  maxN: number;
  /** Throws 429/503 when the server cannot take `sequences` more sequences, 400 (naming `param`) if it never could. */
  admit: (sequences: number, param: string) => void;
  /** --enable-auto-tool-choice, --tool-call-parser. */
  tools?: ToolOptions;
}

const now = () => Math.floor(Date.now() / 1000);

function tokenStr(engine: Engine, id: number): string {
  return engine.tokenizer.decode([id], false);
}

/** A token the grammar masked has logprob -inf, which JSON cannot hold: -9999.0, as vLLM reports it. */
function lpOut(x: number): number {
  return x === -Infinity ? -9999 : x;
}

function bytesOf(s: string): number[] {
  return [...Buffer.from(s, 'utf8')];
}

interface CompletionLogprobs {
  tokens: string[];
  token_logprobs: Array<number | null>;
  top_logprobs: Array<Record<string, number> | null>;
  text_offset: number[];
}

/**
 * Completions' logprobs object for a run of tokens. As OpenAI's legacy API and vLLM do,
 * top_logprobs holds the top-N alternatives and the chosen token itself (up to N + 1 entries).
 */
function completionLogprobs(engine: Engine, tokens: TokenEvent[], offset0: number, into?: CompletionLogprobs): CompletionLogprobs {
  let off = offset0;
  const out = into ?? { tokens: [], token_logprobs: [], top_logprobs: [], text_offset: [] };
  for (const t of tokens) {
    const s = tokenStr(engine, t.token);
    out.tokens.push(s);
    out.token_logprobs.push(t.logprob);
    const top = Object.fromEntries((t.top ?? []).map(([id, lp]) => [tokenStr(engine, id), lpOut(lp)]));
    top[s] ??= t.logprob;
    out.top_logprobs.push(top);
    out.text_offset.push(off);
    off += s.length;
  }
  return out;
}

/** The prompt's part of an echoed logprobs object: the first token has no logprob (null). */
function promptCompletionLogprobs(engine: Engine, ids: number[], lps: Array<PromptLogprob | null>, n: number): CompletionLogprobs {
  const out: CompletionLogprobs = { tokens: [], token_logprobs: [], top_logprobs: [], text_offset: [] };
  let off = 0;
  ids.forEach((id, i) => {
    const s = tokenStr(engine, id);
    const lp = i === 0 ? null : lps[i];
    out.tokens.push(s);
    out.text_offset.push(off);
    off += s.length;
    if (!lp) {
      out.token_logprobs.push(null);
      out.top_logprobs.push(null);
      return;
    }
    out.token_logprobs.push(lp.logprob);
    const top = Object.fromEntries(lp.top.slice(0, n).map(([t, l]) => [tokenStr(engine, t), l]));
    top[s] ??= lp.logprob;
    out.top_logprobs.push(top);
  });
  return out;
}

/** vLLM's `prompt_logprobs`: null for the first token, then {token_id: {logprob, rank, decoded_token}}. */
function vllmPromptLogprobs(engine: Engine, ids: number[], lps: Array<PromptLogprob | null>, n: number) {
  return ids.map((id, i) => {
    const lp = i === 0 ? null : lps[i];
    if (!lp) return null;
    const entry: Record<string, { logprob: number; rank: number; decoded_token: string }> = {};
    lp.top.slice(0, n).forEach(([t, l], r) => (entry[String(t)] = { logprob: l, rank: r + 1, decoded_token: tokenStr(engine, t) }));
    entry[String(id)] ??= { logprob: lp.logprob, rank: lp.rank, decoded_token: tokenStr(engine, id) };
    return entry;
  });
}

function chatLogprobs(engine: Engine, tokens: TokenEvent[]) {
  return {
    content: tokens.map((t) => {
      const s = tokenStr(engine, t.token);
      return {
        token: s,
        logprob: t.logprob,
        bytes: bytesOf(s),
        top_logprobs: (t.top ?? []).map(([id, lp]) => {
          const ts = tokenStr(engine, id);
          return { token: ts, logprob: lpOut(lp), bytes: bytesOf(ts) };
        }),
      };
    }),
  };
}

function sseHeaders(reply: FastifyReply): void {
  reply.hijack();
  for (const [k, v] of Object.entries(reply.getHeaders())) if (v !== undefined) reply.raw.setHeader(k, v); // set by hooks (CORS)
  reply.raw.writeHead(200, {
    'content-type': 'text/event-stream; charset=utf-8',
    'cache-control': 'no-cache',
    connection: 'keep-alive',
    'x-accel-buffering': 'no',
  });
}

function sse(reply: FastifyReply, data: unknown): void {
  reply.raw.write(`data: ${typeof data === 'string' ? data : JSON.stringify(data)}\n\n`);
}

/** vLLM's cache_salt: requests share cached prefix blocks only with requests of the same salt. */
function cacheSaltOf(v: unknown): string | null {
  if (v === undefined || v === null) return null;
  if (typeof v !== 'string' || v.length === 0 || v.length > 1024) invalid('cache_salt', 'cache_salt must be a non-empty string of at most 1024 characters');
  return v as string;
}

/** OpenAI's usage object; cached_tokens (prompt tokens served from the prefix cache) always. */
function usageOf(run: GenerationRun) {
  return {
    prompt_tokens: run.promptTokens,
    completion_tokens: run.completionTokens,
    total_tokens: run.promptTokens + run.completionTokens,
    prompt_tokens_details: { cached_tokens: run.cachedTokens },
  };
}

/** Aborts a run's choices as soon as the client disconnects. */
function watchClient(req: FastifyRequest, reply: FastifyReply, run: GenerationRun) {
  const w = {
    gone: false,
    dispose: () => {
      reply.raw.off('close', onClose);
      req.raw.off('aborted', onClose);
    },
  };
  const onClose = () => {
    if (!reply.raw.writableFinished) {
      w.gone = true;
      run.abort();
    }
  };
  reply.raw.on('close', onClose);
  req.raw.on('aborted', onClose);
  return w;
}

/**
 * Streams a run's events as SSE chunks (`chunkOf` shapes one, or a list; null sends nothing), then the usage
 * chunk when asked and `[DONE]`. The headers go out with the first event: an error known before
 * the first token (a broken adapter, a prompt the pool can never hold) is the same 4xx JSON
 * response a non-streaming request gets. An error after that is an SSE error event in the same
 * OpenAI shape.
 */
async function streamRun(
  req: FastifyRequest,
  reply: FastifyReply,
  run: GenerationRun,
  done: () => void,
  preamble: () => unknown[],
  chunkOf: (e: ChoiceEvent) => unknown,
  usageChunk: (() => unknown) | null,
): Promise<FastifyReply> {
  const watch = watchClient(req, reply, run);
  const events = run.events();
  let first: IteratorResult<ChoiceEvent>;
  try {
    first = await events.next();
  } catch (err) {
    watch.dispose();
    done();
    throw err; // -> the error handler: a JSON error with its own status
  }
  let ok = !watch.gone;
  // stream_options.include_usage: every chunk carries usage: null, the totals come last (OpenAI).
  const send = (c: unknown) => sse(reply, usageChunk ? { ...(c as object), usage: null } : c);
  if (ok) {
    sseHeaders(reply);
    for (const c of preamble()) send(c);
    try {
      for (let it = first; !it.done && !watch.gone; it = await events.next()) {
        const c = chunkOf(it.value);
        if (Array.isArray(c)) for (const x of c) send(x);
        else if (c !== null) send(c);
      }
    } catch (err) {
      const { body } = toOpenAIError(err);
      sse(reply, body);
    }
    ok = !watch.gone;
    if (ok) {
      if (usageChunk) sse(reply, usageChunk());
      sse(reply, '[DONE]');
    }
    reply.raw.end();
  } else {
    await events.return(undefined);
  }
  watch.dispose();
  done();
  return reply;
}

/** Collects every choice's text, tokens and finish reason for a JSON body; null if the client left. */
async function collectRun(req: FastifyRequest, reply: FastifyReply, run: GenerationRun, n: number) {
  const texts = Array.from({ length: n }, () => '');
  const toks: TokenEvent[][] = Array.from({ length: n }, () => []);
  const finish: Array<string | null> = Array.from({ length: n }, () => null);
  const watch = watchClient(req, reply, run);
  try {
    for await (const e of run.events()) {
      if (watch.gone) break;
      texts[e.index] += e.text;
      for (const t of e.tokens) toks[e.index].push(t);
      if (e.finishReason) finish[e.index] = e.finishReason;
    }
  } finally {
    watch.dispose();
  }
  return watch.gone ? null : { texts, toks, finish };
}

export async function openaiRoutes(app: FastifyInstance, deps: OpenAIRouteDeps): Promise<void> {
  const { engine, metrics } = deps;

  app.post<{ Body: CompletionRequest }>('/v1/completions', { schema: { body: CompletionRequest } }, async (req, reply) => {
    const body = req.body;
    const t0 = performance.now();
    const adapter = resolveAdapter(engine, body.model);
    if (body.suffix) invalid('suffix', 'suffix is not supported');
    const n = choiceCount(body.n, deps.maxN);
    if (body.best_of != null && body.best_of !== n) invalid('best_of', 'best_of must equal n (or be omitted)');
    const logprobs = body.logprobs ?? null;
    if (logprobs !== null && (logprobs < 0 || logprobs > 20)) invalid('logprobs', 'logprobs must be an integer in [0, 20]');
    const vllmPromptLps = body.prompt_logprobs ?? null;
    if (vllmPromptLps !== null && !(Number.isInteger(vllmPromptLps) && vllmPromptLps >= 0 && vllmPromptLps <= 20))
      invalid('prompt_logprobs', 'prompt_logprobs must be an integer in [0, 20]');
    // Prompt logprobs are scored in the prefill: with echo they cover the prompt in `logprobs`,
    // and vLLM's prompt_logprobs returns them separately. Both need the whole prompt at once.
    const echoLps = body.echo === true && logprobs !== null;
    if (body.stream && echoLps) invalid('echo', 'echo with logprobs is not supported with stream; send stream: false');
    if (body.stream && vllmPromptLps !== null) invalid('prompt_logprobs', 'prompt_logprobs is not supported with stream; send stream: false');
    if (body.max_tokens === 0 && !body.echo) invalid('max_tokens', 'max_tokens 0 is only valid with echo (the prompt alone is returned)');
    const promptLps = echoLps || vllmPromptLps !== null ? Math.max(echoLps ? logprobs! : 0, vllmPromptLps ?? 0) : null;
    const stops = stopStrings(body.stop);
    // Fan-out is checked before any per-prompt work (tokenising): prompts alone, then prompts x n.
    const p0 = Array.isArray(body.prompt) ? body.prompt[0] : undefined;
    const numPrompts = typeof p0 === 'string' || Array.isArray(p0) ? body.prompt.length : 1;
    deps.admit(numPrompts, 'prompt');
    deps.admit(numPrompts * n, 'n');
    const prompts = normalizePrompts(engine, body.prompt);
    const grammar = await prepareGrammar(engine, structuredRequest(body as StructuredFields));
    const inputs: ChoiceInput[] = [];
    for (const p of prompts) {
      // max_tokens absent: 16, as OpenAI's and vLLM's completions default.
      const params = samplingParams(engine, body, body.max_tokens ?? Math.max(1, Math.min(16, engine.maxModelLen - p.ids.length)), 'max_tokens', p.ids.length, logprobs, promptLps);
      params.grammar = grammar;
      for (let k = 0; k < n; k++) inputs.push({ promptIds: p.ids, params: { ...params, seed: choiceSeed(params.seed, k) }, stops });
    }
    const run = new GenerationRun(engine, inputs, adapter, cacheSaltOf(body.cache_salt));
    const id = `cmpl-${randomUUID().replace(/-/g, '')}`;
    const created = now();
    const echoText = (i: number) => (body.echo ? (prompts[Math.floor(i / n)].text ?? engine.tokenizer.decode(prompts[Math.floor(i / n)].ids, false)) : '');
    const usage = () => usageOf(run);
    req.loraplex = { model: body.model, adapter, run };

    if (body.stream) {
      const echoed = new Set<number>();
      const sent = inputs.map(() => 0); // characters streamed per choice (logprobs text_offset)
      return streamRun(req, reply, run, () => metrics.requestDone(run, 'stream', t0), () => [], (e) => {
        let text = e.text;
        if (!echoed.has(e.index)) (echoed.add(e.index), (text = echoText(e.index) + text));
        // One chunk per engine step that produced tokens, even when they decode to no text yet
        // (a held-back partial character): clients see progress and time tokens.
        if (text === '' && !e.finishReason && e.tokens.length === 0) return null;
        const offset = sent[e.index];
        sent[e.index] += text.length;
        return {
          id, object: 'text_completion', created, model: body.model,
          choices: [{ index: e.index, text, logprobs: logprobs !== null ? completionLogprobs(engine, e.tokens, offset) : null, finish_reason: e.finishReason, stop_reason: null }],
        };
      }, body.stream_options?.include_usage ? () => ({ id, object: 'text_completion', created, model: body.model, choices: [], usage: usage() }) : null);
    }

    const out = await collectRun(req, reply, run, inputs.length);
    metrics.requestDone(run, 'json', t0);
    if (!out) return reply;
    const choiceLogprobs = (i: number) => {
      if (logprobs === null) return null;
      if (!echoLps) return completionLogprobs(engine, out.toks[i], echoText(i).length);
      const seq = run.streams[i].seq;
      const head = promptCompletionLogprobs(engine, seq.promptIds, seq.promptLogprobs, logprobs);
      const end = head.text_offset.length ? head.text_offset[head.text_offset.length - 1] + head.tokens[head.tokens.length - 1].length : 0;
      return completionLogprobs(engine, out.toks[i], end, head);
    };
    return {
      id, object: 'text_completion', created, model: body.model,
      choices: out.texts.map((text, i) => ({
        index: i,
        text: echoText(i) + text,
        logprobs: choiceLogprobs(i),
        finish_reason: out.finish[i],
        stop_reason: null,
        ...(vllmPromptLps !== null ? { prompt_logprobs: vllmPromptLogprobs(engine, run.streams[i].seq.promptIds, run.streams[i].seq.promptLogprobs, vllmPromptLps) } : {}),
      })),
      usage: usage(),
    };
  });

  app.post<{ Body: ChatCompletionRequest }>('/v1/chat/completions', { schema: { body: ChatCompletionRequest } }, async (req, reply) => {
    const body = req.body;
    const t0 = performance.now();
    const adapter = resolveAdapter(engine, body.model);
    const tools = toolPlan(body, deps.tools ?? { enableAutoToolChoice: false, toolCallParser: null });
    const structured = structuredRequest(body as StructuredFields);
    if (structured && tools && tools.mode !== 'none')
      invalid(structured.param.split('.')[0], 'a response format cannot be combined with tool calls; send tool_choice "none" or drop the response format');
    const messages: TplMessage[] = templateMessages(body.messages);
    const n = choiceCount(body.n, deps.maxN);
    const topLogprobs = body.top_logprobs ?? null;
    if (topLogprobs !== null && (topLogprobs < 0 || topLogprobs > 20)) invalid('top_logprobs', 'top_logprobs must be an integer in [0, 20]');
    if (topLogprobs !== null && !body.logprobs) invalid('top_logprobs', 'top_logprobs requires logprobs: true');
    const logprobs = body.logprobs ? (topLogprobs ?? 0) : null;
    const stops = stopStrings(body.stop);
    if (!engine.tokenizer.hasChatTemplate) invalid('messages', 'this model has no chat template; use /v1/completions', 'no_chat_template');
    const ids = engine.tokenizer.encodeChat(messages, body.add_generation_prompt ?? true, tools && tools.mode !== 'none' ? { tools: tools.templateTools } : {});
    // Absent: the rest of the context, capped by generation_config.json's max_new_tokens (as vLLM).
    const genCap = engine.model.maxNewTokens;
    const maxTokens = body.max_completion_tokens ?? body.max_tokens ?? (genCap !== null ? Math.max(1, Math.min(genCap, engine.maxModelLen - ids.length)) : null);
    const params = samplingParams(engine, body, maxTokens, body.max_completion_tokens != null ? 'max_completion_tokens' : 'max_tokens', ids.length, logprobs);
    deps.admit(n, 'n');
    const toolSpec = tools ? toolGrammar(tools) : null;
    params.grammar = await prepareGrammar(engine, toolSpec ? { spec: toolSpec, param: tools!.mode === 'named' ? 'tool_choice' : 'tools' } : structured);
    const toolMode = tools?.mode ?? 'none';
    const inputs: ChoiceInput[] = Array.from({ length: n }, (_, k) => ({ promptIds: ids, params: { ...params, seed: choiceSeed(params.seed, k) }, stops }));
    const run = new GenerationRun(engine, inputs, adapter, cacheSaltOf(body.cache_salt));
    const id = `chatcmpl-${randomUUID().replace(/-/g, '')}`;
    const created = now();
    const usage = () => usageOf(run);
    req.loraplex = { model: body.model, adapter, run };

    if (body.stream) {
      const chunk = (choices: unknown[]) => ({ id, object: 'chat.completion.chunk', created, model: body.model, choices });
      const roles = () => Array.from({ length: n }, (_, i) => chunk([{ index: i, delta: { role: 'assistant', content: toolMode === 'none' || toolMode === 'auto' ? '' : null }, logprobs: null, finish_reason: null }]));
      // Tool calls stream as OpenAI's: a named call's arguments as they are generated (its first
      // delta carries id, type and name); required and auto calls once the choice has finished,
      // each call one delta with its index. In auto mode the text before a call streams as content.
      const callIds: Array<string | null> = Array.from({ length: n }, () => null);
      const toolStreams = Array.from({ length: n }, () => new ToolCallStream(tools!));
      return streamRun(req, reply, run, () => metrics.requestDone(run, 'stream', t0), roles, (e) => {
        if (e.text === '' && !e.finishReason && e.tokens.length === 0) return null;
        if (toolMode === 'named') {
          const lp = logprobs !== null ? chatLogprobs(engine, e.tokens) : null;
          const finish = e.finishReason === 'stop' ? 'stop' : e.finishReason;
          if (e.text === '') return chunk([{ index: e.index, delta: {}, logprobs: lp, finish_reason: finish }]);
          const first = callIds[e.index] === null;
          if (first) callIds[e.index] = toolCallId();
          const call = first
            ? { index: 0, id: callIds[e.index], type: 'function', function: { name: tools!.named, arguments: e.text } }
            : { index: 0, function: { arguments: e.text } };
          return chunk([{ index: e.index, delta: { tool_calls: [call] }, logprobs: lp, finish_reason: finish }]);
        }
        if (toolMode !== 'none') {
          const d = toolStreams[e.index].push(e.text, e.finishReason);
          const choices: unknown[] = [];
          if (d.content !== null) choices.push({ index: e.index, delta: { content: d.content }, logprobs: null, finish_reason: null });
          d.calls.forEach((c, k) =>
            choices.push({ index: e.index, delta: { tool_calls: [{ index: k, id: toolCallId(), type: 'function', function: { name: c.name, arguments: c.arguments } }] }, logprobs: null, finish_reason: null }));
          if (e.finishReason) choices.push({ index: e.index, delta: {}, logprobs: null, finish_reason: d.finishReason });
          return choices.length ? choices.map((c) => chunk([c])) : null;
        }
        const delta = e.text === '' && e.finishReason ? {} : { content: e.text };
        return chunk([{ index: e.index, delta, logprobs: logprobs !== null ? chatLogprobs(engine, e.tokens) : null, finish_reason: e.finishReason }]);
      }, body.stream_options?.include_usage ? () => ({ id, object: 'chat.completion.chunk', created, model: body.model, choices: [], usage: usage() }) : null);
    }

    const out = await collectRun(req, reply, run, inputs.length);
    metrics.requestDone(run, 'json', t0);
    if (!out) return reply;
    const messageOf = (text: string, i: number) => {
      if (toolMode === 'none') return { message: { role: 'assistant', content: text }, finish: out.finish[i] };
      const r = parseToolOutput(tools!, text);
      if (r.calls.length === 0) return { message: { role: 'assistant', content: text }, finish: out.finish[i] };
      const tool_calls = r.calls.map((c) => ({ id: toolCallId(), type: 'function', function: { name: c.name, arguments: c.arguments } }));
      // A named tool_choice finishes with stop (OpenAI); required and auto calls with tool_calls.
      const finish = out.finish[i] === 'stop' && toolMode !== 'named' ? 'tool_calls' : out.finish[i];
      return { message: { role: 'assistant', content: r.content, tool_calls }, finish };
    };
    return {
      id, object: 'chat.completion', created, model: body.model,
      choices: out.texts.map((text, i) => {
        const m = messageOf(text, i);
        return { index: i, message: m.message, logprobs: logprobs !== null ? chatLogprobs(engine, out.toks[i]) : null, finish_reason: m.finish };
      }),
      usage: usage(),
    };
  });
}

/** Compiles (or finds cached) the request's grammar; waits off the event loop, 400s name the parameter. */
async function prepareGrammar(engine: Engine, s: { spec: Parameters<Engine['grammars']['prepare']>[0]; param: string } | null): Promise<GrammarRef | null> {
  return s ? engine.grammars.prepare(s.spec, s.param) : null;
}

declare module 'fastify' {
  interface FastifyRequest {
    loraplex?: { model: string; adapter: string | null; run: GenerationRun };
  }
}

export { LoraplexError };
