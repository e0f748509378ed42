// Tokenizer (tokenizer.json via @huggingface/tokenizers), chat template (@huggingface/jinja) and
// incremental detokenisation that never splits a multi-byte character.
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Tokenizer } from '@huggingface/tokenizers';
import { Template } from '@huggingface/jinja';
import { ModelLoadError } from './errors.js';

export interface ChatMessage {
  role: string;
  content: string;
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

  constructor(readonly dir: string) {
    const tjPath = join(dir, 'tokenizer.json');
    if (!existsSync(tjPath)) throw new ModelLoadError(`${tjPath}: missing tokenizer.json`);
    const tj = readJsonFile(tjPath);
    const cfgPath = join(dir, 'tokenizer_config.json');
    const cfg = existsSync(cfgPath) ? readJsonFile(cfgPath) : {};
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
    this.template = typeof chatTemplate === 'string' ? new Template(chatTemplate) : null;
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

  /** Renders the chat template as transformers' apply_chat_template(tokenize=False) does. */
  applyChatTemplate(messages: ChatMessage[], addGenerationPrompt = true): string {
    if (!this.template) throw new ModelLoadError(`${this.dir}: the tokenizer has no chat_template`, 400, 'no_chat_template');
    return this.template.render({
      messages,
      add_generation_prompt: addGenerationPrompt,
      bos_token: this.bosToken ?? '',
      eos_token: this.eosToken ?? '',
    });
  }

  /** Token ids of a chat, as apply_chat_template(tokenize=True): the template adds specials itself. */
  encodeChat(messages: ChatMessage[], addGenerationPrompt = true): number[] {
    return this.encode(this.applyChatTemplate(messages, addGenerationPrompt), false);
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
