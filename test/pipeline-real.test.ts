import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { eq } from 'drizzle-orm';
import { kaggleImages } from '../src/db/schema.ts';
import { decodeNpy } from '../src/imaging/npy.ts';
import { FIXTURES, harness, json, postRun, waitForRun, type Harness } from './helpers/services.ts';

// The fixtures are read in place: a folder runs may read only when the operator allows it.
process.env.SLICEWISE_ALLOWED_ROOTS = FIXTURES;

/** The real fixtures through the whole data run, read in place (path: sources), on a real Postgres. */
describe('data-only run on the real fixtures', () => {
  let h: Harness;
  beforeAll(async () => {
    h = await harness('postgres');
  });
  afterAll(async () => {
    await h?.close();
  });

  it('reads the BraTS 2015 cases through a layout and all 60 Kaggle images', async () => {
    const res = await postRun(h.app, {
      mode: 'data-only',
      trainingMode: 'quick',
      sources: {
        brats: `path:${join(FIXTURES, 'brats2015-deepmedic')}`,
        bratsLayout: 'flair=Flair_*.nii.gz,seg=OTMultiClass.nii.gz',
        kaggle: `path:${join(FIXTURES, 'kaggle-navoneel')}`,
      },
      overrides: { data: { image_size: 128 } },
    });
    expect(res.status).toBe(201);
    const { run } = await json(res);
    const done = await waitForRun(h.app, run.id, 180_000);
    expect(done.error ?? null).toBeNull();
    expect(done.status).toBe('succeeded');
    expect(done.patients.map((p: any) => p.patientId)).toEqual(['pat0001', 'pat0005']);

    // Every slice with >= 100 tumour pixels is kept: 69 and 70 of them, as an independent reader counts.
    const expected: Record<string, number> = { pat0001: 69, pat0005: 70 };
    for (const p of done.patients) {
      const dir = join(h.dataDir, 'runs', run.id, 'processed', 'brats', p.patientId);
      const meta = JSON.parse(await readFile(join(dir, 'meta.json'), 'utf8'));
      expect(meta.original_shape).toEqual([240, 240, 155]);
      expect(meta.slices.filter((s: any) => s.tumor_pixels >= 100)).toHaveLength(expected[p.patientId]!);
      const masks = decodeNpy(await readFile(join(dir, 'masks.npy')));
      expect(masks.shape).toEqual([meta.slices.length, 128, 128]);
      expect(p.slices).toBe(meta.slices.length);
    }

    // All 60 Kaggle images are accounted for: processed, or rejected with a reason.
    const rows = await h.ctx.db.select().from(kaggleImages).where(eq(kaggleImages.runId, run.id));
    expect(rows).toHaveLength(60);
    for (const r of rows) {
      if (r.status === 'rejected') expect(r.reason).toBeTruthy();
      else expect(r.split).toMatch(/^(train|val|test)$/);
    }
    expect(rows.filter((r) => r.label === 1)).toHaveLength(30);
    expect(rows.some((r) => /\.JPG$/.test(r.relPath))).toBe(true);
    expect(rows.some((r) => / /.test(r.relPath))).toBe(true);
    const kaggleStep = done.steps.find((s: any) => s.name === 'preprocess_kaggle');
    expect(kaggleStep.counts.processed + kaggleStep.counts.rejected).toBe(60);
  });
});
