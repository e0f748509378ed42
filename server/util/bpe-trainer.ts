// A small, deterministic byte-level BPE trainer. It produces a Hugging Face `tokenizer.json`
// object (GPT-2 style byte-level BPE: ByteLevel pre-tokenizer and decoder, a TemplateProcessing
// post-processor that prepends BOS) that loads in both the Rust `tokenizers` library and
// `@huggingface/tokenizers`. Meant for generated models (demo, tests, benchmarks), not for
// training production tokenizers: every merge recounts all pairs.

/** GPT-2's pre-tokenization regex, the one the ByteLevel pre-tokenizer uses when use_regex is true. */
const GPT2_SPLIT = /'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+/gu;

/** GPT-2's reversible byte -> printable character table (byte b maps to BYTE_TO_CHAR[b]). */
export const BYTE_TO_CHAR: readonly string[] = (() => {
  const printable: number[] = [];
  for (let b = 0x21; b <= 0x7e; b++) printable.push(b);
  for (let b = 0xa1; b <= 0xac; b++) printable.push(b);
  for (let b = 0xae; b <= 0xff; b++) printable.push(b);
  const table: string[] = new Array<string>(256);
  const isPrintable = new Set(printable);
  let next = 0;
  for (let b = 0; b < 256; b++) {
    table[b] = String.fromCodePoint(isPrintable.has(b) ? b : 256 + next++);
  }
  return table;
})();

export interface BpeTrainOptions {
  /** Size of the BPE model's vocabulary (256 byte tokens + merges); special tokens come on top. */
  vocabSize: number;
  /** Special tokens, appended after the BPE vocabulary (ids vocabSize, vocabSize + 1, ...). */
  specialTokens?: string[];
  /** Special token the post-processor prepends to single sequences (and to each of a pair). */
  bosToken?: string;
  /** Pairs seen fewer times than this are never merged (training stops early). Default 2. */
  minFrequency?: number;
}

export interface AddedTokenJson {
  id: number;
  content: string;
  single_word: boolean;
  lstrip: boolean;
  rstrip: boolean;
  normalized: boolean;
  special: boolean;
}

/** The subset of Hugging Face's tokenizer.json that this trainer writes. */
export interface TokenizerJson {
  version: '1.0';
  truncation: null;
  padding: null;
  added_tokens: AddedTokenJson[];
  normalizer: null;
  pre_tokenizer: { type: 'ByteLevel'; add_prefix_space: false; trim_offsets: true; use_regex: true };
  post_processor: Record<string, unknown> | null;
  decoder: { type: 'ByteLevel'; add_prefix_space: true; trim_offsets: true; use_regex: true };
  model: {
    type: 'BPE';
    dropout: null;
    unk_token: null;
    continuing_subword_prefix: null;
    end_of_word_suffix: null;
    fuse_unk: false;
    byte_fallback: false;
    ignore_merges: false;
    vocab: Record<string, number>;
    merges: string[];
  };
}

/** Splits text the way the ByteLevel pre-tokenizer does and maps each piece to byte characters. */
export function preTokenize(text: string): string[] {
  const pieces = text.match(GPT2_SPLIT) ?? [];
  return pieces.map(toByteChars);
}

function toByteChars(piece: string): string {
  let out = '';
  for (const b of Buffer.from(piece, 'utf8')) out += BYTE_TO_CHAR[b];
  return out;
}

/**
 * Trains byte-level BPE on `corpus`. Deterministic: the most frequent pair wins, ties go to the
 * pair whose "left right" string sorts first (code unit order).
 */
export function trainBpe(corpus: string | string[], options: BpeTrainOptions): TokenizerJson {
  const texts = typeof corpus === 'string' ? [corpus] : corpus;
  const minFrequency = options.minFrequency ?? 2;
  if (options.vocabSize < 256) throw new Error(`vocabSize ${options.vocabSize} is below the 256 byte tokens`);

  // Unique pre-tokenized words with their counts, each as a list of symbols.
  const wordCounts = new Map<string, number>();
  for (const text of texts) {
    for (const w of preTokenize(text)) wordCounts.set(w, (wordCounts.get(w) ?? 0) + 1);
  }
  const words: { symbols: string[]; count: number }[] = [...wordCounts.entries()]
    .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
    .map(([w, count]) => ({ symbols: [...w], count }));

  const vocab: Record<string, number> = {};
  let nextId = 0;
  for (const ch of BYTE_TO_CHAR) vocab[ch] = nextId++;
  const merges: string[] = [];

  while (nextId < options.vocabSize) {
    const pairCounts = new Map<string, number>();
    for (const { symbols, count } of words) {
      for (let i = 0; i + 1 < symbols.length; i++) {
        const key = `${symbols[i]} ${symbols[i + 1]}`;
        pairCounts.set(key, (pairCounts.get(key) ?? 0) + count);
      }
    }
    let best: string | null = null;
    let bestCount = 0;
    for (const [key, count] of pairCounts) {
      if (count > bestCount || (count === bestCount && best !== null && key < best)) {
        best = key;
        bestCount = count;
      }
    }
    if (best === null || bestCount < minFrequency) break;
    const [left, right] = best.split(' ') as [string, string];
    const merged = left + right;
    merges.push(best);
    if (!(merged in vocab)) vocab[merged] = nextId++;
    for (const word of words) word.symbols = applyMerge(word.symbols, left, right, merged);
  }

  const specials = options.specialTokens ?? [];
  const added_tokens: AddedTokenJson[] = specials.map((content, i) => ({
    id: nextId + i,
    content,
    single_word: false,
    lstrip: false,
    rstrip: false,
    normalized: false,
    special: true,
  }));

  let post_processor: Record<string, unknown> | null = null;
  if (options.bosToken !== undefined) {
    const bos = added_tokens.find((t) => t.content === options.bosToken);
    if (!bos) throw new Error(`bosToken ${options.bosToken} is not among the special tokens`);
    const special = { SpecialToken: { id: bos.content, type_id: 0 } };
    post_processor = {
      type: 'TemplateProcessing',
      single: [special, { Sequence: { id: 'A', type_id: 0 } }],
      pair: [special, { Sequence: { id: 'A', type_id: 0 } }, { SpecialToken: { id: bos.content, type_id: 1 } }, { Sequence: { id: 'B', type_id: 1 } }],
      special_tokens: { [bos.content]: { id: bos.content, ids: [bos.id], tokens: [bos.content] } },
    };
  }

  return {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens,
    normalizer: null,
    pre_tokenizer: { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: true },
    post_processor,
    decoder: { type: 'ByteLevel', add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: false,
      vocab,
      merges,
    },
  };
}

function applyMerge(symbols: string[], left: string, right: string, merged: string): string[] {
  let out: string[] | null = null;
  for (let i = 0; i < symbols.length; i++) {
    if (i + 1 < symbols.length && symbols[i] === left && symbols[i + 1] === right) {
      out ??= symbols.slice(0, i);
      out.push(merged);
      i++;
    } else if (out) {
      out.push(symbols[i]!);
    }
  }
  return out ?? symbols;
}

/** Total number of ids a trained tokenizer uses (BPE vocabulary plus added tokens). */
export function tokenizerVocabSize(tokenizer: TokenizerJson): number {
  let max = -1;
  for (const id of Object.values(tokenizer.model.vocab)) max = Math.max(max, id);
  for (const t of tokenizer.added_tokens) max = Math.max(max, t.id);
  return max + 1;
}

export interface TokenizerConfigOptions {
  bosToken?: string;
  eosToken?: string;
  chatTemplate?: string;
  modelMaxLength?: number;
}

/** A `tokenizer_config.json` object matching `tokenizer` (as transformers writes one). */
export function buildTokenizerConfig(tokenizer: TokenizerJson, options: TokenizerConfigOptions = {}): Record<string, unknown> {
  const added_tokens_decoder: Record<string, Omit<AddedTokenJson, 'id'>> = {};
  for (const { id, ...rest } of tokenizer.added_tokens) {
    added_tokens_decoder[String(id)] = {
      content: rest.content,
      lstrip: rest.lstrip,
      normalized: rest.normalized,
      rstrip: rest.rstrip,
      single_word: rest.single_word,
      special: rest.special,
    };
  }
  const config: Record<string, unknown> = {
    added_tokens_decoder,
    bos_token: options.bosToken ?? null,
    eos_token: options.eosToken ?? null,
    clean_up_tokenization_spaces: false,
    model_input_names: ['input_ids', 'attention_mask'],
    model_max_length: options.modelMaxLength ?? 2048,
    tokenizer_class: 'PreTrainedTokenizerFast',
  };
  if (options.chatTemplate !== undefined) config['chat_template'] = options.chatTemplate;
  return config;
}
