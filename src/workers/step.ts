import { UnrecoverableError, WaitingChildrenError, type Job } from 'bullmq';
import { z } from 'zod';
import type { AppContext } from '../context.ts';
import type { Config } from '../config/schema.ts';
import type { RunRow } from '../db/schema.ts';
import { SliceWiseError } from '../lib/errors.ts';
import { finishRun, getRunRow, markRunRunning, stepFailed, stepProgress, stepStarted, stepSucceeded } from '../runs/store.ts';

/** Thrown when a job belongs to a run that was cancelled or already failed: not an error of the step. */
export class RunStoppedError extends UnrecoverableError {
  constructor(runId: string, status: string) {
    super(`run ${runId} is ${status}; job not run`);
    this.name = 'UnrecoverableError';
  }
}

export interface StepArgs {
  ctx: AppContext;
  job: Job;
  token: string | undefined;
  signal: AbortSignal | undefined;
  run: RunRow;
  config: Config;
  /** Merges counts into the step's row (e.g. {done: 3, total: 10}); visible in GET /runs/:id. */
  progress(counts: Record<string, number>): Promise<void>;
}

export interface StepOutcome<R> {
  result: R;
  counts?: Record<string, number>;
}

const JobData = z.object({ runId: z.string().min(1) }).loose();

/** Bad input (a 4xx SliceWiseError: a corrupt file, a missing folder) fails the same way on every attempt. */
export function isPermanent(err: unknown): boolean {
  if (err instanceof UnrecoverableError || (err as Error)?.name === 'UnrecoverableError') return true;
  return err instanceof SliceWiseError && err.status >= 400 && err.status < 500;
}

export function isFinalAttempt(job: Job, err: unknown): boolean {
  if (isPermanent(err)) return true;
  return job.attemptsMade + 1 >= (job.opts.attempts ?? 1);
}

export function throwIfAborted(signal: AbortSignal | undefined, runId: string): void {
  if (signal?.aborted) throw new RunStoppedError(runId, 'cancelled');
}

/**
 * Wraps a step's work with its bookkeeping: the run is checked (a cancelled run's jobs do nothing), the step row
 * moves to running, then success with its counts, or failed with the error. A failure on the last attempt fails
 * the run with a message that names the step.
 */
export async function runStep<R>(
  step: string,
  ctx: AppContext,
  job: Job,
  token: string | undefined,
  signal: AbortSignal | undefined,
  work: (a: StepArgs) => Promise<StepOutcome<R>>,
  { evenIfStopped = false }: { evenIfStopped?: boolean } = {},
): Promise<R> {
  const parsed = JobData.safeParse(job.data);
  if (!parsed.success) throw new UnrecoverableError(`job ${job.id} (${job.name}) has malformed data: ${parsed.error.message}`);
  const { runId } = parsed.data;
  const run = await getRunRow(ctx.db, runId);
  if (!run) throw new UnrecoverableError(`job ${job.id}: run ${runId} does not exist in the database (was it created against another database?)`);
  if (!evenIfStopped && (run.status === 'cancelled' || run.status === 'failed')) {
    await stepFailed(ctx.db, runId, step, { message: `not run: run ${run.status}`, final: true, status: 'cancelled' });
    throw new RunStoppedError(runId, run.status);
  }
  await markRunRunning(ctx.db, runId);
  await stepStarted(ctx.db, runId, step, { jobId: job.id, attempt: job.attemptsMade + 1 });
  try {
    const { result, counts } = await work({
      ctx,
      job,
      token,
      signal,
      run,
      config: run.config as Config,
      progress: (c) => stepProgress(ctx.db, runId, step, c),
    });
    await stepSucceeded(ctx.db, runId, step, counts);
    return result;
  } catch (err) {
    if (err instanceof WaitingChildrenError) throw err;
    const final = isFinalAttempt(job, err);
    const cancelled = err instanceof RunStoppedError || signal?.aborted;
    const message = (err as Error).message ?? String(err);
    const details = err instanceof SliceWiseError ? err.details : undefined;
    await stepFailed(ctx.db, runId, step, { message, details, final: final || !!cancelled, status: cancelled ? 'cancelled' : 'failed' });
    if (final && !cancelled) {
      await finishRun(ctx.db, runId, 'failed', { message: `${step} failed: ${message}`, details: { step, ...(details ?? {}) } });
      ctx.logger.error({ runId, step, jobId: job.id, err: message }, `Run ${runId} failed at ${step}: ${message}`);
    } else if (!cancelled) {
      ctx.logger.warn({ runId, step, jobId: job.id, attempt: job.attemptsMade + 1 }, `${step} of run ${runId} failed on attempt ${job.attemptsMade + 1}, will retry: ${message}`);
    }
    // An aborted job must not be retried: BullMQ would only start it again to find the run cancelled.
    if (cancelled && !(err instanceof RunStoppedError)) throw new RunStoppedError(runId, 'cancelled');
    if (isPermanent(err) && !(err instanceof UnrecoverableError)) throw new UnrecoverableError(message);
    throw err;
  }
}
