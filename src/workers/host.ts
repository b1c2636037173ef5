import { cpus, hostname } from 'node:os';
import { fileURLToPath } from 'node:url';
import { Worker, type Job, type Processor } from 'bullmq';
import type { Redis } from 'ioredis';
import type { AppContext } from '../context.ts';
import { createRedis } from '../queues/connection.ts';
import { CANCEL_CHANNEL, PATIENT_JOB, QUEUE_NAMES, type QueueName } from '../queues/names.ts';
import { countPatients, finishRun, getRunRow, stepFailed, stepProgress, stepStarted, stepSucceeded, upsertPatient } from '../runs/store.ts';
import { downloadProcessor } from './download.ts';
import { finalizeProcessor } from './finalize.ts';
import { preprocessBratsProcessor, type PatientJobData, type PatientResult } from './preprocess-brats.ts';
import type { KaggleResult } from './sandboxed/preprocess.ts';
import { splitProcessor } from './split.ts';
import { isFinalAttempt } from './step.ts';
import { trainProcessor } from './train.ts';

export interface WorkerHostOptions {
  /** Which queues this process consumes. Default: all but train (train needs a GPU worker of its own). */
  queues?: QueueName[];
  /** Jobs at once per queue. Default: one per CPU core for preprocess, 2 for the rest. */
  concurrency?: number;
}

export interface WorkerHost {
  workers: Worker[];
  /** Finishes active jobs, then stops. `force` aborts them instead. */
  close(force?: boolean): Promise<void>;
  activeCount(): number;
}

const SANDBOX = fileURLToPath(new URL('./sandboxed/preprocess-entry.mjs', import.meta.url));

export const DEFAULT_WORKER_QUEUES: QueueName[] = QUEUE_NAMES.filter((q) => q !== 'train' && q !== 'evaluate');

export async function startWorkers(ctx: AppContext, { queues = DEFAULT_WORKER_QUEUES, concurrency }: WorkerHostOptions = {}): Promise<WorkerHost> {
  const log = ctx.logger;
  // The name ends up on each job (processedBy): which host and process took a shard.
  const common = { prefix: ctx.prefix, maxStalledCount: 2, name: `${hostname()}:${process.pid}` };
  const split = splitProcessor(ctx);
  const pipeline = { preprocess_brats: preprocessBratsProcessor(ctx), finalize: finalizeProcessor(ctx) };
  const processors: Partial<Record<QueueName, Processor>> = {
    download: downloadProcessor(ctx),
    split,
    pipeline: (job, token, signal) => {
      const p = pipeline[job.name as keyof typeof pipeline];
      if (!p) throw new Error(`the pipeline queue has no processor for job name '${job.name}'`);
      return p(job, token, signal);
    },
  };
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
    let worker: Worker;
    if (q === 'preprocess') {
      worker = new Worker(q, SANDBOX, {
        ...common,
        connection: conn(),
        concurrency: concurrency ?? Math.max(1, cpus().length),
        useWorkerThreads: true,
        // A volume is seconds of CPU in a thread; the main thread keeps renewing the lock meanwhile.
        lockDuration: 60_000,
      });
      attachPreprocessBookkeeping(ctx, worker);
    } else if (q === 'train') {
      // One training job per GPU: each worker takes one at a time, and the queue's global concurrency caps the
      // pool (SLICEWISE_TRAIN_POOL, default 1). A killed worker's job is picked up again once its lock expires
      // and resumes from its last epoch checkpoint.
      await ctx.queues.train.setGlobalConcurrency(Number(process.env.SLICEWISE_TRAIN_POOL ?? 1));
      worker = new Worker(q, trainProcessor(ctx), {
        ...common,
        connection: conn(),
        concurrency: 1,
        lockDuration: Number(process.env.SLICEWISE_TRAIN_LOCK_MS ?? 120_000),
        stalledInterval: Number(process.env.SLICEWISE_TRAIN_LOCK_MS ?? 120_000) / 2,
      });
    } else if (processors[q]) {
      worker = new Worker(q, processors[q]!, { ...common, connection: conn(), concurrency: concurrency ?? 2, lockDuration: 60_000 });
    } else {
      log.warn(`No processor for queue '${q}' in this version; not consuming it`);
      continue;
    }
    worker.on('active', (job: Job) => active.set(`${q}:${job.id}`, { worker, runId: job.data?.runId }));
    const forget = (job: Job | undefined) => job && active.delete(`${q}:${job.id}`);
    worker.on('completed', forget);
    worker.on('failed', forget);
    worker.on('error', (err) => log.error({ queue: q, err: err.message }, `Worker for queue ${q} hit an error: ${err.message}`));
    workers.push(worker);
  }

  const sub = createRedis(ctx.redisUrl);
  const channel = `${ctx.prefix}:${CANCEL_CHANNEL}`;
  await sub.subscribe(channel);
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
      for (const c of conns) c.disconnect();
    },
  };
}

/**
 * The sandboxed preprocess jobs have no database in their thread; their bookkeeping happens here, in the main
 * thread, as BullMQ reports them. If the process dies between a job and its event, the parent job that collects
 * the results writes the same rows again (all writes are upserts).
 */
function attachPreprocessBookkeeping(ctx: AppContext, worker: Worker): void {
  const { db, logger } = ctx;
  const safely = (what: string, fn: () => Promise<void>) => fn().catch((err) => logger.error({ err: (err as Error).message }, `Could not record ${what}: ${(err as Error).message}`));

  worker.on('active', (job: Job) =>
    safely(`start of ${job.id}`, async () => {
      const runId = job.data.runId as string;
      const run = await getRunRow(db, runId);
      // A job of a stopped run that was already queued: stop it at once rather than spend minutes on it.
      if (run && (run.status === 'cancelled' || run.status === 'failed')) {
        worker.cancelJob(job.id!, `run ${runId} is ${run.status}`);
        return;
      }
      if (job.name === 'preprocess_kaggle') await stepStarted(db, runId, 'preprocess_kaggle', { jobId: job.id, attempt: job.attemptsMade + 1 });
    }),
  );

  worker.on('progress', (job: Job, progress) =>
    safely(`progress of ${job.id}`, async () => {
      if (job.name === 'preprocess_kaggle' && typeof progress === 'object' && progress) {
        const { done, total } = progress as { done: number; total: number };
        await stepProgress(db, job.data.runId, 'preprocess_kaggle', { done, total });
      }
    }),
  );

  worker.on('completed', (job: Job, result: PatientResult | KaggleResult) =>
    safely(`completion of ${job.id}`, async () => {
      const runId = job.data.runId as string;
      if (result.kind === 'patient') {
        await upsertPatient(db, { runId, patientId: result.patientId, status: 'done', slices: result.slices, tumorSlices: result.tumorSlices, outputDir: result.outDir, error: null });
        const c = await countPatients(db, runId);
        await stepProgress(db, runId, 'preprocess_brats', { done: c.done });
      } else if (result.kind === 'preprocess_kaggle') {
        await stepSucceeded(db, runId, 'preprocess_kaggle', { processed: result.processed, rejected: result.rejected, yes: result.yes, no: result.no, done: result.processed + result.rejected });
      }
    }),
  );

  worker.on('failed', (job: Job | undefined, err: Error) =>
    job &&
    safely(`failure of ${job.id}`, async () => {
      const runId = job.data.runId as string;
      const final = isFinalAttempt(job, err);
      const run = await getRunRow(db, runId);
      const cancelled = run?.status === 'cancelled' || /cancel/i.test(err.message);
      if (job.name === PATIENT_JOB) {
        const { patient } = job.data as PatientJobData;
        if (!final && !cancelled) {
          logger.warn({ runId, patientId: patient.patientId }, `Patient ${patient.patientId} of run ${runId} failed on attempt ${job.attemptsMade}; will retry: ${err.message}`);
          return;
        }
        await upsertPatient(db, { runId, patientId: patient.patientId, status: 'failed', error: err.message });
        if (cancelled) return;
        await stepFailed(db, runId, 'preprocess_brats', { message: err.message, details: { patientId: patient.patientId }, final: true });
        if (await finishRun(db, runId, 'failed', { message: `preprocess_brats failed: ${err.message}`, details: { step: 'preprocess_brats', patientId: patient.patientId } })) {
          logger.error({ runId, patientId: patient.patientId }, `Run ${runId} failed: ${err.message}`);
        }
      } else if (job.name === 'preprocess_kaggle') {
        if (cancelled) return;
        await stepFailed(db, runId, 'preprocess_kaggle', { message: err.message, final });
        if (final) await finishRun(db, runId, 'failed', { message: `preprocess_kaggle failed: ${err.message}`, details: { step: 'preprocess_kaggle' } });
      }
    }),
  );
}
