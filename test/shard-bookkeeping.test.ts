/**
 * A patient shard's bookkeeping on the main thread, on a real PGlite: its row written behind it (shard-rows.ts) and
 * its run's row kept for a moment (run-rows.ts).
 */
import { eq } from 'drizzle-orm';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { loadConfig } from '../src/config/load.ts';
import type { DbHandle } from '../src/db/client.ts';
import { patients, runs, steps } from '../src/db/schema.ts';
import { createLogger } from '../src/lib/logger.ts';
import { finishRun } from '../src/runs/store.ts';
import { RunRowCache } from '../src/workers/run-rows.ts';
import { ShardRowWriter } from '../src/workers/shard-rows.ts';
import { freshDb } from './helpers/db.ts';

let h: DbHandle;
beforeEach(async () => {
  h = await freshDb('pglite');
});
afterEach(async () => {
  await h.close();
});

async function addRun(id: string): Promise<void> {
  const config = loadConfig({ trainingMode: 'quick' });
  await h.db.insert(runs).values({ id, status: 'running', mode: 'data-only', trainingMode: 'quick', config, sources: {}, dataDir: '/tmp' });
  await h.db.insert(steps).values({ runId: id, name: 'preprocess_brats', status: 'running', queue: 'pipeline' });
}

const done = (runId: string, patientId: string, slices = 3) => ({ runId, patientId, status: 'done' as const, slices, tumorSlices: 1, outputDir: `/out/${patientId}`, error: null });
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function rowsOf(runId: string) {
  return (await h.db.select().from(patients).where(eq(patients.runId, runId))).map((r) => [r.patientId, r.status, r.slices]).sort();
}
async function doneCount(runId: string) {
  const [s] = await h.db.select().from(steps).where(eq(steps.runId, runId));
  return (s!.counts as { done?: number } | null)?.done;
}

describe('ShardRowWriter', () => {
  it('writes the rows of shards finished within an interval together, after it, and raises the step done count', async () => {
    await addRun('r1');
    const w = new ShardRowWriter(h.db, createLogger('test', 'silent'), { intervalMs: 150 });
    w.add('preprocess_brats', done('r1', 'p1'));
    w.add('preprocess_brats', done('r1', 'p2'));
    // Not written at once: the point is one statement for many shards.
    expect(await rowsOf('r1')).toEqual([]);
    await sleep(600);
    expect(await rowsOf('r1')).toEqual([
      ['p1', 'done', 3],
      ['p2', 'done', 3],
    ]);
    expect(await doneCount('r1')).toBe(2);
    // A later shard is written by a later interval.
    w.add('preprocess_brats', done('r1', 'p3'));
    await sleep(600);
    expect(await doneCount('r1')).toBe(3);
  });

  it('keeps rows it could not write for the next write, and flush() writes what is queued', async () => {
    const w = new ShardRowWriter(h.db, createLogger('test', 'silent'), { intervalMs: 50 });
    // The run does not exist yet: the insert breaks the foreign key and fails.
    w.add('preprocess_brats', done('r2', 'a'));
    await sleep(300);
    expect(await rowsOf('r2')).toEqual([]);
    await addRun('r2');
    // Nothing retries on its own; the next shard's write takes the kept row along.
    w.add('preprocess_brats', done('r2', 'b'));
    await w.flush();
    expect(await rowsOf('r2')).toEqual([
      ['a', 'done', 3],
      ['b', 'done', 3],
    ]);
    expect(await doneCount('r2')).toBe(2);
  });
});

describe('RunRowCache', () => {
  it('reads a run once for the shards that start together, and again after maxAgeMs', async () => {
    await addRun('r3');
    const c = new RunRowCache(h.db, { maxAgeMs: 200 });
    const [a, b] = await Promise.all([c.get('r3'), c.get('r3')]);
    expect(a).toBe(b);
    await finishRun(h.db, 'r3', 'cancelled');
    // Within maxAgeMs the kept row is used...
    expect((await c.get('r3'))!.status).toBe('running');
    await sleep(250);
    // ...then the row is read again.
    expect((await c.get('r3'))!.status).toBe('cancelled');
    expect(await c.get('missing')).toBeUndefined();
  });

  it('a stop heard on the cancel channel applies at once, also to a read in flight', async () => {
    await addRun('r4');
    const c = new RunRowCache(h.db, { maxAgeMs: 60_000 });
    expect((await c.get('r4'))!.status).toBe('running');
    c.stopped('r4', 'failed');
    expect((await c.get('r4'))!.status).toBe('failed');
    await addRun('r5');
    const reading = c.get('r5');
    c.stopped('r5', 'cancelled');
    expect((await reading)!.status).toBe('cancelled');
  });
});
