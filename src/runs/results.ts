import { eq } from 'drizzle-orm';
import type { Db } from '../db/client.ts';
import { steps, type RunRow } from '../db/schema.ts';
import type { PipelineResults } from '../disk/layout.ts';
import { byStepOrder } from './modes.ts';

/** pipeline_results.json, in the original controller's shape (see REFERENCE.md), from what the database recorded. */
export async function buildResults(db: Db, run: RunRow): Promise<PipelineResults> {
  const rows = byStepOrder(await db.select().from(steps).where(eq(steps.runId, run.id)));
  const out: PipelineResults['steps'] = {};
  for (const s of rows) {
    if (s.name === 'finalize') continue; // ours, not one of the original's steps
    out[s.name] = {
      status: s.status,
      duration_seconds: s.durationMs == null ? null : s.durationMs / 1000,
      // The original recorded the shell command it ran; a queued step's equivalent is its queue and job.
      command: `bullmq ${s.queue} ${s.jobId ?? '(not started)'}`,
      attempts: s.attempts,
      counts: s.counts,
      ...(s.error ? { error: s.error } : {}),
    };
  }
  const start = run.startedAt ?? run.createdAt;
  const end = run.finishedAt;
  return {
    run_id: run.id,
    start_time: start ? start.toISOString() : null,
    end_time: end ? end.toISOString() : null,
    mode: run.mode,
    training_mode: run.trainingMode,
    success: run.status === 'succeeded',
    status: run.status,
    ...(run.error ? { error: run.error } : {}),
    total_duration_seconds: end && start ? (end.getTime() - start.getTime()) / 1000 : null,
    steps: out,
  };
}
