import { Redis, type RedisOptions } from 'ioredis';
import { SliceWiseError } from '../lib/errors.ts';
import { redactPassword } from '../lib/redact.ts';

/**
 * BullMQ needs `maxRetriesPerRequest: null` on worker connections (blocking commands must not be cut short).
 * Every connection in the process comes from here so the options stay consistent.
 */
export function createRedis(url: string, extra: RedisOptions = {}): Redis {
  const r = new Redis(url, { maxRetriesPerRequest: null, enableReadyCheck: true, lazyConnect: false, ...extra });
  // ioredis reconnects on its own; an unhandled 'error' event would crash the process instead.
  r.on('error', () => {});
  return r;
}

/** Fails fast, with the URL in the message, when Redis is not there: better than a worker hanging in reconnects. */
export async function assertRedisReachable(url: string, timeoutMs = 3000): Promise<void> {
  const probe = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null, connectTimeout: timeoutMs });
  probe.on('error', () => {});
  try {
    await probe.connect();
    await probe.ping();
    const policy = (await probe.config('GET', 'maxmemory-policy').catch(() => [])) as string[];
    if (policy[1] && policy[1] !== 'noeviction') {
      process.emitWarning(`Redis at ${redactPassword(url)} has maxmemory-policy ${policy[1]}; BullMQ needs noeviction or jobs can vanish`);
    }
  } catch (err) {
    throw new SliceWiseError(`cannot reach Redis at ${redactPassword(url)}: ${(err as Error).message}. Is redis-server running? (set REDIS_URL, or unset it to let slicewise start a private one)`, {
      status: 503,
      code: 'redis_unreachable',
      cause: err,
    });
  } finally {
    probe.disconnect();
  }
}
