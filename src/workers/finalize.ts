/**
 * finalize: gives the run its verdict once every branch has settled (it runs even when a branch failed or the
 * run was cancelled), and writes pipeline_results.json beside the run.
 */
import { Job } from 'bullmq';
import { and, eq } from 'drizzle-orm';
import type { AppContext } from '../context.ts';
import { patients, steps } from '../db/schema.ts';
import { runPaths, writePipelineResults } from '../disk/layout.ts';
import { buildResults } from '../runs/results.ts';
import { closeOpenSteps, finishRun, getRunRow, stepFailed, stepSucceeded, upsertPatient } from '../runs/store.ts';
import { defineStep, RunJobData, type StepDefinition } from './define.ts';
import { preprocessPatientStep } from './preprocess-patient.ts';

/** The per-patient steps (not the registry: it imports this file). */
const SHARD_STEPS: StepDefinition[] = [preprocessPatientStep];

/** BullMQ's reason for a job whose worker died holding it more often than maxStalledCount allows. */
const STALLED_REASON = 'job stalled more than allowable limit';

/** A job's key as BullMQ writes it in a parent's records: <prefix>:<queue>:<id>. */
async function jobOfKey(ctx: AppContext, key: string): Promise<Job | undefined> {
  const parts = key.split(':');
  const id = parts.pop()!;
  const queue = ctx.queues[parts.pop() as keyof typeof ctx.queues];
  return queue ? Job.fromId(queue, id) : undefined;
}

interface Failure {
  /** The step whose row carries it (a shard's is its parent step's). */
  step?: string;
  patientId?: string;
  message: string;
}

/**
 * Follows a failed dependency down to the job that failed first: a parent failed by failParentOnFailure only
 * says "child X failed", while the child's own reason names the patient and the file. A job BullMQ failed by
 * itself (its worker died on it too often) never went through the runner, so its reason names nothing: this says
 * which step and patient it was.
 */
async function firstFailure(ctx: AppContext, key: string, reason: string): Promise<Failure> {
  let job = await jobOfKey(ctx, key);
  for (let depth = 0; depth < 6; depth++) {
    const m = /child (\S+) failed/.exec(reason);
    const child = m ? await jobOfKey(ctx, m[1]!) : undefined;
    if (!child?.failedReason) break;
    job = child;
    reason = child.failedReason;
  }
  if (!job) return { message: reason };
  const def = SHARD_STEPS.find((d) => d.name === job.name);
  const data = def?.data.safeParse(job.data);
  const shard = data?.success ? def!.shard : undefined;
  const patientId = shard ? (shard.patientId(data!.data) as string) : undefined;
  let message = reason;
  if (reason === STALLED_REASON) {
    // Not processedBy: that is the worker that took the job once more only to fail it.
    message = `its worker process died ${job.stalledCounter} times while running it; not tried again (${reason})`;
  }
  if (patientId && !message.includes(patientId)) message = `patient ${patientId}: ${message}`;
  return { step: shard?.rollsUpInto ?? job.name, patientId, message };
}

/** Writes a failure the runner never saw into the rows it would have written: the patient's and the step's. */
async function recordFailure(ctx: AppContext, runId: string, f: Failure): Promise<void> {
  if (!f.step) return;
  const details = { step: f.step, ...(f.patientId ? { patientId: f.patientId } : {}) };
  if (f.patientId) {
    const [row] = await ctx.db
      .select({ status: patients.status })
      .from(patients)
      .where(and(eq(patients.runId, runId), eq(patients.patientId, f.patientId)));
    // A row the runner already failed keeps its own words.
    if (row?.status !== 'failed') await upsertPatient(ctx.db, { runId, patientId: f.patientId, status: 'failed', error: f.message });
  }
  // Guarded: a step row the runner already settled is left as it is.
  await stepFailed(ctx.db, runId, f.step, { message: f.message, details, final: true });
}

export const finalize = defineStep({
  name: 'finalize',
  queue: 'pipeline',
  data: RunJobData,
  attempts: 3,
  evenIfStopped: true,
  async run({ ctx, job, run, log }) {
    const failures = await job.getIgnoredChildrenFailures();
    const current = (await getRunRow(ctx.db, run.id))!;
    // This step's own row is settled before the run's: whoever sees the verdict sees every step closed.
    await stepSucceeded(ctx.db, run.id, 'finalize');
    const unfinished = (await ctx.db.select({ name: steps.name, status: steps.status }).from(steps).where(eq(steps.runId, run.id))).filter(
      (r) => r.name !== 'finalize' && r.status !== 'success',
    );
    if (Object.keys(failures).length > 0 && current.status !== 'cancelled') {
      const causes = await Promise.all(Object.entries(failures).map(([key, reason]) => firstFailure(ctx, key, reason)));
      for (const f of causes) await recordFailure(ctx, run.id, f);
      const texts = causes.map((f) => (f.step ? `${f.step} failed: ${f.message}` : f.message));
      // A step already failed the run with its own message; this only covers a worker that died before saying so.
      const message = texts.join('; ');
      if (await finishRun(ctx.db, run.id, 'failed', { message, details: { failures: texts, ...(causes.length === 1 ? { step: causes[0]!.step, patientId: causes[0]!.patientId } : {}) } })) {
        ctx.logger.error({ runId: run.id, failures: texts }, `Run ${run.id} failed: ${message}`);
      }
    } else if (unfinished.length > 0 && current.status !== 'cancelled') {
      // Every branch settled without a failure BullMQ knows of, yet a step did not succeed: say which.
      const list = unfinished.map((r) => `${r.name} ${r.status}`).join(', ');
      await finishRun(ctx.db, run.id, 'failed', { message: `not every step succeeded: ${list}`, details: { steps: unfinished } });
    } else if (current.status !== 'failed' && current.status !== 'cancelled') {
      await finishRun(ctx.db, run.id, 'succeeded');
    }
    const after = (await getRunRow(ctx.db, run.id))!;
    if (after.status !== 'succeeded') await closeOpenSteps(ctx.db, run.id, after.status === 'cancelled' ? 'cancelled' : 'skipped');
    const file = runPaths(run.dataDir, run.id).pipelineResults;
    await writePipelineResults(file, await buildResults(ctx.db, after));
    log(`Run ${run.id} ${after.status}; results in ${file}`);
    return { result: { status: after.status, file } };
  },
});
