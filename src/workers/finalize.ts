import { join } from 'node:path';
import { Job } from 'bullmq';
import type { AppContext } from '../context.ts';
import { writeJsonAtomic } from '../lib/atomic.ts';
import { runDir } from '../producers/run-flow.ts';
import { buildResults } from '../runs/results.ts';
import { closeOpenSteps, finishRun, getRunRow, stepSucceeded } from '../runs/store.ts';
import { runStep } from './step.ts';

/**
 * Follows a failed dependency down to the job that failed first: a parent failed by failParentOnFailure only
 * says "child X failed", while the child's own reason names the patient and the file.
 */
async function rootCause(ctx: AppContext, jobKey: string, reason: string, depth = 0): Promise<string> {
  const m = /child (\S+) failed/.exec(reason);
  if (!m || depth > 5) return reason;
  const key = m[1]!; // <prefix>:<queue>:<id>
  const parts = key.split(':');
  const id = parts.pop()!;
  const queue = parts.pop()!;
  const q = ctx.queues[queue as keyof typeof ctx.queues];
  const child = q ? await Job.fromId(q, id) : undefined;
  if (!child?.failedReason) return reason;
  return rootCause(ctx, key, child.failedReason, depth + 1);
}

/** Gives the run its verdict once every branch has settled, and writes pipeline_results.json beside the run. */
export function finalizeProcessor(ctx: AppContext) {
  return async (job: Job, token?: string, signal?: AbortSignal) =>
    runStep('finalize', ctx, job, token, signal, async ({ run }) => {
      const failures = await job.getIgnoredChildrenFailures();
      const current = (await getRunRow(ctx.db, run.id))!;
      // This step's own row is settled before the run's: whoever sees the verdict sees every step closed.
      await stepSucceeded(ctx.db, run.id, 'finalize');
      if (Object.keys(failures).length > 0 && current.status !== 'cancelled') {
        const causes = await Promise.all(Object.entries(failures).map(([key, reason]) => rootCause(ctx, key, reason)));
        // A step already failed the run with its own message; this only covers a worker that died before saying so.
        await finishRun(ctx.db, run.id, 'failed', { message: causes.join('; '), details: { failures: causes } });
      } else if (current.status !== 'failed' && current.status !== 'cancelled') {
        await finishRun(ctx.db, run.id, 'succeeded');
      }
      const after = (await getRunRow(ctx.db, run.id))!;
      if (after.status !== 'succeeded') await closeOpenSteps(ctx.db, run.id, after.status === 'cancelled' ? 'cancelled' : 'skipped');
      const file = join(runDir(run.dataDir, run.id), 'pipeline_results.json');
      await writeJsonAtomic(file, await buildResults(ctx.db, after));
      ctx.logger.info({ runId: run.id, status: after.status }, `Run ${run.id} ${after.status}; results in ${file}`);
      return { result: { status: after.status, file }, counts: {} };
    }, { evenIfStopped: true });
}
