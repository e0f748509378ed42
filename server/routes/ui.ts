// The playground: static HTML/CSS/JS modules from server/ui/ (no build step, no CDN), served by
// @fastify/static under /ui/ and at GET / for browsers. API clients keep their JSON: GET / answers
// the page only when the Accept header prefers text/html, and the OpenAI-shaped 404 otherwise.
// The page and its assets need no API key (app.ts opens uiOpenPaths()); the page's own API calls
// carry the key the user types in.
import { existsSync, readdirSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import fastifyStatic from '@fastify/static';
import type { FastifyInstance, FastifyReply } from 'fastify';

/** Every asset comes from this server: no inline script, no other origin. */
const CSP = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/** server/ui/ next to this module (tsx) or, from dist/server/routes/, in the package's server/. */
export function uiDir(): string | null {
  for (const rel of ['../ui/', '../../../server/ui/']) {
    const dir = fileURLToPath(new URL(rel, import.meta.url));
    if (existsSync(dir + 'index.html')) return dir;
  }
  return null;
}

/** The exact paths the playground serves: `/` and `/ui/<file>`. Empty when there is no page. */
export function uiOpenPaths(dir: string | null = uiDir()): Set<string> {
  if (!dir) return new Set();
  const files = readdirSync(dir, { withFileTypes: true }).filter((e) => e.isFile()).map((e) => `/ui/${e.name}`);
  return new Set(['/', ...files]);
}

/** q-value of the most specific range in `accept` that matches `type` (0 when none does). */
function quality(accept: string, type: string, wildcards: boolean): number {
  const [major] = type.split('/');
  let best = -1;
  let q = 0;
  for (const part of accept.split(',')) {
    const [range, ...params] = part.trim().toLowerCase().split(';');
    const r = range.trim();
    const spec = r === type ? 2 : r === `${major}/*` ? 1 : r === '*/*' && wildcards ? 0 : -1;
    if (spec <= best) continue;
    best = spec;
    const qp = params.map((p) => p.trim()).find((p) => p.startsWith('q='));
    const v = qp ? Number(qp.slice(2)) : 1;
    q = Number.isFinite(v) ? v : 0;
  }
  return q;
}

/** A browser navigation: text/html named (not only through *\/*) and liked at least as much as JSON. */
export function prefersHtml(accept: string | undefined): boolean {
  if (!accept) return false;
  const html = quality(accept, 'text/html', false);
  return html > 0 && html >= quality(accept, 'application/json', true);
}

function pageHeaders(reply: FastifyReply): void {
  reply.header('content-security-policy', CSP);
  reply.header('x-content-type-options', 'nosniff');
  reply.header('referrer-policy', 'no-referrer');
}

export interface UiRouteDeps {
  dir: string;
}

export async function uiRoutes(app: FastifyInstance, deps: UiRouteDeps): Promise<void> {
  await app.register(fastifyStatic, {
    root: deps.dir,
    prefix: '/ui/',
    wildcard: false, // one route per file found at start: nothing else under /ui/ resolves
    index: false,
    list: false,
    dotfiles: 'deny',
    cacheControl: false,
    setHeaders: (reply) => {
      pageHeaders(reply);
      reply.header('cache-control', 'no-cache'); // revalidate (ETag): a new server version shows at once
    },
  });
  app.get('/', async (req, reply) => {
    reply.header('vary', 'accept');
    if (!prefersHtml(req.headers.accept)) return reply.callNotFound();
    return reply.sendFile('index.html');
  });
}

/** What `serve` logs once it listens: where the playground is and one request to try. */
export function readyHints(opts: { host: string; port: number; model: string; ui: boolean; apiKey: boolean }): string[] {
  const host = opts.host === '0.0.0.0' || opts.host === '::' || opts.host === '' ? '127.0.0.1' : opts.host.includes(':') ? `[${opts.host}]` : opts.host;
  const base = `http://${host}:${opts.port}`;
  const body = JSON.stringify({ model: opts.model, prompt: 'The', max_tokens: 16 }).replace(/'/g, "'\\''");
  const auth = opts.apiKey ? ` -H "authorization: Bearer $LORAPLEX_API_KEY"` : '';
  return [
    opts.ui ? `playground: open ${base} in a browser` : 'playground off (--no-ui)',
    `try: curl ${base}/v1/completions -H 'content-type: application/json'${auth} -d '${body}'`,
  ];
}
