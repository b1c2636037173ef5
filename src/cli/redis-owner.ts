/**
 * Who may run a redis-server on a data dir's Redis files: one slicewise process at a time. Two servers appending
 * to one AOF corrupt it, so the files are claimed before a server starts on them, and the claim is an atomic
 * create (a complete record linked into place: link() fails when the name exists), not a check followed by a
 * write that another process could slip between.
 */
import { randomBytes } from 'node:crypto';
import { readFileSync, rmSync } from 'node:fs';
import { link, readFile, realpath, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Redis } from 'ioredis';
import { processAlive, writeJsonAtomic } from '../lib/atomic.ts';
import { SliceWiseError } from '../lib/errors.ts';

/** The record beside the files: which slicewise process claimed them, its server's port, and (once up) its pid. */
interface RedisOwner {
  ownerPid: number;
  port: number;
  redisPid?: number;
}

export interface RedisClaim {
  /** Records the pid of the server now running (after a start or a restart). */
  started(redisPid: number): Promise<void>;
  /** Gives the files up (the server has stopped). */
  release(): Promise<void>;
  /** The same, from a process 'exit' handler (which cannot wait). */
  releaseSync(): void;
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

function parseOwner(text: string): RedisOwner | undefined {
  try {
    const o = JSON.parse(text) as Partial<RedisOwner>;
    return Number.isInteger(o.ownerPid) && Number.isInteger(o.port) ? (o as RedisOwner) : undefined;
  } catch {
    return undefined;
  }
}

async function readOwner(path: string): Promise<RedisOwner | undefined> {
  return parseOwner(await readFile(path, 'utf8').catch(() => ''));
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
 * A server left on the files by a slicewise process that is gone (killed with -9, it could not stop it): shut
 * down, which writes its AOF out, so the next server starts from all of it.
 */
async function shutDownOrphan(dir: string, o: RedisOwner, say: (line: string) => void): Promise<void> {
  const server = await serverOn(o.port, dir);
  if (!server) return;
  // SHUTDOWN writes the AOF out and exits; the connection drops before any reply.
  await server.call('SHUTDOWN').catch(() => {});
  server.disconnect();
  const deadline = Date.now() + 10_000;
  for (;;) {
    const still = await serverOn(o.port, dir);
    if (!still) break;
    still.disconnect();
    if (Date.now() > deadline) {
      throw new SliceWiseError(`an orphaned private redis-server on port ${o.port} (${dir}) did not shut down; stop it${o.redisPid ? ` (pid ${o.redisPid})` : ''} and start again`, {
        status: 503,
        code: 'redis_unreachable',
      });
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  say(`shut down a private redis-server (port ${o.port}) left running by slicewise process ${o.ownerPid}, which is gone; starting a new one from its AOF`);
}

/**
 * Moves a dead owner's record out of the way. Renamed first and checked after, not removed outright: between
 * reading it and removing it another process may have replaced it with a live claim, which goes back.
 */
async function removeStale(path: string, stale: RedisOwner | undefined): Promise<void> {
  const aside = `${path}.stale-${process.pid}-${randomBytes(4).toString('hex')}`;
  try {
    await rename(path, aside);
  } catch {
    return; // gone already: someone else cleared it
  }
  const moved = await readOwner(aside);
  if (moved && moved.ownerPid !== stale?.ownerPid) await link(aside, path).catch(() => {});
  await rm(aside, { force: true });
}

function inUse(dir: string, o: RedisOwner, path: string): SliceWiseError {
  return new SliceWiseError(
    `the data dir's private Redis (${dir}) is in use by another slicewise process (pid ${o.ownerPid}, its redis-server on port ${o.port}): ` +
      `stop that one first, give this one another --data-dir, or point both at one Redis with REDIS_URL (if pid ${o.ownerPid} is not slicewise, remove ${path})`,
    { status: 409, code: 'data_dir_in_use' },
  );
}

/**
 * Claims `dir`'s Redis files for this process and a server on `port`. Refused, naming the process, while another
 * live slicewise process holds them; a dead one's server is shut down and its claim cleared first.
 */
export async function claimRedisFiles(dir: string, port: number, say: (line: string) => void): Promise<RedisClaim> {
  const path = join(dir, OWNER_FILE);
  const mine: RedisOwner = { ownerPid: process.pid, port };
  const draft = `${path}.claim-${process.pid}-${randomBytes(4).toString('hex')}`;
  await writeFile(draft, JSON.stringify(mine));
  try {
    for (let attempt = 1; ; attempt++) {
      try {
        await link(draft, path);
        break;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      }
      const o = await readOwner(path);
      if (o && o.ownerPid !== process.pid && slicewiseAlive(o.ownerPid)) throw inUse(dir, o, path);
      // Three rounds of clearing a dead claim while others keep making new ones: let the operator sort it out.
      if (attempt > 3) throw new SliceWiseError(`could not claim the data dir's private Redis (${dir}): other processes keep claiming it`, { status: 409, code: 'data_dir_in_use' });
      if (o) await shutDownOrphan(dir, o, say);
      await removeStale(path, o);
    }
  } finally {
    await rm(draft, { force: true });
  }
  const ours = (text: string) => parseOwner(text)?.ownerPid === process.pid;
  return {
    started: (redisPid) => writeJsonAtomic(path, { ...mine, redisPid } satisfies RedisOwner),
    async release() {
      if (ours(await readFile(path, 'utf8').catch(() => ''))) await rm(path, { force: true });
    },
    releaseSync() {
      try {
        if (ours(readFileSync(path, 'utf8'))) rmSync(path, { force: true });
      } catch {
        // Nothing to give up.
      }
    },
  };
}
