/**
 * Real processes for the fault suite: `slicewise worker` / `slicewise api` children, a redis-server of the test's
 * own (so it can be killed and restarted without touching the shared one), and a TCP proxy that can cut a
 * service off from the processes behind it.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { createServer, connect, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach } from 'vitest';
import { BIN } from '../helpers/cli.ts';
import { freePort } from '../../src/cli/redis-server.ts';
import { harness, TEST_REDIS_URL, type Harness } from '../helpers/services.ts';

export interface Proc {
  proc: ChildProcess;
  /** Everything printed so far (stdout and stderr interleaved). */
  output(): string;
  /** Resolves when the output matches, rejects after `timeoutMs` or when the process exits first. */
  waitFor(pattern: RegExp, timeoutMs?: number): Promise<void>;
  /** Resolves with the exit code (or signal name) once the process has exited. */
  exited: Promise<number | string>;
  signal(sig: NodeJS.Signals): void;
}

/**
 * `slicewise ARGS` as a long-lived child process. `fileSizeLimitKb` caps every file it writes (RLIMIT_FSIZE, as a
 * full disk would: Node ignores SIGXFSZ, so a write past it fails with EFBIG); `exec` keeps the pid node's own.
 */
export function startCli(args: string[], { env, cwd, fileSizeLimitKb }: { env: NodeJS.ProcessEnv; cwd?: string; fileSizeLimitKb?: number }): Proc {
  const proc =
    fileSizeLimitKb === undefined
      ? spawn(process.execPath, [BIN, ...args], { cwd, env, stdio: ['ignore', 'pipe', 'pipe'] })
      : spawn('sh', ['-c', `ulimit -f ${fileSizeLimitKb * 2} && exec "$0" "$@"`, process.execPath, BIN, ...args], { cwd, env, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  const waiters: Array<() => void> = [];
  const feed = (d: Buffer) => {
    out += d;
    for (const w of waiters.splice(0)) w();
  };
  proc.stdout!.on('data', feed);
  proc.stderr!.on('data', feed);
  // 'close', not 'exit': 'exit' can come before the last of the child's output has been read from its pipes.
  const exited = new Promise<number | string>((res) => proc.once('close', (code, sig) => res(code ?? sig ?? -1)));
  let done = false;
  let how = '';
  exited.then((codeOrSignal) => {
    done = true;
    how = typeof codeOrSignal === 'number' ? `exit code ${codeOrSignal}` : `signal ${codeOrSignal}`;
    for (const w of waiters.splice(0)) w();
  });
  return {
    proc,
    output: () => out,
    exited,
    signal: (sig) => {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(sig);
    },
    waitFor(pattern, timeoutMs = 60_000) {
      return new Promise((res, rej) => {
        const timer = setTimeout(() => rej(new Error(`timed out after ${timeoutMs} ms waiting for ${pattern} in:\n${out.slice(-3000)}`)), timeoutMs);
        const check = () => {
          if (pattern.test(out)) {
            clearTimeout(timer);
            res();
          } else if (done) {
            clearTimeout(timer);
            rej(new Error(`process exited (${how}) before printing ${pattern}:\n${out.slice(-3000)}`));
          } else waiters.push(check);
        };
        check();
      });
    },
  };
}

export interface WorkerProcessOptions {
  redisUrl: string;
  databaseUrl: string;
  dataDir: string;
  prefix: string;
  queues?: string[];
  concurrency?: number;
  extraEnv?: NodeJS.ProcessEnv;
  /** See startCli. */
  fileSizeLimitKb?: number;
  /** How long it may take to be ready (several processes starting at once on a busy machine take longer). Default 60 s. */
  readyTimeoutMs?: number;
}

/** A `slicewise worker` process on the given Redis and Postgres; resolves once its workers are ready. */
export async function startWorkerProcess({
  redisUrl,
  databaseUrl,
  dataDir,
  prefix,
  queues,
  concurrency,
  extraEnv = {},
  fileSizeLimitKb,
  readyTimeoutMs = 60_000,
}: WorkerProcessOptions): Promise<Proc> {
  const args = ['worker', '--data-dir', dataDir];
  if (queues) args.push('--queues', queues.join(','));
  if (concurrency) args.push('--concurrency', String(concurrency));
  const p = startCli(args, {
    env: { ...process.env, REDIS_URL: redisUrl, DATABASE_URL: databaseUrl, SLICEWISE_QUEUE_PREFIX: prefix, LOG_LEVEL: 'info', SLICEWISE_LOG: '', ...extraEnv },
    fileSizeLimitKb,
  });
  // One that never gets ready is killed here: the caller has no handle to do it with.
  await p.waitFor(/Workers ready/, readyTimeoutMs).catch((err) => {
    p.signal('SIGKILL');
    throw err;
  });
  return p;
}

/** A `slicewise api` process (loopback, no workers) on the given Redis and Postgres; resolves once it listens. */
export async function startApiProcess({
  redisUrl,
  databaseUrl,
  dataDir,
  prefix,
  port,
  extraEnv = {},
}: {
  redisUrl: string;
  databaseUrl: string;
  dataDir: string;
  prefix: string;
  port: number;
  extraEnv?: NodeJS.ProcessEnv;
}): Promise<Proc & { url: string }> {
  const p = startCli(['api', '--host', '127.0.0.1', '--port', String(port), '--data-dir', dataDir], {
    env: { ...process.env, REDIS_URL: redisUrl, DATABASE_URL: databaseUrl, SLICEWISE_QUEUE_PREFIX: prefix, LOG_LEVEL: 'info', SLICEWISE_LOG: '', ...extraEnv },
  });
  await p.waitFor(/API listening on/, 60_000).catch((err) => {
    p.signal('SIGKILL');
    throw err;
  });
  return { ...p, url: `http://127.0.0.1:${port}` };
}

export { freePort };

export interface TestRedis {
  url: string;
  port: number;
  /** kill -9: no chance to write anything more. */
  kill(): Promise<void>;
  /** Starts it again on the same port and dir (so with AOF on, the data comes back). */
  start(): Promise<void>;
  stop(): Promise<void>;
}

/** A redis-server of the test's own, AOF on or off, on a free port, data in `dir`. */
export async function testRedis(dir: string, { aof = true }: { aof?: boolean } = {}): Promise<TestRedis> {
  await mkdir(dir, { recursive: true });
  const port = await freePort();
  let proc: ChildProcess | undefined;
  const start = async () => {
    proc = spawn(
      'redis-server',
      ['--port', String(port), '--bind', '127.0.0.1', '--appendonly', aof ? 'yes' : 'no', '--save', '', '--maxmemory-policy', 'noeviction', '--dir', dir, '--logfile', join(dir, 'redis.log')],
      { stdio: 'ignore' },
    );
    for (let i = 0; i < 100; i++) {
      const ok = await new Promise<boolean>((res) => {
        const s = connect(port, '127.0.0.1');
        s.once('connect', () => {
          s.write('PING\r\n');
          s.once('data', (d) => {
            s.destroy();
            res(d.toString().startsWith('+PONG'));
          });
        });
        s.once('error', () => res(false));
      });
      if (ok) return;
      await new Promise((r) => setTimeout(r, 100));
    }
    throw new Error(`test redis-server on port ${port} did not start (see ${join(dir, 'redis.log')})`);
  };
  const kill = async () => {
    const p = proc;
    if (!p || p.exitCode !== null || p.signalCode !== null) return;
    const gone = new Promise((r) => p.once('exit', r));
    p.kill('SIGKILL');
    await gone;
  };
  await start();
  return { url: `redis://127.0.0.1:${port}`, port, kill, start, stop: kill };
}

export interface CutProxy {
  port: number;
  /** Drops every open connection and refuses new ones until `restore()`. */
  cut(): void;
  /**
   * Keeps connections open but forwards nothing more to the service: every request hangs unanswered, as behind
   * a dead link. `restore()` forwards again (what was held back included); `cut()` drops it instead.
   */
  stall(): void;
  restore(): void;
  close(): Promise<void>;
}

/** A TCP proxy in front of `host:port` that a test can cut, as if the service behind it were down. */
export async function cutProxy(targetHost: string, targetPort: number): Promise<CutProxy> {
  let down = false;
  let stalled = false;
  const open = new Set<Socket>();
  const pairs = new Map<Socket, Socket>();
  const server: Server = createServer((client) => {
    if (down) {
      client.destroy();
      return;
    }
    const upstream = connect(targetPort, targetHost);
    open.add(client);
    open.add(upstream);
    const drop = () => {
      client.destroy();
      upstream.destroy();
      open.delete(client);
      open.delete(upstream);
      pairs.delete(client);
    };
    client.on('error', drop);
    upstream.on('error', drop);
    client.on('close', drop);
    upstream.on('close', drop);
    pairs.set(client, upstream);
    if (!stalled) client.pipe(upstream);
    upstream.pipe(client);
  });
  const port = await new Promise<number>((res) => server.listen(0, '127.0.0.1', () => res((server.address() as { port: number }).port)));
  return {
    port,
    cut() {
      down = true;
      for (const s of open) s.destroy();
      open.clear();
      pairs.clear();
    },
    stall() {
      stalled = true;
      for (const [client, upstream] of pairs) {
        client.unpipe(upstream);
        client.pause();
      }
    },
    restore() {
      down = false;
      if (stalled) for (const [client, upstream] of pairs) client.pipe(upstream);
      stalled = false;
    },
    close: () =>
      new Promise((res) => {
        for (const s of open) s.destroy();
        server.close(() => res());
      }),
  };
}

/** kill -9, and wait until it is gone. */
export async function kill9(p: Proc): Promise<void> {
  p.signal('SIGKILL');
  await p.exited;
}

/** Polls `fn` until it gives a truthy value; past the timeout fails naming what it waited for (and the logs). */
export async function until<T>(what: string, fn: () => Promise<T | undefined | false | null>, timeoutMs: number, logs?: () => string, everyMs = 50): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${logs ? `\n${logs()}` : ''}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

export interface FaultScene {
  /** The database, data dir and key prefix the processes share; its in-process workers are off. */
  h: Harness;
  /** A scratch folder of the test's own. */
  root: string;
  /** Push every process the test starts: they are killed after it. */
  procs: Proc[];
  /** The tail of every process's output, for failure messages. */
  logs(): string;
  /** A `slicewise worker` on the shared test Redis and the scene's database, data dir and prefix; killed after the test. */
  worker(opts?: Partial<WorkerProcessOptions>): Promise<Proc>;
}

/**
 * One world per test, torn down after it (processes killed, then keys, database and folders removed): call in a
 * test file's top level, and the returned function in each test.
 */
export function faultScenes(): () => Promise<FaultScene> {
  let current: FaultScene | undefined;
  afterEach(async () => {
    const s = current;
    current = undefined;
    if (!s) return;
    for (const p of s.procs) p.signal('SIGKILL');
    await Promise.all(s.procs.map((p) => p.exited));
    await s.h.close();
    await rm(s.root, { recursive: true, force: true });
  });
  return async () => {
    const h = await harness('postgres', { workers: false });
    const root = await mkdtemp(join(tmpdir(), 'slicewise-faults-'));
    const procs: Proc[] = [];
    const logs = () => procs.map((p, i) => `--- process ${i} (pid ${p.proc.pid}) ---\n${p.output().slice(-4000)}`).join('\n');
    const worker = async (opts: Partial<WorkerProcessOptions> = {}) => {
      const p = await startWorkerProcess({ redisUrl: TEST_REDIS_URL, databaseUrl: h.db.url!, dataDir: h.dataDir, prefix: h.ctx.prefix, ...opts });
      procs.push(p);
      return p;
    };
    current = { h, root, procs, logs, worker };
    return current;
  };
}
