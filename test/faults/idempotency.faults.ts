/**
 * Idempotency under repetition, with real `slicewise worker` processes on the shared test Redis (a prefix per
 * test) and a fresh Postgres database per test:
 *
 *  - POST /runs repeated with one Idempotency-Key answers the first run, flagged as a replay, and adds no job,
 *    row or file; the same key on a different request is 409 naming the key; five at once make one run;
 *  - preprocess_brats (the coordinator that fans out one job per patient) killed (-9) in the middle of its
 *    fan-out while shards already run: its redelivery adds the rest, and every patient's job is added once,
 *    runs once and makes one row and one folder, even for shards that finished and were trimmed from Redis.
 *
 * "Added once" is read from each queue's event stream, where BullMQ records every job it adds ("added") and
 * every add it ignored because the id existed ("duplicated"): a job trimmed after completing and then added
 * again would show as two "added" events for one id.
 */
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { and, count, eq } from 'drizzle-orm';
import { Job } from 'bullmq';
import { describe, expect, it } from 'vitest';
import type { Config } from '../../src/config/schema.ts';
import { patients, runs, steps } from '../../src/db/schema.ts';
import { runPaths } from '../../src/disk/layout.ts';
import { discoverPatients } from '../../src/imaging/layout.ts';
import { addPatientShards } from '../../src/producers/patient-shards.ts';
import { jobId, QUEUE_NAMES } from '../../src/queues/names.ts';
import { SHARD_RETENTION } from '../../src/queues/retention.ts';
import { stepsForMode } from '../../src/runs/modes.ts';
import { createRun } from '../../src/runs/service.ts';
import { getRunRow } from '../../src/runs/store.ts';
import { synthesize } from '../../src/synth/index.ts';
import { preprocessPatientStep } from '../../src/workers/preprocess-patient.ts';
import { json, postRun, waitForRun, type Harness } from '../helpers/services.ts';
import { faultScenes, until, type FaultScene, type Proc } from './procs.ts';

/** Short locks: a killed worker's job is taken over within about 3 s. */
const LOCK_MS = '2000';
const IMAGE_SIZE = 32;
const DATA_STEPS = stepsForMode('data-only').length;

// These tests count every job's events, so the queues' event streams must keep them all (the default trims).
const EVENTS = '1000000';
process.env.SLICEWISE_EVENTS_MAX_LEN = EVENTS;
const scene = faultScenes();

function worker(s: FaultScene, queues: string[], concurrency = 1): Promise<Proc> {
  return s.worker({ queues, concurrency, extraEnv: { SLICEWISE_LOCK_MS: LOCK_MS, SLICEWISE_EVENTS_MAX_LEN: EVENTS } });
}

/** Tiny BraTS-2020-named patients and Kaggle-like images, in the data dir (where `path:` sources may read). */
async function sources(h: Harness, patientCount: number) {
  const r = await synthesize({ out: join(h.dataDir, 'incoming'), patients: patientCount, size: [32, 32, 8], kaggleYes: 3, kaggleNo: 3 });
  return { brats: `path:${r.bratsDir}`, kaggle: `path:${r.kaggleDir}`, ids: r.patients };
}

function dataRun(src: { brats: string; kaggle: string }) {
  return { mode: 'data-only', sources: { brats: src.brats, kaggle: src.kaggle }, overrides: { data: { image_size: IMAGE_SIZE, patients: { fraction: 1 } } } };
}

/** Every job of the run in Redis: a job's hash is <prefix>:<queue>:<id> (its other keys add ':lock', ':logs'...). */
async function runJobKeys(h: Harness, runId: string): Promise<string[]> {
  const keys: string[] = [];
  let cursor = '0';
  do {
    const [next, batch] = await h.ctx.redis.scan(cursor, 'MATCH', `${h.ctx.prefix}:*:${runId}.*`, 'COUNT', 1000);
    cursor = next;
    keys.push(...batch.filter((k) => k.split(':').length === 3));
  } while (cursor !== '0');
  return keys.sort();
}

/**
 * How often each of the run's job ids was added and taken by a worker ("active"), and how many adds BullMQ
 * ignored as duplicates, from the event streams.
 */
async function addEvents(h: Harness, runId: string): Promise<{ added: Map<string, number>; active: Map<string, number>; duplicated: number }> {
  const added = new Map<string, number>();
  const active = new Map<string, number>();
  let duplicated = 0;
  for (const q of QUEUE_NAMES) {
    const entries = (await h.ctx.redis.xrange(`${h.ctx.prefix}:${q}:events`, '-', '+')) as [string, string[]][];
    for (const [, fields] of entries) {
      const f: Record<string, string> = {};
      for (let i = 0; i < fields.length; i += 2) f[fields[i]!] = fields[i + 1]!;
      if (!f.jobId?.startsWith(`${runId}.`)) continue;
      if (f.event === 'added') added.set(`${q}:${f.jobId}`, (added.get(`${q}:${f.jobId}`) ?? 0) + 1);
      if (f.event === 'active') active.set(`${q}:${f.jobId}`, (active.get(`${q}:${f.jobId}`) ?? 0) + 1);
      if (f.event === 'duplicated') duplicated++;
    }
  }
  return { added, active, duplicated };
}

async function runRows(h: Harness, where: ReturnType<typeof eq>) {
  return (await h.ctx.db.select({ n: count() }).from(runs).where(where))[0]!.n;
}

describe('POST /runs with an Idempotency-Key', () => {
  it('a repeated request answers the same run, flagged as a replay, and adds no job, row or file', async () => {
    const s = await scene();
    const { h } = s;
    const src = await sources(h, 4);
    const key = 'nightly-2026-12-02';
    const first = await postRun(h.app, dataRun(src), { 'Idempotency-Key': key });
    expect(first.status).toBe(201);
    expect(first.headers.get('idempotent-replayed')).toBeNull();
    const a = await json(first);
    expect(a).toMatchObject({ created: true, replayed: false });
    const jobsAfterFirst = await runJobKeys(h, a.run.id);
    expect(jobsAfterFirst).toHaveLength(DATA_STEPS);

    // The same request, its fields in another order and the default mode left out: the same request.
    const again = { sources: { kaggle: src.kaggle, brats: src.brats }, overrides: { data: { patients: { fraction: 1 }, image_size: IMAGE_SIZE } } };
    const second = await postRun(h.app, again, { 'Idempotency-Key': key });
    expect(second.status).toBe(200);
    expect(second.headers.get('idempotent-replayed')).toBe('true');
    const b = await json(second);
    expect(b).toMatchObject({ created: false, replayed: true, run: { id: a.run.id } });
    expect(await runRows(h, eq(runs.idempotencyKey, key))).toBe(1);
    expect(await runJobKeys(h, a.run.id)).toEqual(jobsAfterFirst);
    expect((await h.ctx.db.select({ n: count() }).from(steps).where(eq(steps.runId, a.run.id)))[0]!.n).toBe(DATA_STEPS);

    await worker(s, ['pipeline', 'download', 'preprocess', 'split'], 2);
    const done = await waitForRun(h.app, a.run.id, 120_000);
    expect(done.status, s.logs()).toBe('succeeded');

    // A replay after the run has finished answers it as it is now, and starts nothing.
    const third = await postRun(h.app, dataRun(src), { 'Idempotency-Key': key });
    expect(third.status).toBe(200);
    expect(await json(third)).toMatchObject({ replayed: true, run: { id: a.run.id, status: 'succeeded' } });
    await new Promise((r) => setTimeout(r, 500));
    const { added, duplicated } = await addEvents(h, a.run.id);
    expect([...added.values()].every((n) => n === 1), JSON.stringify([...added])).toBe(true);
    expect(added.size).toBe(DATA_STEPS + src.ids.length);
    expect(duplicated).toBe(0);
    expect(await runRows(h, eq(runs.idempotencyKey, key))).toBe(1);
    expect((await h.ctx.db.select().from(patients).where(eq(patients.runId, a.run.id))).map((p) => p.status)).toEqual(src.ids.map(() => 'done'));
    expect((await readdir(runPaths(h.dataDir, a.run.id).processedBrats)).sort()).toEqual([...src.ids].sort());
  });

  it('the same key on a different request is 409 naming the key; five requests at once make one run', async () => {
    const { h } = await scene();
    const src = await sources(h, 2);
    const key = 'k-409';
    const a = await json(await postRun(h.app, dataRun(src), { 'Idempotency-Key': key }));
    const other = { ...dataRun(src), trainingMode: 'baseline' };
    const res = await postRun(h.app, other, { 'Idempotency-Key': key });
    expect(res.status).toBe(409);
    const body = await json(res);
    expect(body.error.code).toBe('idempotency_key_reused');
    expect(body.error.message).toContain(`'${key}'`);
    expect(body.error.message).toContain(a.run.id);
    expect(await runRows(h, eq(runs.idempotencyKey, key))).toBe(1);
    expect((await h.ctx.db.select({ n: count() }).from(runs))[0]!.n).toBe(1);

    // Five at once with a fresh key: one inserts, four replay it, whatever order they reach the database in.
    const burst = await Promise.all(Array.from({ length: 5 }, () => postRun(h.app, dataRun(src), { 'Idempotency-Key': 'k-burst' })));
    const answers = await Promise.all(burst.map((r) => json(r)));
    expect(burst.map((r) => r.status).sort()).toEqual([200, 200, 200, 200, 201]);
    const ids = new Set(answers.map((x) => x.run.id));
    expect(ids.size).toBe(1);
    const [id] = [...ids] as [string];
    expect(answers.filter((x) => x.replayed)).toHaveLength(4);
    expect(await runRows(h, eq(runs.idempotencyKey, 'k-burst'))).toBe(1);
    expect((await h.ctx.db.select({ n: count() }).from(runs))[0]!.n).toBe(2);
    expect((await h.ctx.db.select({ n: count() }).from(steps).where(eq(steps.runId, id)))[0]!.n).toBe(DATA_STEPS);
    expect(await runJobKeys(h, id)).toHaveLength(DATA_STEPS);
    const { added } = await addEvents(h, id);
    expect(added.size).toBe(DATA_STEPS);
    expect([...added.values()].every((n) => n === 1)).toBe(true);
  });

  it('keys are per caller, and a malformed key or a query parameter is refused naming it', async () => {
    const { h } = await scene();
    const src = await sources(h, 2);
    // Two principals (the auth middleware's token names) choosing one key get a run each; each replays its own.
    const alice1 = await createRun(h.ctx, dataRun(src) as never, { idempotencyKey: 'shared', idempotencyScope: 'principal:alice' });
    const bob = await createRun(h.ctx, dataRun(src) as never, { idempotencyKey: 'shared', idempotencyScope: 'principal:bob' });
    const alice2 = await createRun(h.ctx, dataRun(src) as never, { idempotencyKey: 'shared', idempotencyScope: 'principal:alice' });
    expect(bob.run.id).not.toBe(alice1.run.id);
    expect([alice1.created, bob.created, alice2.created, alice2.replayed]).toEqual([true, true, false, true]);
    expect(alice2.run.id).toBe(alice1.run.id);
    // The open API's scope is another one again.
    const open = await json(await postRun(h.app, dataRun(src), { 'Idempotency-Key': 'shared' }));
    expect(open.created).toBe(true);
    expect(await runRows(h, eq(runs.idempotencyKey, 'shared'))).toBe(3);

    for (const [k, why] of [
      ['x'.repeat(256), 'at most 255'],
      ['caf\u00e9', 'printable ASCII'],
    ] as const) {
      const res = await postRun(h.app, dataRun(src), { 'Idempotency-Key': k });
      expect(res.status).toBe(400);
      const e = (await json(res)).error;
      expect(e.fields[0].field).toBe('Idempotency-Key');
      expect(e.message).toContain(why);
    }
    const q = await h.app.request('/runs?mode=full', { method: 'POST', body: JSON.stringify(dataRun(src)), headers: { 'content-type': 'application/json' } });
    expect(q.status).toBe(400);
    expect((await json(q)).error.fields).toEqual([{ field: 'mode', message: expect.stringContaining('no query parameters') }]);
    expect((await h.ctx.db.select({ n: count() }).from(runs))[0]!.n).toBe(3);
  });
});

describe('a coordinator that fans out again', () => {
  it('run twice, the second time after half its shards finished and most of those left Redis: each patient once', async () => {
    const s = await scene();
    const { h } = s;
    const n = 240;
    const half = n / 2;
    const src = await sources(h, n);
    await worker(s, ['preprocess'], 2);
    // No pipeline worker: the run's own coordinator never starts, so this test is the only one fanning out, with
    // the real coordinator job as the parent, exactly as preprocess_brats calls it.
    const { run } = await json(await postRun(h.app, dataRun(src)));
    const parent = (await Job.fromId(h.ctx.queues.pipeline, jobId(run.id, 'preprocess_brats')))!;
    const found = await discoverPatients(src.brats.slice('path:'.length));
    const shards = found.map((patient) => ({ patientId: patient.patientId, data: { runId: run.id, patient } }));
    const config = (await getRunRow(h.ctx.db, run.id))!.config as Config;
    const doneRows = async () => (await h.ctx.db.select().from(patients).where(eq(patients.runId, run.id))).filter((p) => p.status === 'done').length;

    expect(await addPatientShards(h.ctx, { parent, step: preprocessPatientStep, config, shards: shards.slice(0, half) })).toEqual({ added: half, present: 0 });
    await until(`the first ${half} patients`, async () => (await doneRows()) === half, 180_000, s.logs, 200);
    const kept = (await runJobKeys(h, run.id)).filter((k) => k.includes('.patient.')).length;
    expect(kept, 'finished shards were trimmed to the retention count').toBeLessThanOrEqual(SHARD_RETENTION.removeOnComplete.count);
    expect(kept).toBeLessThan(half);

    // The retry: every patient again. Those finished (kept or trimmed) are the parent's processed children.
    expect(await addPatientShards(h.ctx, { parent, step: preprocessPatientStep, config, shards })).toEqual({ added: n - half, present: half });
    await until(`all ${n} patients`, async () => (await doneRows()) === n, 180_000, s.logs, 200);
    await new Promise((r) => setTimeout(r, 500));
    const { added, active, duplicated } = await addEvents(h, run.id);
    const shardIds = (m: Map<string, number>) => [...m].filter(([k]) => k.startsWith(`preprocess:${run.id}.patient.`));
    expect(shardIds(added)).toHaveLength(n);
    expect(shardIds(added).filter(([, times]) => times !== 1)).toEqual([]);
    expect(shardIds(active).filter(([, times]) => times !== 1)).toEqual([]);
    expect(duplicated).toBe(0);
    expect(await h.ctx.redis.hlen(`${h.ctx.prefix}:pipeline:${parent.id}:processed`)).toBe(n);
    expect(await h.ctx.db.select().from(patients).where(eq(patients.runId, run.id))).toHaveLength(n);
    expect((await readdir(runPaths(h.dataDir, run.id).processedBrats)).sort()).toEqual([...src.ids].sort());
  });

  it('killed in the middle of its fan-out: its redelivery adds only the missing shards, each patient once in Redis, Postgres and on disk', async () => {
    const s = await scene();
    const { h } = s;
    // Enough patients that the fan-out takes several chunks, so the kill lands between two of them.
    const n = Number(process.env.FAULTS_FANOUT_PATIENTS ?? 600);
    const src = await sources(h, n);
    // Shards run from the start, so some finish (and, past the retention count, leave Redis) before the coordinator dies.
    await worker(s, ['preprocess', 'split'], 2);
    const coordinator = await worker(s, ['pipeline', 'download']);
    const { run } = await json(await postRun(h.app, dataRun(src)));
    const parentKey = `${h.ctx.prefix}:pipeline:${jobId(run.id, 'preprocess_brats')}`;
    const addedSoFar = async () => {
      const [[, deps], [, processed]] = (await h.ctx.redis.multi().scard(`${parentKey}:dependencies`).hlen(`${parentKey}:processed`).exec()) as [unknown, number][];
      // download_brats, the flow's own child, is among them from the start (pending, then processed).
      return deps + processed - 1;
    };
    // Watch the parent's own record of its children, and kill its worker as soon as the first chunk is in.
    const atKill = await until('the coordinator to start its fan-out', async () => ((await addedSoFar()) > 0 ? addedSoFar() : undefined), 120_000, s.logs, 2);
    coordinator.signal('SIGKILL');
    await coordinator.exited;
    const afterKill = await addedSoFar();
    expect(afterKill, `the fan-out finished before the kill landed (${afterKill} of ${n} shards); raise FAULTS_FANOUT_PATIENTS`).toBeLessThan(n);
    expect((await h.ctx.db.select().from(steps).where(and(eq(steps.runId, run.id), eq(steps.name, 'preprocess_brats'))))[0]!.status).toBe('running');

    // A second coordinator process takes the stalled job over and fans out again.
    await worker(s, ['pipeline', 'download']);
    const done = await waitForRun(h.app, run.id, 180_000);
    expect(done.status, s.logs()).toBe('succeeded');
    console.log(`fan-out of ${n} patients killed after ${atKill} (${afterKill} once dead); redelivery added the other ${n - afterKill}`);
    expect(s.logs()).toMatch(new RegExp(`${afterKill} of ${n} patient jobs were added by an earlier attempt`));

    // Redis: each patient's job added once, never re-added (not even those trimmed after completing).
    const { added, duplicated } = await addEvents(h, run.id);
    const shardAdds = [...added].filter(([k]) => k.startsWith(`preprocess:${run.id}.patient.`));
    expect(shardAdds).toHaveLength(n);
    expect(shardAdds.filter(([, times]) => times !== 1)).toEqual([]);
    expect(duplicated).toBe(0);
    const kept = (await runJobKeys(h, run.id)).filter((k) => k.includes('.patient.'));
    expect(kept.length).toBeLessThanOrEqual(SHARD_RETENTION.removeOnComplete.count);

    // Postgres: one row per patient, all done; the step's totals count each once.
    const rows = await h.ctx.db.select().from(patients).where(eq(patients.runId, run.id));
    expect(rows).toHaveLength(n);
    expect(rows.filter((r) => r.status !== 'done' || r.slices === null || r.outputDir === null)).toEqual([]);
    const pb = done.steps.find((x: any) => x.name === 'preprocess_brats');
    expect(pb).toMatchObject({ status: 'success', counts: { done: n, total: n, found: n } });
    expect(done.patients).toHaveLength(n);

    // Disk: one folder per patient, each with its three files and no leftovers of an interrupted write.
    const dir = runPaths(h.dataDir, run.id).processedBrats;
    const folders = (await readdir(dir)).sort();
    expect(folders).toEqual([...src.ids].sort());
    for (const p of folders.slice(0, 50)) expect((await readdir(join(dir, p))).sort()).toEqual(['images.npy', 'masks.npy', 'meta.json']);
  });
});
