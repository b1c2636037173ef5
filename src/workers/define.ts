/**
 * What a step is: one file declares its name, queue, whether it runs sandboxed, its retry policy, its job data
 * (zod) and result types, and its body. The body does the work and reports progress; the runner (runner.ts)
 * does every piece of bookkeeping around it, the same way for every step.
 */
import type { BackoffOptions, Job } from 'bullmq';
import { z } from 'zod';
import type { Config } from '../config/schema.ts';
import type { AppContext } from '../context.ts';
import type { RunRow } from '../db/schema.ts';
import { SliceWiseError } from '../lib/errors.ts';
import type { QueueName } from '../queues/names.ts';
import type { JobName, StepName } from '../runs/modes.ts';

/** What every job of a run carries. Never credentials: job data is shown in Bull Board. */
export const RunJobData = z.object({ runId: z.string().min(1) });
export type RunJobData = z.infer<typeof RunJobData>;

/** What a body gets, in a worker thread or in the worker's main thread alike. */
export interface StepContext<D> {
  data: D;
  /** The run's row as the runner read it when the job started. */
  run: RunRow;
  /** The run's merged config (base -> mode -> overrides). */
  config: Config;
  /** Fires when the run is cancelled or the worker is forced down; stop at the next unit of work. */
  signal: AbortSignal;
  /**
   * Merges counts into the step's row (e.g. {done: 3, total: 10}), visible in GET /runs/:id. Never rejects: await
   * it where the order of two reports matters, or let it run.
   */
  progress(counts: Record<string, number>): Promise<void>;
  /** The return values of the jobs this one waited on (its flow children). */
  childResults(): Promise<unknown[]>;
  /** A line for the operator's log, tagged with the run and the step. */
  log(message: string): void;
}

/** In the main thread a body may also use the database, Redis and its BullMQ job. */
export interface InProcessContext<D> extends StepContext<D> {
  ctx: AppContext;
  job: Job;
  token: string | undefined;
}

export interface StepOutcome<R> {
  result: R;
  /** Merged into the step's row on success. */
  counts?: Record<string, number>;
}

/** A per-patient job: it has no step row; its row is the patient's, and it rolls up into a parent step. */
export interface ShardOf<D, R> {
  rollsUpInto: StepName;
  patientId(data: D): string;
  /** The patient row's figures from the job's result. */
  row(result: R): { slices: number; tumorSlices: number; outputDir: string };
}

interface StepCommon<D, R> {
  name: JobName;
  queue: QueueName;
  data: z.ZodType<D>;
  /** Attempts before the step fails the run (bad input, a 4xx error, is never retried). Default: 2. */
  attempts?: number | ((config: Config) => number);
  /** Wait between attempts. Default: exponential from 2 s. */
  backoff?: BackoffOptions;
  /** Run even when the run was cancelled or has failed (finalize settles every run). Default: false. */
  evenIfStopped?: boolean;
  shard?: ShardOf<D, R>;
}

/**
 * Runs in a worker thread of the runner's pool: CPU-heavy work that would starve lock renewal and the event loop
 * on the main thread. The body has no database: what it needs from there, `prepare` reads in the main thread
 * first (the body gets it as `prepared`), and what it produced that belongs there, `record` stores after it.
 */
export interface SandboxedStep<D = unknown, R = unknown, P = undefined> extends StepCommon<D, R> {
  sandboxed: true;
  prepare?(s: InProcessContext<D>): Promise<P>;
  run(s: StepContext<D> & { prepared: P }): Promise<StepOutcome<R>>;
  record?(s: InProcessContext<D>, result: R): Promise<void>;
}

export interface InProcessStep<D = unknown, R = unknown> extends StepCommon<D, R> {
  sandboxed?: false;
  run(s: InProcessContext<D>): Promise<StepOutcome<R>>;
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export type StepDefinition = SandboxedStep<any, any, any> | InProcessStep<any, any>;

export function defineStep<D extends RunJobData, R, P = undefined>(def: SandboxedStep<D, R, P>): SandboxedStep<D, R, P>;
export function defineStep<D extends RunJobData, R>(def: InProcessStep<D, R>): InProcessStep<D, R>;
export function defineStep<D extends RunJobData, R, P>(def: SandboxedStep<D, R, P> | InProcessStep<D, R>): SandboxedStep<D, R, P> | InProcessStep<D, R> {
  return def;
}

export function attemptsOf(def: StepDefinition, config: Config): number {
  const a = def.attempts ?? 2;
  return typeof a === 'function' ? a(config) : a;
}

export function backoffOf(def: StepDefinition): BackoffOptions {
  return def.backoff ?? { type: 'exponential', delay: 2000 };
}

/** The flow children's result of a given kind, if there is one. */
export function childOfKind<T extends { kind: string }>(results: unknown[], kind: T['kind']): T | undefined {
  return results.find((v): v is T => typeof v === 'object' && v !== null && (v as { kind?: unknown }).kind === kind);
}

/** The flow child's result a step cannot do without: its absence means the flow was built wrong. */
export async function requireChild<T extends { kind: string }>({ childResults, step }: { childResults(): Promise<unknown[]>; step: string }, kind: T['kind']): Promise<T> {
  const found = childOfKind<T>(await childResults(), kind);
  if (!found) throw new SliceWiseError(`${step} found no ${kind} result among its children`, { code: 'flow_broken' });
  return found;
}
