/**
 * The worker threads that run sandboxed step bodies. The main thread keeps the job: its lock, its bookkeeping and
 * its cancel handling; a thread only computes. Threads are started on demand, reused job after job (starting one
 * costs the TypeScript loader and the imaging libraries, far more than a small shard), and replaced when one dies.
 */
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import { UnrecoverableError } from 'bullmq';
import type { RunRow } from '../db/schema.ts';
import { SliceWiseError } from '../lib/errors.ts';
import type { StepOutcome } from './define.ts';
import { StepAbortedError } from './errors.ts';

const ENTRY = fileURLToPath(new URL('./step-thread.mjs', import.meta.url));
/** Run rows a step thread keeps (ToThread); the main thread forgets them in the same order, so both agree. */
export const RUNS_KEPT_PER_THREAD = 8;

export interface ThreadTask {
  jobName: string;
  data: unknown;
  run: RunRow;
  childResults: unknown[];
  /** What the step's prepare hook read in the main thread. */
  prepared: unknown;
}

/**
 * A task as posted: the run's row goes to a thread once per run (the thread keeps it), not with every shard of
 * it; cloning it per message was a measurable part of a tiny shard's cost. The fields bodies read from it (id,
 * data dir, config, sources) do not change while a run goes.
 */
export type ToThread = ({ type: 'run'; id: number; runId: string; run?: RunRow } & Omit<ThreadTask, 'run'>) | { type: 'abort'; id: number };
export type FromThread =
  | { type: 'progress'; id: number; counts: Record<string, number> }
  | { type: 'log'; id: number; message: string }
  | { type: 'done'; id: number; outcome: StepOutcome<unknown> }
  | { type: 'error'; id: number; error: SerializedError };

export interface SerializedError {
  name: string;
  message: string;
  stack?: string;
  status?: number;
  code?: string;
  details?: Record<string, unknown>;
}

export function serializeError(err: unknown): SerializedError {
  const e = err instanceof Error ? err : new Error(String(err));
  const s: SerializedError = { name: e.name, message: e.message, stack: e.stack };
  if (e instanceof SliceWiseError) Object.assign(s, { status: e.status, code: e.code, details: e.details });
  return s;
}

/** The error as the body threw it, as far as the types the runner tells apart go. */
export function reviveError(s: SerializedError): Error {
  let e: Error;
  if (s.name === 'StepAbortedError') e = new StepAbortedError();
  else if (s.name === 'UnrecoverableError') e = new UnrecoverableError(s.message);
  else if (s.status !== undefined) e = new SliceWiseError(s.message, { status: s.status, code: s.code, details: s.details });
  else e = new Error(s.message);
  e.name = s.name;
  e.message = s.message;
  if (s.stack) e.stack = s.stack;
  return e;
}

export interface RunInThreadHooks {
  signal: AbortSignal;
  onProgress(counts: Record<string, number>): void;
  onLog(message: string): void;
}

interface Slot {
  thread: Worker;
  /** Taken by a job (set before its task is posted, so two jobs never get one thread). */
  busy: boolean;
  /** Runs whose row this thread already holds (it keeps as many as RUNS_KEPT_PER_THREAD). */
  runsSent: string[];
  task?: { id: number; hooks: RunInThreadHooks; resolve(o: StepOutcome<unknown>): void; reject(e: Error): void; onAbort(): void };
}

export interface StepThreadPoolOptions {
  /** Threads at most; a job beyond that waits for a free one. Default: 1. */
  size?: number;
}

export class StepThreadPool {
  private readonly slots: Slot[] = [];
  private readonly waiting: (() => void)[] = [];
  private nextId = 1;
  private closed = false;
  readonly size: number;

  constructor({ size = 1 }: StepThreadPoolOptions = {}) {
    this.size = Math.max(1, size);
    // Started now, not at the first job: loading a thread's modules is seconds of CPU, which then overlaps the
    // run's download instead of delaying its first shards.
    for (let i = 0; i < this.size; i++) this.spawn();
  }

  async run(task: ThreadTask, hooks: RunInThreadHooks): Promise<StepOutcome<unknown>> {
    const slot = await this.acquire();
    const id = this.nextId++;
    try {
      return await new Promise<StepOutcome<unknown>>((resolve, reject) => {
        const onAbort = () => slot.thread.postMessage({ type: 'abort', id } satisfies ToThread);
        slot.task = { id, hooks, resolve, reject, onAbort };
        if (hooks.signal.aborted) onAbort();
        hooks.signal.addEventListener('abort', onAbort);
        const { run, ...rest } = task;
        const known = slot.runsSent.includes(run.id);
        if (!known) {
          slot.runsSent.push(run.id);
          if (slot.runsSent.length > RUNS_KEPT_PER_THREAD) slot.runsSent.shift();
        }
        slot.thread.postMessage({ type: 'run', id, ...rest, runId: run.id, ...(known ? {} : { run }) } satisfies ToThread);
      });
    } finally {
      if (slot.task) hooks.signal.removeEventListener('abort', slot.task.onAbort);
      slot.task = undefined;
      slot.busy = false;
      this.release();
    }
  }

  /** Stops every thread; a task still running rejects. */
  async close(): Promise<void> {
    this.closed = true;
    await Promise.all(this.slots.splice(0).map((s) => s.thread.terminate()));
  }

  private async acquire(): Promise<Slot> {
    for (;;) {
      if (this.closed) throw new Error('the step thread pool is closed');
      const slot = this.slots.find((s) => !s.busy) ?? (this.slots.length < this.size ? this.spawn() : undefined);
      if (slot) {
        slot.busy = true;
        return slot;
      }
      await new Promise<void>((r) => this.waiting.push(r));
    }
  }

  private release(): void {
    this.waiting.shift()?.();
  }

  private spawn(): Slot {
    const slot: Slot = { thread: new Worker(ENTRY), busy: false, runsSent: [] };
    // A pool thread must not keep a process alive that is otherwise done.
    slot.thread.unref();
    slot.thread.on('message', (m: FromThread) => {
      const t = slot.task;
      if (!t || t.id !== m.id) return;
      if (m.type === 'progress') t.hooks.onProgress(m.counts);
      else if (m.type === 'log') t.hooks.onLog(m.message);
      else if (m.type === 'done') t.resolve(m.outcome);
      else if (m.type === 'error') t.reject(reviveError(m.error));
    });
    const lost = (why: string) => {
      const i = this.slots.indexOf(slot);
      if (i >= 0) this.slots.splice(i, 1);
      slot.task?.reject(new Error(`the step thread ${why} while running a job (out of memory?)`));
      this.release();
    };
    slot.thread.on('error', (err) => lost(`failed (${err.message})`));
    slot.thread.on('exit', (code) => lost(`exited with code ${code}`));
    this.slots.push(slot);
    return slot;
  }
}
