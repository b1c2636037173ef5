import { spawn, type ChildProcess } from 'node:child_process';
import { join } from 'node:path';
import { Job } from 'bullmq';
import { and, eq } from 'drizzle-orm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { metrics } from '../src/db/schema.ts';
import { DEFAULT_WORKER_QUEUES, jobId, MODEL_QUEUES } from '../src/queues/names.ts';
import { harness, json, postRun, TEST_REDIS_URL, waitForRun, type Harness } from './helpers/services.ts';

const BIN = join(__dirname, '..', 'bin', 'slicewise.mjs');
const SMALL_RUN = {
  mode: 'full',
  trainingMode: 'quick',
  sources: { brats: 'synthetic:4', kaggle: 'synthetic:8' },
  overrides: { data: { image_size: 32, patients: { fraction: 1 } }, training: { epochs: 6, batch_size: 8 } },
};

async function epochsRecorded(h: Harness, runId: string, step: string): Promise<number[]> {
  const rows = await h.ctx.db
    .select()
    .from(metrics)
    .where(and(eq(metrics.runId, runId), eq(metrics.step, step), eq(metrics.name, 'train_loss')));
  return rows.map((r) => r.epoch).sort((a, b) => a - b);
}

async function until<T>(what: string, fn: () => Promise<T | undefined | false>, timeoutMs = 120_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

describe('a killed training job resumes from its last epoch checkpoint', () => {
  let h: Harness;
  const procs: ChildProcess[] = [];
  const output: string[] = [];
  const startTrainWorker = () => {
    const p = spawn(process.execPath, [BIN, 'worker', '--queues', 'train,evaluate', '--data-dir', h.dataDir], {
      env: { ...process.env, REDIS_URL: TEST_REDIS_URL, DATABASE_URL: h.db.url, SLICEWISE_QUEUE_PREFIX: h.ctx.prefix, SLICEWISE_TRAIN_LOCK_MS: '4000' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    p.stdout!.on('data', (d) => output.push(String(d)));
    p.stderr!.on('data', (d) => output.push(String(d)));
    procs.push(p);
    return p;
  };
  beforeAll(async () => {
    h = await harness('postgres', { workerOptions: { queues: ['pipeline', 'download', 'preprocess', 'split'] } });
  });
  afterAll(async () => {
    for (const p of procs) if (p.exitCode === null) p.kill('SIGKILL');
    await h?.close();
  });

  it('SIGKILL mid-stage, a new worker picks the job up and continues at the next epoch', async () => {
    const first = startTrainWorker();
    const { run } = await json(await postRun(h.app, SMALL_RUN));
    const step = 'train_stage1_seg_warmup';
    const before = await until('two epochs of stage 1', async () => {
      const e = await epochsRecorded(h, run.id, step);
      return e.length >= 2 && e;
    });
    first.kill('SIGKILL');
    await new Promise((r) => first.once('exit', r));
    startTrainWorker();
    const done = await waitForRun(h.app, run.id, 300_000);
    expect(done.status, output.join('')).toBe('succeeded');
    const s1 = done.steps.find((s: any) => s.name === step);
    // It resumed after an epoch it had finished, not from scratch.
    expect(s1.counts.resumed_from_epoch, JSON.stringify(s1)).toBeGreaterThanOrEqual(before.at(-1)!);
    expect(s1.counts.epochs_run).toBe(6 - s1.counts.resumed_from_epoch);
    expect(await epochsRecorded(h, run.id, step)).toEqual([1, 2, 3, 4, 5, 6]);
    expect(output.join('')).toContain('resuming at epoch');
  }, 400_000);
});

describe('cancel stops a training job between batches', () => {
  let h: Harness;
  beforeAll(async () => {
    h = await harness('pglite', { workerOptions: { queues: [...DEFAULT_WORKER_QUEUES, ...MODEL_QUEUES] } });
  });
  afterAll(async () => {
    await h?.close();
  });

  it('the stage stops, its job fails as cancelled, and the next stage never starts', async () => {
    const { run } = await json(await postRun(h.app, { ...SMALL_RUN, overrides: { ...SMALL_RUN.overrides, training: { epochs: 50, batch_size: 8 } } }));
    const step = 'train_stage1_seg_warmup';
    await until('an epoch of stage 1', async () => (await epochsRecorded(h, run.id, step)).length >= 1);
    const res = await h.app.request(`/runs/${run.id}/cancel`, { method: 'POST' });
    expect(res.status).toBe(200);
    const job = await Job.fromId(h.ctx.queues.train, jobId(run.id, step));
    await until('the training job to stop', async () => (await job!.getState()) === 'failed', 30_000);
    const d = await json(await h.app.request(`/runs/${run.id}`));
    expect(d.status).toBe('cancelled');
    const byName = Object.fromEntries(d.steps.map((s: any) => [s.name, s.status]));
    expect(byName[step]).toBe('cancelled');
    expect(byName.train_stage2_cls_head).toBe('cancelled');
    expect((await epochsRecorded(h, run.id, step)).length).toBeLessThan(50);
    await until('no active jobs', async () => h.workers!.activeCount() === 0, 10_000);
  }, 300_000);
});
