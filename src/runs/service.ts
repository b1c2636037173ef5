import { createHash, randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { resolve } from 'node:path';
import { and, asc, count, desc, eq, inArray } from 'drizzle-orm';
import type { z } from 'zod';
import type { AppContext } from '../context.ts';
import { loadConfig } from '../config/load.ts';
import type { Config } from '../config/schema.ts';
import { kaggleImages, metrics, patients, runs, steps, type RunRow } from '../db/schema.ts';
import { assertPatientLimit, checkRunSource } from '../download/policy.ts';
import { parseLayout } from '../imaging/layout.ts';
import { SliceWiseError } from '../lib/errors.ts';
import { runPaths } from '../disk/layout.ts';
import { buildRetryFlow, buildRunFlow } from '../producers/run-flow.ts';
import { CANCEL_CHANNEL, jobId } from '../queues/names.ts';
import { STEPS } from '../workers/registry.ts';
import { CreateRunSchema, type CreateRunInput, type PipelineMode, type RunSources } from './input.ts';
import { byStepOrder, EVAL_STEPS, stepsForMode, type StepName } from './modes.ts';
import { buildResults } from './results.ts';
import { closeOpenSteps, finishRun, getRunRow, isTerminal, reopenRun } from './store.ts';

export class RunNotFoundError extends SliceWiseError {
  constructor(runId: string) {
    super(`run ${runId} not found`, { status: 404, code: 'run_not_found' });
    this.name = 'RunNotFoundError';
  }
}

/** Sortable by time, readable in a terminal: run-20261126-121500-3fa9c2. */
function newRunId(now = new Date()): string {
  const t = now.toISOString().replace(/[-:]/g, '').replace('T', '-').slice(0, 15);
  return `run-${t}-${randomBytes(3).toString('hex')}`;
}

export interface IdempotencyOptions {
  /** The caller's Idempotency-Key: a repeated request with it answers the run the first one made. */
  idempotencyKey?: string;
  /** Whose key it is (see runs.idempotencyScope): two callers' equal keys never meet. Default '' (an open API). */
  idempotencyScope?: string;
}

export interface CreatedRun {
  run: RunRow;
  /** False when the run already existed under the request's Idempotency-Key. */
  created: boolean;
  /** True when this answer replays an earlier request's (the same key and the same request). */
  replayed: boolean;
}

/** Sorted keys at every level, so that two equal requests hash equally whatever order their fields came in. */
function canonicalJson(v: unknown): string {
  if (Array.isArray(v)) return `[${v.map(canonicalJson).join(',')}]`;
  if (v && typeof v === 'object') {
    return `{${Object.keys(v)
      .sort()
      .filter((k) => (v as Record<string, unknown>)[k] !== undefined)
      .map((k) => `${JSON.stringify(k)}:${canonicalJson((v as Record<string, unknown>)[k])}`)
      .join(',')}}`;
  }
  return JSON.stringify(v);
}

/** The request as parsed (defaults filled in): `{}` and `{"mode":"data-only"}` are the same request. */
function requestHash(req: z.output<typeof CreateRunSchema>): string {
  return createHash('sha256').update(canonicalJson(req)).digest('hex');
}

export async function createRun(ctx: AppContext, input: CreateRunInput, { idempotencyKey, idempotencyScope = '' }: IdempotencyOptions = {}): Promise<CreatedRun> {
  const req = CreateRunSchema.parse(input);
  const hash = idempotencyKey ? requestHash(req) : null;
  const byKey = async () => (await ctx.db.select().from(runs).where(and(eq(runs.idempotencyScope, idempotencyScope), eq(runs.idempotencyKey, idempotencyKey!))))[0];
  if (idempotencyKey) {
    const existing = await byKey();
    if (existing) return replay(ctx, existing, idempotencyKey, hash!);
  }
  const stepNames = stepsForMode(req.mode);
  if (stepNames.length === 0) {
    throw new SliceWiseError(`mode '${req.mode}' is not a run: it serves a trained model (slicewise pipeline --mode demo, or this API's /predict_multitask and /ui/demo); use --mode full, data-only or train-eval to make one`, {
      status: 400,
      code: 'not_a_run',
    });
  }
  const dataRunId = req.mode === 'train-eval' ? await resolveDataRun(ctx, req.fromRun) : null;
  const config = loadConfig({ trainingMode: req.trainingMode, overrides: req.overrides });
  const dataDir = resolve(req.dataDir ?? ctx.dataDir);
  // Checked now so a bad or forbidden source (a path outside the allowed folders, a private address) is a 400
  // naming its field at the door, not a failed job a minute later. The download step checks again.
  const brats = await checkRunSource(req.sources.brats, { field: 'sources.brats', dataset: 'brats', dataDir });
  const kaggle = await checkRunSource(req.sources.kaggle, { field: 'sources.kaggle', dataset: 'kaggle', dataDir });
  if (config.data.max_patients != null) assertPatientLimit(config.data.max_patients, 'max_patients asks for', { field: 'overrides.data.max_patients' });
  // The object form goes through the string form's checks: one validation for both.
  const layoutSpec = typeof req.sources.bratsLayout === 'object' ? Object.entries(req.sources.bratsLayout).map(([k, v]) => `${k}=${v}`).join(',') : req.sources.bratsLayout;
  const bratsLayout = layoutSpec === undefined ? undefined : parseLayout(layoutSpec);
  const sources: RunSources = { brats, kaggle, ...(bratsLayout ? { bratsLayout } : {}), skipDownload: req.skipDownload };
  const id = newRunId();

  // The insert claims the key: of concurrent requests with one key exactly one inserts, the others replay its run.
  const inserted = await ctx.db
    .insert(runs)
    .values({
      id,
      status: 'queued',
      mode: req.mode,
      trainingMode: req.trainingMode,
      config,
      overrides: req.overrides ?? null,
      dataRunId,
      sources,
      dataDir,
      idempotencyKey: idempotencyKey ?? null,
      idempotencyScope,
      requestHash: hash,
    })
    .onConflictDoNothing({ target: [runs.idempotencyScope, runs.idempotencyKey] })
    .returning();
  if (inserted.length === 0) return replay(ctx, (await byKey())!, idempotencyKey!, hash!);
  try {
    await enqueueRun(ctx, inserted[0]!);
  } catch (err) {
    await finishRun(ctx.db, id, 'failed', { message: `could not enqueue the run: ${(err as Error).message}` });
    throw new SliceWiseError(`could not enqueue run ${id}: ${(err as Error).message}`, { status: 503, code: 'redis_unreachable', cause: err });
  }
  ctx.logger.info({ runId: id, mode: req.mode, trainingMode: req.trainingMode, brats, kaggle }, `Run ${id} queued (${req.mode}, ${req.trainingMode})`);
  return { run: inserted[0]!, created: true, replayed: false };
}

/**
 * A request that repeats an Idempotency-Key gets the key's run, provided it is the same request; the run is
 * queued again when the process that made it died before queueing it (see ensureRunEnqueued).
 */
async function replay(ctx: AppContext, run: RunRow, key: string, hash: string): Promise<CreatedRun> {
  // Rows from before request hashes were kept have none: they replay on the key alone.
  if (run.requestHash && run.requestHash !== hash) {
    throw new SliceWiseError(`Idempotency-Key '${key}' was already used for a different request (it made run ${run.id}); send a new key for a new run`, {
      status: 409,
      code: 'idempotency_key_reused',
      details: { idempotencyKey: key, runId: run.id },
    });
  }
  const requeued = await ensureRunEnqueued(ctx, run).catch((err: Error) => {
    throw new SliceWiseError(`could not queue run ${run.id} again: ${err.message}`, { status: 503, code: 'redis_unreachable', cause: err });
  });
  return { run: requeued ? ((await getRunRow(ctx.db, run.id)) ?? run) : run, created: false, replayed: true };
}

/** The run's step rows and its flow. Both are idempotent (rows on run + step, jobs on ids from run + step). */
async function enqueueRun(ctx: AppContext, run: RunRow): Promise<void> {
  const stepNames = stepsForMode(run.mode as PipelineMode);
  await ctx.db
    .insert(steps)
    .values(stepNames.map((name) => ({ runId: run.id, name, status: 'pending' as const, queue: STEPS[name].queue })))
    .onConflictDoNothing();
  await ctx.flows.add(buildRunFlow({ runId: run.id, mode: run.mode as PipelineMode, config: run.config as Config }));
}

/**
 * A run is inserted before its jobs are queued, so a process killed between the two (or Redis lost with its
 * data) leaves a run that stays queued with nothing in Redis to move it. This queues such a run's flow again;
 * the flow's job ids are the run's own, so a flow that is there after all (another process queued it a moment
 * ago) is not added twice. Only a queued run: once a job has started, the run is running and its jobs exist.
 * Returns whether it queued anything.
 */
export async function ensureRunEnqueued(ctx: AppContext, run: RunRow): Promise<boolean> {
  if (run.status !== 'queued') return false;
  if (await ctx.queues[STEPS.finalize.queue].getJob(jobId(run.id, 'finalize'))) return false;
  await enqueueRun(ctx, run);
  ctx.logger.warn({ runId: run.id }, `Run ${run.id} was queued in the database with no jobs in Redis (its creator stopped before queueing them); queued them now`);
  return true;
}

/** Every queued run with no jobs (see ensureRunEnqueued), e.g. when an API process starts. Returns their ids. */
export async function enqueueOrphanedRuns(ctx: AppContext): Promise<string[]> {
  const queued = await ctx.db.select().from(runs).where(eq(runs.status, 'queued'));
  const done: string[] = [];
  for (const run of queued) if (await ensureRunEnqueued(ctx, run)) done.push(run.id);
  return done;
}

/**
 * train-eval trains on data an earlier run prepared: the one named, or the latest run that made data and
 * succeeded. Its splits must be there: a run whose files were deleted is refused now, not mid-training.
 */
async function resolveDataRun(ctx: AppContext, fromRun?: string): Promise<string> {
  const [row] = fromRun
    ? await ctx.db.select().from(runs).where(eq(runs.id, fromRun))
    : await ctx.db
        .select()
        .from(runs)
        .where(and(eq(runs.status, 'succeeded'), inArray(runs.mode, ['data-only', 'full'])))
        .orderBy(desc(runs.createdAt))
        .limit(1);
  if (!row) {
    throw new SliceWiseError(
      fromRun ? `fromRun: run ${fromRun} not found` : 'train-eval needs prepared data, and no data-only or full run has succeeded yet: run --mode data-only first (or pass fromRun)',
      { status: fromRun ? 404 : 409, code: 'no_data_run' },
    );
  }
  if (row.status !== 'succeeded' || !['data-only', 'full'].includes(row.mode)) {
    throw new SliceWiseError(`fromRun: run ${row.id} is a ${row.mode} run with status ${row.status}; train-eval needs a succeeded data-only or full run`, { status: 409, code: 'no_data_run' });
  }
  const splits = runPaths(row.dataDir, row.id).split('brats');
  if (!existsSync(splits)) throw new SliceWiseError(`run ${row.id} has no ${splits} any more; prepare data again`, { status: 409, code: 'no_data_run' });
  return row.id;
}

export async function getRunDetail(ctx: AppContext, runId: string) {
  const run = await getRunRow(ctx.db, runId);
  if (!run) throw new RunNotFoundError(runId);
  const stepRows = byStepOrder(await ctx.db.select().from(steps).where(eq(steps.runId, runId)));
  const patientRows = await ctx.db.select().from(patients).where(eq(patients.runId, runId)).orderBy(asc(patients.patientId));
  const [kaggleCounts] = await ctx.db
    .select({ n: count() })
    .from(kaggleImages)
    .where(and(eq(kaggleImages.runId, runId), eq(kaggleImages.status, 'rejected')));
  // Training progress: the latest epoch's figures of each training step (the whole history is in `metrics`).
  const metricRows = await ctx.db.select().from(metrics).where(eq(metrics.runId, runId));
  const latest: Record<string, { epoch: number; values: Record<string, number> }> = {};
  for (const m of metricRows) {
    const cur = latest[m.step];
    if (!cur || m.epoch > cur.epoch) latest[m.step] = { epoch: m.epoch, values: { [m.name]: m.value } };
    else if (m.epoch === cur.epoch) cur.values[m.name] = m.value;
  }
  return {
    ...run,
    steps: stepRows.map((s) => ({
      name: s.name,
      status: s.status,
      queue: s.queue,
      attempts: s.attempts,
      startedAt: s.startedAt,
      finishedAt: s.finishedAt,
      durationSeconds: s.durationMs == null ? null : s.durationMs / 1000,
      counts: s.counts,
      error: s.error,
      errorDetails: s.errorDetails,
      ...(latest[s.name] ? { latestEpoch: latest[s.name] } : {}),
    })),
    patients: patientRows.map((p) => ({ patientId: p.patientId, status: p.status, split: p.split, slices: p.slices, tumorSlices: p.tumorSlices, error: p.error })),
    kaggleRejected: kaggleCounts?.n ?? 0,
  };
}

export async function listRuns(ctx: AppContext, { status, limit, offset }: { status?: RunRow['status']; limit: number; offset: number }) {
  const where = status ? eq(runs.status, status) : undefined;
  const rows = await ctx.db.select().from(runs).where(where).orderBy(desc(runs.createdAt)).limit(limit).offset(offset);
  const [total] = await ctx.db.select({ n: count() }).from(runs).where(where);
  return { runs: rows, total: total?.n ?? 0, limit, offset };
}

export async function getRunResults(ctx: AppContext, runId: string) {
  const run = await getRunRow(ctx.db, runId);
  if (!run) throw new RunNotFoundError(runId);
  return buildResults(ctx.db, run);
}

/**
 * Cancels a run everywhere: the run is marked cancelled first (so no worker starts another of its jobs), then
 * every worker process hears it on the cancel channel and aborts the run's active jobs between units of work.
 */
export async function cancelRun(ctx: AppContext, runId: string): Promise<RunRow> {
  const run = await getRunRow(ctx.db, runId);
  if (!run) throw new RunNotFoundError(runId);
  if (isTerminal(run.status)) {
    throw new SliceWiseError(`run ${runId} is already ${run.status}; nothing to cancel`, { status: 409, code: 'run_finished' });
  }
  await finishRun(ctx.db, runId, 'cancelled', { message: 'cancelled by request' });
  await closeOpenSteps(ctx.db, runId, 'cancelled');
  await ctx.redis.publish(`${ctx.prefix}:${CANCEL_CHANNEL}`, runId);
  ctx.logger.info({ runId }, `Run ${runId} cancelled; workers told to stop its jobs`);
  return (await getRunRow(ctx.db, runId))!;
}

/**
 * Runs one evaluation step of a finished run again, alone, from the checkpoints its training recorded (e.g. after
 * fixing what made generate_gradcam fail, or to judge the same model again). The run is reopened, the step and a
 * finalize of its own are queued, and finalize gives the run its verdict again.
 */
export async function retryStep(ctx: AppContext, runId: string, step: string): Promise<RunRow> {
  if (!(EVAL_STEPS as readonly string[]).includes(step)) {
    throw new SliceWiseError(`step '${step}' cannot run alone; these can: ${EVAL_STEPS.join(', ')}`, { status: 400, code: 'not_retryable', details: { step } });
  }
  const run = await getRunRow(ctx.db, runId);
  if (!run) throw new RunNotFoundError(runId);
  if (!stepsForMode(run.mode as PipelineMode).includes(step as StepName)) {
    throw new SliceWiseError(`run ${runId} is a ${run.mode} run: it has no step ${step}`, { status: 409, code: 'no_such_step' });
  }
  if (run.status !== 'succeeded' && run.status !== 'failed') {
    throw new SliceWiseError(`run ${runId} is ${run.status}: a step can run again only once the run has finished`, { status: 409, code: 'run_not_finished' });
  }
  if (!(await reopenRun(ctx.db, runId, step))) {
    throw new SliceWiseError(`run ${runId} changed while the retry was being set up; look at it again`, { status: 409, code: 'run_changed' });
  }
  const stamp = new Date().toISOString().replace(/\D/g, '').slice(0, 17);
  try {
    await ctx.flows.add(buildRetryFlow({ runId, step: step as StepName, config: run.config as Config, stamp }));
  } catch (err) {
    await finishRun(ctx.db, runId, 'failed', { message: `could not enqueue the retry of ${step}: ${(err as Error).message}` });
    throw new SliceWiseError(`could not enqueue the retry of ${step} for run ${runId}: ${(err as Error).message}`, { status: 503, code: 'redis_unreachable', cause: err });
  }
  ctx.logger.info({ runId, step }, `Run ${runId}: ${step} queued to run again`);
  return (await getRunRow(ctx.db, runId))!;
}
