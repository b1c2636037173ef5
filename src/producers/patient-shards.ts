/**
 * Adds the per-patient jobs of a coordinating step (BullMQ's "process step" pattern: the number of patients is
 * known only after download). Job ids come from run and patient, so a coordinator redelivered halfway through
 * adds nothing twice, and each patient's row starts as pending here; the runner settles it.
 */
import type { Job } from 'bullmq';
import type { Config } from '../config/schema.ts';
import type { AppContext } from '../context.ts';
import { jobId } from '../queues/names.ts';
import { SHARD_RETENTION } from '../queues/retention.ts';
import { upsertPatient } from '../runs/store.ts';
import { attemptsOf, backoffOf, type RunJobData, type StepDefinition } from '../workers/define.ts';

export async function addPatientShards<D extends RunJobData>(
  ctx: AppContext,
  { parent, step, config, shards }: { parent: Job; step: StepDefinition; config: Config; shards: { patientId: string; data: D }[] },
): Promise<void> {
  for (const s of shards) await upsertPatient(ctx.db, { runId: s.data.runId, patientId: s.patientId, status: 'pending' });
  await ctx.queues[step.queue].addBulk(
    shards.map((s) => ({
      name: step.name,
      data: s.data,
      opts: {
        jobId: jobId(s.data.runId, 'patient', s.patientId),
        parent: { id: parent.id!, queue: parent.queueQualifiedName },
        failParentOnFailure: true,
        attempts: attemptsOf(step, config),
        backoff: backoffOf(step),
        ...SHARD_RETENTION,
      },
    })),
  );
}
