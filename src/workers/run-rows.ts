/**
 * The run rows that patient shards read, kept for a moment per process. A shard needs of its run only what does
 * not change while the run goes (config, data dir, sources) and whether the run was stopped; reading the whole row
 * (the config is the largest value in the table) for each of a run's thousands of tiny shards was the largest part
 * of a shard's bookkeeping. Steps other than shards always read the row afresh.
 *
 * A stop reaches the kept row two ways: at once through the cancel channel (host.ts calls runStopped), and at the
 * latest after `maxAgeMs`, when the row is read again (a host that missed the message while Redis was away).
 */
import type { Db } from '../db/client.ts';
import type { RunRow } from '../db/schema.ts';
import { getRunRow } from '../runs/store.ts';

export interface RunRowCacheOptions {
  /** How long a row is used before it is read again. Default: 1000 ms. */
  maxAgeMs?: number;
  /** Rows kept at most (the oldest is forgotten first). Default: 64. */
  maxRuns?: number;
}

interface Kept {
  row: RunRow;
  at: number;
}

export class RunRowCache {
  private readonly kept = new Map<string, Kept>();
  /** Stops heard of, applied to every row handed out (a read in flight may return the row as it was before). */
  private readonly stops = new Map<string, 'cancelled' | 'failed'>();
  /** Reads in flight: the shards of a run starting together read its row once. */
  private readonly reading = new Map<string, Promise<RunRow | undefined>>();
  private readonly maxAgeMs: number;
  private readonly maxRuns: number;

  constructor(
    private readonly db: Db,
    { maxAgeMs = 1000, maxRuns = 64 }: RunRowCacheOptions = {},
  ) {
    this.maxAgeMs = maxAgeMs;
    this.maxRuns = maxRuns;
  }

  async get(runId: string): Promise<RunRow | undefined> {
    const k = this.kept.get(runId);
    const row = k && Date.now() - k.at < this.maxAgeMs ? k.row : await this.read(runId);
    const stop = this.stops.get(runId);
    return row && stop && row.status !== stop ? { ...row, status: stop } : row;
  }

  private read(runId: string): Promise<RunRow | undefined> {
    let read = this.reading.get(runId);
    if (!read) {
      const at = Date.now();
      read = getRunRow(this.db, runId).then((row) => {
        if (row) this.keep(runId, { row, at });
        return row;
      });
      read.finally(() => this.reading.delete(runId)).catch(() => undefined);
      this.reading.set(runId, read);
    }
    return read;
  }

  /** The run was cancelled or failed: shards of it that start here from now on see that without a read. */
  stopped(runId: string, status: 'cancelled' | 'failed'): void {
    this.stops.set(runId, status);
    if (this.stops.size > this.maxRuns) this.stops.delete(this.stops.keys().next().value!);
  }

  /** The run's row changed in a way its shards must see (e.g. this process marked it running). */
  forget(runId: string): void {
    this.kept.delete(runId);
  }

  private keep(runId: string, k: Kept): void {
    this.kept.delete(runId);
    this.kept.set(runId, k);
    if (this.kept.size > this.maxRuns) this.kept.delete(this.kept.keys().next().value!);
  }
}

const caches = new WeakMap<Db, RunRowCache>();

/** The database handle's cache (one per handle, so per process in production). */
export function runRowCache(db: Db): RunRowCache {
  let c = caches.get(db);
  if (!c) caches.set(db, (c = new RunRowCache(db)));
  return c;
}
