/**
 * Control-flow errors of the step runner, recognised by type (or, across a thread boundary, by name), never by
 * their message text.
 */
import { UnrecoverableError } from 'bullmq';

/**
 * The job belongs to a run that was cancelled or has already failed: not an error of the step. Unrecoverable, so
 * BullMQ does not start the job again only to find the run stopped.
 */
export class RunStoppedError extends UnrecoverableError {
  readonly runId: string;
  readonly runStatus: string;
  constructor(runId: string, runStatus: string, { cause }: { cause?: unknown } = {}) {
    super(`run ${runId} is ${runStatus}; job not run`);
    this.name = 'RunStoppedError';
    this.runId = runId;
    this.runStatus = runStatus;
    if (cause !== undefined) this.cause = cause;
  }
}

/** Thrown inside a step's body when its abort signal fired (the run was cancelled, or the worker is forced down). */
export class StepAbortedError extends Error {
  constructor(what = 'the step', { cause }: { cause?: unknown } = {}) {
    super(`${what} was aborted`, cause === undefined ? undefined : { cause });
    this.name = 'StepAbortedError';
  }
}

export function throwIfAborted(signal: AbortSignal | undefined, what?: string): void {
  if (signal?.aborted) throw new StepAbortedError(what, { cause: signal.reason });
}
