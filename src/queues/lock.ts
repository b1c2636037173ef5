import { randomBytes } from 'node:crypto';
import type { Redis } from 'ioredis';

const RENEW = `if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end`;
const RELEASE = `if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end`;

export interface LockOptions {
  /** How long the lock outlives a holder that died without releasing it. Default: 30 s (renewed every 10 s). */
  ttlMs?: number;
  /** Aborts the wait. */
  signal?: AbortSignal;
  /** Called once if the lock is busy, e.g. to log who waits for what. */
  onWait?: () => void;
}

/**
 * Runs `fn` while holding a Redis lock. Two runs with the same source share one raw-data folder, and two
 * downloads appending to one .part file would corrupt it; the second waits, then finds the data complete.
 */
export async function withRedisLock<T>(redis: Redis, key: string, fn: () => Promise<T>, { ttlMs = 30_000, signal, onWait }: LockOptions = {}): Promise<T> {
  const token = randomBytes(8).toString('hex');
  let told = false;
  while ((await redis.set(key, token, 'PX', ttlMs, 'NX')) !== 'OK') {
    if (!told) {
      told = true;
      onWait?.();
    }
    if (signal?.aborted) throw signal.reason instanceof Error ? signal.reason : new Error('aborted while waiting for a lock');
    await new Promise((r) => setTimeout(r, 250));
  }
  const timer = setInterval(() => void redis.eval(RENEW, 1, key, token, String(ttlMs)).catch(() => {}), Math.max(1000, ttlMs / 3));
  try {
    return await fn();
  } finally {
    clearInterval(timer);
    await redis.eval(RELEASE, 1, key, token).catch(() => {});
  }
}
