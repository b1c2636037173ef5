/**
 * Worker faults, with real `slicewise worker` processes on the shared test Redis (a prefix per test) and a fresh
 * Postgres database per test:
 *
 *  - a preprocess worker killed (-9) in the middle of a patient: another process takes the shard over;
 *  - a shard that takes its worker down every time: the run fails naming the patient, nothing left waiting;
 *  - cancel from the API reaches a training job on another process within 2 s, and it is not retried;
 *  - a full disk while a patient is written: the shard fails naming the file and the reason, leaves no half
 *    file, and its retry on a healthy worker completes.
 *
 * A patient is held "in the middle" deterministically by swapping its FLAIR volume for a named pipe once the
 * shard is queued (discovery saw a regular file): the worker reads the segmentation, writes masks.npy (into the
 * patient's temporary folder), then blocks on the pipe until the test writes the volume into it (or kills it).
 */
import { execFileSync } from 'node:child_process';
import { readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { Job, type Queue } from 'bullmq';
import { and, eq } from 'drizzle-orm';
import { describe, expect, it } from 'vitest';
import type { Config } from '../../src/config/schema.ts';
import { metrics, patients } from '../../src/db/schema.ts';
import { patientFiles, readPatientMeta, runPaths } from '../../src/disk/layout.ts';
import { preprocessPatient } from '../../src/imaging/brats.ts';
import { readNpy } from '../../src/imaging/npy.ts';
import { getRunRow } from '../../src/runs/store.ts';
import { jobId, QUEUE_NAMES } from '../../src/queues/names.ts';
import { synthesize } from '../../src/synth/index.ts';
import { json, postRun, waitForRun, type Harness } from '../helpers/services.ts';
import { faultScenes, kill9, until, type FaultScene, type Proc } from './procs.ts';

/** Short locks: a killed worker's job is taken over within about 3 s. */
const LOCK_MS = '2000';
const IMAGE_SIZE = 32;

const setUp = faultScenes();

/** One job at a time, and short locks. */
function worker(s: FaultScene, queues: string[], opts: { fileSizeLimitKb?: number } = {}): Promise<Proc> {
  return s.worker({ queues, concurrency: 1, extraEnv: { SLICEWISE_LOCK_MS: LOCK_MS }, ...opts });
}

/** The worker name BullMQ records on a job it took (host.ts names each worker host:pid). */
const workerName = (p: Proc) => `${hostname()}:${p.proc.pid}`;

/**
 * A few BraTS-2020-named patients as a `path:` source, small enough to preprocess in a blink; in the data dir,
 * where `path:` sources may read.
 */
async function bratsSource(h: Harness, count: number, size: [number, number, number] = [48, 48, 24]): Promise<{ dir: string; ids: string[] }> {
  const r = await synthesize({ out: join(h.dataDir, 'incoming'), patients: count, size, kaggleYes: 0, kaggleNo: 0 });
  return { dir: r.bratsDir, ids: r.patients };
}

function dataRun(bratsDir: string, overrides: Record<string, unknown> = {}) {
  const { data, ...rest } = overrides as { data?: Record<string, unknown> };
  return {
    mode: 'data-only',
    sources: { brats: `path:${bratsDir}`, kaggle: 'synthetic:2' },
    overrides: { data: { image_size: IMAGE_SIZE, patients: { fraction: 1 }, ...data }, ...rest },
  };
}

/** Fails at once, with the run's reason, when the run ended while the test still waits on it. */
async function expectRunOpen(h: Harness, runId: string, logs: () => string): Promise<void> {
  const run = await getRunRow(h.ctx.db, runId);
  if (run && ['failed', 'cancelled', 'succeeded'].includes(run.status)) throw new Error(`run ${runId} ended early (${run.status}): ${run.error}\n${logs()}`);
}

const processedBrats = (h: Harness, runId: string) => runPaths(h.dataDir, runId).processedBrats;

async function patientJob(h: Harness, runId: string, patientId: string): Promise<Job | undefined> {
  return Job.fromId(h.ctx.queues.preprocess, jobId(runId, 'patient', patientId));
}

/**
 * Once the patient's shard is queued, its FLAIR volume becomes a named pipe at the same path: whoever takes the
 * shard blocks reading it. Returns the volume's bytes, for the test to write into the pipe when it chooses.
 */
async function holdFlair(h: Harness, runId: string, patientId: string, logs: () => string): Promise<{ path: string; bytes: Buffer }> {
  const job = await until(
    'the patient shard to be queued',
    async () => {
      await expectRunOpen(h, runId, logs);
      return patientJob(h, runId, patientId);
    },
    60_000,
    logs,
  );
  const path = job.data.patient.files.flair as string;
  const bytes = await readFile(path);
  await rm(path);
  execFileSync('mkfifo', [path]);
  return { path, bytes };
}

/**
 * A data-only run of two patients whose coordination steps run in a worker process, with patient `victim`'s FLAIR
 * held (holdFlair); no preprocess worker yet, so the test chooses who takes the shards.
 */
async function runWithHeldPatient(s: FaultScene, victim: number) {
  const src = await bratsSource(s.h, 2);
  await worker(s, ['pipeline', 'download', 'split']);
  const { run } = await json(await postRun(s.h.app, dataRun(src.dir)));
  const flair = await holdFlair(s.h, run.id, src.ids[victim]!, s.logs);
  return { src, victim: src.ids[victim]!, run, flair };
}

/** Puts the volume back as a plain file (the pipe, if any, is replaced). */
async function restoreFlair({ path, bytes }: { path: string; bytes: Buffer }): Promise<void> {
  await writeFile(`${path}.restore`, bytes);
  await rename(`${path}.restore`, path);
}

/** Every file and folder below `dir` (none when it does not exist). */
async function entriesUnder(dir: string): Promise<string[]> {
  const found = await readdir(dir, { withFileTypes: true, recursive: true }).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') return [];
    throw err;
  });
  return found.map((e) => join(e.parentPath, e.name));
}

/** What a temporary (or set-aside) file or folder of an atomic write is called. */
const TEMP = /\.(tmp|old)-/;

async function waitingChildren(h: Harness): Promise<Record<string, number>> {
  const out: Record<string, number> = {};
  for (const q of QUEUE_NAMES) out[q] = (await (h.ctx.queues[q] as Queue).getJobCounts('waiting-children'))['waiting-children'] ?? 0;
  return out;
}

/** The patient's output is whole: meta.json vouches for arrays of its slice count, equal to a clean re-run's. */
async function expectCompletePatient(h: Harness, runId: string, patientId: string, flair: { path: string; bytes: Buffer }, config: Config, scratch: string) {
  const paths = runPaths(h.dataDir, runId);
  const files = patientFiles(paths.processedBrats, patientId);
  expect((await readdir(files.dir)).sort()).toEqual(['images.npy', 'masks.npy', 'meta.json']);
  const meta = await readPatientMeta(files);
  const images = await readNpy(files.images);
  const masks = await readNpy(files.masks);
  expect(meta.num_slices).toBe(meta.slices.length);
  expect(images.shape).toEqual([meta.num_slices, IMAGE_SIZE, IMAGE_SIZE]);
  expect(masks.shape).toEqual([meta.num_slices, IMAGE_SIZE, IMAGE_SIZE]);
  // The same patient preprocessed undisturbed here gives the same bytes.
  await restoreFlair(flair);
  const job = (await patientJob(h, runId, patientId))!;
  const ref = await preprocessPatient(job.data.patient, scratch, {
    imageSize: config.data.image_size,
    modalities: config.data.modalities,
    minTumorPixels: config.data.min_tumor_pixels,
    keepProbability: config.data.keep_probability,
    seed: config.seed,
  });
  expect(ref.slices).toEqual(meta.slices);
  const refFiles = patientFiles(scratch, patientId);
  expect((await readFile(files.images)).equals(await readFile(refFiles.images))).toBe(true);
  expect((await readFile(files.masks)).equals(await readFile(refFiles.masks))).toBe(true);
  // One row for the patient, settled with the figures of the files on disk.
  const rows = await h.ctx.db.select().from(patients).where(and(eq(patients.runId, runId), eq(patients.patientId, patientId)));
  expect(rows).toHaveLength(1);
  expect(rows[0]).toMatchObject({ status: 'done', slices: meta.num_slices, tumorSlices: meta.slices.filter((x) => x.has_tumor).length, outputDir: files.dir, error: null });
}

describe('worker process faults', () => {
  it('kill -9 of a preprocess worker mid-patient: another process takes the shard over, the output is whole and once', async () => {
    const s = await setUp();
    const { h } = s;
    const { src, victim, run, flair } = await runWithHeldPatient(s, 0);
    const a = await worker(s, ['preprocess']);
    const b = await worker(s, ['preprocess']);

    // The shard is taken and stuck on the volume, halfway: masks.npy written, images.npy and meta.json not.
    const job = await until(
      'the patient shard to be active',
      async () => {
        const j = await patientJob(h, run.id, victim);
        return (await j?.getState()) === 'active' && j?.processedBy ? j : undefined;
      },
      60_000,
      s.logs,
    );
    const [taker, other] = job.processedBy === workerName(a) ? [a, b] : [b, a];
    expect(job.processedBy).toBe(workerName(taker));
    const processed = runPaths(h.dataDir, run.id).processedBrats;
    const ofVictim = async () => (await entriesUnder(processed)).filter((p) => p.includes(victim));
    await until('masks.npy of the held patient', async () => (await ofVictim()).some((p) => p.endsWith('masks.npy')), 30_000, s.logs);
    expect((await ofVictim()).filter((p) => /(images\.npy|meta\.json)$/.test(p))).toEqual([]);
    await kill9(taker);

    // The other process recovers the stalled shard and reads the volume, now fed into the pipe.
    const fed = writeFile(flair.path, flair.bytes);
    const done = await waitForRun(h.app, run.id, 90_000);
    await fed;
    expect(done.status, `${JSON.stringify(done.error)}\n${s.logs()}`).toBe('succeeded');
    const after = (await patientJob(h, run.id, victim))!;
    expect(after.processedBy).toBe(workerName(other));
    expect(after.stalledCounter).toBe(1);
    expect(await after.getState()).toBe('completed');

    const runDir = runPaths(h.dataDir, run.id).root;
    expect((await entriesUnder(runDir)).filter((f) => TEMP.test(f))).toEqual([]);
    expect(done.patients.map((p: any) => [p.patientId, p.status])).toEqual(src.ids.map((id) => [id, 'done']));
    await expectCompletePatient(h, run.id, victim, flair, done.config, join(s.root, 'reference'));
  });

  it('a shard that takes its worker down more times than allowed fails the run naming the patient, and nothing waits', async () => {
    const s = await setUp();
    const { h } = s;
    const { src, victim, run } = await runWithHeldPatient(s, 1);

    // Whichever worker takes the shard is killed while it holds it, and a fresh process replaces it (started while
    // the stalled check runs, so two are always up), until BullMQ gives up on the job.
    const live = new Set<Proc>(await Promise.all([worker(s, ['preprocess']), worker(s, ['preprocess'])]));
    const starting: Promise<unknown>[] = [];
    let kills = 0;
    for (;;) {
      const holder = await until(
        `a worker to take the shard (or the shard to fail) after ${kills} kills`,
        async () => {
          const j = await patientJob(h, run.id, victim);
          const st = await j?.getState();
          if (st === 'failed') return 'failed';
          // A job BullMQ has given up on (deferredFailure) is taken only to be failed: that worker is left alone.
          return st === 'active' && !j?.deferredFailure ? [...live].find((w) => j?.processedBy === workerName(w)) : undefined;
        },
        60_000,
        s.logs,
      );
      if (holder === 'failed') break;
      await kill9(holder);
      live.delete(holder);
      kills++;
      expect(kills, 'the shard was not failed after its third crash').toBeLessThanOrEqual(3);
      const next = worker(s, ['preprocess']).then((w) => live.add(w));
      next.catch(() => undefined); // awaited below; a failed test must not leave it unhandled
      starting.push(next);
    }
    await Promise.all(starting);
    expect(kills).toBe(3);

    const done = await waitForRun(h.app, run.id, 60_000);
    expect(done.status).toBe('failed');
    console.log(`run error after ${kills} crashes: ${done.error}`);
    // The run, the step and the patient's row each say which patient, and that its worker died on it.
    expect(done.error).toContain(victim);
    expect(done.error).toMatch(/^preprocess_brats failed: patient \S+: /);
    expect(done.error).toMatch(/worker process died 3 times/);
    const step = done.steps.find((x: any) => x.name === 'preprocess_brats');
    expect(step.status).toBe('failed');
    expect(step.error).toContain(victim);
    expect(step.errorDetails).toMatchObject({ patientId: victim });
    const rows = Object.fromEntries(done.patients.map((p: any) => [p.patientId, p]));
    expect(rows[victim]).toMatchObject({ status: 'failed' });
    expect(rows[victim].error).toMatch(/worker process died 3 times/);
    expect(rows[src.ids[0]!]).toMatchObject({ status: 'done' });
    expect(await waitingChildren(h)).toEqual(Object.fromEntries(QUEUE_NAMES.map((q) => [q, 0])));
    const fin = done.steps.find((x: any) => x.name === 'finalize');
    expect(fin.status).toBe('success');
  });

  it('cancel from the API stops a training job on another worker process within 2 s, and it is not retried', async () => {
    const s = await setUp();
    const { h } = s;
    await worker(s, ['pipeline', 'download', 'preprocess', 'split']);
    const trainer = await worker(s, ['train', 'evaluate']);
    const { run } = await json(
      await postRun(h.app, {
        mode: 'full',
        trainingMode: 'quick',
        sources: { brats: 'synthetic:4', kaggle: 'synthetic:8' },
        overrides: { data: { image_size: IMAGE_SIZE, patients: { fraction: 1 } }, training: { epochs: 200, batch_size: 8 } },
      }),
    );
    const step = 'train_stage1_seg_warmup';
    const epochs = async () =>
      (await h.ctx.db.select().from(metrics).where(and(eq(metrics.runId, run.id), eq(metrics.step, step), eq(metrics.name, 'train_loss')))).length;
    await until('an epoch of stage 1', async () => (await epochs()) >= 1, 120_000, s.logs, 100);
    const job = (await Job.fromId(h.ctx.queues.train, jobId(run.id, step)))!;
    expect(await job.getState()).toBe('active');
    expect(job.processedBy).toBe(workerName(trainer));

    const wall0 = Date.now();
    const t0 = performance.now();
    const res = await h.app.request(`/runs/${run.id}/cancel`, { method: 'POST' });
    const answered = performance.now() - t0;
    expect(res.status).toBe(200);
    await until('the training job to fail as cancelled', async () => (await job.getState()) === 'failed', 10_000, s.logs, 10);
    const latency = performance.now() - t0;
    // When the worker process heard it: the time of its log line saying so.
    const heard = trainer
      .output()
      .split('\n')
      .filter((l) => l.includes(`Run ${run.id} cancelled; aborting 1 active job`))
      .map((l) => JSON.parse(l).time as number)[0];
    console.log(
      `cancel latency: ${latency.toFixed(0)} ms from POST /runs/${run.id}/cancel to its training job failed in Redis on worker pid ${trainer.proc.pid} ` +
        `(the API answered after ${answered.toFixed(0)} ms, the worker aborted the job after ${heard === undefined ? '?' : heard - wall0} ms)`,
    );
    expect(heard, 'the worker process never said it aborted the job').toBeDefined();
    expect(latency).toBeLessThan(2000);

    const failedJob = (await Job.fromId(h.ctx.queues.train, job.id!))!;
    expect(failedJob.failedReason).toMatch(/cancelled/);
    const { attemptsMade, attemptsStarted } = failedJob;
    const epochsAtStop = await epochs();
    // Longer than the training steps' retry backoff (5 s): a retry would have started by now.
    await new Promise((r) => setTimeout(r, 7000));
    const later = (await Job.fromId(h.ctx.queues.train, job.id!))!;
    expect(await later.getState()).toBe('failed');
    expect([later.attemptsMade, later.attemptsStarted]).toEqual([attemptsMade, attemptsStarted]);
    expect(attemptsStarted).toBe(1);
    expect(await epochs()).toBe(epochsAtStop);
    expect(trainer.output()).not.toMatch(/resuming at epoch/);

    const d = await json(await h.app.request(`/runs/${run.id}`));
    expect(d.status).toBe('cancelled');
    const byName = Object.fromEntries(d.steps.map((x: any) => [x.name, x.status]));
    expect(byName[step]).toBe('cancelled');
    expect(byName.train_stage2_cls_head).toBe('cancelled');
    expect(await waitingChildren(h)).toEqual(Object.fromEntries(QUEUE_NAMES.map((q) => [q, 0])));
  });

  it('a full disk while a patient is written fails the shard naming the file and EFBIG, leaves no half file, and the retry completes', async () => {
    const s = await setUp();
    const { h } = s;
    // 64 axial slices at 32 x 32: images.npy is 4 KB a slice, masks.npy 1 KB, the Kaggle arrays under 20 KB.
    const src = await bratsSource(h, 2, [48, 48, 64]);
    const LIMIT_KB = 100;
    await worker(s, ['pipeline', 'download', 'split']);
    const full = await worker(s, ['preprocess'], { fileSizeLimitKb: LIMIT_KB });
    const { run } = await json(await postRun(h.app, dataRun(src.dir, { workers: { preprocess_attempts: 3 } })));

    // The first attempt fails on the write, and the shard waits for its retry (1 s backoff).
    const failed = await until(
      'a patient shard to fail its first attempt',
      async () => {
        await expectRunOpen(h, run.id, s.logs);
        for (const id of src.ids) {
          const j = await patientJob(h, run.id, id);
          if (j && j.attemptsMade >= 1 && j.failedReason) return j;
        }
      },
      60_000,
      s.logs,
      20,
    );
    await kill9(full);
    const patientId = failed.data.patient.patientId as string;
    const files = patientFiles(runPaths(h.dataDir, run.id).processedBrats, patientId);
    // The reason names the file being written (in the patient's folder or its temporary twin) and the errno.
    const named = new RegExp(`cannot write ${processedBrats(h, run.id)}/\\.?${patientId}(\\.tmp-[^/]+)?/images\\.npy: EFBIG`);
    expect(failed.failedReason).toMatch(named);
    // Nothing half-written is left to be taken for complete: no images.npy, no meta.json, no temp file or folder.
    const left = await entriesUnder(processedBrats(h, run.id));
    expect(left.filter((p) => p.includes(patientId) && /(images\.npy|meta\.json)$/.test(p))).toEqual([]);
    expect(left.filter((p) => TEMP.test(p))).toEqual([]);
    const mid = await json(await h.app.request(`/runs/${run.id}`));
    const midStep = mid.steps.find((x: any) => x.name === 'preprocess_brats');
    expect(midStep.error).toMatch(named);
    expect(midStep.error).toMatch(/will retry/);

    // Space again: a healthy worker takes the retry.
    const healthy = await worker(s, ['preprocess']);
    const done = await waitForRun(h.app, run.id, 90_000);
    expect(done.status, `${JSON.stringify(done.error)}\n${s.logs()}`).toBe('succeeded');
    const after = (await patientJob(h, run.id, patientId))!;
    expect(after.processedBy).toBe(workerName(healthy));
    expect(after.attemptsMade).toBeGreaterThanOrEqual(2);
    expect((await stat(files.images)).size, 'images.npy must be over the limit, or the test proved nothing').toBeGreaterThan(LIMIT_KB * 1024);
    expect((await entriesUnder(runPaths(h.dataDir, run.id).root)).filter((f) => TEMP.test(f))).toEqual([]);
    for (const id of src.ids) {
      const f = patientFiles(runPaths(h.dataDir, run.id).processedBrats, id);
      const meta = await readPatientMeta(f);
      expect((await readNpy(f.images)).shape).toEqual([meta.num_slices, IMAGE_SIZE, IMAGE_SIZE]);
      expect((await readNpy(f.masks)).shape).toEqual([meta.num_slices, IMAGE_SIZE, IMAGE_SIZE]);
    }
    expect(done.patients.every((p: any) => p.status === 'done' && p.error === null)).toBe(true);
  });
});
