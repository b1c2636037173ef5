/**
 * Finished shards' patient rows, written behind the shards: one statement per interval for every shard this
 * process finished meanwhile, instead of one per shard awaited before its job is acknowledged (for a tiny patient
 * that statement cost more than the patient). These rows serve whoever watches the run (a patient's status, the
 * step's done count); the durable record is the coordinator's: once all its shards are done it writes every
 * patient's row from the results BullMQ keeps with it (preprocess-brats.ts), so a row this process never got to
 * write (killed first, or the database away) is written then, before split and finalize read them.
 */
import type { AppContext } from '../context.ts';
import type { Db } from '../db/client.ts';
import { env } from '../env.ts';
import type { Logger } from '../lib/logger.ts';
import { countPatients, stepDoneAtLeast, upsertPatients, type PatientRowWrite } from '../runs/store.ts';

export interface ShardRowWriterOptions {
  /** How long a finished shard's row may wait to be written with others. Default: 250 ms (SLICEWISE_SHARD_ROWS_MS). */
  intervalMs?: number;
  /** Rows kept while the database is away; past it the oldest are left to the coordinator. Default: 100,000. */
  maxQueued?: number;
}

type QueuedRow = PatientRowWrite & { step: string };

export class ShardRowWriter {
  private rows = new Map<string, QueuedRow>();
  private timer: NodeJS.Timeout | undefined;
  private writing: Promise<void> | undefined;
  private readonly intervalMs: number;
  private readonly maxQueued: number;

  constructor(
    private readonly db: Db,
    private readonly log: Logger,
    { intervalMs = 250, maxQueued = 100_000 }: ShardRowWriterOptions = {},
  ) {
    this.intervalMs = intervalMs;
    this.maxQueued = maxQueued;
  }

  /** A shard of `step` finished with this row. */
  add(step: string, row: PatientRowWrite): void {
    const key = `${row.runId}\u0000${row.patientId}`;
    this.rows.delete(key);
    this.rows.set(key, { ...row, step });
    if (this.rows.size > this.maxQueued) this.rows.delete(this.rows.keys().next().value!);
    this.schedule();
  }

  /** Writes what is queued now and waits for it (a worker stopping gracefully). */
  async flush(): Promise<void> {
    clearTimeout(this.timer);
    this.timer = undefined;
    await this.writing;
    if (this.rows.size > 0) await this.write();
  }

  private schedule(): void {
    if (this.timer || this.writing) return;
    this.timer = setTimeout(() => {
      this.timer = undefined;
      this.writing = this.write().then((ok) => {
        this.writing = undefined;
        // After a failure the next finished shard schedules the retry: a database closed for good is not retried
        // forever on a timer.
        if (ok && this.rows.size > 0) this.schedule();
      });
    }, this.intervalMs);
    // Nothing here may keep a finished process alive: the coordinator writes these rows anyway.
    this.timer.unref();
  }

  /** False when the rows could not be written (they are kept for the next write). */
  private async write(): Promise<boolean> {
    const batch = [...this.rows.values()];
    this.rows.clear();
    try {
      await upsertPatients(this.db, batch.map(({ step: _step, ...row }) => row));
      // The done count of each step these rows belong to, from the table: never lowered (stepDoneAtLeast), so a
      // late or concurrent count from another process cannot move it back.
      const steps = new Map(batch.map((r) => [`${r.runId}\u0000${r.step}`, r]));
      for (const r of steps.values()) await stepDoneAtLeast(this.db, r.runId, r.step, (await countPatients(this.db, r.runId)).done);
      return true;
    } catch (err) {
      // Kept for the next write, unless a later row of the same patient took their place. An outage is reported by
      // the database client.
      for (const r of batch) {
        const key = `${r.runId}\u0000${r.patientId}`;
        if (!this.rows.has(key) && this.rows.size < this.maxQueued) this.rows.set(key, r);
      }
      this.log.debug({ rows: batch.length, err: (err as Error).message }, `Could not write ${batch.length} finished patients' rows yet: ${(err as Error).message}`);
      return false;
    }
  }
}

const writers = new WeakMap<AppContext, ShardRowWriter>();

/** The context's writer (one per worker process in production). */
export function shardRowWriter(ctx: AppContext): ShardRowWriter {
  let w = writers.get(ctx);
  if (!w) writers.set(ctx, (w = new ShardRowWriter(ctx.db, ctx.logger, { intervalMs: env().shardRowsMs })));
  return w;
}

/** The context's writer if it has one: a host stopping flushes it without making one. */
export function existingShardRowWriter(ctx: AppContext): ShardRowWriter | undefined {
  return writers.get(ctx);
}
