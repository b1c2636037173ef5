/**
 * Fault 5: Postgres unavailable for a while. A real `slicewise worker` process reaches the test database only
 * through a proxy, which is cut for several seconds while the run's patient shards are going, then restored. The
 * steps wait the outage out (their statements are sent again with backoff), the worker says once that the
 * database is unreachable and once that it is back, and the run completes with every patient row and every step
 * result recorded. The run is created and checked from this process, on the direct connection.
 */
import { join } from 'node:path';
import { eq } from 'drizzle-orm';
import { describe, expect, it } from 'vitest';
import { patients, steps } from '../../src/db/schema.ts';
import { createRun } from '../../src/runs/service.ts';
import { getRunRow, stepResult } from '../../src/runs/store.ts';
import { synthesize } from '../../src/synth/index.ts';
import { cutProxy, faultScenes, until } from './procs.ts';

/** Enough tiny patients that the shards are still going a few seconds after the first ones are done. */
const PATIENTS = 200;
const CUT_MS = 6000;

const setUp = faultScenes();

describe('Postgres unavailable for a while', () => {
  it('the steps wait and retry their writes; no result is lost; the run completes', async () => {
    const s = await setUp();
    const direct = new URL(s.h.db.url!);
    const proxy = await cutProxy(direct.hostname, Number(direct.port || 5432));
    try {
      const viaProxy = new URL(direct);
      viaProxy.port = String(proxy.port);
      const worker = await s.worker({ databaseUrl: viaProxy.toString() });

      // `path:` sources must lie in the data dir.
      const synth = await synthesize({ out: join(s.h.dataDir, 'incoming'), patients: PATIENTS, size: [32, 32, 8], kaggleYes: 3, kaggleNo: 3, kaggleSize: 64 });
      const { run } = await createRun(s.h.ctx, {
        mode: 'data-only',
        sources: { brats: `path:${synth.bratsDir}`, kaggle: `path:${synth.kaggleDir}` },
        overrides: { data: { image_size: 32, patients: { fraction: 1 } } },
      });
      const doneRows = async () => (await s.h.ctx.db.select({ status: patients.status }).from(patients).where(eq(patients.runId, run.id))).filter((p) => p.status === 'done').length;

      // In the middle of the shards: some patients recorded, most not.
      await until('the first patients done', async () => (await doneRows()) >= 5, 120_000, s.logs, 20);
      proxy.cut();
      const doneAtCut = await doneRows();
      await new Promise((r) => setTimeout(r, CUT_MS));
      // Nothing the worker did reached the database meanwhile, and the run is not over.
      expect(await doneRows()).toBeLessThanOrEqual(doneAtCut + 2); // a statement already in flight when cut may land
      expect((await getRunRow(s.h.ctx.db, run.id))?.status).toBe('running');
      expect(doneAtCut, 'the cut came after the run had ended its shards').toBeLessThan(PATIENTS);
      proxy.restore();

      const final = await until(
        'the run to end',
        async () => {
          const r = await getRunRow(s.h.ctx.db, run.id);
          return r && ['succeeded', 'failed', 'cancelled'].includes(r.status) ? r : undefined;
        },
        180_000,
        s.logs,
        200,
      );
      expect(final.status, `${final.error}\n${s.logs()}`).toBe('succeeded');

      // Every patient row, with the figures its shard produced.
      const rows = await s.h.ctx.db.select().from(patients).where(eq(patients.runId, run.id));
      expect(rows).toHaveLength(PATIENTS);
      for (const p of rows) {
        expect(p.status, p.patientId).toBe('done');
        expect(p.slices, p.patientId).not.toBeNull();
        expect(p.tumorSlices, p.patientId).not.toBeNull();
        expect(p.outputDir, p.patientId).toBeTruthy();
        expect(p.split, p.patientId).toBeTruthy();
      }
      // Every step succeeded and kept its result; preprocess_brats counted every patient.
      const stepRows = await s.h.ctx.db.select().from(steps).where(eq(steps.runId, run.id));
      expect(stepRows.map((r) => [r.name, r.status]).filter(([, st]) => st !== 'success')).toEqual([]);
      // (finalize settles its own row before the run's verdict, and keeps no result.)
      for (const name of ['download_brats', 'download_kaggle', 'preprocess_brats', 'preprocess_kaggle', 'split_brats', 'split_kaggle']) {
        expect(await stepResult(s.h.ctx.db, run.id, name), name).not.toBeNull();
      }
      const pre = await stepResult<{ patients: { patientId: string; slices: number }[] }>(s.h.ctx.db, run.id, 'preprocess_brats');
      expect(pre!.patients).toHaveLength(PATIENTS);
      const bySlices = new Map(rows.map((r) => [r.patientId, r.slices]));
      for (const p of pre!.patients) expect(bySlices.get(p.patientId), p.patientId).toBe(p.slices);
      expect(stepRows.find((r) => r.name === 'preprocess_brats')!.counts).toMatchObject({ done: PATIENTS, total: PATIENTS });

      // Said once each, not once per statement or retry.
      const out = worker.output();
      expect(out.match(/steps wait for it and retry their database writes/g) ?? [], out.slice(-3000)).toHaveLength(1);
      expect(out.match(/is reachable again after [\d.]+ s/g) ?? [], out.slice(-3000)).toHaveLength(1);
    } finally {
      await proxy.close();
    }
  });
});
