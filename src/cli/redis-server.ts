import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { mkdir, readFile, realpath, rm } from 'node:fs/promises';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { Redis } from 'ioredis';
import { SliceWiseError } from '../lib/errors.ts';
import { within } from '../queues/connection.ts';
import { env } from '../env.ts';
import { redisDir } from '../disk/layout.ts';
import { processAlive, writeJsonAtomic } from '../lib/atomic.ts';

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

/** Who runs the private redis-server of a data dir: written beside its files once it is up, removed when it stops. */
interface RedisOwner {
  /** The slicewise process that started it. */
  ownerPid: number;
  redisPid: number;
  port: number;
}

const OWNER_FILE = 'owner.json';

/** Whether `pid` is a slicewise (node) process now, not one that took the number of one that has gone. */
function slicewiseAlive(pid: number): boolean {
  if (!processAlive(pid)) return false;
  try {
    return /node|slicewise/.test(readFileSync(`/proc/${pid}/cmdline`, 'utf8'));
  } catch {
    return true; // no /proc (not Linux): the pid alone decides
  }
}

async function readOwner(dir: string): Promise<RedisOwner | undefined> {
  try {
    const o = JSON.parse(await readFile(join(dir, OWNER_FILE), 'utf8')) as Partial<RedisOwner>;
    return Number.isInteger(o.ownerPid) && Number.isInteger(o.redisPid) && Number.isInteger(o.port) ? (o as RedisOwner) : undefined;
  } catch {
    return undefined;
  }
}

/** A connection to the redis-server on `port` if it serves the files in `dir` (its CONFIG dir), else undefined. */
async function serverOn(port: number, dir: string): Promise<Redis | undefined> {
  const r = new Redis(`redis://127.0.0.1:${port}`, { lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null, connectTimeout: 2000 });
  r.on('error', () => {});
  try {
    await r.connect();
    const [, served] = (await r.config('GET', 'dir')) as [string, string];
    if (served && (await realpath(served)) === (await realpath(dir))) return r;
  } catch {
    // Nobody there, or not a Redis that answers CONFIG: not ours.
  }
  r.disconnect();
  return undefined;
}

/**
 * Before a private redis-server starts on a data dir's Redis files, no other server may have them: two servers
 * appending to one AOF corrupt it. One whose slicewise process is still running means the data dir is in use
 * (refused, naming the process). One whose slicewise process is gone (killed with -9, so it could not stop it)
 * is an orphan: it is shut down, which writes its AOF out, and the new server starts from that.
 */
async function takeOverRedisFiles(dir: string, say: (line: string) => void): Promise<void> {
  const o = await readOwner(dir);
  if (!o) return;
  const server = await serverOn(o.port, dir);
  if (!server) return;
  if (o.ownerPid !== process.pid && slicewiseAlive(o.ownerPid)) {
    server.disconnect();
    throw new SliceWiseError(
      `the data dir's private Redis (${dir}) is in use by another slicewise process (pid ${o.ownerPid}, its redis-server on port ${o.port}): ` +
        'stop that one first, give this one another --data-dir, or point both at one Redis with REDIS_URL',
      { status: 409, code: 'data_dir_in_use' },
    );
  }
  // SHUTDOWN writes the AOF out and exits; the connection drops before any reply.
  await server.call('SHUTDOWN').catch(() => {});
  server.disconnect();
  const deadline = Date.now() + 10_000;
  let still = await serverOn(o.port, dir);
  while (still && Date.now() < deadline) {
    still.disconnect();
    await new Promise((r) => setTimeout(r, 100));
    still = await serverOn(o.port, dir);
  }
  if (still) {
    still.disconnect();
    throw new SliceWiseError(`an orphaned private redis-server on port ${o.port} (${dir}) did not shut down; stop it (pid ${o.redisPid}) and start again`, {
      status: 503,
      code: 'redis_unreachable',
    });
  }
  say(`shut down a private redis-server (port ${o.port}) left running by slicewise process ${o.ownerPid}, which is gone; starting a new one from its AOF`);
}

/**
 * A private redis-server for one CLI invocation: loopback only, AOF on (a crash loses no queued job),
 * noeviction (BullMQ's requirement), data under the data dir so --skip-download runs see the same history.
 *
 * Supervised: when it exits without being asked to, it is started again on the same port from the same dir,
 * so its AOF brings the queues back and the clients reconnect to it by themselves. More than three exits in a
 * minute, or a restart that does not come up, and the supervisor gives up (onGiveUp) with a reason.
 */
export async function startPrivateRedis(dataDir: string, { say = () => {} }: { say?: (line: string) => void } = {}): Promise<PrivateRedis> {
  const dir = redisDir(dataDir);
  await mkdir(dir, { recursive: true });
  const port = await freePort();
  const logFile = join(dir, 'redis.log');
  const args = ['--port', String(port), '--bind', '127.0.0.1', '--appendonly', 'yes', '--maxmemory-policy', 'noeviction', '--dir', dir, '--save', '', '--logfile', logFile];
  const url = `redis://127.0.0.1:${port}`;
  await takeOverRedisFiles(dir, say);
  const recordOwner = (p: ChildProcess) => writeJsonAtomic(join(dir, OWNER_FILE), { ownerPid: process.pid, redisPid: p.pid!, port } satisfies RedisOwner);
  let stopping = false;
  let gaveUp: SliceWiseError | undefined;
  const giveUpListeners: Array<(err: SliceWiseError) => void> = [];
  const exits: number[] = [];
  let proc = await launch(args, url, logFile);
  await recordOwner(proc);

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
        await recordOwner(proc);
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
      await rm(join(dir, OWNER_FILE), { force: true });
    },
  };
}
