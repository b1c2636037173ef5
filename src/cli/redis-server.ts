import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdir } from 'node:fs/promises';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { Redis } from 'ioredis';
import { SliceWiseError } from '../lib/errors.ts';
import { within } from '../queues/connection.ts';
import { env } from '../env.ts';
import { redisDir } from '../disk/layout.ts';
import { claimRedisFiles } from './redis-owner.ts';

export class RedisMissingError extends SliceWiseError {
  constructor(extra = '') {
    super(
      'redis-server was not found on PATH, and slicewise needs one when REDIS_URL is not set.\n' +
        '  Debian/Ubuntu: sudo apt-get install -y redis-server\n' +
        '  macOS:         brew install redis\n' +
        '  Docker:        docker compose up -d redis   (then export REDIS_URL=redis://127.0.0.1:6379)\n' +
        '  Or point REDIS_URL at a Redis you already run.' +
        extra,
      { status: 503, code: 'redis_missing' },
    );
    this.name = 'RedisMissingError';
  }
}

function onPath(cmd: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' }).status === 0;
}

/**
 * On a fresh Debian machine, running as root, installing the one missing service is what the user would do
 * next anyway; elsewhere we only say how.
 */
export function installRedisIfPossible(say: (line: string) => void): boolean {
  if (onPath('redis-server')) return true;
  const root = typeof process.getuid === 'function' && process.getuid() === 0;
  if (!root || !onPath('apt-get') || env().noInstall) return false;
  say('redis-server not found; installing it with apt-get (running as root, apt present; set SLICEWISE_NO_INSTALL=1 to stop this)');
  const aptEnv = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
  let r = spawnSync('apt-get', ['install', '-y', '-qq', 'redis-server'], { stdio: ['ignore', 'ignore', 'inherit'], env: aptEnv });
  if (r.status !== 0) {
    spawnSync('apt-get', ['update', '-qq'], { stdio: ['ignore', 'ignore', 'inherit'], env: aptEnv });
    r = spawnSync('apt-get', ['install', '-y', '-qq', 'redis-server'], { stdio: ['ignore', 'ignore', 'inherit'], env: aptEnv });
  }
  // Debian's package starts a system service on 6379; ours is private, so that one can stay or go as the user likes.
  return r.status === 0 && onPath('redis-server');
}

/** A TCP port nobody listens on right now (loopback). */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address() as { port: number };
      srv.close(() => resolve(port));
    });
  });
}

export interface PrivateRedis {
  url: string;
  /** Called once if the supervisor gives up restarting the server (it kept exiting, or would not start again). */
  onGiveUp(cb: (err: SliceWiseError) => void): void;
  /** SIGTERM (it writes its AOF and exits), then SIGKILL after `graceMs` (default 5 s). */
  stop(graceMs?: number): Promise<void>;
}

/** A restart budget: more unexpected exits than this within the window, and the supervisor gives up. */
const MAX_QUICK_EXITS = 3;
const QUICK_WINDOW_MS = 60_000;
const START_TIMEOUT_MS = 10_000;

function describeExit(code: number | null, signal: NodeJS.Signals | null): string {
  return signal ? `signal ${signal}` : `code ${code}`;
}

/** Starts redis-server and waits until it answers PING; kills it and throws when it does not within 10 s. */
async function launch(args: string[], url: string, logFile: string): Promise<ChildProcess> {
  const proc: ChildProcess = spawn('redis-server', args, { stdio: 'ignore' });
  // A spawn failure (ENOENT after an uninstall) is an 'error' event; without a listener it would crash us.
  proc.once('error', () => {});
  const probe = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null });
  probe.on('error', () => {});
  const deadline = Date.now() + START_TIMEOUT_MS;
  for (;;) {
    try {
      await probe.connect();
      await probe.ping();
      probe.disconnect();
      return proc;
    } catch {
      probe.disconnect();
      if (proc.exitCode !== null || proc.signalCode !== null || Date.now() > deadline) {
        proc.kill('SIGKILL');
        throw new SliceWiseError(`the private redis-server did not start (see ${logFile})`, { status: 503, code: 'redis_unreachable' });
      }
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}

/**
 * A private redis-server for one CLI invocation: loopback only, AOF on (a crash loses no queued job),
 * noeviction (BullMQ's requirement), data under the data dir so --skip-download runs see the same history.
 *
 * Supervised: when it exits without being asked to, it is started again on the same port from the same dir,
 * so its AOF brings the queues back and the clients reconnect to it by themselves. More than three exits in a
 * minute, or a restart that does not come up, and the supervisor gives up (onGiveUp) with a reason.
 *
 * Its files are claimed first (redis-owner.ts): while another live slicewise process has them this refuses,
 * naming it, and a server left on them by a process that is gone is shut down before this one starts.
 */
export async function startPrivateRedis(dataDir: string, { say = () => {} }: { say?: (line: string) => void } = {}): Promise<PrivateRedis> {
  const dir = redisDir(dataDir);
  await mkdir(dir, { recursive: true });
  const port = await freePort();
  const logFile = join(dir, 'redis.log');
  const args = ['--port', String(port), '--bind', '127.0.0.1', '--appendonly', 'yes', '--maxmemory-policy', 'noeviction', '--dir', dir, '--save', '', '--logfile', logFile];
  const url = `redis://127.0.0.1:${port}`;
  const claim = await claimRedisFiles(dir, port, say);
  let stopping = false;
  let gaveUp: SliceWiseError | undefined;
  const giveUpListeners: Array<(err: SliceWiseError) => void> = [];
  const exits: number[] = [];
  let proc: ChildProcess;
  try {
    proc = await launch(args, url, logFile);
  } catch (err) {
    await claim.release();
    throw err;
  }
  await claim.started(proc.pid!);

  const giveUp = (message: string, cause?: unknown) => {
    gaveUp = new SliceWiseError(message, { status: 503, code: 'redis_unreachable', cause });
    for (const cb of giveUpListeners) cb(gaveUp);
  };
  const supervise = (p: ChildProcess) =>
    p.once('exit', (code, signal) => {
      if (stopping || p !== proc) return;
      void restart(describeExit(code, signal));
    });
  const restart = async (how: string) => {
    const now = Date.now();
    exits.push(now);
    while (exits.length && exits[0]! < now - QUICK_WINDOW_MS) exits.shift();
    if (exits.length > MAX_QUICK_EXITS) {
      giveUp(`the private redis-server exited ${exits.length} times within ${QUICK_WINDOW_MS / 1000} s (last: ${how}); giving up on it (see ${logFile})`);
      return;
    }
    say(`the private redis-server exited (${how}); restarting it from its AOF`);
    let lastErr: unknown;
    for (let attempt = 1; attempt <= 3 && !stopping; attempt++) {
      // A moment for the port to be free again, longer each time.
      await new Promise((r) => setTimeout(r, 200 * attempt));
      try {
        proc = await launch(args, url, logFile);
        // Stopped while it was starting: it must not outlive us.
        if (stopping) {
          proc.kill('SIGTERM');
          return;
        }
        supervise(proc);
        await claim.started(proc.pid!);
        say(`the private redis-server is up again on port ${port} (pid ${proc.pid})`);
        return;
      } catch (err) {
        lastErr = err;
      }
    }
    if (!stopping) giveUp(`the private redis-server exited (${how}) and did not start again in 3 tries (see ${logFile}); giving up on it`, lastErr);
  };
  supervise(proc);
  // Whatever way this process ends (a forced exit included), its private server goes with it.
  const onExit = () => {
    stopping = true;
    proc.kill('SIGTERM');
    claim.releaseSync();
  };
  process.once('exit', onExit);

  return {
    url,
    onGiveUp(cb) {
      if (gaveUp) cb(gaveUp);
      else giveUpListeners.push(cb);
    },
    async stop(graceMs = 5000) {
      stopping = true;
      process.off('exit', onExit);
      const p = proc;
      if (p.exitCode === null && p.signalCode === null) {
        const exited = new Promise((r) => p.once('exit', r));
        p.kill('SIGTERM');
        await within(graceMs, exited);
        if (p.exitCode === null && p.signalCode === null) p.kill('SIGKILL');
      }
      await claim.release();
    },
  };
}
