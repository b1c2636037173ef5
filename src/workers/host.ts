/**
 * A worker process's queues: one BullMQ Worker per consumed queue, each running the registered step for a job's
 * name through the one runner (runner.ts), and a pool of step threads for the sandboxed steps. Also listens for
 * cancelled runs and aborts their active jobs here.
 */
import { cpus, hostname } from 'node:os';
import { UnrecoverableError, Worker, type Job } from 'bullmq';
import type { Redis } from 'ioredis';
import type { AppContext } from '../context.ts';
import { env } from '../env.ts';
import { createRedis } from '../queues/connection.ts';
import { CANCEL_CHANNEL, DEFAULT_WORKER_QUEUES, type QueueName } from '../queues/names.ts';
import { STEPS } from './registry.ts';
import { executeStep } from './runner.ts';
import { StepThreadPool } from './step-threads.ts';

export interface WorkerHostOptions {
  /** Which queues this process consumes. Default: all but train (train needs a GPU worker of its own). */
  queues?: QueueName[];
  /** Jobs at once per queue. Default: one per CPU core for preprocess, 1 for train and evaluate, 2 for the rest. */
  concurrency?: number;
}

export interface WorkerHost {
  workers: Worker[];
  /** Finishes active jobs, then stops. `force` aborts them instead. */
  close(force?: boolean): Promise<void>;
  activeCount(): number;
}

interface QueueSettings {
  concurrency: number;
  lockDuration: number;
  stalledInterval?: number;
}

function queueSettings(q: QueueName, concurrency: number | undefined): QueueSettings {
  switch (q) {
    case 'preprocess':
      // The work is in step threads; the main thread keeps renewing the locks meanwhile.
      return { concurrency: concurrency ?? Math.max(1, cpus().length), lockDuration: env().lockMs, stalledInterval: env().lockMs / 2 };
    case 'train': {
      // One training job per worker (per GPU); the queue's global concurrency caps the whole pool. A killed
      // worker's job is taken over once its lock expires and resumes from its last epoch checkpoint.
      const lock = env().trainLockMs;
      return { concurrency: 1, lockDuration: lock, stalledInterval: lock / 2 };
    }
    case 'evaluate':
      // A model job uses every core by itself; two at once would only share them.
      return { concurrency: 1, lockDuration: 120_000 };
    default:
      return { concurrency: concurrency ?? 2, lockDuration: env().lockMs, stalledInterval: env().lockMs / 2 };
  }
}

export async function startWorkers(ctx: AppContext, { queues = DEFAULT_WORKER_QUEUES, concurrency }: WorkerHostOptions = {}): Promise<WorkerHost> {
  const log = ctx.logger;
  const sandboxedQueues = new Set(Object.values(STEPS).filter((d) => d.sandboxed).map((d) => d.queue));
  const threadCount = Math.max(0, ...queues.filter((q) => sandboxedQueues.has(q)).map((q) => queueSettings(q, concurrency).concurrency));
  const threads = threadCount > 0 ? new StepThreadPool({ size: threadCount }) : undefined;
  // Which run each active job belongs to, so a cancel message can find them.
  const active = new Map<string, { worker: Worker; runId: string }>();
  const workers: Worker[] = [];
  // BullMQ does not close connections it was handed, so this host keeps its own list and closes them itself.
  const conns: Redis[] = [];
  const conn = () => {
    const c = createRedis(ctx.redisUrl);
    conns.push(c);
    return c;
  };

  for (const q of queues) {
    if (!Object.values(STEPS).some((d) => d.queue === q)) {
      log.warn(`No step runs on queue '${q}' in this version; not consuming it`);
      continue;
    }
    if (q === 'train') await ctx.queues.train.setGlobalConcurrency(env().trainPool);
    const worker = new Worker(
      q,
      (job: Job, token?: string, signal?: AbortSignal) => {
        const def = STEPS[job.name as keyof typeof STEPS];
        if (!def || def.queue !== q) throw new UnrecoverableError(`the ${q} queue has no step named '${job.name}' in this version`);
        return executeStep(def, { ctx, job, token, signal, threads });
      },
      // The name ends up on each job (processedBy): which host and process took it.
      { prefix: ctx.prefix, connection: conn(), maxStalledCount: 2, name: `${hostname()}:${process.pid}`, ...queueSettings(q, concurrency) },
    );
    worker.on('active', (job: Job) => active.set(`${q}:${job.id}`, { worker, runId: job.data?.runId }));
    const forget = (job: Job | undefined) => job && active.delete(`${q}:${job.id}`);
    worker.on('completed', forget);
    worker.on('failed', forget);
    worker.on('error', (err) => log.error({ queue: q, err: err.message }, `Worker for queue ${q} hit an error: ${err.message}`));
    workers.push(worker);
  }

  const sub = createRedis(ctx.redisUrl);
  await sub.subscribe(`${ctx.prefix}:${CANCEL_CHANNEL}`);
  sub.on('message', (_ch: string, runId: string) => {
    let n = 0;
    for (const [key, a] of active) {
      if (a.runId === runId && a.worker.cancelJob(key.slice(key.indexOf(':') + 1), `run ${runId} cancelled`)) n++;
    }
    if (n) log.info({ runId, jobs: n }, `Run ${runId} cancelled; aborting ${n} active job(s) here`);
  });

  await Promise.all(workers.map((w) => w.waitUntilReady()));
  log.info({ queues: workers.map((w) => w.name) }, `Workers ready on queues: ${workers.map((w) => w.name).join(', ')}`);
  return {
    workers,
    activeCount: () => active.size,
    async close(force = false) {
      await sub.quit().catch(() => sub.disconnect());
      // Forced: abort what runs (a training thread stops between batches) instead of leaving it to run on.
      if (force) for (const w of workers) w.cancelAllJobs('worker shutting down');
      await Promise.all(workers.map((w) => w.close(force)));
      await threads?.close();
      for (const c of conns) c.disconnect();
    },
  };
}
