// The playground (server/ui/) in a real browser: headless Chromium from Debian's `chromium`
// package driven by puppeteer-core (no browser download), against real servers. One server runs the
// demo model with its three adapters (chat, completion, compare, upload, delete, metrics); a second
// runs the llama-gqa fixture with --api-key (the page asks for the key; r4-mlp is dropped in and
// deleted). Screenshots land in test/ui/artifacts/ (ignored by git). The HTTP contract of the page
// (browsers only, no key for the page, --no-ui) is checked without a browser.
import { cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import puppeteer, { type Browser, type ConsoleMessage, type ElementHandle, type Page } from 'puppeteer-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureDemoModel } from '../../server/demo/demo-model.js';
import { prefersHtml, readyHints } from '../../server/routes/ui.js';
import { adapterRoot, modelDir, ROOT } from '../helpers/fixtures.js';
import { startTestServer, type TestServer } from '../helpers/server.js';

const CHROMIUM = process.env['LORAPLEX_CHROMIUM'] ?? '/usr/bin/chromium';
const HAVE_CHROMIUM = existsSync(CHROMIUM);
const ARTIFACTS = join(ROOT, 'test', 'ui', 'artifacts');
const R4 = join(adapterRoot('llama-gqa'), 'r4-mlp');
const BROWSER_ACCEPT = 'text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8';
const KEY = 'playground-test-key';

let tmp: string;
let demo: { modelDir: string; adapterDir: string };

beforeAll(async () => {
  tmp = mkdtempSync(join(tmpdir(), 'loraplex-ui-'));
  demo = await ensureDemoModel(join(tmp, 'cache'));
  mkdirSync(ARTIFACTS, { recursive: true });
});

afterAll(() => {
  rmSync(tmp, { recursive: true, force: true });
});

/** A fresh adapter directory holding copies of `from`'s sub-directories (uploads and deletes go here). */
function adapterDirOf(from: string | null): string {
  const dir = mkdtempSync(join(tmp, 'adapters-'));
  if (from) cpSync(from, dir, { recursive: true });
  return dir;
}

// ---------------------------------------------------------------------------------------------

describe('the page over HTTP', () => {
  let srv: TestServer;
  let off: TestServer;
  beforeAll(async () => {
    srv = await startTestServer({ model: modelDir('llama-gqa'), adapterDir: adapterDirOf(null) }, ['--api-key', KEY]);
    off = await startTestServer({ model: modelDir('llama-gqa'), adapterDir: adapterDirOf(null) }, ['--no-ui']);
  });
  afterAll(async () => {
    await srv?.close();
    await off?.close();
  });

  it('GET / is the page for browsers and the OpenAI 404 for API clients', async () => {
    const page = await fetch(`${srv.url}/`, { headers: { accept: BROWSER_ACCEPT } });
    expect(page.status).toBe(200);
    expect(page.headers.get('content-type')).toMatch(/^text\/html/);
    expect(page.headers.get('content-security-policy')).toContain("default-src 'none'");
    const html = await page.text();
    expect(html).toContain('<script type="module" src="/ui/app.js">');
    // No CDN: every src/href is this server's.
    for (const m of html.matchAll(/(?:src|href)="([^"]+)"/g)) expect(m[1]).toMatch(/^\/ui\//);
    for (const accept of [undefined, '*/*', 'application/json', 'application/json, text/html;q=0.5']) {
      const res = await fetch(`${srv.url}/`, { headers: accept ? { accept, authorization: `Bearer ${KEY}` } : { authorization: `Bearer ${KEY}` } });
      expect(res.status, String(accept)).toBe(404);
      expect(((await res.json()) as { error: { code: string } }).error.code).toBe('not_found');
    }
    expect(prefersHtml('text/html')).toBe(true);
    expect(prefersHtml('text/html;q=0, */*')).toBe(false);
  });

  it('the page and its assets need no key; the API and unknown /ui/ paths still do', async () => {
    for (const f of ['app.js', 'api.js', 'shared.js', 'chat.js', 'compare.js', 'adapters.js', 'metrics.js', 'style.css', 'favicon.svg']) {
      const res = await fetch(`${srv.url}/ui/${f}`);
      expect(res.status, f).toBe(200);
      expect(res.headers.get('x-content-type-options')).toBe('nosniff');
    }
    expect((await fetch(`${srv.url}/ui/app.js`)).headers.get('content-type')).toMatch(/javascript/);
    expect((await fetch(`${srv.url}/v1/models`)).status).toBe(401);
    expect((await fetch(`${srv.url}/ui/nope.js`)).status).toBe(401);
    expect((await fetch(`${srv.url}/ui/nope.js`, { headers: { authorization: `Bearer ${KEY}` } })).status).toBe(404);
    expect((await fetch(`${srv.url}/ui/%2e%2e/package.json`, { headers: { authorization: `Bearer ${KEY}` } })).status).toBe(404);
  });

  it('--no-ui turns the page off', async () => {
    expect(off.cfg.ui).toBe(false);
    expect((await fetch(`${off.url}/`, { headers: { accept: BROWSER_ACCEPT } })).status).toBe(404);
    expect((await fetch(`${off.url}/ui/app.js`)).status).toBe(404);
    expect((await fetch(`${off.url}/v1/models`)).status).toBe(200);
  });

  it('serve logs the playground URL and a curl to try', () => {
    const lines = readyHints({ host: '0.0.0.0', port: 8000, model: 'loraplex-demo', ui: true, apiKey: true });
    expect(lines[0]).toBe('playground: open http://127.0.0.1:8000 in a browser');
    expect(lines[1]).toContain(`curl http://127.0.0.1:8000/v1/completions`);
    expect(lines[1]).toContain('$LORAPLEX_API_KEY');
    expect(lines[1]).not.toContain(KEY);
    expect(readyHints({ host: '::1', port: 1, model: 'm', ui: false, apiKey: false })[0]).toContain('--no-ui');
  });
});

// ---------------------------------------------------------------------------------------------

describe.skipIf(!HAVE_CHROMIUM)('the playground in Chromium', () => {
  let browser: Browser;
  let srv: TestServer;
  let keyed: TestServer;
  let page: Page;
  const errors: string[] = [];

  const collect = (p: Page, into: string[]) => {
    p.on('console', (m: ConsoleMessage) => {
      if (m.type() === 'error') into.push(`console: ${m.text()}`);
    });
    p.on('pageerror', (e) => into.push(`pageerror: ${(e as Error).message}`));
    p.on('requestfailed', (r) => {
      if (r.failure()?.errorText !== 'net::ERR_ABORTED') into.push(`requestfailed: ${r.url()} ${r.failure()?.errorText}`);
    });
  };
  const text = (sel: string) => page.$eval(sel, (e) => (e as HTMLElement).innerText);
  const shot = (p: Page, name: string) => p.screenshot({ path: join(ARTIFACTS, `${name}.png`), fullPage: true });
  const options = (sel: string) => page.$$eval(`${sel} option`, (os) => os.map((o) => (o as HTMLOptionElement).value));
  const uploadFile = async (sel: string, path: string, p = page) => ((await p.$(sel)) as ElementHandle<HTMLInputElement>).uploadFile(path);
  const setValue = (sel: string, v: string) =>
    page.$eval(sel, (e, v) => {
      (e as HTMLInputElement).value = v;
      e.dispatchEvent(new Event('change', { bubbles: true }));
    }, v);

  beforeAll(async () => {
    [srv, keyed, browser] = await Promise.all([
      startTestServer({ model: demo.modelDir, adapterDir: adapterDirOf(demo.adapterDir), servedModelName: 'loraplex-demo', memoryBudget: 64 << 20 }),
      startTestServer({ model: modelDir('llama-gqa'), adapterDir: adapterDirOf(null) }, ['--api-key', KEY]),
      puppeteer.launch({
        executablePath: CHROMIUM,
        headless: true,
        args: ['--no-sandbox', '--headless=new', '--disable-gpu', '--disable-dev-shm-usage', '--no-first-run'],
      }),
    ]);
    page = await browser.newPage();
    await page.setViewport({ width: 1280, height: 860 });
    collect(page, errors);
  });

  afterAll(async () => {
    await browser?.close();
    await srv?.close();
    await keyed?.close();
  });

  it('loads with no console errors and lists the demo adapters', async () => {
    const res = await page.goto(srv.url + '/', { waitUntil: 'networkidle0' });
    expect(res?.status()).toBe(200);
    await page.waitForFunction(() => document.querySelectorAll('#chat-model option').length >= 4);
    expect(await options('#chat-model')).toEqual(['loraplex-demo', 'pirate', 'poet', 'robot']);
    expect(await text('#base-model')).toBe('base: loraplex-demo');
    expect(await page.$eval('#auth', (e) => (e as HTMLElement).hidden)).toBe(true);
    expect(errors).toEqual([]);
  });

  it('the metrics panel shows numbers from /metrics', async () => {
    await page.waitForFunction(() => /^\d+$/.test(document.getElementById('m-running')!.textContent!));
    expect(await text('#m-waiting')).toMatch(/^\d+$/);
    expect(await text('#m-kv')).toMatch(/^\d+(\.\d)? %$/);
    expect(await text('#m-loads')).toMatch(/^\d+$/);
    expect(await text('#m-evictions')).toMatch(/^\d+$/);
    expect(await text('#pool-legend')).toMatch(/^kv \d+ · (prefix cache \d+ · )?adapter \d+ · free \d+ of [1-9]\d* pages$/);
    expect(await text('#m-loras')).toMatch(/running: .* · waiting: .* · max \d+/);
  });

  it('streams a completion into the page with TTFT and tokens/s', async () => {
    await setValue('#mode', 'completion');
    await setValue('#temperature', '0');
    await setValue('#max-tokens', '24');
    await page.select('#chat-model', 'pirate');
    // Count the writes into the transcript: one per streamed chunk, not one final write.
    await page.evaluate(() => {
      const w = window as unknown as { growth: number };
      w.growth = 0;
      new MutationObserver((records) => (w.growth += records.length)).observe(document.getElementById('transcript')!, { childList: true, subtree: true, characterData: true });
    });
    await page.type('#chat-input', 'In the morning the');
    await page.click('#chat-send');
    await page.waitForFunction(() => document.querySelector('#transcript .gen:not(.streaming)') !== null && !(document.getElementById('chat-send') as HTMLButtonElement).disabled);
    const gen = await text('#transcript .gen');
    const api = (await (await fetch(`${srv.url}/v1/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'pirate', prompt: 'In the morning the', max_tokens: 24, temperature: 0 }),
    })).json()) as { choices: Array<{ text: string }> };
    expect(gen.length).toBeGreaterThan(0);
    expect(gen.trim()).toBe(api.choices[0].text.trim()); // greedy: the page shows what the API returns
    expect(await page.evaluate(() => (window as unknown as { growth: number }).growth)).toBeGreaterThan(3);
    expect(await text('#chat-stats')).toMatch(/^TTFT \d+ ms · [\d.]+ tok\/s · \d+ tokens · (length|stop)$/);
    expect(await text('#chat-error')).toBe('');
  });

  it('chats (chat mode) with an adapter', async () => {
    await page.click('#chat-clear');
    await setValue('#mode', 'chat');
    await setValue('#max-tokens', '16');
    await page.select('#chat-model', 'poet');
    await page.type('#chat-input', 'Tell me about the sea');
    await page.click('#chat-send');
    await page.waitForFunction(() => document.querySelector('#transcript .assistant .text:not(.streaming)') !== null && !(document.getElementById('chat-send') as HTMLButtonElement).disabled);
    expect(await page.$$eval('#transcript .msg', (ms) => ms.map((m) => m.className))).toEqual(['msg user', 'msg assistant']);
    expect((await text('#transcript .assistant .text')).length).toBeGreaterThan(0);
    expect(await text('#transcript .assistant .who')).toBe('poet');
    expect(await text('#chat-stats')).toMatch(/TTFT \d+ ms/);
    await shot(page, 'chat');
  });

  it('compares two adapters side by side, streamed at once', async () => {
    await page.click('#tabs button[data-view="compare"]');
    await setValue('#mode', 'completion');
    await setValue('#max-tokens', '32');
    // The first two adapters are preselected; pick pirate and robot instead.
    await page.$$eval('#compare-models input', (is) => is.forEach((i) => ((i as HTMLInputElement).checked = false)));
    await page.click('#compare-models input[value="pirate"]');
    await page.click('#compare-models input[value="robot"]');
    await page.type('#compare-input', 'In the morning the');
    await page.click('#compare-run');
    await page.waitForFunction(() => document.querySelectorAll('#panes .pane').length === 2 && document.querySelectorAll('#panes .text.streaming').length === 0, { timeout: 20_000 });
    const panes = await page.$$eval('#panes .pane', (ps) => ps.map((p) => ({
      model: p.querySelector('h3')!.textContent,
      text: (p.querySelector('.text') as HTMLElement).innerText,
      stats: p.querySelector('.stats')!.textContent,
    })));
    expect(panes.map((p) => p.model)).toEqual(['pirate', 'robot']);
    for (const p of panes) {
      expect(p.text.length, p.model!).toBeGreaterThan(10);
      expect(p.stats).toMatch(/^TTFT \d+ ms · [\d.]+ tok\/s · \d+ tokens/);
    }
    expect(panes[0].text).not.toBe(panes[1].text);
    await shot(page, 'compare');
  });

  it('uploads an adapter with the file inputs, sees it appear, deletes it', async () => {
    await page.click('#tabs button[data-view="adapters"]');
    await page.waitForFunction(() => document.querySelectorAll('#adapters tbody tr[data-id]').length === 3);
    await page.type('#upload-id', 'pirate-copy');
    await uploadFile('#upload-config', join(demo.adapterDir, 'pirate', 'adapter_config.json'));
    await uploadFile('#upload-model', join(demo.adapterDir, 'pirate', 'adapter_model.safetensors'));
    expect(await text('#upload-files')).toContain('adapter_model.safetensors ← adapter_model.safetensors');
    await page.click('#upload-button');
    await page.waitForSelector('#adapters tbody tr[data-id="pirate-copy"]');
    expect(await text('#upload-status')).toMatch(/^uploaded pirate-copy: rank 4/);
    expect(await options('#chat-model')).toContain('pirate-copy');
    // Compare takes four at most: with five models, ticking them all leaves the fifth disabled.
    expect(await page.$$eval('#compare-models input', (is) => {
      for (const i of is) (i as HTMLInputElement).checked = false;
      is[0].dispatchEvent(new Event('change')); // re-enables every box
      for (const i of is) (i as HTMLInputElement).click();
      return [is.length, is.filter((i) => (i as HTMLInputElement).checked).length, is.filter((i) => (i as HTMLInputElement).disabled).length];
    })).toEqual([5, 4, 1]);
    const del = '#adapters tbody tr[data-id="pirate-copy"] button';
    await page.click(del);
    expect(await text(del)).toBe('Confirm delete');
    await page.click(del);
    await page.waitForFunction(() => document.querySelector('#adapters tbody tr[data-id="pirate-copy"]') === null);
    expect(await text('#upload-status')).toBe('deleted pirate-copy');
    expect(await options('#chat-model')).not.toContain('pirate-copy');
    expect((await fetch(`${srv.url}/v1/adapters/pirate-copy`)).status).toBe(404);
  });

  it('a wrong upload shows the server\'s error message', async () => {
    // llama-gqa's r4-mlp does not fit the demo model: the server says why; the page shows that text.
    const fd = new FormData();
    fd.append('id', 'wrong');
    for (const f of ['adapter_config.json', 'adapter_model.safetensors']) fd.append(f, new Blob([readFileSync(join(R4, f))]), f);
    const res = await fetch(`${srv.url}/v1/adapters`, { method: 'POST', body: fd });
    expect(res.status).toBe(400);
    const message = ((await res.json()) as { error: { message: string } }).error.message;
    const before = errors.length;
    await page.type('#upload-id', 'wrong');
    await uploadFile('#upload-config', join(R4, 'adapter_config.json'));
    await uploadFile('#upload-model', join(R4, 'adapter_model.safetensors'));
    await page.click('#upload-button');
    await page.waitForFunction(() => document.getElementById('upload-error')!.textContent !== '');
    expect(await text('#upload-error')).toBe(message);
    // Swapped files (the JSON config as the weights): the safetensors parser's message.
    await uploadFile('#upload-model', join(R4, 'adapter_config.json'));
    await page.click('#upload-button');
    await page.waitForFunction((m) => { const t = document.getElementById('upload-error')!.textContent; return t !== '' && t !== m; }, {}, message);
    expect(await text('#upload-error')).toMatch(/safetensors/i);
    await shot(page, 'upload-error');
    expect(await page.$$eval('#adapters tbody tr[data-id]', (rs) => rs.map((r) => (r as HTMLElement).dataset.id))).toEqual(['pirate', 'poet', 'robot']);
    // The only console errors are the browser's own lines about those two 400 responses.
    expect(errors.slice(before).every((e) => /status of 400/.test(e)), errors.join('\n')).toBe(true);
  });

  it('the metrics panel counts the generations', async () => {
    await page.waitForFunction(() => Number(document.getElementById('m-gen')!.textContent!.split(' ')[0]) > 0);
    expect(await text('#m-gen')).toMatch(/^\d+( \([\d.]+ tok\/s\))?$/);
    expect(Number(await text('#m-loads'))).toBeGreaterThanOrEqual(3); // pirate, poet, robot (and the copy)
    const widths = await page.$$eval('#pool-bar span', (ss) => ss.map((s) => (s as HTMLElement).style.width));
    expect(widths.every((w) => /%$/.test(w))).toBe(true);
    await shot(page, 'adapters');
    // Through chat, compare, upload and delete: no console error but the two expected 400 lines.
    expect(errors.filter((e) => !/status of 400/.test(e))).toEqual([]);
  });

  it('with --api-key the page asks for the key, then works with it (drop an adapter in, delete it)', async () => {
    const p = await browser.newPage();
    await p.setViewport({ width: 1280, height: 860 });
    const errs: string[] = [];
    collect(p, errs);
    await p.goto(keyed.url + '/', { waitUntil: 'networkidle0' });
    await p.waitForSelector('#auth:not([hidden])');
    expect(await p.$eval('#layout', (e) => (e as HTMLElement).hidden)).toBe(true);
    await shot(p, 'api-key');
    // A wrong key: still asked, with the server's message.
    await p.type('#auth-key', 'not-the-key');
    await p.click('#auth button[type="submit"]');
    await p.waitForFunction(() => document.getElementById('auth-error')!.textContent !== '');
    expect(await p.$eval('#auth-error', (e) => e.textContent)).toMatch(/invalid or missing API key/);
    await p.type('#auth-key', KEY);
    await p.click('#auth button[type="submit"]');
    await p.waitForSelector('#layout:not([hidden])');
    expect(await p.$eval('#base-model', (e) => e.textContent)).toBe('base: llama-gqa');
    // Kept in this tab only: sessionStorage, no cookie, no localStorage.
    expect(await p.evaluate(() => [sessionStorage.getItem('loraplex.apiKey'), localStorage.length, document.cookie])).toEqual([KEY, 0, '']);
    // Drag and drop r4-mlp's two files onto the drop zone.
    await p.click('#tabs button[data-view="adapters"]');
    const files = ['adapter_config.json', 'adapter_model.safetensors'].map((name) => ({ name, b64: readFileSync(join(R4, name)).toString('base64') }));
    await p.evaluate((files) => {
      const dt = new DataTransfer();
      for (const f of files) dt.items.add(new File([Uint8Array.from(atob(f.b64), (c) => c.charCodeAt(0))], f.name));
      document.getElementById('drop')!.dispatchEvent(new DragEvent('drop', { dataTransfer: dt, bubbles: true, cancelable: true }));
    }, files);
    expect(await p.$eval('#upload-files', (e) => e.textContent)).toMatch(/adapter_config\.json ← adapter_config\.json .* adapter_model\.safetensors ← adapter_model\.safetensors/);
    await p.type('#upload-id', 'r4-mlp');
    await p.click('#upload-button');
    await p.waitForSelector('#adapters tbody tr[data-id="r4-mlp"]');
    const row = await p.$$eval('#adapters tbody tr[data-id="r4-mlp"] td', (tds) => tds.slice(0, 4).map((t) => t.textContent!));
    expect(row.slice(0, 3)).toEqual(['r4-mlp', '4', '8']);
    expect(row[3].split(', ').sort()).toEqual(['down_proj', 'gate_proj', 'up_proj']);
    const del = '#adapters tbody tr[data-id="r4-mlp"] button';
    await p.click(del);
    await p.click(del);
    await p.waitForFunction(() => document.querySelector('#adapters tbody tr[data-id="r4-mlp"]') === null);
    expect((await fetch(`${keyed.url}/v1/adapters/r4-mlp`, { headers: { authorization: `Bearer ${KEY}` } })).status).toBe(404);
    // The only console errors are the browser's lines about the two 401s (no key, wrong key).
    expect(errs.length).toBeLessThanOrEqual(2);
    expect(errs.every((e) => /status of 401/.test(e)), errs.join('\n')).toBe(true);
    await p.close();
  });
});
