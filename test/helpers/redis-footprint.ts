/**
 * What a key prefix holds in Redis: its keys, their bytes (MEMORY USAGE of each), the job hashes per queue and the
 * event streams' share. For the load wave, in the fault suite and in the queue bench alike (so no vitest import
 * here). Redis may be shared with other work, so this measures the prefix's own keys, not INFO's totals.
 */
import type { Redis } from 'ioredis';
import { QUEUE_NAMES } from '../../src/queues/names.ts';

export interface RedisFootprint {
  keys: number;
  bytes: number;
  /** Job hashes per queue (<prefix>:<queue>:<id>, with no further ':' part). */
  jobs: Record<string, number>;
  streamBytes: number;
}

export async function redisFootprint(redis: Redis, prefix: string): Promise<RedisFootprint> {
  const keys: string[] = [];
  let cursor = '0';
  do {
    const [next, batch] = await redis.scan(cursor, 'MATCH', `${prefix}:*`, 'COUNT', 1000);
    cursor = next;
    keys.push(...batch);
  } while (cursor !== '0');
  let bytes = 0;
  let streamBytes = 0;
  const jobs: Record<string, number> = Object.fromEntries(QUEUE_NAMES.map((q) => [q, 0]));
  for (let i = 0; i < keys.length; i += 500) {
    const chunk = keys.slice(i, i + 500);
    const pipe = redis.pipeline();
    for (const k of chunk) pipe.memory('USAGE', k, 'SAMPLES', '0');
    const res = (await pipe.exec()) ?? [];
    chunk.forEach((k, j) => {
      const b = Number(res[j]?.[1] ?? 0);
      bytes += b;
      if (k.endsWith(':events')) streamBytes += b;
    });
  }
  for (const k of keys) {
    const parts = k.split(':');
    // Job ids here are <run>.<step>[.<shard>]: the queue's own keys (wait, meta, events...) have no '.' in that place.
    if (parts.length === 3 && parts[2]!.startsWith('run-')) jobs[parts[1]!] = (jobs[parts[1]!] ?? 0) + 1;
  }
  return { keys: keys.length, bytes, jobs, streamBytes };
}

export const mb = (b: number): string => `${(b / 1024 / 1024).toFixed(2)} MB`;
