/**
 * The private redis-server of a data dir (`slicewise pipeline`/`api` without REDIS_URL) never shares its files with
 * another: one left running by a killed slicewise process is shut down before a new one starts from its AOF, and
 * one whose process still runs makes a second start refuse, naming that process. Real redis-server processes.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Redis } from 'ioredis';
import { afterEach, describe, expect, it } from 'vitest';
import { startPrivateRedis } from '../src/cli/redis-server.ts';

const CHILD = join(__dirname, 'helpers', 'private-redis-child.ts');
const cleanups: Array<() => Promise<unknown> | void> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

async function dataDir(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'slicewise-private-redis-'));
  cleanups.push(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

/** The stand-in slicewise process on `dir`, started. */
function startHolder(dir: string): ChildProcess {
  const proc = spawn(process.execPath, ['--import', 'tsx', CHILD, dir], { stdio: ['ignore', 'pipe', 'pipe'] });
  // SIGTERM: the holder stops its server (a test that fails half-way must not leave one running).
  cleanups.push(async () => {
    if (proc.exitCode !== null || proc.signalCode !== null) return;
    const gone = new Promise((r) => proc.once('exit', r));
    proc.kill('SIGTERM');
    await gone;
  });
  return proc;
}

/** The stand-in slicewise process on `dir`, once its server is up. */
async function holder(dir: string): Promise<{ proc: ChildProcess; url: string; out: () => string }> {
  const proc = startHolder(dir);
  let out = '';
  proc.stdout!.on('data', (d) => (out += d));
  proc.stderr!.on('data', (d) => (out += d));
  const url = await new Promise<string>((res, rej) => {
    const timer = setTimeout(() => rej(new Error(`no URL from the holder in 30 s:\n${out}`)), 30_000);
    proc.stdout!.on('data', () => {
      const m = /^URL (\S+)$/m.exec(out);
      if (m) {
        clearTimeout(timer);
        res(m[1]!);
      }
    });
    proc.once('exit', (code) => rej(new Error(`the holder exited (${code}):\n${out}`)));
  });
  return { proc, url, out: () => out };
}

function client(url: string): Redis {
  const r = new Redis(url, { maxRetriesPerRequest: 0, retryStrategy: () => null, lazyConnect: true });
  r.on('error', () => {});
  return r;
}

async function answers(url: string): Promise<boolean> {
  const r = client(url);
  try {
    await r.connect();
    return (await r.ping()) === 'PONG';
  } catch {
    return false;
  } finally {
    r.disconnect();
  }
}

describe('a data dir private Redis', () => {
  it('left running by a killed slicewise process is shut down, and the next one starts from its AOF', async () => {
    const dir = await dataDir();
    const first = await holder(dir);
    const c = client(first.url);
    await c.connect();
    await c.set('written-before-the-kill', 'kept');
    c.disconnect();
    const killed = new Promise((r) => first.proc.once('exit', r));
    first.proc.kill('SIGKILL');
    await killed;
    // The orphan: its slicewise process is gone, the server is not.
    expect(await answers(first.url)).toBe(true);

    const said: string[] = [];
    const second = await startPrivateRedis(dir, { say: (l) => said.push(l) });
    cleanups.push(() => second.stop());
    expect(said.join('\n')).toMatch(new RegExp(`shut down a private redis-server \\(port ${new URL(first.url).port}\\) left running by slicewise process ${first.proc.pid}, which is gone`));
    expect(await answers(first.url)).toBe(false);
    const c2 = client(second.url);
    await c2.connect();
    expect(await c2.get('written-before-the-kill')).toBe('kept');
    c2.disconnect();

    await second.stop();
    expect(existsSync(join(dir, 'redis', 'owner.json'))).toBe(false);
  }, 60_000);

  it('in use by a running slicewise process makes a second start refuse, naming that process, and leaves it serving', async () => {
    const dir = await dataDir();
    const first = await holder(dir);
    await expect(startPrivateRedis(dir)).rejects.toThrow(new RegExp(`in use by another slicewise process \\(pid ${first.proc.pid}, its redis-server on port ${new URL(first.url).port}\\)`));
    expect(await answers(first.url)).toBe(true);

    // Stopped the right way, it leaves nothing behind, and the next start is a plain one.
    const exited = new Promise((r) => first.proc.once('exit', r));
    first.proc.kill('SIGTERM');
    expect(await exited).toBe(0);
    expect(await answers(first.url)).toBe(false);
    expect(existsSync(join(dir, 'redis', 'owner.json'))).toBe(false);
    const said: string[] = [];
    const next = await startPrivateRedis(dir, { say: (l) => said.push(l) });
    await next.stop();
    expect(said).toEqual([]);
  }, 60_000);

  it('claimed by two slicewise processes at the same moment: one serves, the other is refused naming it', async () => {
    const dir = await dataDir();
    const procs = [startHolder(dir), startHolder(dir)];
    const outcomes = await Promise.all(
      procs.map(
        (proc) =>
          new Promise<{ url?: string; out: string }>((res) => {
            let out = '';
            const onData = (d: Buffer) => {
              out += d;
              const m = /^URL (\S+)$/m.exec(out);
              if (m) res({ url: m[1], out });
            };
            proc.stdout!.on('data', onData);
            proc.stderr!.on('data', onData);
            proc.once('close', () => res({ out }));
          }),
      ),
    );
    const served = outcomes.filter((o) => o.url);
    expect(served, outcomes.map((o) => o.out).join('\n---\n')).toHaveLength(1);
    const refused = outcomes.find((o) => !o.url)!;
    const winner = procs[outcomes.indexOf(served[0]!)]!;
    expect(refused.out).toContain(`in use by another slicewise process (pid ${winner.pid}`);
    expect(await answers(served[0]!.url!)).toBe(true);
  }, 60_000);
});
