// Starts a real loraplex HTTP server for tests: in-process (buildApp + listen on an ephemeral
// loopback port) or as a child process running the CLI (for signals and multi-replica tests).
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { FastifyInstance } from 'fastify';
import { buildApp, type AppState } from '../../server/app.js';
import { serveConfig, type ServeConfig } from '../../server/config.js';
import { Engine, type EngineOptions } from '../../server/engine/engine.js';
import { ROOT } from './fixtures.js';

export interface TestServer {
  url: string;
  app: FastifyInstance;
  engine: Engine;
  cfg: ServeConfig;
  state: AppState;
  close(): Promise<void>;
}

export async function startTestServer(
  engineOpts: EngineOptions,
  flags: string[] = [],
): Promise<TestServer> {
  const adapterDir = engineOpts.adapterDir ?? mkdtempSync(join(tmpdir(), 'loraplex-adapters-'));
  const cfg = { ...serveConfig(flags, {}), adapterDir };
  const engine = await Engine.create({ memoryBudget: 16 << 20, ...engineOpts, adapterDir });
  const state: AppState = { draining: false };
  const app = await buildApp(engine, cfg, { state });
  await app.listen({ host: '127.0.0.1', port: 0 });
  const addr = app.server.address();
  const port = typeof addr === 'object' && addr ? addr.port : 0;
  return {
    url: `http://127.0.0.1:${port}`,
    app,
    engine,
    cfg,
    state,
    async close() {
      await app.close();
      await engine.close();
    },
  };
}

export interface ChildServer {
  url: string;
  proc: ChildProcess;
  logs: () => string;
  exited: Promise<number | null>;
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

/** Runs `node bin/loraplex.js serve <args> --port 0` and waits for its "listening" log line. */
export async function startChildServer(args: string[], env: NodeJS.ProcessEnv = {}, timeoutMs = 30_000): Promise<ChildServer> {
  const proc = spawn(process.execPath, ['--import', 'tsx', join(ROOT, 'server', 'main.ts'), 'serve', '--host', '127.0.0.1', '--port', '0', ...args], {
    cwd: ROOT,
    env: { ...process.env, ...env, LORAPLEX_LOG_LEVEL: 'info' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  proc.stdout!.on('data', (d) => (out += d));
  proc.stderr!.on('data', (d) => (out += d));
  const exited = new Promise<number | null>((r) => proc.on('exit', (code) => r(code)));
  const url = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`server did not start:\n${out}`)), timeoutMs);
    const check = () => {
      const m = /"address":"(http:\/\/[^"]+)"/.exec(out);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]);
      }
    };
    proc.stderr!.on('data', check);
    proc.on('exit', () => {
      clearTimeout(timer);
      reject(new Error(`server exited before listening:\n${out}`));
    });
  });
  return {
    url,
    proc,
    logs: () => out,
    exited,
    async stop(signal: NodeJS.Signals = 'SIGTERM') {
      if (proc.exitCode === null) proc.kill(signal);
      return exited;
    },
  };
}
