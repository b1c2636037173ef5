/**
 * upsertPatients, the one writer of patient rows (shards written behind, the coordinator's record, failures), on
 * a real PGlite and a real Postgres: its merge rules, and values that a hand-built statement could mangle.
 */
import { eq } from 'drizzle-orm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadConfig } from '../src/config/load.ts';
import { patients, runs } from '../src/db/schema.ts';
import { upsertPatients } from '../src/runs/store.ts';
import { freshDb, type DbKind } from './helpers/db.ts';

describe.each(['pglite', 'postgres'] as DbKind[])('upsertPatients on %s', (kind) => {
  let h: Awaited<ReturnType<typeof freshDb>>;
  beforeAll(async () => {
    h = await freshDb(kind);
  });
  afterAll(async () => {
    await h.close();
  });

  let n = 0;
  async function newRun(): Promise<string> {
    const id = `run-rows-${++n}`;
    await h.db.insert(runs).values({ id, status: 'running', mode: 'data-only', trainingMode: 'quick', config: loadConfig({ trainingMode: 'quick' }), sources: {}, dataDir: '/tmp' });
    return id;
  }
  const rowsOf = async (runId: string) =>
    new Map((await h.db.select().from(patients).where(eq(patients.runId, runId))).map((r) => [r.patientId, r]));

  it('inserts, then merges: done stays done against a late pending, omitted figures are kept, the error follows the last write', async () => {
    const runId = await newRun();
    await upsertPatients(h.db, [
      { runId, patientId: 'a', status: 'pending' },
      { runId, patientId: 'b', status: 'failed', error: 'seg.nii.gz: truncated' },
    ]);
    let rows = await rowsOf(runId);
    expect(rows.get('a')).toMatchObject({ status: 'pending', slices: null, tumorSlices: null, outputDir: null, error: null });
    expect(rows.get('b')).toMatchObject({ status: 'failed', error: 'seg.nii.gz: truncated' });
    const firstWrite = rows.get('a')!.updatedAt.getTime();

    await upsertPatients(h.db, [
      { runId, patientId: 'a', status: 'done', slices: 12, tumorSlices: 4, outputDir: '/out/a' },
      { runId, patientId: 'b', status: 'done', slices: 7, tumorSlices: 0, outputDir: '/out/b', error: null },
    ]);
    await upsertPatients(h.db, [
      // A redelivered fan-out's late 'pending', without figures: must undo nothing.
      { runId, patientId: 'a', status: 'pending' },
    ]);
    rows = await rowsOf(runId);
    expect(rows.get('a')).toMatchObject({ status: 'done', slices: 12, tumorSlices: 4, outputDir: '/out/a', error: null });
    expect(rows.get('b')).toMatchObject({ status: 'done', slices: 7, tumorSlices: 0, outputDir: '/out/b', error: null });
    expect(rows.get('a')!.updatedAt.getTime()).toBeGreaterThanOrEqual(firstWrite);

    // A done patient may still fail on a retry that found its output broken: only pending is kept from undoing it.
    await upsertPatients(h.db, [{ runId, patientId: 'b', status: 'failed', error: 'flair.nii.gz: not found' }]);
    expect((await rowsOf(runId)).get('b')).toMatchObject({ status: 'failed', slices: 7, error: 'flair.nii.gz: not found' });
  });

  it('the later of two writes of one patient in a batch wins, and other runs are untouched', async () => {
    const runId = await newRun();
    const other = await newRun();
    await upsertPatients(h.db, [{ runId: other, patientId: 'p', status: 'done', slices: 1 }]);
    await upsertPatients(h.db, [
      { runId, patientId: 'p', status: 'done', slices: 1 },
      { runId, patientId: 'p', status: 'done', slices: 2 },
    ]);
    expect((await rowsOf(runId)).get('p')!.slices).toBe(2);
    expect((await rowsOf(other)).get('p')!.slices).toBe(1);
  });

  it('keeps text that array literals would mangle (quotes, commas, braces, backslashes, NULL, non-ASCII) exactly', async () => {
    const runId = await newRun();
    const nasty = ['p"1', 'p,2', '{p3}', 'p\\4', 'NULL', 'p 6', 'Ünïcødé-7', ''];
    await upsertPatients(
      h.db,
      nasty.map((patientId, i) => ({ runId, patientId: `id-${i}-${patientId}`, status: 'failed' as const, outputDir: `/out/${patientId}`, error: `bad ${patientId} "x", {y}\\` })),
    );
    const rows = await rowsOf(runId);
    nasty.forEach((p, i) => {
      const row = rows.get(`id-${i}-${p}`);
      expect(row, p).toBeDefined();
      expect(row!.outputDir).toBe(`/out/${p}`);
      expect(row!.error).toBe(`bad ${p} "x", {y}\\`);
    });
  });

  it('writes a run of 2,500 patients (more than one statement) whole', async () => {
    const runId = await newRun();
    await upsertPatients(
      h.db,
      Array.from({ length: 2500 }, (_, i) => ({ runId, patientId: `P${String(i).padStart(5, '0')}`, status: 'done' as const, slices: i % 50, tumorSlices: i % 7 })),
    );
    const rows = await rowsOf(runId);
    expect(rows.size).toBe(2500);
    expect(rows.get('P02499')).toMatchObject({ slices: 2499 % 50, tumorSlices: 2499 % 7 });
  });
});
