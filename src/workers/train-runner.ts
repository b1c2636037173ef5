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

/** Trains one stage in a worker thread of its own; resolves with the stage's result. */
export function trainInThread(input: StageInput, { onEpoch, onLog, signal }: RunInThreadOptions): Promise<StageResult> {
  return new Promise((resolve, reject) => {
    const worker = new Worker(ENTRY, { workerData: input });
    let settled = false;
    let chain = Promise.resolve();
    const finish = (fn: () => void) => {
      if (settled) return;
      settled = true;
      signal?.removeEventListener('abort', onAbort);
      // Epoch reports are written in order and before the verdict.
      chain.then(fn, fn);
    };
    const onAbort = () => worker.postMessage({ type: 'stop' });
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
