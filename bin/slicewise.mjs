#!/usr/bin/env node
// Entry point for `npx slicewise`: runs the TypeScript CLI directly, no build step. Node is re-executed with
// tsx's loader as a command-line flag (not registered at run time) because BullMQ's sandboxed processors run in
// worker threads, and worker threads inherit flags, not loaders registered later.
import { spawn } from 'node:child_process';
import { createRequire } from 'node:module';
import { fileURLToPath, pathToFileURL } from 'node:url';

const require = createRequire(import.meta.url);
const main = fileURLToPath(new URL('../src/cli/main.ts', import.meta.url));
const tsx = pathToFileURL(require.resolve('tsx/esm')).href;

const child = spawn(process.execPath, [...process.execArgv, '--import', tsx, main, ...process.argv.slice(2)], { stdio: 'inherit' });
// The child shares our terminal, so Ctrl-C reaches it directly; signals sent to this pid are passed on.
for (const sig of ['SIGTERM', 'SIGHUP']) process.on(sig, () => child.kill(sig));
process.on('SIGINT', () => {});
child.on('exit', (code, signal) => {
  if (signal) process.kill(process.pid, signal);
  else process.exit(code ?? 1);
});
