import { Queue, FlowProducer } from 'bullmq';
import type { Redis } from 'ioredis';
import type { Db } from './db/client.ts';
import { createRedis } from './queues/connection.ts';
import { QUEUE_NAMES, type QueueName } from './queues/names.ts';
import { createLogger, type Logger } from './lib/logger.ts';

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
  const queues = Object.fromEntries(QUEUE_NAMES.map((q) => [q, new Queue(q, { connection: redis, prefix })])) as Record<QueueName, Queue>;
  const flows = new FlowProducer({ connection: redis, prefix });
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
      await Promise.all(Object.values(queues).map((q) => q.close()));
      await flows.close();
      redis.disconnect();
    },
  };
}
