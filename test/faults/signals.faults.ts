/**
 * Signals to a `slicewise worker` process (real processes on the shared test Redis, a prefix and a fresh Postgres
 * database per test):
 *
 *  - SIGTERM: the worker says which jobs it is finishing (step, run and patient), finishes them, and exits 0;
 *  - SIGTERM twice: it exits within a few seconds (130) and hands its active jobs back to their queue, where
 *    another worker takes them at once, not after their lock expires.
 *
 * Two patients are held mid-shard deterministically: once their shards are queued, their FLAIR volumes become
 * named pipes, and a worker that takes a shard blocks reading the pipe until the test writes the volume into it.
 */
import { execFileSync } from 'node:child_process';
import { readFile, rm, writeFile } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { Job } from 'bullmq';
import { and, eq } from 'drizzle-orm';
import { describe, expect, it } from 'vitest';
import { patients } from '../../src/db/schema.ts';
import { jobId } from '../../src/queues/names.ts';
import { getRunRow } from '../../src/runs/store.ts';
import { synthesize } from '../../src/synth/index.ts';
import { json, postRun, waitForRun } from '../helpers/services.ts';
import { faultScenes, until, type FaultScene, type Proc } from './procs.ts';

const setUp = faultScenes();

const workerName = (p: Proc) => `${hostname()}:${p.proc.pid}`;

const shardOf = (s: FaultScene, runId: string, patientId: string) => Job.fromId(s.h.ctx.queues.preprocess, jobId(runId, 'patient', patientId));

interface Held {
  runId: string;
  ids: string[];
  /** Writes each held volume into its pipe (resolves once a reader has taken it). */
  feed(): Promise<void>;
}

/**
 * A data-only run of two patients whose coordination steps run in a worker process of their own, both patients'
 * FLAIR volumes swapped for named pipes once their shards are queued; no preprocess worker yet.
 */
async function runWithHeldPatients(s: FaultScene): Promise<Held> {
  const src = await synthesize({ out: join(s.h.dataDir, 'incoming'), patients: 2, size: [48, 48, 24], kaggleYes: 0, kaggleNo: 0 });
  await s.worker({ queues: ['pipeline', 'download', 'split'] });
  const { run } = await json(await postRun(s.h.app, { mode: 'data-only', sources: { brats: `path:${src.bratsDir}`, kaggle: 'synthetic:2' }, overrides: { data: { image_size: 32, patients: { fraction: 1 } } } }));
  const volumes: Array<{ path: string; bytes: Buffer }> = [];
  for (const id of src.patients) {
    const job = await until(
      `the shard of ${id} to be queued`,
      async () => {
        const r = await getRunRow(s.h.ctx.db, run.id);
        if (r && ['failed', 'cancelled', 'succeeded'].includes(r.status)) throw new Error(`run ${run.id} ended early (${r.status}): ${r.error}\n${s.logs()}`);
        return shardOf(s, run.id, id);
      },
      60_000,
      s.logs,
    );
    const path = job.data.patient.files.flair as string;
    const bytes = await readFile(path);
    await rm(path);
    execFileSync('mkfifo', [path]);
    volumes.push({ path, bytes });
  }
  return { runId: run.id, ids: src.patients, feed: async () => void (await Promise.all(volumes.map((v) => writeFile(v.path, v.bytes)))) };
}

/** A preprocess worker that takes both held shards (and the Kaggle step, if it is still queued); resolves once both are active in it. */
async function holdingWorker(s: FaultScene, held: Held): Promise<Proc> {
  // Locks of 10 minutes: a job of this worker can come back to its queue within a test only by being handed back.
  const w = await s.worker({ queues: ['preprocess'], concurrency: 3, extraEnv: { SLICEWISE_LOCK_MS: '600000' } });
  await until(
    'both held shards to be active in the worker',
    async () => {
      for (const id of held.ids) {
        const j = await shardOf(s, held.runId, id);
        if ((await j?.getState()) !== 'active' || j?.processedBy !== workerName(w)) return false;
      }
      return true;
    },
    60_000,
    s.logs,
    100,
  );
  return w;
}

const described = (runId: string, id: string) => `preprocess_patient (run ${runId}, patient ${id})`;

describe('signals to a worker process', () => {
  it('SIGTERM: says which jobs it is finishing, finishes them and exits 0', async () => {
    const s = await setUp();
    const held = await runWithHeldPatients(s);
    const w = await holdingWorker(s, held);

    w.signal('SIGTERM');
    await w.waitFor(/Received SIGTERM; finishing \d+ job\(s\), send again to force: /, 10_000);
    const said = w.output().split('\n').find((l) => l.includes('Received SIGTERM'))!;
    for (const id of held.ids) expect(said).toContain(described(held.runId, id));
    // It waits for them: the shards are still blocked on their volumes.
    await new Promise((r) => setTimeout(r, 1000));
    expect(w.proc.exitCode).toBeNull();

    await held.feed();
    expect(await w.exited, w.output()).toBe(0);
    expect(w.output()).toMatch(/Finished \d+ job\(s\): .*preprocess_patient/);
    for (const id of held.ids) {
      const j = (await shardOf(s, held.runId, id))!;
      expect(await j.getState()).toBe('completed');
      expect(j.processedBy).toBe(workerName(w));
      const [row] = await s.h.ctx.db.select().from(patients).where(and(eq(patients.runId, held.runId), eq(patients.patientId, id)));
      expect(row?.status).toBe('done');
    }
    // Nothing was lost: another worker finishes what is left of the run.
    await s.worker({ queues: ['preprocess'] });
    const done = await waitForRun(s.h.app, held.runId, 90_000);
    expect(done.status, `${done.error}\n${s.logs()}`).toBe('succeeded');
  });

  it('SIGTERM twice: exits within a few seconds and hands its jobs back, and another worker takes them at once', async () => {
    const s = await setUp();
    const held = await runWithHeldPatients(s);
    const w = await holdingWorker(s, held);

    w.signal('SIGTERM');
    await w.waitFor(/Received SIGTERM; finishing \d+ job\(s\), send again to force/, 10_000);
    const forcedAt = Date.now();
    w.signal('SIGTERM');
    expect(await w.exited, w.output()).toBe(130);
    expect(Date.now() - forcedAt).toBeLessThan(6000);
    await w.waitFor(/Handed back \d+ job\(s\): /, 1000);
    const said = w.output().split('\n').find((l) => l.includes('Handed back'))!;
    for (const id of held.ids) expect(said).toContain(described(held.runId, id));

    // Back in their queue, unharmed: waiting, not active under a dead worker's lock, not counted as stalled or failed.
    for (const id of held.ids) {
      const j = (await shardOf(s, held.runId, id))!;
      expect(await j.getState()).toBe('waiting');
      expect(j.stalledCounter ?? 0).toBe(0);
      expect(j.attemptsMade).toBe(0);
    }

    // The next worker takes them straight away (the first one's locks were 10 minutes: no stalled check could
    // have recovered them meanwhile).
    const w2 = await s.worker({ queues: ['preprocess'], concurrency: 3 });
    await held.feed();
    const done = await waitForRun(s.h.app, held.runId, 90_000);
    expect(done.status, `${done.error}\n${s.logs()}`).toBe('succeeded');
    for (const id of held.ids) {
      const j = (await shardOf(s, held.runId, id))!;
      expect(j.processedBy).toBe(workerName(w2));
      expect(j.stalledCounter ?? 0).toBe(0);
    }
  });
});
