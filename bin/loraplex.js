#!/usr/bin/env node
// Entry point: runs the compiled CLI (dist/, built by `npm ci` / `npm run build`).
import '../dist/server/main.js';
