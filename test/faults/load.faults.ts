/**
 * A load wave, with real `slicewise worker` processes (three for the per-patient shards, one for the rest) on the
 * shared test Redis (a prefix of its own) and a fresh Postgres database: a burst of 20 runs at once over tiny
 * synthetic patients, FAULTS_LOAD_PATIENTS shards in all (200 by default, so CI finishes in a minute or two;
 * 1000 for the full-size wave). Everything must drain, no job may be left waiting for children, every result must
 * be in Postgres, and Redis must come back near where it started: finished jobs are trimmed by the retention
 * policy (src/queues/retention.ts), so what stays is bounded by the policy, not by the load.
 *
 * Redis is shared with other tests, so its memory is measured over this test's own keys (redisFootprint), not
 * with INFO. The queue bench (bench/queue.ts) runs the same wave at full size and prints the same figures.
 */
import { join } from 'node:path';
import type { Queue } from 'bullmq';
import { eq, inArray } from 'drizzle-orm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { patients, runs, steps } from '../../src/db/schema.ts';
import { QUEUE_NAMES } from '../../src/queues/names.ts';
import { SHARD_RETENTION, STEP_RETENTION } from '../../src/queues/retention.ts';
import { stepsForMode } from '../../src/runs/modes.ts';
import { synthesize } from '../../src/synth/index.ts';
import { mb, redisFootprint, type RedisFootprint } from '../helpers/redis-footprint.ts';
import { harness, json, postRun, TEST_REDIS_URL, type Harness } from '../helpers/services.ts';
import { startWorkerProcess, type Proc } from './procs.ts';

const TOTAL_PATIENTS = Number(process.env.FAULTS_LOAD_PATIENTS ?? 200);
const RUNS = 20;
/** Each run preprocesses the same synthetic folder, so the wave's shards are RUNS x this. */
const PER_RUN = Math.ceil(TOTAL_PATIENTS / RUNS);
const DATA_STEPS = stepsForMode('data-only').length;
/** The full-size wave needs longer than the suite's default on a 2-core machine. */
const WAVE_TIMEOUT_MS = Math.max(240_000, TOTAL_PATIENTS * 700);

const footprint = (h: Harness): Promise<RedisFootprint> => redisFootprint(h.ctx.redis, h.ctx.prefix);

describe(`a load wave: ${RUNS} runs at once, ${RUNS * PER_RUN} patient shards, 3 preprocess worker processes`, () => {
  let h: Harness;
  const procs: Proc[] = [];
  const logs = () => procs.map((p, i) => `--- worker ${i} (pid ${p.proc.pid}) ---\n${p.output().slice(-3000)}`).join('\n');

  beforeAll(async () => {
    h = await harness('postgres', { workers: false });
    const common = { redisUrl: TEST_REDIS_URL, databaseUrl: h.db.url!, dataDir: h.dataDir, prefix: h.ctx.prefix, readyTimeoutMs: 150_000 };
    // Each is listed as soon as it is up, so that afterAll stops it even when another one fails to start.
    const up = (p: Promise<Proc>) => p.then((x) => procs.push(x));
    await Promise.all([
      ...[0, 1, 2].map(() => up(startWorkerProcess({ ...common, queues: ['preprocess'], concurrency: 1 }))),
      up(startWorkerProcess({ ...common, queues: ['pipeline', 'download', 'split'], concurrency: 2 })),
    ]);
  }, 200_000);

  afterAll(async () => {
    for (const p of procs) p.signal('SIGKILL');
    await Promise.all(procs.map((p) => p.exited));
    await h?.close();
  });

  it('drains, leaves nothing waiting, keeps every result in Postgres, and gives Redis back', async () => {
    const synth = await synthesize({ out: join(h.dataDir, 'incoming'), patients: PER_RUN, size: [32, 32, 8], kaggleYes: 3, kaggleNo: 3 });
    const body = {
      mode: 'data-only',
      sources: { brats: `path:${synth.bratsDir}`, kaggle: `path:${synth.kaggleDir}` },
      overrides: { data: { image_size: 32, patients: { fraction: 1 } } },
    };
    const before = await footprint(h);
    const t0 = Date.now();
    const created = await Promise.all(Array.from({ length: RUNS }, (_, i) => postRun(h.app, body, { 'Idempotency-Key': `load-${i}` })));
    expect(created.map((r) => r.status)).toEqual(Array(RUNS).fill(201));
    const ids: string[] = (await Promise.all(created.map((r) => json(r)))).map((x) => x.run.id);

    // Sampled through the wave: the peak is what the policy has to bring back down.
    let peak = before;
    const deadline = t0 + WAVE_TIMEOUT_MS - 30_000;
    for (;;) {
      const rows = await h.ctx.db.select({ id: runs.id, status: runs.status, error: runs.error }).from(runs).where(inArray(runs.id, ids));
      const f = await footprint(h);
      if (f.bytes > peak.bytes) peak = f;
      const open = rows.filter((r) => r.status === 'queued' || r.status === 'running');
      if (open.length === 0) {
        const bad = rows.filter((r) => r.status !== 'succeeded');
        expect(bad, logs()).toEqual([]);
        break;
      }
      if (Date.now() > deadline) throw new Error(`${open.length} of ${RUNS} runs still open after ${((Date.now() - t0) / 1000).toFixed(0)} s\n${logs()}`);
      await new Promise((r) => setTimeout(r, 1000));
    }
    const seconds = (Date.now() - t0) / 1000;

    // Every queue drained: nothing waiting for children, nothing queued, running or delayed.
    for (const q of QUEUE_NAMES) {
      const counts = await (h.ctx.queues[q] as Queue).getJobCounts('waiting-children', 'wait', 'active', 'delayed', 'prioritized', 'failed');
      expect(counts, `queue ${q}`).toEqual({ 'waiting-children': 0, wait: 0, active: 0, delayed: 0, prioritized: 0, failed: 0 });
    }

    // Postgres has every result: each run's steps succeeded, each of its patients is done with its slices counted.
    const stepRows = await h.ctx.db.select().from(steps).where(inArray(steps.runId, ids));
    expect(stepRows).toHaveLength(RUNS * DATA_STEPS);
    expect(stepRows.filter((s) => s.status !== 'success')).toEqual([]);
    for (const s of stepRows.filter((x) => x.name === 'preprocess_brats')) expect(s.counts).toMatchObject({ done: PER_RUN, total: PER_RUN });
    const patientRows = await h.ctx.db.select().from(patients).where(inArray(patients.runId, ids));
    expect(patientRows).toHaveLength(RUNS * PER_RUN);
    expect(patientRows.filter((p) => p.status !== 'done' || p.slices === null)).toEqual([]);
    expect(await h.ctx.db.select().from(runs).where(eq(runs.status, 'succeeded'))).toHaveLength(RUNS);

    // Redis: what stays is the retention policy's recent history, bounded whatever the wave's size.
    const after = await footprint(h);
    console.log(
      `load wave: ${RUNS} runs, ${RUNS * PER_RUN} shards in ${seconds.toFixed(1)} s (${((RUNS * PER_RUN) / seconds).toFixed(1)} shards/s); ` +
        `Redis under the prefix: start ${before.keys} keys ${mb(before.bytes)}, peak ${peak.keys} keys ${mb(peak.bytes)}, ` +
        `after ${after.keys} keys ${mb(after.bytes)} (of which event streams ${mb(after.streamBytes)}); jobs kept ${JSON.stringify(after.jobs)}`,
    );
    expect(after.jobs.preprocess, 'shard jobs kept').toBeLessThanOrEqual(SHARD_RETENTION.removeOnComplete.count + RUNS);
    // The step jobs (a handful per run, linked from the run page) stay up to their own count.
    for (const q of ['pipeline', 'download', 'split'] as const) expect(after.jobs[q]).toBeLessThanOrEqual(Math.min(STEP_RETENTION.removeOnComplete.count, RUNS * 2));
    const jobsKept = Object.values(after.jobs).reduce((a, b) => a + b, 0);
    expect(jobsKept).toBeLessThanOrEqual(SHARD_RETENTION.removeOnComplete.count + RUNS * DATA_STEPS);
    // Apart from the event streams (capped by BullMQ at ~10,000 entries per queue), every byte the wave added is
    // the kept jobs': about a few KB each, nothing per shard beyond the cap.
    const nonStream = (f: RedisFootprint) => f.bytes - f.streamBytes;
    expect(nonStream(after) - nonStream(before)).toBeLessThanOrEqual(jobsKept * 8 * 1024);
  }, WAVE_TIMEOUT_MS);
});
