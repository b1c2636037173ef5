import { Queue, FlowProducer } from 'bullmq';
import type { Redis } from 'ioredis';
import type { Db } from './db/client.ts';
import { createRedis, isConnectionError, within } from './queues/connection.ts';
import { QUEUE_NAMES, type QueueName } from './queues/names.ts';
import { createLogger, type Logger } from './lib/logger.ts';
import { env } from './env.ts';

/** What the API, the producers and the workers share in one process. */
export interface AppContext {
  db: Db;
  redisUrl: string;
  /** Non-blocking connection shared by queues and the flow producer. */
  redis: Redis;
  queues: Record<QueueName, Queue>;
  flows: FlowProducer;
  /** Default data dir for runs created without one. */
  dataDir: string;
  /** BullMQ key prefix; tests use their own so they never see each other's jobs. Default 'slicewise'. */
  prefix: string;
  logger: Logger;
  close(): Promise<void>;
}

export interface CreateContextOptions {
  db: Db;
  redisUrl: string;
  dataDir: string;
  /** Default: 'slicewise'. */
  prefix?: string;
  logger?: Logger;
}

export function createContext({ db, redisUrl, dataDir, prefix = 'slicewise', logger = createLogger() }: CreateContextOptions): AppContext {
  const redis = createRedis(redisUrl);
  // BullMQ's default event stream (~10,000 entries a queue) holds about 1 MB per busy queue long after its jobs
  // are trimmed; the stream only feeds live listeners, and the run's history lives in Postgres.
  const queues = Object.fromEntries(QUEUE_NAMES.map((q) => [q, new Queue(q, { connection: redis, prefix, streams: { events: { maxLen: env().eventsMaxLen } } })])) as Record<QueueName, Queue>;
  const flows = new FlowProducer({ connection: redis, prefix });
  // BullMQ re-emits every error of the shared connection on each Queue and the FlowProducer, and prints it
  // (stack and all) when nobody listens: seven lines per reconnect attempt while Redis is down. The connection's
  // health watcher (queues/connection.ts) reports outages; anything else is said once per message.
  const said = new Set<string>();
  const onError = (err: Error) => {
    if (isConnectionError(err) || said.has(err.message)) return;
    said.add(err.message);
    logger.warn({ err: err.message }, `Redis client error: ${err.message}`);
  };
  for (const q of Object.values(queues)) q.on('error', onError);
  flows.on('error', onError);
  return {
    db,
    redisUrl,
    redis,
    queues,
    flows,
    dataDir,
    prefix,
    logger,
    async close() {
      // Closing quits politely, which waits for Redis; a dead one must not hold the process.
      await within(2000, Promise.all([...Object.values(queues).map((q) => q.close()), flows.close()]));
      redis.disconnect();
    },
  };
}
