// Process-level behaviour of `loraplex serve`: SIGTERM drains (readiness 503 at once, new requests
// 503, in-flight requests finish) and exits 0; flags read from LORAPLEX_* environment variables.
import { describe, expect, it } from 'vitest';
import { modelDir } from '../helpers/fixtures.js';
import { startChildServer } from '../helpers/server.js';

describe('loraplex serve process', () => {
  it('drains on SIGTERM: ready 503, new requests 503, in-flight finish, exit 0', async () => {
    const srv = await startChildServer([], { LORAPLEX_MODEL: modelDir('llama-gqa'), LORAPLEX_MEMORY_BUDGET: '8MiB', LORAPLEX_SHUTDOWN_TIMEOUT: '30', OMP_NUM_THREADS: '1' });
    try {
      expect((await fetch(`${srv.url}/ready`)).status).toBe(200);
      const inflight = fetch(`${srv.url}/v1/completions`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ model: 'llama-gqa', prompt: [1, 2, 3], max_tokens: 240, ignore_eos: true, stream: true }),
      });
      const res = await inflight;
      const reader = res.body!.getReader();
      await reader.read(); // the stream is running
      srv.proc.kill('SIGTERM');
      let ready = 0;
      for (let i = 0; i < 50 && ready !== 503; i++) {
        ready = (await fetch(`${srv.url}/ready`)).status;
        if (ready !== 503) await new Promise((r) => setTimeout(r, 10));
      }
      expect(ready).toBe(503);
      const rejected = await fetch(`${srv.url}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ model: 'llama-gqa', prompt: 'x' }) });
      expect(rejected.status).toBe(503);
      expect(rejected.headers.get('retry-after')).toBeTruthy();
      expect((await rejected.json()).error.code).toBe('shutting_down');
      let text = '';
      const dec = new TextDecoder();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        text += dec.decode(value);
      }
      expect(text).toContain('"finish_reason":"length"');
      expect(text.trim().endsWith('data: [DONE]')).toBe(true);
      expect(await srv.exited).toBe(0);
    } finally {
      await srv.stop('SIGKILL');
    }
  });

  it('reads flags from LORAPLEX_* and logs one JSON line per request', async () => {
    const srv = await startChildServer([], { LORAPLEX_MODEL: modelDir('qwen2-tied'), LORAPLEX_SERVED_MODEL_NAME: 'qwen-tiny', LORAPLEX_MEMORY_BUDGET: '4MiB', OMP_NUM_THREADS: '1' });
    try {
      const models = await (await fetch(`${srv.url}/v1/models`)).json();
      expect(models.data[0].id).toBe('qwen-tiny');
      const r = await fetch(`${srv.url}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ model: 'qwen-tiny', prompt: 'hello', max_tokens: 3 }) });
      expect(r.status).toBe(200);
      await new Promise((r2) => setTimeout(r2, 100));
      const line = srv.logs().split('\n').find((l) => l.includes('"url":"/v1/completions"'));
      expect(line).toBeDefined();
      const rec = JSON.parse(line!);
      expect(rec).toMatchObject({ model: 'qwen-tiny', status: 200, prompt_tokens: expect.any(Number), completion_tokens: 3 });
      expect(rec.latency_ms).toBeGreaterThanOrEqual(0);
      expect(srv.logs()).toContain('"pages":');
    } finally {
      expect(await srv.stop('SIGTERM')).toBe(0);
    }
  });
});
