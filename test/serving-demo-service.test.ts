/**
 * `slicewise api`'s DemoService while runs keep finishing: it serves the newest succeeded run's final model, and
 * moves to a newer one when one appears (looked for at most every refreshMs, in the background), without failing
 * a request: the old model's threads finish what they have in flight. A newest run without a usable model, or a
 * database look-up that fails, leaves the served model alone. Real PGlite database, real checkpoints (untrained,
 * small preset) recorded the way the training step records them, real inference threads.
 */
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { eq } from 'drizzle-orm';
import { Hono } from 'hono';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { demoRoutes } from '../src/api/demo.ts';
import { errorResponse } from '../src/api/errors.ts';
import { loadConfig } from '../src/config/load.ts';
import type { DbHandle } from '../src/db/client.ts';
import { runs, steps } from '../src/db/schema.ts';
import { saveCheckpoint } from '../src/model/checkpoint.ts';
import { createUNet } from '../src/model/unet.ts';
import { DemoService } from '../src/serving/demo-service.ts';
import { FIXTURES, freshDb } from './helpers/services.ts';

const SIZE = 64;
const REQUEST = { imageSize: SIZE, segment: 'always', gradcam: true } as const;

describe('DemoService when a newer run succeeds', () => {
  let db: DbHandle;
  let work: string;
  let image: Uint8Array;
  let minutes = 0;

  /** A succeeded full run whose stage 3 recorded a checkpoint (its own weights, from `seed`), newer than the last. */
  async function addRun(id: string, { seed, checkpoint = true }: { seed: number; checkpoint?: boolean }): Promise<string> {
    const dir = join(work, id, 'joint');
    if (checkpoint) {
      const model = createUNet('small', { seed });
      await saveCheckpoint(dir, model);
      model.dispose();
    }
    const at = new Date(Date.UTC(2026, 0, 1, 0, minutes++));
    await db.db.insert(runs).values({
      id,
      status: 'succeeded',
      mode: 'full',
      trainingMode: 'quick',
      config: loadConfig({ trainingMode: 'quick', overrides: { data: { image_size: SIZE } } }),
      sources: { brats: 'synthetic:4', kaggle: 'synthetic:12' },
      dataDir: work,
      createdAt: at,
      startedAt: at,
      finishedAt: at,
    });
    if (checkpoint) {
      await db.db.insert(steps).values({ runId: id, name: 'train_stage3_joint', status: 'success', queue: 'train', attempts: 1, result: { kind: 'train', stage: 'joint', checkpoint: dir } });
    }
    return dir;
  }

  beforeAll(async () => {
    await tf.setBackend('cpu');
    work = await mkdtemp(join(tmpdir(), 'slicewise-demo-service-'));
    db = await freshDb('pglite');
    image = await readFile(join(FIXTURES, 'kaggle-navoneel', 'yes', 'Y1.jpg'));
  }, 60_000);

  afterAll(async () => {
    await db?.close();
    if (work) await rm(work, { recursive: true, force: true });
  });

  it('serves the newest run, moves to a newer one without failing a request, and ignores a newer run that has no model', async () => {
    const dirA = await addRun('run-a', { seed: 1 });
    const demo = new DemoService({ db: db.db, threads: 1, refreshMs: 0 });
    const app = new Hono().onError(errorResponse).route('/', demoRoutes(demo));
    const info = async () => (await app.request('/model/info')).json();
    try {
      const a = await demo.model();
      expect(a.info.run_id).toBe('run-a');
      expect(a.info.checkpoint.dir).toBe(dirA);
      const pA = (await a.pool.image(image, 'Y1.jpg', REQUEST)).classification.tumor_probability;

      const dirB = await addRun('run-b', { seed: 2 });
      // A request on the old model, in flight while the service moves: it is answered.
      const inFlight = a.pool.image(image, 'Y1.jpg', REQUEST);
      expect((await info()).run_id).toBe('run-a'); // served until the new threads are warm
      await demo.settled();
      const b = await demo.model();
      expect(b.info.run_id).toBe('run-b');
      expect(b.info.checkpoint.dir).toBe(dirB);
      expect(b.pool).not.toBe(a.pool);
      expect((await info()).run_id).toBe('run-b');
      expect((await inFlight).classification.tumor_probability).toBeCloseTo(pA, 6);
      const pB = (await b.pool.image(image, 'Y1.jpg', REQUEST)).classification.tumor_probability;
      expect(pB).not.toBeCloseTo(pA, 6); // other weights
      // The old threads stop once idle (after a short grace for callers still on their way to them).
      const end = Date.now() + 20_000;
      while (a.pool.size > 0 && Date.now() < end) await new Promise((r) => setTimeout(r, 100));
      expect(a.pool.size).toBe(0);

      // A newer run that trained no model: the service keeps the one it has.
      await addRun('run-c', { seed: 3, checkpoint: false });
      await demo.model();
      await demo.settled();
      expect((await demo.model()).info.run_id).toBe('run-b');
      const res = await app.request('/predict_multitask', { method: 'POST', body: formWith(image) });
      expect(res.status).toBe(200);
      await db.db.delete(runs).where(eq(runs.id, 'run-c'));
    } finally {
      await demo.close();
    }
  }, 180_000);

  it('looks again only after refreshMs', async () => {
    const demo = new DemoService({ db: db.db, threads: 1, refreshMs: 60_000 });
    try {
      const first = (await demo.model()).info.run_id;
      await addRun('run-d', { seed: 4 });
      await demo.model();
      await demo.settled();
      expect((await demo.model()).info.run_id).toBe(first);
      // A fresh service (a restart) sees it at once.
      const other = new DemoService({ db: db.db, threads: 1 });
      try {
        expect((await other.model()).info.run_id).toBe('run-d');
      } finally {
        await other.close();
      }
    } finally {
      await demo.close();
    }
  }, 120_000);
});

function formWith(bytes: Uint8Array): FormData {
  const form = new FormData();
  form.append('file', new File([bytes as Uint8Array<ArrayBuffer>], 'Y1.jpg'));
  return form;
}
