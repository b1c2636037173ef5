import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import type { EpochReport, StageInput, StageResult } from '../model/stage.ts';

export type TrainThreadMessage =
  | { type: 'epoch'; report: EpochReport }
  | { type: 'log'; message: string }
  | { type: 'done'; result: StageResult }
  | { type: 'error'; message: string; name?: string; stack?: string };

const ENTRY = fileURLToPath(new URL('./train-thread.mjs', import.meta.url));

/** Thrown when a stage stopped because it was asked to (cancel), not because it failed. */
export class TrainingStoppedError extends Error {
  constructor(message = 'training stopped on request') {
    super(message);
    this.name = 'TrainingStoppedError';
  }
}

export interface RunInThreadOptions {
  onEpoch(report: EpochReport): Promise<void>;
  onLog?(message: string): void;
  /** Aborting asks the stage to stop between batches; it then rejects with TrainingStoppedError. */
  signal?: AbortSignal;
}

/**
 * How long a stop request may take before the thread is ended. The stage stops between batches, but an epoch's
 * validation and checkpoint writes run to their end first, seconds on a busy machine, and a cancel must reach the
 * job at once. Ending the thread loses nothing: a stopped stage keeps nothing of its unfinished epoch, and every
 * checkpoint file is written to a temporary name and renamed.
 */
const STOP_GRACE_MS = 250;

/** Trains one stage in a worker thread of its own; resolves with the stage's result. */
export function trainInThread(input: StageInput, { onEpoch, onLog, signal }: RunInThreadOptions): Promise<StageResult> {
  return new Promise((resolve, reject) => {
    const worker = new Worker(ENTRY, { workerData: input });
    let settled = false;
    let chain = Promise.resolve();
    let grace: NodeJS.Timeout | undefined;
    const finish = (fn: () => void) => {
      if (settled) return;
      settled = true;
      clearTimeout(grace);
      signal?.removeEventListener('abort', onAbort);
      // Epoch reports are written in order and before the verdict.
      chain.then(fn, fn);
    };
    const onAbort = () => {
      worker.postMessage({ type: 'stop' });
      grace = setTimeout(() => {
        void worker.terminate();
        finish(() => reject(new TrainingStoppedError(`training stopped on request (its thread was ended after ${STOP_GRACE_MS} ms mid-epoch)`)));
      }, STOP_GRACE_MS);
    };
    if (signal?.aborted) onAbort();
    signal?.addEventListener('abort', onAbort);
    worker.on('message', (m: TrainThreadMessage) => {
      if (m.type === 'epoch') chain = chain.then(() => onEpoch(m.report));
      else if (m.type === 'log') onLog?.(m.message);
      else if (m.type === 'done') finish(() => (m.result.stopped ? reject(new TrainingStoppedError()) : resolve(m.result)));
      else if (m.type === 'error') {
        const e = new Error(m.message);
        e.name = m.name ?? 'Error';
        e.stack = m.stack;
        finish(() => reject(e));
      }
    });
    worker.on('error', (err) => finish(() => reject(err)));
    worker.on('exit', (code) => finish(() => reject(new Error(`the training thread exited with code ${code} before it finished (out of memory?)`))));
  });
}
