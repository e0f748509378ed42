import { spawnSync } from 'node:child_process';
import { Tokenizer } from '@huggingface/tokenizers';
import { describe, expect, it } from 'vitest';
import { BYTE_TO_CHAR, buildTokenizerConfig, preTokenize, tokenizerVocabSize, trainBpe } from '../../server/util/bpe-trainer.js';

const CORPUS = [
  'The quick brown fox jumps over the lazy dog. The dog sleeps, and the fox runs away.',
  "It's a small world: the fox and the dog are friends now, and they'll play again tomorrow.",
  'Numbers like 123 and 4567 appear too, as do tabs\tand\nnew lines.',
];
const SPECIALS = ['<|bos|>', '<|eos|>'];

function train() {
  return trainBpe(CORPUS, { vocabSize: 300, specialTokens: SPECIALS, bosToken: '<|bos|>', minFrequency: 1 });
}

function load() {
  const json = train();
  return { json, tok: new Tokenizer(json, buildTokenizerConfig(json, { bosToken: '<|bos|>', eosToken: '<|eos|>' })) };
}

const SAMPLES = [
  'The fox and the dog.',
  'héllo wörld — naïve café',
  '日本語のテキスト',
  'emoji 😀🏴‍☠️👍🏽 mixed',
  "  two leading spaces, it's\n\nnew paragraph\ttab 42",
  'unseen zyxwvq words',
];

describe('trainBpe', () => {
  it('is deterministic and lays out bytes, merges and special tokens', () => {
    const a = train();
    expect(JSON.stringify(train())).toBe(JSON.stringify(a));
    expect(BYTE_TO_CHAR.length).toBe(256);
    expect(new Set(BYTE_TO_CHAR).size).toBe(256);
    BYTE_TO_CHAR.forEach((ch, b) => expect(a.model.vocab[ch]).toBe(b));
    expect(a.model.merges.length).toBe(Object.keys(a.model.vocab).length - 256 + countDuplicateMerges(a.model.merges));
    expect(a.added_tokens.map((t) => [t.id, t.content, t.special])).toEqual([
      [300, '<|bos|>', true],
      [301, '<|eos|>', true],
    ]);
    expect(tokenizerVocabSize(a)).toBe(302);
    expect(a.model.vocab['Ġthe']).toBeDefined();
  });

  it('splits like the ByteLevel pre-tokenizer', () => {
    expect(preTokenize("Hi there, it's 42!")).toEqual(['Hi', 'Ġthere', ',', 'Ġit', "'s", 'Ġ42', '!']);
  });

  it('loads in @huggingface/tokenizers, prepends BOS and round-trips text', () => {
    const { tok } = load();
    const bos = tok.token_to_id('<|bos|>');
    expect(bos).toBe(300);
    for (const text of SAMPLES) {
      const enc = tok.encode(text);
      expect(enc.ids[0]).toBe(bos);
      expect(enc.ids.every((id: number) => id >= 0 && id < 302)).toBe(true);
      expect(tok.decode(enc.ids, { skip_special_tokens: true })).toBe(text);
      expect(tok.decode(tok.encode(text, { add_special_tokens: false }).ids)).toBe(text);
    }
    // Frequent words are single tokens; special tokens in the text are matched whole.
    expect(tok.encode(' the', { add_special_tokens: false }).ids).toEqual([tok.token_to_id('Ġthe')]);
    expect(tok.encode('a<|eos|>', { add_special_tokens: false }).ids).toEqual([tok.token_to_id('a'), 301]);
  });

  it.skipIf(!hasPythonTokenizers())('gives the same ids as Python tokenizers', () => {
    const { json, tok } = load();
    const script = [
      'import json, sys',
      'from tokenizers import Tokenizer',
      'data = json.load(sys.stdin)',
      't = Tokenizer.from_str(data["tokenizer"])',
      'print(json.dumps([t.encode(s).ids for s in data["texts"]]))',
    ].join('\n');
    const run = spawnSync('python3', ['-c', script], {
      input: JSON.stringify({ tokenizer: JSON.stringify(json), texts: SAMPLES }),
      encoding: 'utf8',
      timeout: 30_000,
    });
    expect(run.status, run.stderr).toBe(0);
    const pyIds = JSON.parse(run.stdout) as number[][];
    expect(pyIds).toEqual(SAMPLES.map((s) => tok.encode(s).ids));
  });
});

function countDuplicateMerges(merges: string[]): number {
  const seen = new Set<string>();
  let dup = 0;
  for (const m of merges) {
    const merged = m.replace(' ', '');
    if (seen.has(merged)) dup++;
    seen.add(merged);
  }
  return dup;
}

function hasPythonTokenizers(): boolean {
  const r = spawnSync('python3', ['-c', 'import tokenizers'], { timeout: 20_000 });
  return r.status === 0;
}
