import { eq } from 'drizzle-orm';
import type { Db } from '../db/client.ts';
import { steps, type RunRow } from '../db/schema.ts';
import { stepsForMode } from '../producers/run-flow.ts';

/** pipeline_results.json, in the original controller's shape (see REFERENCE.md), from what the database recorded. */
export interface PipelineResults {
  run_id: string;
  start_time: string | null;
  end_time: string | null;
  mode: string;
  training_mode: string;
  success: boolean;
  status: RunRow['status'];
  error?: string;
  total_duration_seconds: number | null;
  steps: Record<string, { status: 'success' | 'failed' | 'timeout' | 'cancelled' | 'skipped' | 'pending' | 'running'; duration_seconds: number | null; command: string; attempts: number; counts: Record<string, number>; error?: string }>;
}

export async function buildResults(db: Db, run: RunRow): Promise<PipelineResults> {
  const rows = await db.select().from(steps).where(eq(steps.runId, run.id));
  const order = stepsForMode(run.mode as never);
  rows.sort((a, b) => order.indexOf(a.name as never) - order.indexOf(b.name as never));
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
