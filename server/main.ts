// Runs the CLI from source (tests spawn this with tsx); bin/loraplex.js runs the compiled copy.
import { main } from './cli.js';

main(process.argv.slice(2)).then(
  (code) => {
    if (code !== 0) process.exitCode = code;
  },
  (err: unknown) => {
    process.stderr.write(`loraplex: fatal: ${err instanceof Error ? err.stack : String(err)}\n`);
    process.exitCode = 1;
  },
);
