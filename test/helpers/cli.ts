import { spawn } from 'node:child_process';
import { join } from 'node:path';

export const BIN = join(__dirname, '..', '..', 'bin', 'slicewise.mjs');

/** The environment of a user who has set nothing: no REDIS_URL, no DATABASE_URL (a private Redis, PGlite). */
export function bareEnv(extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
  const env = { ...process.env, ...extra };
  delete env.REDIS_URL;
  delete env.DATABASE_URL;
  return env;
}

/** `slicewise ARGS` as a child process in `cwd`: its exit code, everything it printed, and stdout alone. */
export function runCli(args: string[], cwd: string, env: NodeJS.ProcessEnv = bareEnv()): Promise<{ code: number | null; out: string; stdout: string }> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, [BIN, ...args], { cwd, env, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let stdout = '';
    p.stdout.on('data', (d) => {
      out += d;
      stdout += d;
    });
    p.stderr.on('data', (d) => (out += d));
    // 'close', not 'exit': 'exit' can come before the last of the output has been read from the pipes.
    p.on('close', (code) => resolve({ code, out, stdout }));
  });
}
