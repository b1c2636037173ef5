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
import { insertPendingPatients } from '../runs/store.ts';
import { attemptsOf, backoffOf, type RunJobData, type StepDefinition } from '../workers/define.ts';

/**
 * Shards per round trip. A fan-out of thousands in one addBulk is one MULTI that holds Redis (every worker's lock
 * renewal included) for its whole length; chunks keep each short. A coordinator killed between two chunks has
 * added some, and its redelivery adds the rest.
 */
export const FAN_OUT_CHUNK = 100;

export interface FanOutResult {
  /** Shards this call added to the queue. */
  added: number;
  /** Shards that already were children of the parent (a redelivered coordinator): left alone. */
  present: number;
}

export async function addPatientShards<D extends RunJobData>(
  ctx: AppContext,
  { parent, step, config, shards }: { parent: Job; step: StepDefinition; config: Config; shards: { patientId: string; data: D }[] },
): Promise<FanOutResult> {
  const queue = ctx.queues[step.queue];
  // What an earlier delivery of this coordinator already added: its children still to run, and those done. A
  // done child's job may be gone already (retention trims finished shards), and adding it again would make a new
  // job that runs the patient a second time, so the parent's own record of its children decides, not the queue.
  const deps = await parent.getDependencies();
  const known = new Set([...(deps.unprocessed ?? []), ...Object.keys(deps.processed ?? {}), ...(deps.failed ?? []), ...Object.keys(deps.ignored ?? {})]);
  const keyOf = (s: { patientId: string; data: D }) => `${queue.qualifiedName}:${jobId(s.data.runId, 'patient', s.patientId)}`;
  const todo = shards.filter((s) => !known.has(keyOf(s)));

  for (let i = 0; i < todo.length; i += FAN_OUT_CHUNK) {
    const chunk = todo.slice(i, i + FAN_OUT_CHUNK);
    // The rows first: a shard that runs at once finds its row to settle.
    const byRun = new Map<string, string[]>();
    for (const s of chunk) byRun.set(s.data.runId, [...(byRun.get(s.data.runId) ?? []), s.patientId]);
    for (const [runId, ids] of byRun) await insertPendingPatients(ctx.db, runId, ids);
    await queue.addBulk(
      chunk.map((s) => ({
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
  return { added: todo.length, present: shards.length - todo.length };
}
