/**
 * finalize: gives the run its verdict once every branch has settled (it runs even when a branch failed or the
 * run was cancelled), and writes pipeline_results.json beside the run.
 */
import { Job } from 'bullmq';
import { eq } from 'drizzle-orm';
import type { AppContext } from '../context.ts';
import { steps } from '../db/schema.ts';
import { runPaths, writePipelineResults } from '../disk/layout.ts';
import { buildResults } from '../runs/results.ts';
import { closeOpenSteps, finishRun, getRunRow, stepSucceeded } from '../runs/store.ts';
import { defineStep, RunJobData } from './define.ts';

/**
 * Follows a failed dependency down to the job that failed first: a parent failed by failParentOnFailure only
 * says "child X failed", while the child's own reason names the patient and the file.
 */
async function rootCause(ctx: AppContext, reason: string, depth = 0): Promise<string> {
  const m = /child (\S+) failed/.exec(reason);
  if (!m || depth > 5) return reason;
  const parts = m[1]!.split(':'); // <prefix>:<queue>:<id>
  const id = parts.pop()!;
  const queue = parts.pop()!;
  const q = ctx.queues[queue as keyof typeof ctx.queues];
  const child = q ? await Job.fromId(q, id) : undefined;
  if (!child?.failedReason) return reason;
  return rootCause(ctx, child.failedReason, depth + 1);
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
      const causes = await Promise.all(Object.values(failures).map((reason) => rootCause(ctx, reason)));
      // A step already failed the run with its own message; this only covers a worker that died before saying so.
      await finishRun(ctx.db, run.id, 'failed', { message: causes.join('; '), details: { failures: causes } });
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
