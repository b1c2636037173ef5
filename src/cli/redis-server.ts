import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdir } from 'node:fs/promises';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { Redis } from 'ioredis';
import { SliceWiseError } from '../lib/errors.ts';
import { env } from '../env.ts';
import { redisDir } from '../disk/layout.ts';

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

async function freePort(): Promise<number> {
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
  stop(): Promise<void>;
}

/**
 * A private redis-server for one CLI invocation: loopback only, AOF on (a crash loses no queued job),
 * noeviction (BullMQ's requirement), data under the data dir so --skip-download runs see the same history.
 */
export async function startPrivateRedis(dataDir: string): Promise<PrivateRedis> {
  const dir = redisDir(dataDir);
  await mkdir(dir, { recursive: true });
  const port = await freePort();
  const proc: ChildProcess = spawn(
    'redis-server',
    ['--port', String(port), '--bind', '127.0.0.1', '--appendonly', 'yes', '--maxmemory-policy', 'noeviction', '--dir', dir, '--save', '', '--logfile', join(dir, 'redis.log')],
    { stdio: 'ignore' },
  );
  const exited = new Promise<number | null>((res) => proc.once('exit', (code) => res(code)));
  const url = `redis://127.0.0.1:${port}`;
  const probe = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null });
  probe.on('error', () => {});
  const deadline = Date.now() + 10_000;
  for (;;) {
    try {
      await probe.connect();
      await probe.ping();
      probe.disconnect();
      break;
    } catch {
      probe.disconnect();
      if (proc.exitCode !== null || Date.now() > deadline) {
        proc.kill('SIGKILL');
        throw new SliceWiseError(`the private redis-server did not start (see ${join(dir, 'redis.log')})`, { status: 503, code: 'redis_unreachable' });
      }
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  return {
    url,
    async stop() {
      if (proc.exitCode !== null) return;
      proc.kill('SIGTERM');
      await Promise.race([exited, new Promise((r) => setTimeout(r, 5000))]);
      if (proc.exitCode === null) proc.kill('SIGKILL');
    },
  };
}
