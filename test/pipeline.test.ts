import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { eq } from 'drizzle-orm';
import { decodeNpy } from '../src/imaging/npy.ts';
import { patients, runs, steps } from '../src/db/schema.ts';
import { harness, json, postRun, waitForRun, type DbKind, type Harness } from './helpers/services.ts';

describe.each<DbKind>(['pglite', 'postgres'])('data-only run through the API (%s)', (kind) => {
  let h: Harness;
  beforeAll(async () => {
    h = await harness(kind);
  });
  afterAll(async () => {
    await h?.close();
  });

  it('downloads, preprocesses one job per patient, splits, and records every step', async () => {
    const res = await postRun(h.app, {
      mode: 'data-only',
      trainingMode: 'quick',
      sources: { brats: 'synthetic:5', kaggle: 'synthetic:8' },
      overrides: { data: { image_size: 64, patients: { fraction: 1 } } },
    });
    expect(res.status).toBe(201);
    const { run } = await json(res);
    const done = await waitForRun(h.app, run.id);
    expect(done.error ?? null).toBeNull();
    expect(done.status).toBe('succeeded');
    expect(done.steps.map((s: any) => [s.name, s.status])).toEqual([
      ['download_brats', 'success'],
      ['download_kaggle', 'success'],
      ['preprocess_brats', 'success'],
      ['preprocess_kaggle', 'success'],
      ['split_brats', 'success'],
      ['split_kaggle', 'success'],
      ['finalize', 'success'],
    ]);
    for (const s of done.steps) {
      expect(s.attempts).toBeGreaterThanOrEqual(1);
      expect(s.durationSeconds).toBeGreaterThanOrEqual(0);
    }

    // Slice counts: what the database says equals what is on disk, patient by patient.
    expect(done.patients).toHaveLength(5);
    const outRoot = join(h.dataDir, 'runs', run.id, 'processed', 'brats');
    let total = 0;
    for (const p of done.patients) {
      expect(p.status).toBe('done');
      const meta = JSON.parse(await readFile(join(outRoot, p.patientId, 'meta.json'), 'utf8'));
      const imgs = decodeNpy(await readFile(join(outRoot, p.patientId, 'images.npy')));
      const masks = decodeNpy(await readFile(join(outRoot, p.patientId, 'masks.npy')));
      expect(imgs.shape).toEqual([meta.slices.length, 64, 64]);
      expect(masks.shape).toEqual([meta.slices.length, 64, 64]);
      expect(p.slices).toBe(meta.slices.length);
      expect(p.tumorSlices).toBe(meta.slices.filter((s: any) => s.has_tumor).length);
      expect(p.tumorSlices).toBeGreaterThan(0);
      total += p.slices;
    }
    const pre = done.steps.find((s: any) => s.name === 'preprocess_brats');
    expect(pre.counts).toMatchObject({ done: 5, total: 5, slices: total });

    // Splits: patient-disjoint, covering every patient, in the file and in the database alike.
    const split = JSON.parse(await readFile(join(h.dataDir, 'runs', run.id, 'splits', 'brats.json'), 'utf8'));
    const all = [...split.train, ...split.val, ...split.test];
    expect(new Set(all).size).toBe(all.length);
    expect(all.sort()).toEqual(done.patients.map((p: any) => p.patientId).sort());
    for (const p of done.patients) expect(split[p.split]).toContain(p.patientId);

    const kaggle = JSON.parse(await readFile(join(h.dataDir, 'runs', run.id, 'splits', 'kaggle.json'), 'utf8'));
    const kAll = [...kaggle.train, ...kaggle.val, ...kaggle.test];
    expect(new Set(kAll).size).toBe(kAll.length);
    expect(kAll.length).toBeGreaterThan(10);

    const results = await json(await h.app.request(`/runs/${run.id}/results`));
    expect(results.success).toBe(true);
    expect(Object.keys(results.steps)).toEqual(['download_brats', 'download_kaggle', 'preprocess_brats', 'preprocess_kaggle', 'split_brats', 'split_kaggle']);
    expect(results.steps.preprocess_brats.status).toBe('success');
    const onDisk = JSON.parse(await readFile(join(h.dataDir, 'runs', run.id, 'pipeline_results.json'), 'utf8'));
    expect(onDisk.success).toBe(true);
  });

  it('a repeated POST with the same Idempotency-Key makes one run', async () => {
    const body = { mode: 'data-only', sources: { brats: 'synthetic:2', kaggle: 'synthetic:4' }, overrides: { data: { image_size: 32 } } };
    const a = await postRun(h.app, body, { 'Idempotency-Key': 'same-key-1' });
    const b = await postRun(h.app, body, { 'Idempotency-Key': 'same-key-1' });
    expect(a.status).toBe(201);
    expect(b.status).toBe(200);
    const ra = (await json(a)).run;
    const rb = (await json(b)).run;
    expect(rb.id).toBe(ra.id);
    const rows = await h.ctx.db.select().from(runs).where(eq(runs.idempotencyKey, 'same-key-1'));
    expect(rows).toHaveLength(1);
    const done = await waitForRun(h.app, ra.id);
    expect(done.status).toBe('succeeded');
    // Redelivery of the flow added no second set of step rows or patients.
    const stepRows = await h.ctx.db.select().from(steps).where(eq(steps.runId, ra.id));
    expect(stepRows).toHaveLength(7);
    const patientRows = await h.ctx.db.select().from(patients).where(eq(patients.runId, ra.id));
    expect(patientRows).toHaveLength(2);
  });
});

describe('API validation', () => {
  let h: Harness;
  beforeAll(async () => {
    h = await harness('pglite', { workers: false });
  });
  afterAll(async () => {
    await h?.close();
  });

  it('names the bad fields with a 400', async () => {
    const res = await postRun(h.app, { mode: 'data-only', trainingMode: 'fast', sources: { brats: 'ftp://x' } });
    expect(res.status).toBe(400);
    const body = await json(res);
    expect(body.error.message).toContain('trainingMode');
    expect(body.error.fields.map((f: any) => f.field)).toContain('trainingMode');
  });

  it('rejects an unknown source form, a bad override and a URL with credentials', async () => {
    const bad = await json(await postRun(h.app, { mode: 'data-only', sources: { brats: 'ftp://x' } }));
    expect(bad.error.code).toBe('bad_source');
    const cfg = await json(await postRun(h.app, { mode: 'data-only', overrides: { data: { image_sise: 64 } } }));
    expect(cfg.error.code).toBe('bad_config');
    expect(cfg.error.message).toContain('image_sise');
    const cred = await postRun(h.app, { mode: 'data-only', sources: { brats: 'https://user:secret@example.org/x.zip' } });
    expect(cred.status).toBe(400);
    expect(await cred.text()).not.toContain('secret@');
  });

  it('answers 404 for an unknown run and reports health', async () => {
    expect((await h.app.request('/runs/nope')).status).toBe(404);
    const health = await json(await h.app.request('/healthz'));
    expect(health).toMatchObject({ ok: true, redis: { ok: true }, postgres: { ok: true } });
  });

  it('serves Bull Board', async () => {
    const res = await h.app.request('/admin/queues');
    expect(res.status).toBe(200);
    expect(await res.text()).toContain('<html');
    const api = await json(await h.app.request('/admin/queues/api/queues'));
    expect(api.queues.map((q: any) => q.name).sort()).toEqual(['download', 'evaluate', 'pipeline', 'preprocess', 'split', 'train']);
  });
});
