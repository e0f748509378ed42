// Tokenizer (tokenizer.json via @huggingface/tokenizers), chat template (@huggingface/jinja) and
// incremental detokenisation that never splits a multi-byte character.
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Tokenizer } from '@huggingface/tokenizers';
import { Template } from '@huggingface/jinja';
import { LoraplexError, ModelLoadError } from './errors.js';

export interface ChatMessage {
  role: string;
  content: string;
  /** An assistant turn's tool calls (arguments as an object where they parse, as templates expect). */
  tool_calls?: Array<{ id: string; type: 'function'; function: { name: string; arguments: unknown } }>;
  /** A tool result's call id and function name. */
  tool_call_id?: string;
  name?: string;
}

function readJsonFile(path: string): Record<string, unknown> {
  try {
    return JSON.parse(readFileSync(path, 'utf8')) as Record<string, unknown>;
  } catch (e) {
    throw new ModelLoadError(`${path}: ${(e as Error).message}`);
  }
}

function tokenText(v: unknown): string | null {
  if (typeof v === 'string') return v;
  if (v && typeof v === 'object' && typeof (v as { content?: unknown }).content === 'string')
    return (v as { content: string }).content;
  return null;
}

export class TextTokenizer {
  private readonly tok: Tokenizer;
  private readonly template: Template | null;
  readonly bosToken: string | null;
  readonly eosToken: string | null;
  readonly specialIds: Set<number>;
  /** tokenizer_config.json as read ({} when absent): GET /tokenizer_info reports it. */
  readonly config: Readonly<Record<string, unknown>>;
  /** The chat template in use (the "default" of a named list), or null. */
  readonly chatTemplate: string | null;

  constructor(readonly dir: string) {
    const tjPath = join(dir, 'tokenizer.json');
    if (!existsSync(tjPath)) throw new ModelLoadError(`${tjPath}: missing tokenizer.json`);
    const tj = readJsonFile(tjPath);
    const cfgPath = join(dir, 'tokenizer_config.json');
    const cfg = existsSync(cfgPath) ? readJsonFile(cfgPath) : {};
    this.config = cfg;
    try {
      this.tok = new Tokenizer(tj, cfg);
    } catch (e) {
      throw new ModelLoadError(`${tjPath}: cannot build tokenizer (${(e as Error).message})`);
    }
    this.bosToken = tokenText(cfg.bos_token);
    this.eosToken = tokenText(cfg.eos_token);
    let chatTemplate: unknown = cfg.chat_template;
    const jinjaPath = join(dir, 'chat_template.jinja');
    if (chatTemplate == null && existsSync(jinjaPath)) chatTemplate = readFileSync(jinjaPath, 'utf8');
    if (Array.isArray(chatTemplate)) {
      // [{name, template}]: use "default"
      const def = chatTemplate.find((t: { name?: string }) => t.name === 'default') ?? chatTemplate[0];
      chatTemplate = def?.template;
    }
    this.chatTemplate = typeof chatTemplate === 'string' ? chatTemplate : null;
    this.template = this.chatTemplate !== null ? new Template(this.chatTemplate) : null;
    this.specialIds = new Set<number>();
    for (const [id, t] of this.tok.get_added_tokens_decoder()) if (t.special) this.specialIds.add(id);
  }

  get hasChatTemplate(): boolean {
    return this.template !== null;
  }

  encode(text: string, addSpecialTokens = true): number[] {
    return this.tok.encode(text, { add_special_tokens: addSpecialTokens }).ids;
  }

  decode(ids: number[], skipSpecialTokens = true): string {
    if (ids.length === 0) return '';
    return this.tok.decode(ids, { skip_special_tokens: skipSpecialTokens, clean_up_tokenization_spaces: false });
  }

  tokenToId(token: string): number | undefined {
    return this.tok.token_to_id(token);
  }

  idToToken(id: number): string | undefined {
    return this.tok.id_to_token(id);
  }

  /**
   * Renders the chat template as transformers' apply_chat_template(tokenize=False) does.
   * `continueFinalMessage`: the text ends with the last message's content, open-ended (the
   * template's end-of-turn after it is cut, as transformers cuts it); a 400 if the rendered text
   * does not contain that content.
   */
  applyChatTemplate(messages: ChatMessage[], addGenerationPrompt = true, continueFinalMessage = false, tools?: unknown[]): string {
    if (!this.template) throw new ModelLoadError(`${this.dir}: the tokenizer has no chat_template`, 400, 'no_chat_template');
    const text = this.template.render({
      messages,
      add_generation_prompt: addGenerationPrompt,
      bos_token: this.bosToken ?? '',
      eos_token: this.eosToken ?? '',
      ...(tools ? { tools } : {}),
    });
    if (!continueFinalMessage || messages.length === 0) return text;
    const last = messages[messages.length - 1].content;
    const at = text.lastIndexOf(last.trim());
    if (last.trim() === '' || at < 0)
      throw new LoraplexError('continue_final_message is set but the final message does not appear in the chat after applying the chat template',
        400, 'invalid_request_error', 'continue_final_message', 'invalid_value');
    // As transformers: the template kept the message's spacing (or it has none), or trimmed it.
    const keep = text.slice(at, at + last.trimStart().length) === last ? last.trimStart().length : last.trim().length;
    return text.slice(0, at + keep);
  }

  /**
   * Token ids of a chat, as apply_chat_template(tokenize=True): the template adds specials itself
   * (`addSpecialTokens` adds the tokenizer's own on top, as vLLM's /tokenize option does).
   */
  encodeChat(messages: ChatMessage[], addGenerationPrompt = true, opts: { continueFinalMessage?: boolean; addSpecialTokens?: boolean; tools?: unknown[] } = {}): number[] {
    return this.encode(this.applyChatTemplate(messages, addGenerationPrompt, opts.continueFinalMessage ?? false, opts.tools), opts.addSpecialTokens ?? false);
  }
}

/**
 * Incremental detokeniser: decodes a growing id list and emits only text that is final, holding
 * back an incomplete UTF-8 sequence (decoded as U+FFFD at the end) until the next token completes it.
 */
export class IncrementalDecoder {
  private ids: number[] = [];
  private emitted = '';
  // Decode from a window of recent tokens rather than the whole output, so each step is O(1).
  private prefixStart = 0;
  private readStart = 0;

  constructor(
    private readonly tok: TextTokenizer,
    private readonly skipSpecial = true,
  ) {}

  /** Appends tokens and returns the newly final text (possibly ''). */
  push(newIds: number[]): string {
    this.ids.push(...newIds);
    const prefix = this.tok.decode(this.ids.slice(this.prefixStart, this.readStart), this.skipSpecial);
    const full = this.tok.decode(this.ids.slice(this.prefixStart), this.skipSpecial);
    if (full.length > prefix.length && !full.endsWith('\uFFFD')) {
      const delta = full.slice(prefix.length);
      this.prefixStart = this.readStart;
      this.readStart = this.ids.length;
      this.emitted += delta;
      return delta;
    }
    return '';
  }

  /** Flushes anything held back (an incomplete character at the very end becomes U+FFFD). */
  flush(): string {
    const prefix = this.tok.decode(this.ids.slice(this.prefixStart, this.readStart), this.skipSpecial);
    const full = this.tok.decode(this.ids.slice(this.prefixStart), this.skipSpecial);
    this.prefixStart = this.readStart = this.ids.length;
    const delta = full.length > prefix.length ? full.slice(prefix.length) : '';
    this.emitted += delta;
    return delta;
  }

  get text(): string {
    return this.emitted;
  }
}
