// lm-evaluation-harness end to end: `local-completions` against a real loraplex server (child
// process, fp32 throughout) on two local tasks (tasks/: a multiple-choice loglikelihood task and a
// generate_until task), compared with the same evaluation run in process by lm-eval's `hf` model
// (transformers + PEFT) on the same demo model and adapter. Every sample must agree: the same
// choice picked, per-choice loglikelihoods within 1e-3, the same generated text, hence the same
// acc / acc_norm / exact_match.
//
// Slow (about a minute of CPU across two processes), so it is not in `npm test`: run
// `bash test/lm-eval/setup.sh` once, then `npm run test:lm-eval` (README.md beside this file).
//
// How lm-eval tokenizes decides which HF run a server run must equal:
//   - remote tokenizer (lm-eval 0.4.13 detects GET /tokenizer_info + POST /tokenize), token-id
//     requests: lm-eval encodes without BOS, so it equals `hf` with add_bos_token=False.
//   - HF tokenizer from the model directory with add_bos_token=True, token-id requests: equals
//     `hf` as it runs by default (the tokenizer's post-processor prepends BOS).
//   - remote tokenizer with tokenized_requests=False (text prompts): lm-eval counts the context
//     without BOS, but the server (like vLLM) prepends BOS to a text prompt, so lm-eval's slice
//     `token_logprobs[ctxlen:-1]` also takes the context's last token: every choice of a document
//     is shifted by the same constant. acc and the generations still equal `hf`'s default run;
//     the loglikelihoods do not (lm-eval's behaviour with BOS-adding tokenizers, not the server's).
import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureDemoModel } from '../../server/demo/demo-model.js';
import { ROOT } from '../helpers/fixtures.js';
import { startChildServer, type ChildServer } from '../helpers/server.js';

const PY = process.env.LORAPLEX_PYTHON ?? 'python3';
const RUN_EVAL = join(ROOT, 'test', 'lm-eval', 'run_eval.py');
const LL_TOL = 1e-3;
const ADAPTER = 'pirate';

interface Sample {
  doc_id: number;
  target: string | number;
  resps: unknown[][];
  filtered_resps: unknown[];
  acc?: number;
  acc_norm?: number;
  exact_match?: number;
}
interface EvalOut {
  seconds: number;
  results: Record<string, Record<string, number>>;
  samples: Record<string, Sample[]>;
}
type Runs = Record<string, EvalOut>;

function python(args: string[], timeoutMs: number): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(PY, args, { cwd: ROOT, timeout: timeoutMs, maxBuffer: 64 << 20, env: { ...process.env, OMP_NUM_THREADS: '1' } }, (err, stdout, stderr) => {
      if (err) reject(new Error(`${PY} ${args.slice(0, 2).join(' ')} failed: ${err.message}\n${stderr.slice(-4000)}`));
      else resolve(stdout);
    });
  });
}

/** Runs named lm-eval evaluations in one Python process (one import of torch and lm-eval). */
async function evaluate(runs: Array<{ name: string; model: string; model_args: string }>, out: string): Promise<Runs> {
  await python([RUN_EVAL, '--runs', JSON.stringify(runs), '--out', out], 540_000);
  return JSON.parse(readFileSync(out, 'utf8')) as Runs;
}

/** The per-choice loglikelihoods of a multiple-choice sample: resps is [[[ll, is_greedy]], ...]. */
const lls = (s: Sample) => s.resps.map((r) => Number((r[0] as [number, boolean])[0]));
const greedy = (s: Sample) => s.resps.map((r) => Boolean((r[0] as [number, boolean])[1]));

/** Per-sample agreement of a server run with an HF run; returns the largest loglikelihood gap. */
function expectSameEval(server: EvalOut, hf: EvalOut, where: string, opts: { constantShift?: boolean } = {}): number {
  let worst = 0;
  const mc = server.samples.loraplex_mc;
  expect(mc.length, `${where}: MC docs`).toBe(hf.samples.loraplex_mc.length);
  mc.forEach((s, i) => {
    const h = hf.samples.loraplex_mc[i];
    const w = `${where} loraplex_mc doc ${s.doc_id}`;
    expect(s.doc_id).toBe(h.doc_id);
    expect(s.acc, `${w}: acc`).toBe(h.acc);
    const a = lls(s);
    const b = lls(h);
    expect(a.length).toBe(b.length);
    const d = a.map((x, k) => x - b[k]);
    if (opts.constantShift) {
      // The same extra token in every choice: the differences agree with each other.
      expect(Math.max(...d) - Math.min(...d), `${w}: shift spread ${JSON.stringify(d)}`).toBeLessThan(LL_TOL);
    } else {
      for (const [k, x] of d.entries()) expect(Math.abs(x), `${w}: choice ${k} ll ${a[k]} vs ${b[k]}`).toBeLessThan(LL_TOL);
      expect(s.acc_norm, `${w}: acc_norm`).toBe(h.acc_norm);
      expect(greedy(s), `${w}: is_greedy`).toEqual(greedy(h));
    }
    worst = Math.max(worst, ...d.map(Math.abs));
  });
  const gen = server.samples.loraplex_gen;
  expect(gen.length, `${where}: generate_until docs`).toBe(hf.samples.loraplex_gen.length);
  gen.forEach((s, i) => {
    const h = hf.samples.loraplex_gen[i];
    expect(s.filtered_resps, `${where} loraplex_gen doc ${s.doc_id}: generated text`).toEqual(h.filtered_resps);
    expect(s.exact_match, `${where} loraplex_gen doc ${s.doc_id}: exact_match`).toBe(h.exact_match);
  });
  expect(server.results.loraplex_mc['acc,none'], `${where}: acc`).toBe(hf.results.loraplex_mc['acc,none']);
  expect(server.results.loraplex_gen['exact_match,strip'], `${where}: exact_match`).toBe(hf.results.loraplex_gen['exact_match,strip']);
  if (!opts.constantShift) expect(server.results.loraplex_mc['acc_norm,none'], `${where}: acc_norm`).toBe(hf.results.loraplex_mc['acc_norm,none']);
  return worst;
}

describe('lm-evaluation-harness local-completions vs in-process HF', () => {
  let tmp: string;
  let server: ChildServer;
  let hf: Runs;
  let srv: Runs;
  let wallS = 0;

  beforeAll(async () => {
    const t0 = performance.now();
    // Not installed is a failure with the fix, never a skip.
    await python(['-c', 'import lm_eval.evaluator, lm_eval.models.openai_completions, lm_eval.models.huggingface, peft'], 120_000).catch((err: Error) => {
      throw new Error(`lm-eval is not installed: run \`bash test/lm-eval/setup.sh\` first.\n${err.message}`);
    });
    tmp = mkdtempSync(join(tmpdir(), 'loraplex-lm-eval-'));
    const demo = await ensureDemoModel();
    server = await startChildServer(
      ['--model', demo.modelDir, '--adapter-dir', demo.adapterDir, '--compute-dtype', 'float32', '--kv-cache-dtype', 'float32', '--lora-dtype', 'float32'],
      { OMP_NUM_THREADS: '1' },
      120_000,
    );
    const name = 'demo-v1'; // --served-model-name defaults to the directory's name
    const base = `base_url=${server.url}/v1/completions,num_concurrent=4,max_retries=1`;
    const hfTok = `tokenizer_backend=huggingface,tokenizer=${demo.modelDir},add_bos_token=True`;
    const hfModel = `pretrained=${demo.modelDir},dtype=float32`;
    // The two processes run side by side: the server's compute overlaps the HF runs.
    [srv, hf] = await Promise.all([
      evaluate(
        [
          { name: 'remote', model: 'local-completions', model_args: `model=${name},${base},tokenized_requests=True` },
          { name: 'hf-tokenizer', model: 'local-completions', model_args: `model=${name},${base},tokenized_requests=True,${hfTok}` },
          { name: 'text-prompts', model: 'local-completions', model_args: `model=${name},${base},tokenized_requests=False` },
          { name: 'adapter', model: 'local-completions', model_args: `model=${ADAPTER},${base},tokenized_requests=True,${hfTok}` },
        ],
        join(tmp, 'server.json'),
      ),
      evaluate(
        [
          { name: 'bos', model: 'hf', model_args: hfModel },
          { name: 'no-bos', model: 'hf', model_args: `${hfModel},add_bos_token=False` },
          { name: 'adapter', model: 'hf', model_args: `${hfModel},peft=${join(demo.adapterDir, ADAPTER)}` },
        ],
        join(tmp, 'hf.json'),
      ),
    ]);
    wallS = (performance.now() - t0) / 1000;
  }, 600_000);

  afterAll(async () => {
    await server?.stop();
    if (tmp) rmSync(tmp, { recursive: true, force: true });
  });

  it('remote tokenizer (auto-detected), token-id requests = HF without BOS', () => {
    // lm-eval detected the remote tokenizer: it asked for /tokenizer_info and used /tokenize.
    expect(server.logs()).toMatch(/"url":"\/tokenizer_info"/);
    expect(server.logs()).toMatch(/"url":"\/tokenize"/);
    const worst = expectSameEval(srv.remote, hf['no-bos'], 'remote');
    console.log(`remote tokenizer: worst |ll - HF| ${worst.toExponential(2)}`);
  });

  it('HF tokenizer with add_bos_token, token-id requests = HF default', () => {
    const worst = expectSameEval(srv['hf-tokenizer'], hf.bos, 'hf-tokenizer');
    console.log(`HF tokenizer + BOS: worst |ll - HF| ${worst.toExponential(2)}`);
  });

  it('text prompts (tokenized_requests=False): same acc and generations, loglikelihoods shifted per document', () => {
    expectSameEval(srv['text-prompts'], hf.bos, 'text-prompts', { constantShift: true });
  });

  it(`adapter ${ADAPTER} = HF with peft`, () => {
    const worst = expectSameEval(srv.adapter, hf.adapter, 'adapter');
    console.log(`adapter ${ADAPTER}: worst |ll - HF| ${worst.toExponential(2)}`);
    // The adapter really changes the evaluation.
    expect(srv.adapter.samples.loraplex_mc.map(lls)).not.toEqual(srv['hf-tokenizer'].samples.loraplex_mc.map(lls));
  });

  it('the tasks measure something (not all wrong, not all right) and the run is timed', () => {
    const acc = hf.bos.results.loraplex_mc['acc,none'];
    const em = hf.bos.results.loraplex_gen['exact_match,strip'];
    expect(acc).toBeGreaterThan(0.5);
    expect(acc).toBeLessThan(1);
    expect(em).toBeGreaterThan(0);
    const table = Object.entries({ ...Object.fromEntries(Object.entries(srv).map(([k, v]) => [`server/${k}`, v])), ...Object.fromEntries(Object.entries(hf).map(([k, v]) => [`hf/${k}`, v])) })
      .map(([k, v]) => `${k.padEnd(20)} acc ${v.results.loraplex_mc['acc,none'].toFixed(4)}  acc_norm ${v.results.loraplex_mc['acc_norm,none'].toFixed(4)}  exact_match ${v.results.loraplex_gen['exact_match,strip'].toFixed(4)}  (${v.seconds}s)`)
      .join('\n');
    console.log(`${table}\nwall time (server start, both processes): ${wallS.toFixed(1)}s`);
  });
});
