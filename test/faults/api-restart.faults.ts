/**
 * The API process killed (-9) and started again, with a real `slicewise api` and a real `slicewise worker` on the
 * shared test Redis (a prefix per test) and a fresh Postgres database per test:
 *
 *  - in the middle of a run: the run goes on in the worker, completes, and the new API's GET /runs/:id shows
 *    exactly what Postgres holds (status, every step's status, attempts and counts, every patient);
 *  - between recording a run and queueing its jobs (its Redis held unanswered by a proxy, the POST hanging): the
 *    run is left queued with nothing in Redis; the client's retry with the same Idempotency-Key queues it on the
 *    new API, and one without a key is queued by enqueueOrphanedRuns (what an API does when it starts).
 */
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { asc, eq } from 'drizzle-orm';
import { describe, expect, it } from 'vitest';
import { patients, runs, steps } from '../../src/db/schema.ts';
import { runPaths } from '../../src/disk/layout.ts';
import { byStepOrder, stepsForMode } from '../../src/runs/modes.ts';
import { enqueueOrphanedRuns } from '../../src/runs/service.ts';
import { synthesize } from '../../src/synth/index.ts';
import { TEST_REDIS_URL, type Harness } from '../helpers/services.ts';
import { cutProxy, faultScenes, freePort, kill9, startApiProcess, until, type FaultScene } from './procs.ts';

const IMAGE_SIZE = 32;

const scene = faultScenes();

async function api(s: FaultScene, port: number, redisUrl = TEST_REDIS_URL) {
  const p = await startApiProcess({ redisUrl, databaseUrl: s.h.db.url!, dataDir: s.h.dataDir, prefix: s.h.ctx.prefix, port });
  s.procs.push(p);
  return p;
}

const worker = (s: FaultScene) => s.worker({ concurrency: 2 });

async function http(url: string, init: RequestInit = {}): Promise<{ status: number; body: any; headers: Headers }> {
  const res = await fetch(url, { ...init, headers: { 'content-type': 'application/json', ...(init.headers ?? {}) } });
  const text = await res.text();
  return { status: res.status, headers: res.headers, body: text ? JSON.parse(text) : null };
}

async function sources(h: Harness, count: number, size: [number, number, number] = [32, 32, 8]) {
  const r = await synthesize({ out: join(h.dataDir, 'incoming'), patients: count, size, kaggleYes: 3, kaggleNo: 3 });
  return { body: { mode: 'data-only', sources: { brats: `path:${r.bratsDir}`, kaggle: `path:${r.kaggleDir}` }, overrides: { data: { image_size: IMAGE_SIZE, patients: { fraction: 1 } } } }, ids: r.patients };
}

/** Polls GET /runs/:id on a live API until the run ends. */
async function finished(url: string, runId: string, logs: () => string) {
  return until(
    `run ${runId} to finish`,
    async () => {
      const r = await http(`${url}/runs/${runId}`);
      return ['succeeded', 'failed', 'cancelled'].includes(r.body?.status) ? r.body : undefined;
    },
    180_000,
    logs,
    200,
  );
}

/** GET /runs/:id against Postgres itself: the run, every step and every patient as the rows hold them. */
async function expectDetailMatchesRows(h: Harness, detail: any) {
  const [run] = await h.ctx.db.select().from(runs).where(eq(runs.id, detail.id));
  expect(detail).toMatchObject({ id: run!.id, status: run!.status, error: run!.error, mode: run!.mode });
  const rows = byStepOrder(await h.ctx.db.select().from(steps).where(eq(steps.runId, detail.id)));
  expect(detail.steps.map((x: any) => [x.name, x.status, x.attempts, x.counts, x.error])).toEqual(rows.map((r) => [r.name, r.status, r.attempts, r.counts, r.error]));
  const pats = await h.ctx.db.select().from(patients).where(eq(patients.runId, detail.id)).orderBy(asc(patients.patientId));
  expect(detail.patients.map((p: any) => [p.patientId, p.status, p.split, p.slices])).toEqual(pats.map((p) => [p.patientId, p.status, p.split, p.slices]));
}

describe('the API process restarted', () => {
  it('kill -9 in the middle of a run: the run completes, and the restarted API shows it right', async () => {
    const s = await scene();
    const { h } = s;
    // Enough work that the run is still preprocessing for a second or two: 60 tiny patients took 0.6 s in all, and
    // the test once found the run over before it saw any patient done (their rows are written every 250 ms).
    const n = 120;
    const src = await sources(h, n, [96, 96, 48]);
    const port = await freePort();
    const [first] = await Promise.all([api(s, port), worker(s)]);
    const created = await http(`${first.url}/runs`, { method: 'POST', body: JSON.stringify(src.body) });
    expect(created.status, s.logs()).toBe(201);
    const runId: string = created.body.run.id;

    // The middle: the run's patients are being preprocessed, some done, not all.
    const mid = await until(
      'the run to be in the middle of preprocessing',
      async () => {
        const d = (await http(`${first.url}/runs/${runId}`)).body;
        if (['succeeded', 'failed', 'cancelled'].includes(d.status)) throw new Error(`run ended before the API could be killed: ${d.status}\n${s.logs()}`);
        const done = d.patients.filter((p: any) => p.status === 'done').length;
        return d.status === 'running' && done > 0 && done < n ? { done } : undefined;
      },
      120_000,
      s.logs,
      20,
    );
    await kill9(first);
    // With no API at all the run goes on: the worker and Postgres carry it.
    const whileDown = await until(
      'progress while the API is down',
      async () => {
        const done = (await h.ctx.db.select().from(patients).where(eq(patients.runId, runId))).filter((p) => p.status === 'done').length;
        return done > mid.done ? done : undefined;
      },
      60_000,
      s.logs,
    );

    const second = await api(s, port);
    const detail = await finished(second.url, runId, s.logs);
    console.log(`API killed with ${mid.done}/${n} patients done, ${whileDown} done while it was down; run ${detail.status}`);
    expect(detail.status, s.logs()).toBe('succeeded');
    expect(detail.steps.map((x: any) => x.name).sort()).toEqual([...stepsForMode('data-only')].sort());
    expect(detail.steps.every((x: any) => x.status === 'success')).toBe(true);
    expect(detail.steps.find((x: any) => x.name === 'preprocess_brats')).toMatchObject({ attempts: 1, counts: { found: n, total: n, done: n } });
    expect(detail.steps.find((x: any) => x.name === 'finalize')).toMatchObject({ attempts: 1 });
    expect(detail.patients).toHaveLength(n);
    expect(detail.patients.every((p: any) => p.status === 'done' && ['train', 'val', 'test'].includes(p.split))).toBe(true);
    await expectDetailMatchesRows(h, detail);
    // The list and the results agree with the run.
    const list = (await http(`${second.url}/runs`)).body;
    expect(list.runs.find((r: any) => r.id === runId)).toMatchObject({ status: 'succeeded' });
    const results = (await http(`${second.url}/runs/${runId}/results`)).body;
    expect(results).toBeTruthy();
    expect((await readdir(runPaths(h.dataDir, runId).processedBrats)).sort()).toEqual([...src.ids].sort());
  });

  it('kill -9 between recording a run and queueing it: the retried POST (same Idempotency-Key) queues it; so does a starting API for one without a key', async () => {
    const s = await scene();
    const { h } = s;
    const src = await sources(h, 6);
    const redisPort = Number(new URL(TEST_REDIS_URL).port);
    const proxy = await cutProxy('127.0.0.1', redisPort);
    try {
      const port = await freePort();
      const first = await api(s, port, `redis://127.0.0.1:${proxy.port}`);
      // From here the first API's Redis answers nothing: a POST records its run in Postgres, then hangs queueing it.
      proxy.stall();
      const hanging = [
        fetch(`${first.url}/runs`, { method: 'POST', body: JSON.stringify(src.body), headers: { 'content-type': 'application/json', 'Idempotency-Key': 'retry-me' } }).catch(() => null),
        fetch(`${first.url}/runs`, { method: 'POST', body: JSON.stringify({ ...src.body, trainingMode: 'baseline' }), headers: { 'content-type': 'application/json' } }).catch(() => null),
      ];
      const stepCount = stepsForMode('data-only').length;
      const recorded = await until(
        'both runs and their steps in Postgres',
        async () => {
          const rows = await h.ctx.db.select().from(runs);
          if (rows.length < 2) return undefined;
          const st = await h.ctx.db.select().from(steps);
          return st.length === 2 * stepCount ? rows : undefined;
        },
        30_000,
        s.logs,
      );
      await new Promise((r) => setTimeout(r, 300));
      await kill9(first);
      await Promise.all(hanging);
      // Dropped, not forwarded: what the dead API had sent must never reach Redis.
      proxy.cut();
      const keyed = recorded.find((r) => r.idempotencyKey === 'retry-me')!;
      const unkeyed = recorded.find((r) => r.idempotencyKey === null)!;
      for (const r of recorded) {
        expect((await h.ctx.db.select().from(runs).where(eq(runs.id, r.id)))[0]!.status).toBe('queued');
        expect(await h.ctx.redis.keys(`${h.ctx.prefix}:*:${r.id}.*`)).toEqual([]);
      }

      // The client never got an answer, so it sends the same request with the same key again, to another API
      // process (the test's own app, on the same Redis and Postgres): the replay queues the run.
      const retried = await h.app.request('/runs', { method: 'POST', body: JSON.stringify(src.body), headers: { 'content-type': 'application/json', 'Idempotency-Key': 'retry-me' } });
      expect(retried.status).toBe(200);
      expect(retried.headers.get('idempotent-replayed')).toBe('true');
      expect(((await retried.json()) as { run: { id: string } }).run.id).toBe(keyed.id);
      await worker(s);
      // The run without a key has no client to retry it: the restarted API's start-up sweep queues it, and says so.
      const second = await api(s, port);
      await second.waitFor(new RegExp(`Queued 1 run\\(s\\) an earlier API process recorded but never queued: ${unkeyed.id}`), 10_000);
      // Nothing is left for another sweep.
      expect(await enqueueOrphanedRuns(h.ctx)).toEqual([]);

      for (const r of [keyed, unkeyed]) {
        const detail = await finished(second.url, r.id, s.logs);
        expect(detail.status, s.logs()).toBe('succeeded');
        expect(detail.patients).toHaveLength(src.ids.length);
        expect(detail.steps.every((x: any) => x.status === 'success' && x.attempts === 1)).toBe(true);
        await expectDetailMatchesRows(h, detail);
      }
      expect((await h.ctx.db.select().from(runs)).length).toBe(2);
    } finally {
      await proxy.close();
    }
  });
});
