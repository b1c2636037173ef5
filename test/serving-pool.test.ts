/**
 * The demo's inference threads (src/serving/inference-pool.ts) when one of them dies: the requests it had in
 * flight are answered with a 503 naming the cause, over HTTP too; the other thread keeps answering; a new thread
 * takes the dead one's place and serves. The crash is a real uncaught exception in a real inference thread: the
 * thread's entry here is the real one plus a listener that throws, on the next turn of the thread's event loop,
 * when a request names the file "crash.jpg".
 */
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as tf from '@tensorflow/tfjs';
import { Hono } from 'hono';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { demoRoutes } from '../src/api/demo.ts';
import { errorResponse } from '../src/api/errors.ts';
import { SliceWiseError } from '../src/lib/errors.ts';
import { saveCheckpoint } from '../src/model/checkpoint.ts';
import { createUNet } from '../src/model/unet.ts';
import { DemoService, type ServingModel } from '../src/serving/demo-service.ts';
import { InferencePool } from '../src/serving/inference-pool.ts';
import { FIXTURES } from './helpers/services.ts';

const SIZE = 64;
const REQUEST = { imageSize: SIZE, segment: 'always', gradcam: true } as const;

async function until(what: string, ok: () => boolean, ms = 60_000): Promise<void> {
  const end = Date.now() + ms;
  while (!ok()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe('an inference thread that dies', () => {
  let work: string;
  let entry: string;
  let image: Uint8Array;

  beforeAll(async () => {
    work = await mkdtemp(join(tmpdir(), 'slicewise-pool-'));
    await tf.setBackend('cpu');
    const model = createUNet('small');
    await saveCheckpoint(join(work, 'model'), model);
    model.dispose();
    image = await readFile(join(FIXTURES, 'kaggle-navoneel', 'yes', 'Y1.jpg'));
    const real = new URL('../src/serving/inference-thread-main.ts', import.meta.url).href;
    entry = join(work, 'crashing-thread.mjs');
    await writeFile(
      entry,
      [
        `import { parentPort } from 'node:worker_threads';`,
        `import { register } from ${JSON.stringify(import.meta.resolve('tsx/esm/api'))};`,
        `register();`,
        `await import(${JSON.stringify(real)});`,
        `parentPort.on('message', (m) => { if (m.name === 'crash.jpg') setImmediate(() => { throw new Error('simulated crash in the inference thread'); }); });`,
      ].join('\n'),
    );
  });

  afterAll(async () => {
    if (work) await rm(work, { recursive: true, force: true });
  });

  it('answers its requests in flight with a 503 naming the cause and is replaced; the other thread keeps serving', async () => {
    const pool = new InferencePool({ checkpoint: join(work, 'model'), size: 2, kernelThreads: 1, entry });
    try {
      await pool.ready;
      expect(pool.size).toBe(2);
      // Least busy first, ties to the first thread: the crash and `behind` go to one thread, `other` to the other.
      const crash = pool.image(image, 'crash.jpg', REQUEST);
      const other = pool.image(image, 'Y1.jpg', REQUEST);
      const behind = pool.image(image, 'Y1.jpg', REQUEST);
      const [c, o, b] = await Promise.allSettled([crash, other, behind]);
      for (const r of [c, b]) {
        expect(r.status).toBe('rejected');
        const err = (r as PromiseRejectedResult).reason;
        expect(err).toBeInstanceOf(SliceWiseError);
        expect(err).toMatchObject({ status: 503, code: 'inference_thread_died' });
        expect(err.message).toMatch(/died \(Error: simulated crash in the inference thread\); it is being replaced: try again/);
      }
      expect(o.status).toBe('fulfilled');
      expect((o as PromiseFulfilledResult<{ image_size: number }>).value.image_size).toBe(SIZE);

      await until('the replacement thread', () => pool.size === 2);
      expect(pool.restarts).toBe(1);
      const again = await Promise.all([1, 2, 3, 4].map(() => pool.image(image, 'Y1.jpg', REQUEST)));
      for (const a of again) expect(a.segmentation?.mask_png.length).toBeGreaterThan(0);
    } finally {
      await pool.close();
    }
  }, 120_000);

  it('is a 503 JSON answer over HTTP, and the next request is served', async () => {
    const pool = new InferencePool({ checkpoint: join(work, 'model'), size: 1, kernelThreads: 1, entry });
    const served: ServingModel = {
      pool,
      info: {
        run_id: 'run-pool-test',
        training_mode: 'quick',
        checkpoint: { stage: 'joint', dir: join(work, 'model'), sha256: '' },
        preset: 'small',
        architecture: { base: 16, depth: 2, head_hidden: 16, in_channels: 1 },
        image_size: SIZE,
        modalities: ['flair'],
        threshold: 0.5,
        evaluation: null,
      },
    };
    const demo = new (class extends DemoService {
      override model() {
        return Promise.resolve(served);
      }
    })({ db: undefined as never });
    const app = new Hono().onError(errorResponse).route('/', demoRoutes(demo));
    const send = (name: string) => {
      const form = new FormData();
      form.append('file', new File([image as Uint8Array<ArrayBuffer>], name));
      return app.request('/predict_multitask', { method: 'POST', body: form });
    };
    try {
      await pool.ready;
      const dead = await send('crash.jpg');
      expect(dead.status).toBe(503);
      const body = await dead.json();
      expect(body.error.code).toBe('inference_thread_died');
      expect(body.error.message).toMatch(/simulated crash in the inference thread/);
      // The only thread died: the next request waits for its replacement to load rather than failing.
      const next = await send('Y1.jpg');
      expect(next.status).toBe(200);
      expect((await next.json()).image_size).toBe(SIZE);
      expect(pool.restarts).toBe(1);
    } finally {
      await pool.close();
    }
  }, 120_000);
});
