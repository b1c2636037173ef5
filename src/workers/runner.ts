/**
 * The one wrapper around every step's body, sandboxed or not: it checks the job and its run, records the start,
 * the progress, the result or the failure in the same rows and the same shape, and turns a failure on the last
 * attempt into the run's verdict. Bodies write no bookkeeping of their own.
 *
 * Every write is an upsert or a guarded update (runs/store.ts): BullMQ delivers a job at least once, and a worker
 * may die between the work and its record, in which case the redelivered job records it again.
 */
import { UnrecoverableError, WaitingChildrenError, type Job } from 'bullmq';
import type { Config } from '../config/schema.ts';
import type { AppContext } from '../context.ts';
import type { RunRow } from '../db/schema.ts';
import { SliceWiseError } from '../lib/errors.ts';
import { waitingOutDbOutages } from '../db/client.ts';
import { finishRun, getRunRow, markRunRunning, stepFailed, stepProgress, stepStarted, stepSucceeded, upsertPatient } from '../runs/store.ts';
import { RunJobData, type InProcessContext, type StepDefinition, type StepOutcome } from './define.ts';
import { RunStoppedError, StepAbortedError } from './errors.ts';
import { CANCEL_CHANNEL } from '../queues/names.ts';
import type { StepThreadPool } from './step-threads.ts';
import { runRowCache } from './run-rows.ts';
import { shardRowWriter } from './shard-rows.ts';

/** Bad input (a 4xx SliceWiseError: a corrupt file, a missing folder) fails the same way on every attempt. */
function isPermanent(err: unknown): boolean {
  if (err instanceof UnrecoverableError || (err as Error)?.name === 'UnrecoverableError') return true;
  return err instanceof SliceWiseError && err.status >= 400 && err.status < 500;
}

function isFinalAttempt(job: Job, err: unknown): boolean {
  return isPermanent(err) || job.attemptsMade + 1 >= (job.opts.attempts ?? 1);
}

export interface ExecuteOptions {
  ctx: AppContext;
  job: Job;
  token: string | undefined;
  signal: AbortSignal | undefined;
  /** Runs sandboxed bodies; required when the step is sandboxed. */
  threads?: StepThreadPool;
}

/**
 * Runs one job's step. Its database statements wait out an outage of Postgres (db/client.ts) instead of failing
 * the step: every write here is idempotent, so one retried after a lost connection is safe.
 */
export function executeStep(def: StepDefinition, opts: ExecuteOptions): Promise<unknown> {
  return waitingOutDbOutages(() => execute(def, opts));
}

async function execute(def: StepDefinition, { ctx, job, token, signal, threads }: ExecuteOptions): Promise<unknown> {
  const base = RunJobData.safeParse(job.data);
  if (!base.success) throw new UnrecoverableError(`job ${job.id} (${job.name}) has no valid runId: ${base.error.message}`);
  const { runId } = base.data;
  const parsed = def.data.safeParse(job.data);
  if (!parsed.success) throw new UnrecoverableError(`job ${job.id} (${job.name}) of run ${runId} has malformed data: ${parsed.error.message}`);
  const shard = def.shard;
  const run = shard ? await runRowCache(ctx.db).get(runId) : await getRunRow(ctx.db, runId);
  if (!run) throw new UnrecoverableError(`job ${job.id}: run ${runId} does not exist in the database (was it created against another database?)`);

  const { db, logger } = ctx;
  // A shard has no step row of its own: its failures are its parent step's.
  const rowStep = shard?.rollsUpInto ?? def.name;
  const patientId = shard?.patientId(parsed.data);

  if (!def.evenIfStopped && (run.status === 'cancelled' || run.status === 'failed')) {
    if (!shard) await stepFailed(db, runId, rowStep, { message: `not run: run ${run.status}`, final: true, status: 'cancelled' });
    throw new RunStoppedError(runId, run.status);
  }
  // Only the run's first job finds it queued; the others skip the write.
  if (run.status === 'queued') {
    await markRunRunning(db, runId);
    runRowCache(db).forget(runId);
  }
  if (!shard) await stepStarted(db, runId, rowStep, { jobId: job.id, attempt: job.attemptsMade + 1 });

  const aborted = signal ?? new AbortController().signal;
  const progress = async (counts: Record<string, number>) => {
    if (shard) return;
    // Progress is advisory: a lost write must not fail the step.
    await Promise.all([
      stepProgress(db, runId, rowStep, counts).catch((err: Error) => logger.warn({ runId, step: rowStep, err: err.message }, `Could not record progress of ${rowStep}: ${err.message}`)),
      job.updateProgress(counts).catch(() => {}),
    ]);
  };
  const log = (message: string) => logger.info({ runId, step: def.name, jobId: job.id }, message);

  try {
    let outcome: StepOutcome<unknown>;
    const s: InProcessContext<unknown> = {
      data: parsed.data,
      run,
      config: run.config as Config,
      signal: aborted,
      progress,
      childResults: async () => Object.values(await job.getChildrenValues()),
      log,
      ctx,
      job,
      token,
    };
    if (def.sandboxed) {
      if (!threads) throw new Error(`${def.name} runs sandboxed, and this worker has no step threads`);
      const prepared = await def.prepare?.(s);
      // A shard is added with no children of its own: no Redis round trip to learn that.
      const childResults = shard ? [] : await s.childResults();
      outcome = await threads.run({ jobName: def.name, data: parsed.data, run, childResults, prepared }, { signal: aborted, onProgress: (c) => void progress(c), onLog: log });
      await def.record?.(s, outcome.result);
    } else {
      outcome = await def.run(s);
    }
    if (shard) {
      // Written behind (shard-rows.ts): the durable record is the result BullMQ keeps with the coordinator, which
      // writes every patient's row from it before split and finalize read them.
      shardRowWriter(ctx).add(rowStep, { runId, patientId: patientId!, status: 'done', ...shard.row(outcome.result), error: null });
    } else {
      await stepSucceeded(db, runId, rowStep, outcome.counts, outcome.result);
    }
    return outcome.result;
  } catch (err) {
    if (err instanceof WaitingChildrenError) throw err;
    return failed(def, { ctx, job, run, rowStep, patientId, signal: aborted }, err);
  }
}

/** Records a failed attempt and rethrows what BullMQ should see: retry, or not. */
async function failed(
  def: StepDefinition,
  { ctx, job, run, rowStep, patientId, signal }: { ctx: AppContext; job: Job; run: RunRow; rowStep: string; patientId?: string; signal: AbortSignal },
  err: unknown,
): Promise<never> {
  const { db, logger } = ctx;
  const runId = run.id;
  const cancelled = err instanceof RunStoppedError || err instanceof StepAbortedError || signal.aborted;
  const final = cancelled || isFinalAttempt(job, err);
  let message = (err as Error)?.message ?? String(err);
  // A shard's failure must name its patient, whatever the error said.
  if (patientId && !message.includes(patientId)) message = `patient ${patientId}: ${message}`;
  const details = { ...(err instanceof SliceWiseError ? err.details : {}), ...(patientId ? { patientId } : {}) };

  if (patientId && final) await upsertPatient(db, { runId, patientId, status: 'failed', error: message });
  if (cancelled) {
    if (!patientId) await stepFailed(db, runId, rowStep, { message, details, final: true, status: 'cancelled' });
    // Not retried: BullMQ would only start it again to find the run cancelled.
    throw err instanceof RunStoppedError ? err : new RunStoppedError(runId, 'cancelled', { cause: err });
  }
  await stepFailed(db, runId, rowStep, { message, details, final });
  if (final) {
    if (await finishRun(db, runId, 'failed', { message: `${rowStep} failed: ${message}`, details: { step: rowStep, ...details } })) {
      logger.error({ runId, step: rowStep, jobId: job.id, err: message }, `Run ${runId} failed at ${rowStep}: ${message}`);
      // The run has its verdict: the jobs of its other branches stop now, on whichever worker runs them (the same
      // channel a cancel uses), instead of running on and keeping finalize waiting for them.
      await ctx.redis.publish(`${ctx.prefix}:${CANCEL_CHANNEL}`, `${runId} failed`).catch(() => {});
    }
    if (isPermanent(err) && !(err instanceof UnrecoverableError)) throw new UnrecoverableError(message);
  } else {
    const attempt = job.attemptsMade + 1;
    logger.warn({ runId, step: def.name, jobId: job.id, attempt }, `${def.name} of run ${runId}${patientId ? ` (patient ${patientId})` : ''} failed on attempt ${attempt}, will retry: ${message}`);
  }
  throw err;
}
