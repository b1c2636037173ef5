/**
 * A worker process's queues: one BullMQ Worker per consumed queue, each running the registered step for a job's
 * name through the one runner (runner.ts), and a pool of step threads for the sandboxed steps. Also listens for
 * cancelled runs and aborts their active jobs here, and runs the run watchdog (runs/watchdog.ts).
 */
import { cpus, hostname } from 'node:os';
import { UnrecoverableError, Worker, type Job } from 'bullmq';
import type { Redis } from 'ioredis';
import type { AppContext } from '../context.ts';
import { env } from '../env.ts';
import { createRedis, isConnectionError, within } from '../queues/connection.ts';
import { CANCEL_CHANNEL, DEFAULT_WORKER_QUEUES, type QueueName } from '../queues/names.ts';
import { startRunWatchdog } from '../runs/watchdog.ts';
import { STEPS } from './registry.ts';
import { executeStep } from './runner.ts';
import { StepThreadPool } from './step-threads.ts';
import { runRowCache } from './run-rows.ts';
import { existingShardRowWriter } from './shard-rows.ts';

export interface WorkerHostOptions {
  /** Which queues this process consumes. Default: all but train (train needs a GPU worker of its own). */
  queues?: QueueName[];
  /** Jobs at once per queue. Default: one per CPU core for preprocess, 1 for train and evaluate, 2 for the rest. */
  concurrency?: number;
  /** Run the run watchdog in this process. Default: true. */
  watchdog?: boolean;
}

export interface WorkerHost {
  workers: Worker[];
  /**
   * Graceful: stops taking jobs, finishes the active ones, then stops. `force`: stops taking jobs and hands the
   * active ones back to their queues (first in line, so another worker takes them at once instead of after their
   * lock expires), without waiting for them; their bodies are not stopped, so the caller exits the process next.
   * Returns the active jobs it finished or handed back, described as in the log.
   */
  close(force?: boolean): Promise<string[]>;
  activeCount(): number;
  /** The active jobs, e.g. `preprocess_patient (run run-2026..., patient BraTS20_Training_002)`. */
  describeActive(): string[];
  /** Aborts this process's active jobs of a run (what a cancel message does, without going through Redis). */
  abortRun(runId: string, reason: string): number;
}

interface QueueSettings {
  /** Jobs computing at once (step threads, for a sandboxed queue). */
  concurrency: number;
  /**
   * Jobs taken at once, when more than `concurrency`: the extra ones wait, fetched and checked, for a free step
   * thread, so that a thread finishing a shard starts the next at once instead of idling while the main thread
   * acknowledges the last one and fetches another (for tiny shards that idle time was most of the thread's).
   */
  taken?: number;
  lockDuration: number;
  stalledInterval?: number;
}

function queueSettings(q: QueueName, concurrency: number | undefined): QueueSettings {
  switch (q) {
    case 'preprocess': {
      // The work is in step threads; the main thread keeps renewing the locks meanwhile.
      const threads = concurrency ?? Math.max(1, cpus().length);
      return { concurrency: threads, taken: 2 * threads, lockDuration: env().lockMs, stalledInterval: env().lockMs / 2 };
    }
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

function workerSettings({ concurrency, taken, ...rest }: QueueSettings) {
  return { concurrency: taken ?? concurrency, ...rest };
}

interface ActiveJob {
  worker: Worker;
  job: Job;
  token: string | undefined;
  runId: string;
}

/** A job as the operator knows it: step, run and, for a shard, the patient. */
export function describeJob(job: Job): string {
  const def = STEPS[job.name as keyof typeof STEPS];
  let patient: string | undefined;
  try {
    patient = def?.shard?.patientId(job.data as never);
  } catch {
    patient = undefined;
  }
  const runId = (job.data as { runId?: string } | undefined)?.runId ?? 'unknown';
  return `${job.name} (run ${runId}${patient ? `, patient ${patient}` : ''})`;
}

export async function startWorkers(ctx: AppContext, { queues = DEFAULT_WORKER_QUEUES, concurrency, watchdog = true }: WorkerHostOptions = {}): Promise<WorkerHost> {
  const log = ctx.logger;
  const sandboxedQueues = new Set(Object.values(STEPS).filter((d) => d.sandboxed).map((d) => d.queue));
  const threadCount = Math.max(0, ...queues.filter((q) => sandboxedQueues.has(q)).map((q) => queueSettings(q, concurrency).concurrency));
  const threads = threadCount > 0 ? new StepThreadPool({ size: threadCount }) : undefined;
  // The jobs this process holds (taken from their queue, running or about to), with the token that holds each
  // one's lock: a cancel message finds its run's jobs here, and a forced stop hands them back with it.
  const active = new Map<string, ActiveJob>();
  const workers: Worker[] = [];
  // BullMQ does not close connections it was handed, so this host keeps its own list and closes them itself.
  const conns: Redis[] = [];
  const conn = () => {
    const c = createRedis(ctx.redisUrl);
    conns.push(c);
    return c;
  };
  // While Redis is away every Worker reports each failed reconnect as an 'error'; the connection's health watcher
  // says that once per interval. Other errors are said once per message and minute, not once per retry.
  const saidAt = new Map<string, number>();
  const onWorkerError = (q: QueueName) => (err: Error) => {
    if (isConnectionError(err)) return;
    const now = Date.now();
    if (now - (saidAt.get(err.message) ?? -Infinity) < 60_000) return;
    saidAt.set(err.message, now);
    log.error({ queue: q, err: err.message }, `Worker for queue ${q} hit an error: ${err.message}`);
  };

  for (const q of queues) {
    if (!Object.values(STEPS).some((d) => d.queue === q)) {
      log.warn(`No step runs on queue '${q}' in this version; not consuming it`);
      continue;
    }
    if (q === 'train') await ctx.queues.train.setGlobalConcurrency(env().trainPool);
    const worker: Worker = new Worker(
      q,
      async (job: Job, token?: string, signal?: AbortSignal) => {
        const def = STEPS[job.name as keyof typeof STEPS];
        if (!def || def.queue !== q) throw new UnrecoverableError(`the ${q} queue has no step named '${job.name}' in this version`);
        // Counted since it was taken (the 'active' listener below); forgotten as soon as its step ends.
        try {
          return await executeStep(def, { ctx, job, token, signal, threads });
        } finally {
          active.delete(`${q}:${job.id}`);
        }
      },
      // The name ends up on each job (processedBy): which host and process took it.
      { prefix: ctx.prefix, connection: conn(), maxStalledCount: 2, name: `${hostname()}:${process.pid}`, ...workerSettings(queueSettings(q, concurrency)) },
    );
    worker.on('error', onWorkerError(q));
    // A job is ours from the moment BullMQ takes it (active in Redis under our lock), which comes a moment before
    // the processor above is called, and may not be followed by it at all when the worker is stopped with force
    // in between: a stop must count such a job ("finishing 2 job(s)", not 0) and a forced one hand it back.
    worker.on('active', (job: Job) => active.set(`${q}:${job.id}`, { worker, job, token: job.token, runId: job.data?.runId }));
    const settled = (job: Job | undefined) => job && active.delete(`${q}:${job.id}`);
    worker.on('completed', settled);
    worker.on('failed', settled);
    workers.push(worker);
  }

  const abortRun = (runId: string, reason: string) => {
    let n = 0;
    for (const a of active.values()) if (a.runId === runId && a.job.id && a.worker.cancelJob(a.job.id, reason)) n++;
    return n;
  };
  const sub = createRedis(ctx.redisUrl);
  await sub.subscribe(`${ctx.prefix}:${CANCEL_CHANNEL}`);
  sub.on('message', (_ch: string, message: string) => {
    // `<runId>` when a run is cancelled, `<runId> failed` when one of its steps failed it: its other jobs stop.
    const [runId = '', how = 'cancelled'] = message.split(' ');
    runRowCache(ctx.db).stopped(runId, how === 'failed' ? 'failed' : 'cancelled');
    const n = abortRun(runId, `run ${runId} ${how}`);
    if (n) log.info({ runId, jobs: n }, `Run ${runId} ${how}; aborting ${n} active job(s) here`);
  });

  await Promise.all(workers.map((w) => w.waitUntilReady()));
  const dog = watchdog ? startRunWatchdog(ctx) : undefined;
  log.info({ queues: workers.map((w) => w.name) }, `Workers ready on queues: ${workers.map((w) => w.name).join(', ')}`);
  const describeActive = () => [...active.values()].map((a) => describeJob(a.job));
  return {
    workers,
    activeCount: () => active.size,
    describeActive,
    abortRun,
    async close(force = false) {
      dog?.stop();
      const jobs = describeActive();
      if (force) {
        // Nothing here may wait on a dead Redis: every step has a time limit, and what did not make it is left
        // to the stalled check of the other workers (after the job's lock expires).
        sub.disconnect();
        // Closing the workers first stops them taking jobs (a handed-back job must not come straight back here);
        // the connections they were handed stay open for the hand-back.
        await within(1000, Promise.all(workers.map((w) => w.close(true))));
        const handed = await within(
          1500,
          Promise.all([...active.values()].map((a) => a.job.moveToWait(a.token).then(() => describeJob(a.job), () => undefined))),
        );
        for (const c of conns) c.disconnect();
        return (handed ?? []).filter((d): d is string => d !== undefined);
      }
      await within(2000, sub.quit());
      sub.disconnect();
      await Promise.all(workers.map((w) => w.close(false)));
      // The rows of the shards just finished, for the run page; the coordinator writes them anyway.
      await within(5000, existingShardRowWriter(ctx)?.flush() ?? Promise.resolve());
      await threads?.close();
      for (const c of conns) c.disconnect();
      return jobs;
    },
  };
}
