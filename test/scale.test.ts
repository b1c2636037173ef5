import { spawn, type ChildProcess } from 'node:child_process';
import { join } from 'node:path';
import { Job } from 'bullmq';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { jobId } from '../src/queues/names.ts';
import { harness, json, postRun, TEST_REDIS_URL, waitForRun, type Harness } from './helpers/services.ts';

const BIN = join(__dirname, '..', 'bin', 'slicewise.mjs');

describe('preprocessing scales out over worker processes', () => {
  let h: Harness;
  const procs: ChildProcess[] = [];
  const output: string[] = [];

  beforeAll(async () => {
    // This process runs every queue but preprocess; two separate `slicewise worker` processes take the shards.
    h = await harness('postgres', { workerOptions: { queues: ['pipeline', 'download', 'split'] } });
    for (let i = 0; i < 2; i++) {
      const p = spawn(process.execPath, [BIN, 'worker', '--queues', 'preprocess', '--concurrency', '1', '--data-dir', h.dataDir], {
        env: { ...process.env, REDIS_URL: TEST_REDIS_URL, DATABASE_URL: h.db.url, SLICEWISE_QUEUE_PREFIX: h.ctx.prefix, LOG_LEVEL: 'info' },
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      p.stdout!.on('data', (d) => output.push(`[w${i}] ${d}`));
      p.stderr!.on('data', (d) => output.push(`[w${i}] ${d}`));
      procs.push(p);
    }
    const deadline = Date.now() + 60_000;
    while ((await h.ctx.queues.preprocess.getWorkers()).length < 2) {
      if (Date.now() > deadline) throw new Error(`worker processes did not come up:\n${output.join('')}`);
      await new Promise((r) => setTimeout(r, 200));
    }
  });

  afterAll(async () => {
    for (const p of procs) if (p.exitCode === null) p.kill('SIGKILL');
    await h?.close();
  });

  it('both processes take shards and the run completes once', async () => {
    const { run } = await json(
      await postRun(h.app, {
        mode: 'data-only',
        sources: { brats: 'synthetic:8', kaggle: 'synthetic:4' },
        overrides: { data: { image_size: 64, patients: { fraction: 1 } } },
      }),
    );
    const done = await waitForRun(h.app, run.id, 120_000);
    expect(done.status, output.join('')).toBe('succeeded');
    expect(done.patients).toHaveLength(8);
    expect(done.patients.every((p: any) => p.status === 'done')).toBe(true);

    const takers = new Set<string>();
    for (const p of done.patients) {
      const job = await Job.fromId(h.ctx.queues.preprocess, jobId(run.id, 'patient', p.patientId));
      expect(job?.processedBy).toBeTruthy();
      takers.add(job!.processedBy!);
    }
    expect(takers.size, `shards taken by ${[...takers].join(', ')}`).toBe(2);
    // Once: the run was finalised by one job, on its first attempt.
    const fin = done.steps.find((s: any) => s.name === 'finalize');
    expect(fin).toMatchObject({ status: 'success', attempts: 1 });
    expect((await h.ctx.queues.pipeline.getJobCounts('completed')).completed).toBe(2); // preprocess_brats + finalize

    // SIGTERM: each worker finishes what it has and exits cleanly.
    const exits = procs.map((p) => new Promise<number | null>((r) => p.once('exit', (code) => r(code))));
    for (const p of procs) p.kill('SIGTERM');
    expect(await Promise.all(exits)).toEqual([0, 0]);
    expect(output.join('')).toContain('Received SIGTERM; finishing');
  });
});
