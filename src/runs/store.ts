import { and, eq, inArray, sql } from 'drizzle-orm';
import type { Db } from '../db/client.ts';
import { patients, runs, steps, type RunStatus } from '../db/schema.ts';

/**
 * Run and step bookkeeping. Every write is an upsert or a guarded update, because BullMQ may deliver a job
 * twice and a worker may die between doing the work and recording it.
 */

const TERMINAL: RunStatus[] = ['succeeded', 'failed', 'cancelled'];

export async function getRunRow(db: Db, runId: string) {
  const [row] = await db.select().from(runs).where(eq(runs.id, runId));
  return row;
}

export async function markRunRunning(db: Db, runId: string): Promise<void> {
  await db
    .update(runs)
    .set({ status: 'running', startedAt: sql`coalesce(${runs.startedAt}, now())` })
    .where(and(eq(runs.id, runId), eq(runs.status, 'queued')));
}

/** Settles a run once: a run already succeeded, failed or cancelled keeps its first verdict. */
export async function finishRun(db: Db, runId: string, status: 'succeeded' | 'failed' | 'cancelled', error?: { message: string; details?: unknown }): Promise<boolean> {
  const res = await db
    .update(runs)
    .set({ status, finishedAt: new Date(), error: error?.message ?? null, errorDetails: (error?.details ?? null) as never })
    .where(and(eq(runs.id, runId), sql`${runs.status} not in ('succeeded','failed','cancelled')`))
    .returning({ id: runs.id });
  return res.length > 0;
}

export function isTerminal(status: RunStatus): boolean {
  return TERMINAL.includes(status);
}

export async function stepStarted(db: Db, runId: string, step: string, { jobId, attempt }: { jobId?: string; attempt: number }): Promise<void> {
  await db
    .update(steps)
    .set({
      status: 'running',
      attempts: sql`greatest(${steps.attempts}, ${attempt})`,
      jobId: jobId ?? sql`${steps.jobId}`,
      // The first attempt's start is the step's start: a retry does not reset the clock.
      startedAt: sql`coalesce(${steps.startedAt}, now())`,
      error: null,
    })
    .where(and(eq(steps.runId, runId), eq(steps.name, step), inArray(steps.status, ['pending', 'running'])));
}

export async function stepProgress(db: Db, runId: string, step: string, counts: Record<string, number>): Promise<void> {
  await db
    .update(steps)
    .set({ counts: sql`${steps.counts} || ${JSON.stringify(counts)}::jsonb` })
    .where(and(eq(steps.runId, runId), eq(steps.name, step)));
}

export async function stepSucceeded(db: Db, runId: string, step: string, counts: Record<string, number> = {}, result?: unknown): Promise<void> {
  await db
    .update(steps)
    .set({
      status: 'success',
      finishedAt: sql`now()`,
      startedAt: sql`coalesce(${steps.startedAt}, now())`,
      durationMs: sql`(extract(epoch from (now() - coalesce(${steps.startedAt}, now()))) * 1000)::int`,
      counts: sql`${steps.counts} || ${JSON.stringify(counts)}::jsonb`,
      error: null,
      errorDetails: null,
      ...(result === undefined ? {} : { result }),
    })
    .where(and(eq(steps.runId, runId), eq(steps.name, step), inArray(steps.status, ['pending', 'running'])));
}

export async function stepFailed(
  db: Db,
  runId: string,
  step: string,
  { message, details, final, status = 'failed' }: { message: string; details?: unknown; final: boolean; status?: 'failed' | 'cancelled' },
): Promise<void> {
  await db
    .update(steps)
    .set(
      final
        ? {
            status,
            finishedAt: sql`now()`,
            durationMs: sql`(extract(epoch from (now() - coalesce(${steps.startedAt}, now()))) * 1000)::int`,
            error: message,
            errorDetails: (details ?? null) as never,
          }
        : { error: `${message} (will retry)` },
    )
    .where(and(eq(steps.runId, runId), eq(steps.name, step), inArray(steps.status, ['pending', 'running'])));
}

/** Steps still pending or running when a run ends are closed with the run's verdict. */
export async function closeOpenSteps(db: Db, runId: string, status: 'cancelled' | 'skipped'): Promise<void> {
  await db
    .update(steps)
    .set({ status, finishedAt: sql`case when ${steps.startedAt} is null then null else now() end` })
    .where(and(eq(steps.runId, runId), inArray(steps.status, ['pending', 'running'])));
}

export type PatientRowWrite = { runId: string; patientId: string; status: 'pending' | 'done' | 'failed'; slices?: number; tumorSlices?: number; outputDir?: string; error?: string | null };

export async function upsertPatient(db: Db, row: PatientRowWrite): Promise<void> {
  await upsertPatients(db, [row]);
}

/** Several patients' rows in one statement, merged as upsertPatient merges one. */
export async function upsertPatients(db: Db, rows: PatientRowWrite[]): Promise<void> {
  // One statement may not touch a row twice (ON CONFLICT would refuse it): the later write of a patient wins.
  const unique = [...new Map(rows.map((r) => [`${r.runId}\u0000${r.patientId}`, r])).values()];
  // 1,000 rows a statement: a run's 10,000 patients are ten short statements, not one that holds its locks long.
  for (let i = 0; i < unique.length; i += 1000) await upsertPatientChunk(db, unique.slice(i, i + 1000));
}

/**
 * The rows go in as one array per column, unnested by the server: seven parameters whatever the row count. A
 * multi-row VALUES list built by the query builder cost ~0.05 ms of CPU per row on the client (measured: 80 rows,
 * 4.0 ms against 0.6 ms on Postgres, 7.9 against 4.1 on PGlite), paid on the main thread of a worker that is
 * acknowledging shards meanwhile.
 */
async function upsertPatientChunk(db: Db, unique: PatientRowWrite[]): Promise<void> {
  const column = <T>(pick: (r: PatientRowWrite) => T) => sql.param(unique.map(pick));
  await db.execute(sql`
    insert into ${patients} (run_id, patient_id, status, slices, tumor_slices, output_dir, error, updated_at)
    select r.run_id, r.patient_id, r.status, r.slices, r.tumor_slices, r.output_dir, r.error, now()
    from unnest(
      ${column((r) => r.runId)}::text[], ${column((r) => r.patientId)}::text[], ${column((r) => r.status)}::text[],
      ${column((r) => r.slices ?? null)}::int[], ${column((r) => r.tumorSlices ?? null)}::int[],
      ${column((r) => r.outputDir ?? null)}::text[], ${column((r) => r.error ?? null)}::text[]
    ) as r(run_id, patient_id, status, slices, tumor_slices, output_dir, error)
    on conflict (run_id, patient_id) do update set
      -- A patient already done stays done: a late duplicate 'pending' must not undo it.
      status = case when ${patients}.status = 'done' and excluded.status = 'pending' then ${patients}.status else excluded.status end,
      slices = coalesce(excluded.slices, ${patients}.slices),
      tumor_slices = coalesce(excluded.tumor_slices, ${patients}.tumor_slices),
      output_dir = coalesce(excluded.output_dir, ${patients}.output_dir),
      error = excluded.error,
      updated_at = now()`);
}

/**
 * Raises a step's `done` count to at least `done` (merging nothing else): progress written from several places
 * at once, or late, never moves it back.
 */
export async function stepDoneAtLeast(db: Db, runId: string, step: string, done: number): Promise<void> {
  await db
    .update(steps)
    .set({ counts: sql`${steps.counts} || jsonb_build_object('done', greatest(coalesce((${steps.counts}->>'done')::int, 0), ${done}::int))` })
    .where(and(eq(steps.runId, runId), eq(steps.name, step)));
}

export async function countPatients(db: Db, runId: string): Promise<{ done: number; failed: number; total: number }> {
  const rows = await db
    .select({ status: patients.status, n: sql<number>`count(*)::int` })
    .from(patients)
    .where(eq(patients.runId, runId))
    .groupBy(patients.status);
  const by = Object.fromEntries(rows.map((r) => [r.status, Number(r.n)]));
  return { done: by.done ?? 0, failed: by.failed ?? 0, total: rows.reduce((a, r) => a + Number(r.n), 0) };
}

/** What a step's job returned when it last succeeded in this run (null when it has not). */
export async function stepResult<T>(db: Db, runId: string, step: string): Promise<T | null> {
  const [row] = await db
    .select({ result: steps.result, status: steps.status })
    .from(steps)
    .where(and(eq(steps.runId, runId), eq(steps.name, step)));
  return row?.status === 'success' ? ((row.result as T | null) ?? null) : null;
}

/**
 * Opens a finished run again for a step that runs once more alone (a retry): the run goes back to running with
 * no verdict, and the step and finalize back to pending. Guarded: only a run that succeeded or failed, so two
 * retries racing cannot both reopen it.
 */
export async function reopenRun(db: Db, runId: string, step: string): Promise<boolean> {
  const res = await db
    .update(runs)
    .set({ status: 'running', finishedAt: null, error: null, errorDetails: null })
    .where(and(eq(runs.id, runId), inArray(runs.status, ['succeeded', 'failed'])))
    .returning({ id: runs.id });
  if (res.length === 0) return false;
  await db
    .update(steps)
    .set({ status: 'pending', error: null, errorDetails: null, finishedAt: null, durationMs: null, startedAt: null, result: null })
    .where(and(eq(steps.runId, runId), inArray(steps.name, [step, 'finalize'])));
  return true;
}

/**
 * The pending rows of a coordinator's patients, in one statement per call (a fan-out has thousands). A row that
 * exists is left alone: a redelivered coordinator must not turn a done or failed patient back into pending.
 */
export async function insertPendingPatients(db: Db, runId: string, patientIds: string[]): Promise<void> {
  if (patientIds.length === 0) return;
  await db
    .insert(patients)
    .values(patientIds.map((patientId) => ({ runId, patientId, status: 'pending' as const })))
    .onConflictDoNothing({ target: [patients.runId, patients.patientId] });
}

/** Runs with no verdict yet (queued or running): what the run watchdog looks after. */
export async function unfinishedRuns(db: Db): Promise<Array<{ id: string; status: RunStatus }>> {
  return db.select({ id: runs.id, status: runs.status }).from(runs).where(inArray(runs.status, ['queued', 'running']));
}
