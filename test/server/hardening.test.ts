// One request must never take the server down, stall it, or read outside its roots. Each block
// is a defect found by attacking the server (issue #13), tested at its class: fan-out memory,
// ReDoS through adapter configs, non-finite adapters and logits, symlink escapes, metrics of
// disconnects, unload that sticks, pool accounting after a too-large adapter, streaming errors
// before the first token, and how expected refusals are logged. Real HTTP on loopback throughout.
import { cpSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { request as httpRequest } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import pino from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildApp } from '../../server/app.js';
import { serveConfig } from '../../server/config.js';
import { Engine } from '../../server/engine/engine.js';
import { writeRandomAdapter } from '../helpers/adapters.js';
import { adapterRoot, modelDir } from '../helpers/fixtures.js';
import { startChildServer, startTestServer, type TestServer } from '../helpers/server.js';

const M = 'llama-gqa';
const DIMS = { hidden: 64, intermediate: 176, layers: 2, qDim: 64, kvDim: 32 };
const ALL = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'];
const GOOD = 'r8-all';

let tmp: string;
beforeAll(() => {
  tmp = mkdtempSync(join(tmpdir(), 'loraplex-hardening-'));
});
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

async function post(url: string, path: string, body: unknown): Promise<Response> {
  return fetch(`${url}${path}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
}

interface ErrBody {
  message: string;
  type: string;
  param: string | null;
  code: string | null;
}

async function openAIError(res: Response, status: number): Promise<ErrBody> {
  const text = await res.text();
  expect(res.status, text).toBe(status);
  expect(res.headers.get('content-type') ?? '').toMatch(/application\/json/);
  const j = JSON.parse(text) as { error: ErrBody };
  expect(Object.keys(j)).toContain('error');
  for (const k of ['message', 'type', 'param', 'code']) expect(j.error, text).toHaveProperty(k);
  return j.error;
}

function adapterDirWithGolden(name: string, adapters: string[] = [GOOD]): string {
  const dir = join(tmp, name);
  mkdirSync(dir, { recursive: true });
  for (const a of adapters) cpSync(join(adapterRoot(M), a), join(dir, a), { recursive: true });
  return dir;
}

/** Overwrites element `index` of an F32 tensor in a safetensors file (header unchanged). */
function patchF32(file: string, tensor: string, index: number, value: number): void {
  const buf = readFileSync(file);
  const len = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + len).toString('utf8')) as Record<string, { dtype: string; data_offsets: [number, number] }>;
  const e = header[tensor];
  expect(e?.dtype, tensor).toBe('F32');
  buf.writeFloatLE(value, 8 + len + e.data_offsets[0] + index * 4);
  writeFileSync(file, buf);
}

async function greedy(url: string, model: string): Promise<string> {
  const res = await post(url, '/v1/completions', { model, prompt: [592, 10, 20, 30], max_tokens: 8, temperature: 0, ignore_eos: true });
  expect(res.status, await res.clone().text()).toBe(200);
  return ((await res.json()) as { choices: Array<{ text: string }> }).choices[0].text;
}

// ---------------------------------------------------------------------------------------------

describe('1. fan-out: the queue counts sequences and choices merge in linear memory', () => {
  let srv: TestServer;
  beforeAll(async () => {
    srv = await startTestServer({ model: modelDir(M) }, ['--max-queue', '64', '--max-n', '16']);
  });
  afterAll(async () => srv?.close());

  it('refuses a request whose prompts x n exceed --max-queue with a 400 naming the parameter', async () => {
    const e1 = await openAIError(await post(srv.url, '/v1/completions', { model: M, prompt: new Array(1024).fill('The'), n: 16, max_tokens: 1 }), 400);
    expect(e1.param).toBe('prompt');
    expect(e1.message).toMatch(/1024 sequences/);
    const e2 = await openAIError(await post(srv.url, '/v1/completions', { model: M, prompt: new Array(8).fill('The'), n: 16, max_tokens: 1 }), 400);
    expect(e2.param).toBe('n');
    const e3 = await openAIError(await post(srv.url, '/v1/completions', { model: M, prompt: [[1, 2], [3, 4], [5], [6], [7]], n: 16, max_tokens: 1 }), 400);
    expect(e3.param).toBe('n');
    expect(srv.engine.scheduler.waiting.length + srv.engine.scheduler.running.length).toBe(0);
  });

  it('answers 429 when the sequences in flight plus the new ones exceed the queue', async () => {
    // 60 long sequences occupy the queue; a request for 8 more does not fit now.
    const busy = post(srv.url, '/v1/completions', { model: M, prompt: new Array(4).fill('The'), n: 15, max_tokens: 200, ignore_eos: true });
    const t0 = Date.now();
    while (srv.engine.scheduler.waiting.length + srv.engine.scheduler.running.length < 60 && Date.now() - t0 < 10_000) await new Promise((r) => setTimeout(r, 5));
    const res = await post(srv.url, '/v1/completions', { model: M, prompt: 'The', n: 8, max_tokens: 1 });
    const e = await openAIError(res, 429);
    expect(e.code).toBe('queue_full');
    expect(res.headers.get('retry-after')).toBeTruthy();
    expect((await busy).status).toBe(200);
  });

  it('serves a request that fans out to 64 choices, every choice complete', async () => {
    const res = await post(srv.url, '/v1/completions', { model: M, prompt: new Array(4).fill([592, 7]), n: 16, max_tokens: 3, ignore_eos: true, temperature: 0 });
    expect(res.status).toBe(200);
    const j = (await res.json()) as { choices: Array<{ index: number; finish_reason: string }>; usage: { completion_tokens: number } };
    expect(j.choices).toHaveLength(64);
    expect(j.choices.map((c) => c.index)).toEqual([...Array(64).keys()]);
    expect(j.choices.every((c) => c.finish_reason === 'length')).toBe(true);
    expect(j.usage.completion_tokens).toBe(64 * 3);
  });

  it('a 1,024 x 16 request served in full stays under 1 GB of peak RSS', async () => {
    // --max-queue high enough to serve it: 16,384 sequences in one request.
    const child = await startChildServer(['--model', modelDir(M), '--max-queue', '20000', '--max-n', '16', '--memory-budget', '64MiB'], { OMP_NUM_THREADS: '1' });
    try {
      const res = await post(child.url, '/v1/completions', { model: M, prompt: new Array(1024).fill('The'), n: 16, max_tokens: 1 });
      expect(res.status).toBe(200);
      const j = (await res.json()) as { choices: unknown[] };
      expect(j.choices).toHaveLength(16384);
      const status = readFileSync(`/proc/${child.proc.pid}/status`, 'utf8');
      const hwmKb = Number(/VmHWM:\s+(\d+) kB/.exec(status)![1]);
      console.log(`peak RSS of the 1024 x 16 request: ${(hwmKb / 1024).toFixed(0)} MiB`);
      expect(hwmKb * 1024).toBeLessThan(1 << 30);
    } finally {
      await child.stop();
    }
  }, 120_000);
});

// ---------------------------------------------------------------------------------------------

describe('2-4, 7-9: adapters', () => {
  let srv: TestServer;
  let adapterDir: string;
  let loraRoot: string;
  let outside: string;

  beforeAll(async () => {
    adapterDir = adapterDirWithGolden('adapters', [GOOD, 'r4-mlp']);
    loraRoot = join(tmp, 'lora-root');
    outside = join(tmp, 'outside');
    mkdirSync(loraRoot);
    mkdirSync(outside);
    srv = await startTestServer({ model: modelDir(M), adapterDir, maxLoraRank: 64 }, ['--lora-roots', loraRoot]);
  });
  afterAll(async () => srv?.close());

  const load = (name: string, path: string) => post(srv.url, '/v1/load_lora_adapter', { lora_name: name, lora_path: path });
  const upload = async (id: string, config: string, model: Buffer) => {
    const fd = new FormData();
    fd.append('id', id);
    fd.append('adapter_config.json', new Blob([config]), 'adapter_config.json');
    fd.append('adapter_model.safetensors', new Blob([new Uint8Array(model)]), 'adapter_model.safetensors');
    return fetch(`${srv.url}/v1/adapters`, { method: 'POST', body: fd });
  };
  const goodConfig = () => JSON.parse(readFileSync(join(adapterRoot(M), GOOD, 'adapter_config.json'), 'utf8')) as Record<string, unknown>;
  const goodModel = () => readFileSync(join(adapterRoot(M), GOOD, 'adapter_model.safetensors'));

  describe('2. ReDoS: module patterns never block the event loop', () => {
    /** Runs `work` while polling /health every 10 ms; returns the worst /health latency seen. */
    async function worstHealthDuring(work: () => Promise<void>): Promise<number> {
      let worst = 0;
      let done = false;
      const poller = (async () => {
        while (!done) {
          const t = performance.now();
          const r = await fetch(`${srv.url}/health`);
          await r.text();
          worst = Math.max(worst, performance.now() - t);
          await new Promise((res) => setTimeout(res, 10));
        }
      })();
      try {
        await work();
      } finally {
        done = true;
        await poller;
      }
      return worst;
    }

    it('a catastrophic-backtracking rank_pattern and target_modules cost nothing; /health stays under 100 ms', async () => {
      const hostile = { ...goodConfig(), rank_pattern: { '(.*)*z': 4, '(a|aa)*$x': 2 }, alpha_pattern: { '(.*.*)*=': 3 } };
      const worst = await worstHealthDuring(async () => {
        const res = await upload('redos-patterns', JSON.stringify(hostile), goodModel());
        expect(res.status, await res.text()).toBe(201); // valid: the patterns just match nothing
        const regexTarget = { ...goodConfig(), target_modules: '((.*)*)*_proj' };
        const r2 = await upload('redos-target', JSON.stringify(regexTarget), goodModel());
        expect(r2.status, await r2.text()).toBe(201);
        // and on every cold load too
        expect(await greedy(srv.url, 'redos-patterns')).toBe(await greedy(srv.url, GOOD));
      });
      console.log(`worst /health latency during hostile configs: ${worst.toFixed(1)} ms`);
      expect(worst).toBeLessThan(100);
    });

    it('hundreds of regex patterns and thousands of names are matched in slices: /health stays under 100 ms', async () => {
      const many: Record<string, number> = {};
      for (let i = 0; i < 3000; i++) many[`model.layers.${i + 2}.self_attn.q_proj`] = 2;
      for (let i = 0; i < 256; i++) many[`(x|y)*${i}(.*)*[kv]+_proj`] = 2;
      const worst = await worstHealthDuring(async () => {
        const res = await upload('redos-many', JSON.stringify({ ...goodConfig(), rank_pattern: many }), goodModel());
        // k/v now match rank 2, the file holds rank 8: a 400 on the tensor shapes, after the plan.
        const e = await openAIError(res, 400);
        expect(e.message).toMatch(/has shape/);
        // one regex key more than the limit: refused before any matching
        const more = { ...many, '(z|w)*q_proj': 2 };
        const e2 = await openAIError(await upload('redos-more', JSON.stringify({ ...goodConfig(), rank_pattern: more }), goodModel()), 400);
        expect(e2.param).toBe('rank_pattern');
      });
      console.log(`worst /health latency during 4,000 patterns: ${worst.toFixed(1)} ms`);
      expect(worst).toBeLessThan(100);
    });

    it('a pattern with no linear-time form (lookaround, backreference) is a 400 naming the field', async () => {
      for (const [field, value] of [
        ['rank_pattern', { '(?=q)q_proj': 4 }],
        ['alpha_pattern', { '(a)\\1': 4 }],
        ['target_modules', '(?<!x)q_proj'],
      ] as const) {
        const res = await upload(`bad-re-${field}`, JSON.stringify({ ...goodConfig(), [field]: value }), goodModel());
        const e = await openAIError(res, 400);
        expect(e.param).toBe(field);
        expect(e.code).toBe('invalid_adapter');
      }
    });
  });

  describe('3. non-finite adapters are refused at load', () => {
    const cases: Array<[string, (c: Record<string, unknown>) => void, string]> = [
      ['lora_alpha 1e300', (c) => (c.lora_alpha = 1e300), 'lora_alpha'],
      ['lora_alpha -1e300', (c) => (c.lora_alpha = -1e300), 'lora_alpha'],
      ['alpha_pattern 1e300', (c) => (c.alpha_pattern = { q_proj: 1e300 }), 'alpha_pattern'],
      ['lora_alpha over the scale bound', (c) => (c.lora_alpha = 1e7), 'lora_alpha'],
    ];
    it.each(cases)('%s: 400 naming the field, on upload and on load', async (what, edit, param) => {
      const cfg = goodConfig();
      edit(cfg);
      const id = `nf-${what.replace(/-/g, 'minus-').replace(/[^a-z0-9]+/gi, '-')}`;
      const e = await openAIError(await upload(id, JSON.stringify(cfg), goodModel()), 400);
      expect(e.param).toBe(param);
      expect(e.code).toBe('invalid_adapter');
      const dir = join(loraRoot, id);
      mkdirSync(dir);
      writeFileSync(join(dir, 'adapter_config.json'), JSON.stringify(cfg));
      writeFileSync(join(dir, 'adapter_model.safetensors'), goodModel());
      const e2 = await openAIError(await load(id, dir), 400);
      expect(e2.param).toBe(param);
      await openAIError(await post(srv.url, '/v1/completions', { model: id, prompt: 'x', max_tokens: 1 }), 404);
    });

    it('finite weights whose update overflows float32 (3e38) are refused', async () => {
      const dir = join(loraRoot, 'huge-weights');
      cpSync(join(adapterRoot(M), GOOD), dir, { recursive: true });
      patchF32(join(dir, 'adapter_model.safetensors'), 'base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight', 3, 3e38);
      const e = await openAIError(await load('huge-weights', dir), 400);
      expect(e.code).toBe('invalid_adapter');
      expect(e.message).toMatch(/overflow float32/);
      const e2 = await openAIError(await upload('huge-weights-up', readFileSync(join(dir, 'adapter_config.json'), 'utf8'), readFileSync(join(dir, 'adapter_model.safetensors'))), 400);
      expect(e2.message).toMatch(/overflow float32/);
    });
  });

  describe('4. files must resolve inside the allowed roots; errors quote no contents and no paths', () => {
    it('an adapter whose files are symlinks to outside the roots is refused', async () => {
      const src = join(outside, 'real');
      cpSync(join(adapterRoot(M), GOOD), src, { recursive: true });
      const dir = join(loraRoot, 'linked-files');
      mkdirSync(dir);
      symlinkSync(join(src, 'adapter_config.json'), join(dir, 'adapter_config.json'));
      symlinkSync(join(src, 'adapter_model.safetensors'), join(dir, 'adapter_model.safetensors'));
      const e = await openAIError(await load('linked-files', dir), 400);
      expect(e.message).toMatch(/outside the allowed adapter folders/);
      expect(e.message).not.toContain(tmp);
      await openAIError(await post(srv.url, '/v1/completions', { model: 'linked-files', prompt: 'x', max_tokens: 1 }), 404);
      // only the weights linked out: refused as well
      const dir2 = join(loraRoot, 'linked-weights');
      mkdirSync(dir2);
      cpSync(join(src, 'adapter_config.json'), join(dir2, 'adapter_config.json'));
      symlinkSync(join(src, 'adapter_model.safetensors'), join(dir2, 'adapter_model.safetensors'));
      const e2 = await openAIError(await load('linked-weights', dir2), 400);
      expect(e2.param).toBe('adapter_model.safetensors');
    });

    it('a config linked to /etc/passwd: the 400 quotes nothing of the file', async () => {
      const dir = join(loraRoot, 'passwd');
      mkdirSync(dir);
      symlinkSync('/etc/passwd', join(dir, 'adapter_config.json'));
      writeFileSync(join(dir, 'adapter_model.safetensors'), goodModel());
      const e = await openAIError(await load('passwd', dir), 400);
      expect(e.message).not.toMatch(/root:|\/bin\/|\/etc\//);
    });

    it('a config that is not JSON is located by line and column, not quoted', async () => {
      const dir = join(loraRoot, 'not-json');
      mkdirSync(dir);
      writeFileSync(join(dir, 'adapter_config.json'), '{\n  "r": 8,\n  secret-token-abc: 1\n}');
      writeFileSync(join(dir, 'adapter_model.safetensors'), goodModel());
      const e = await openAIError(await load('not-json', dir), 400);
      expect(e.message).toBe('adapter_config.json: not valid JSON at line 3 column 3');
      const e2 = await openAIError(await upload('not-json-up', '{"r": 8, "lora_alpha": 16,, "secret-xyz"}', goodModel()), 400);
      expect(e2.message).toMatch(/not valid JSON at line 1 column 27/);
      expect(e2.message).not.toContain('secret');
    });

    it('a symlinked folder in --adapter-dir that points outside is neither listed nor served', async () => {
      const src = join(outside, 'escapee');
      cpSync(join(adapterRoot(M), GOOD), src, { recursive: true });
      symlinkSync(src, join(adapterDir, 'escapee'));
      const models = (await (await fetch(`${srv.url}/v1/models`)).json()) as { data: Array<{ id: string }> };
      expect(models.data.map((m) => m.id)).not.toContain('escapee');
      const list = (await (await fetch(`${srv.url}/v1/adapters`)).json()) as { data: Array<{ id: string }> };
      expect(list.data.map((m) => m.id)).not.toContain('escapee');
      await openAIError(await post(srv.url, '/v1/completions', { model: 'escapee', prompt: 'x', max_tokens: 1 }), 404);
    });

    it('no API response carries a server-side absolute path', async () => {
      const bodies = await Promise.all(['/v1/models', '/v1/adapters', `/v1/adapters/${GOOD}`].map(async (p) => (await fetch(`${srv.url}${p}`)).text()));
      for (const b of bodies) {
        expect(b).not.toContain(tmp);
        expect(b).not.toContain(modelDir(M));
      }
      // a broken weights file: the native error names the file, not where it lives
      const dir = join(loraRoot, 'truncated');
      cpSync(join(adapterRoot(M), GOOD), dir, { recursive: true });
      const st = join(dir, 'adapter_model.safetensors');
      writeFileSync(st, readFileSync(st).subarray(0, 200));
      const e = await openAIError(await load('truncated', dir), 400);
      expect(e.message).toMatch(/adapter_model\.safetensors/);
      expect(e.message).not.toContain(tmp);
    });
  });

  describe('7. unload of an --adapter-dir adapter sticks', () => {
    it('after unload: 404 on use, absent from /v1/models and /v1/adapters, until loaded again', async () => {
      expect(await greedy(srv.url, 'r4-mlp')).toBeTruthy();
      const res = await post(srv.url, '/v1/unload_lora_adapter', { lora_name: 'r4-mlp' });
      expect(res.status, await res.text()).toBe(200);
      await openAIError(await post(srv.url, '/v1/completions', { model: 'r4-mlp', prompt: 'x', max_tokens: 1 }), 404);
      const models = (await (await fetch(`${srv.url}/v1/models`)).json()) as { data: Array<{ id: string }> };
      expect(models.data.map((m) => m.id)).not.toContain('r4-mlp');
      const list = (await (await fetch(`${srv.url}/v1/adapters`)).json()) as { data: Array<{ id: string }> };
      expect(list.data.map((m) => m.id)).not.toContain('r4-mlp');
      await openAIError(await fetch(`${srv.url}/v1/adapters/r4-mlp`), 404);
      await openAIError(await post(srv.url, '/v1/unload_lora_adapter', { lora_name: 'r4-mlp' }), 404);
      // loaded again from its folder: served again, with the same output
      const again = await load('r4-mlp', join(adapterDir, 'r4-mlp'));
      expect(again.status, await again.text()).toBe(200);
      expect(await greedy(srv.url, 'r4-mlp')).toBeTruthy();
    });
  });

  describe('9. errors known before the first token: the same 4xx streaming or not', () => {
    it('a broken adapter is a 400 invalid_adapter for stream and non-stream, completions and chat', async () => {
      const dir = join(adapterDir, 'broken-dora');
      mkdirSync(dir);
      writeFileSync(join(dir, 'adapter_config.json'), JSON.stringify({ ...goodConfig(), use_dora: true }));
      writeFileSync(join(dir, 'adapter_model.safetensors'), goodModel());
      for (const stream of [false, true]) {
        const e = await openAIError(await post(srv.url, '/v1/completions', { model: 'broken-dora', prompt: 'x', max_tokens: 4, stream }), 400);
        expect(e.code).toBe('invalid_adapter');
        expect(e.param).toBe('use_dora');
        const e2 = await openAIError(await post(srv.url, '/v1/chat/completions', { model: 'broken-dora', messages: [{ role: 'user', content: 'x' }], max_tokens: 4, stream }), 400);
        expect(e2.code).toBe('invalid_adapter');
      }
      // a good adapter still streams normally
      const ok = await post(srv.url, '/v1/completions', { model: GOOD, prompt: 'x', max_tokens: 3, stream: true, ignore_eos: true });
      expect(ok.status).toBe(200);
      expect(ok.headers.get('content-type')).toMatch(/text\/event-stream/);
      expect(await ok.text()).toMatch(/data: \[DONE\]/);
    });
  });
});

// ---------------------------------------------------------------------------------------------

describe('3b. non-finite logits end the sequence with an error, never garbage text', () => {
  it('a model whose final norm holds a NaN answers an error, and the server keeps serving', async () => {
    const dir = join(tmp, 'nan-model');
    cpSync(modelDir(M), dir, { recursive: true });
    patchF32(join(dir, 'model.safetensors'), 'model.norm.weight', 0, Number.NaN);
    const srv = await startTestServer({ model: dir });
    try {
      for (const stream of [false, true]) {
        const res = await post(srv.url, '/v1/completions', { model: 'nan-model', prompt: [592, 1, 2], max_tokens: 4, stream, logprobs: 1 });
        const e = await openAIError(res, 500);
        expect(e.code).toBe('non_finite_logits');
      }
      expect((await fetch(`${srv.url}/health`)).status).toBe(200);
      expect(srv.engine.scheduler.hasWork).toBe(false);
    } finally {
      await srv.close();
    }
  });
});

describe('6. disconnects count as abort', () => {
  let srv: TestServer;
  beforeAll(async () => {
    srv = await startTestServer({ model: modelDir(M) });
  });
  afterAll(async () => srv?.close());

  const counter = async (reason: string) => {
    const text = await (await fetch(`${srv.url}/metrics`)).text();
    const m = new RegExp(`^vllm:request_success_total\\{[^}]*finished_reason="${reason}"[^}]*\\} (\\S+)`, 'm').exec(text);
    return m ? Number(m[1]) : 0;
  };

  it('a stream dropped by the client counts as abort, not stop, and stops generating', async () => {
    const stop0 = await counter('stop');
    const abort0 = await counter('abort');
    await new Promise<void>((resolve, reject) => {
      const req = httpRequest(`${srv.url}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' } }, (res) => {
        res.once('data', () => {
          req.destroy(); // the client goes away after the first chunk
          resolve();
        });
      });
      req.on('error', () => undefined);
      req.end(JSON.stringify({ model: M, prompt: 'The', max_tokens: 200, ignore_eos: true, stream: true }));
      setTimeout(() => reject(new Error('no first chunk')), 10_000);
    });
    const t0 = Date.now();
    while (srv.engine.scheduler.hasWork && Date.now() - t0 < 5000) await new Promise((r) => setTimeout(r, 5));
    expect(srv.engine.scheduler.hasWork).toBe(false);
    for (let i = 0; i < 100 && (await counter('abort')) === abort0; i++) await new Promise((r) => setTimeout(r, 10));
    expect(await counter('abort')).toBe(abort0 + 1);
    expect(await counter('stop')).toBe(stop0);
    // A stop string still counts as stop (the engine sees an abort for it).
    const text = await greedy(srv.url, M);
    const stop1 = await counter('stop');
    const res = await post(srv.url, '/v1/completions', { model: M, prompt: [592, 10, 20, 30], max_tokens: 8, temperature: 0, ignore_eos: true, stop: [text.slice(2, 4)], stream: true });
    expect(await res.text()).toMatch(/"finish_reason":"stop"/);
    expect(await counter('stop')).toBe(stop1 + 1);
    expect(await counter('abort')).toBe(abort0 + 1);
  });
});

describe('8. a too-large adapter leaves the pool accounting intact', () => {
  it('every request to it gets adapter_too_large, never a negative pool', async () => {
    const adapterDir = join(tmp, 'big-adapters');
    await writeRandomAdapter(join(adapterDir, 'big'), DIMS, { rank: 64, targets: ALL, seed: 7, std: 0.01 });
    const srv = await startTestServer({ model: modelDir(M), adapterDir, memoryBudget: 256 << 10, maxLoraRank: 64 });
    try {
      const pages = srv.engine.paging.totalPages;
      for (let i = 0; i < 3; i++) {
        const e = await openAIError(await post(srv.url, '/v1/completions', { model: 'big', prompt: [592, 1], max_tokens: 2 }), 400);
        expect(e.code, e.message).toBe('adapter_too_large');
        expect(e.message).not.toMatch(/-\d+ pages/);
      }
      srv.engine.checkInvariants();
      expect(srv.engine.paging.stats().freePages + srv.engine.paging.stats().prefixPages).toBe(pages);
      expect(await greedy(srv.url, M)).toBeTruthy();
    } finally {
      await srv.close();
    }
  });
});

describe('10. expected refusals are warnings without a stack', () => {
  it('a 503 (engine shutting down) logs one warn line, no error, no stack', async () => {
    const lines: Array<Record<string, unknown>> = [];
    const sink = new Writable({
      write(chunk: Buffer, _enc, cb) {
        for (const l of chunk.toString().split('\n')) if (l.trim()) lines.push(JSON.parse(l) as Record<string, unknown>);
        cb();
      },
    });
    const engine = await Engine.create({ model: modelDir(M), memoryBudget: 16 << 20, adapterDir: mkdtempSync(join(tmp, 'ad-')) });
    const cfg = { ...serveConfig([], {}), adapterDir: engine.adapters.opts.adapterDir };
    const app = await buildApp(engine, cfg, { logger: pino({ level: 'info' }, sink) });
    await app.listen({ host: '127.0.0.1', port: 0 });
    const addr = app.server.address();
    const url = `http://127.0.0.1:${typeof addr === 'object' && addr ? addr.port : 0}`;
    try {
      await engine.close();
      const e = await openAIError(await post(url, '/v1/completions', { model: M, prompt: 'x', max_tokens: 1 }), 503);
      expect(e.code).toBe('shutting_down');
      await new Promise((r) => setTimeout(r, 20));
      const refused = lines.filter((l) => l.msg === 'request refused');
      expect(refused).toHaveLength(1);
      expect(refused[0].level).toBe(40);
      expect(JSON.stringify(lines)).not.toMatch(/"stack"/);
      expect(lines.filter((l) => (l.level as number) >= 50)).toHaveLength(0);
    } finally {
      await app.close();
    }
  });
});
