#!/usr/bin/env node
// Entry point: runs the compiled CLI (dist/, built by `npm ci` / `npm run build`).
import { main } from '../dist/server/cli.js';

main(process.argv.slice(2)).then(
  (code) => {
    if (code !== 0) process.exitCode = code;
  },
  (err) => {
    process.stderr.write(`loraplex: fatal: ${err && err.stack ? err.stack : err}\n`);
    process.exitCode = 1;
  },
);
