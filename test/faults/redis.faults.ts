/**
 * Redis faults, with real processes and a redis-server of the test's own (AOF on) that can be killed and started
 * again on the same port:
 *
 *  - Redis killed and restarted mid-run: a `slicewise worker` and a `slicewise api` ride it out (the API's
 *    /healthz says 503 meanwhile), each says so once per interval instead of once per reconnect, and the run
 *    completes;
 *  - `slicewise pipeline` with its private redis-server killed (-9): restarted from its AOF, the run succeeds;
 *    killed again and again, the supervisor gives up and the run fails saying why;
 *  - Redis gone for longer than SLICEWISE_REDIS_DEADLINE_MS: the pipeline's run fails naming Redis and the
 *    deadline, with a handful of log lines over the outage, not a flood;
 *  - the queues flushed: the run watchdog fails a running run with that reason instead of leaving it "running",
 *    and queues a still-queued one again;
 *  - a second SIGTERM with Redis dead ends the pipeline within a few seconds.
 *
 * "Mid-run" is made deterministic with a BraTS archive served over loopback HTTP that stops halfway until the
 * test releases it: the download job is active and waiting while Redis goes.
 */
import { execFileSync } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { Redis } from 'ioredis';
import * as tar from 'tar';
import { afterEach, describe, expect, it } from 'vitest';
import { getRunRow } from '../../src/runs/store.ts';
import { synthesize } from '../../src/synth/index.ts';
import { bareEnv } from '../helpers/cli.ts';
import { faultScenes, freePort, startApiProcess, startCli, testRedis, until, type FaultScene, type Proc, type TestRedis } from './procs.ts';

const setUp = faultScenes();

/** Redis servers a test started: killed after it, whatever happened. */
const servers: Array<{ close(): Promise<void> }> = [];
afterEach(async () => {
  for (const s of servers.splice(0)) await s.close();
});

async function ownRedis(s: FaultScene, opts: { aof?: boolean } = {}): Promise<TestRedis> {
  const r = await testRedis(join(s.root, 'redis'), opts);
  servers.push({ close: () => r.stop() });
  return r;
}

interface HeldDownload {
  url: string;
  /** Resolves once the first request has received the first half of the body. */
  requested: Promise<void>;
  /** Sends the rest. */
  release(): void;
}

/**
 * An archive served over loopback HTTP that stops halfway through the first request until `release()`; later
 * requests (a resumed download, with Range) get their bytes at once.
 */
async function heldDownload(body: Buffer): Promise<HeldDownload> {
  let release!: () => void;
  const released = new Promise<void>((r) => (release = r));
  let onRequest!: () => void;
  const requested = new Promise<void>((r) => (onRequest = r));
  let first = true;
  const server = http.createServer((req, res) => {
    const m = /^bytes=(\d+)-$/.exec(req.headers.range ?? '');
    const start = m ? Number(m[1]) : 0;
    const rest = body.subarray(start);
    res.writeHead(m ? 206 : 200, {
      'content-type': 'application/gzip',
      'content-length': rest.length,
      ...(m ? { 'content-range': `bytes ${start}-${body.length - 1}/${body.length}` } : {}),
    });
    if (!first) return void res.end(rest);
    first = false;
    const half = Math.floor(rest.length / 2);
    res.write(rest.subarray(0, half), () => onRequest());
    void released.then(() => res.end(rest.subarray(half)));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  servers.push({
    close: () =>
      new Promise<void>((r) => {
        release();
        server.closeAllConnections();
        server.close(() => r());
      }),
  });
  return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/brats.tar.gz`, requested, release };
}

/** A .tar.gz of a few small synthetic BraTS-2020-named patients. */
async function bratsArchive(s: FaultScene): Promise<Buffer> {
  const out = join(s.root, 'synth');
  await synthesize({ out, patients: 3, size: [48, 48, 24], kaggleYes: 0, kaggleNo: 0 });
  const file = join(s.root, 'brats.tar.gz');
  await tar.c({ gzip: true, file, cwd: out, portable: true }, ['brats']);
  return readFile(file);
}

/** What every process of these tests gets: loopback downloads allowed, logs on, no colours. */
const BASE_ENV = { SLICEWISE_ALLOW_PRIVATE_NETWORKS: '1', SLICEWISE_LOG: '', NO_COLOR: '1' };

/**
 * `slicewise pipeline` (data-only, the held archive as BraTS) in the scene's scratch folder. Its own Redis unless
 * REDIS_URL is given; the scene's Postgres database unless `pglite` (the embedded default, slower to open).
 */
function pipeline(s: FaultScene, bratsUrl: string, env: NodeJS.ProcessEnv, { pglite = false } = {}): Proc {
  const p = startCli(['pipeline', '--mode', 'data-only', '--brats-source', bratsUrl, '--kaggle-source', 'synthetic:4', '--image-size', '32', '--data-dir', join(s.root, 'data')], {
    cwd: s.root,
    env: { ...bareEnv(), ...BASE_ENV, ...(pglite ? {} : { DATABASE_URL: s.h.db.url! }), ...env },
  });
  s.procs.push(p);
  return p;
}

/** The redis-server a `slicewise pipeline` started as its child. */
function privateRedisPid(p: Proc): number | undefined {
  try {
    return Number(execFileSync('pgrep', ['-P', String(p.proc.pid), 'redis-server'], { encoding: 'utf8' }).trim().split('\n')[0]) || undefined;
  } catch {
    return undefined;
  }
}

/** Lines of `text` matching `re`. */
const lines = (text: string, re: RegExp) => text.split('\n').filter((l) => re.test(l));

/** Every line that mentions a refused connection must be one of the health watcher's reports. */
function expectNoConnectionFlood(output: string) {
  expect(lines(output, /ECONNREFUSED|Connection is closed/).filter((l) => !/unreachable for \d+ s/.test(l))).toEqual([]);
}

async function resultsOf(s: FaultScene) {
  return JSON.parse(await readFile(join(s.root, 'pipeline_results.json'), 'utf8')) as { status: string; error: string | null };
}

/** The pipeline said its run failed for `reason`, and pipeline_results.json (written from the database) agrees. */
async function expectFailedRun(s: FaultScene, p: Proc, reason: RegExp) {
  expect(p.output()).toMatch(new RegExp(`Run \\S+ failed: ${reason.source}`));
  const results = await resultsOf(s);
  expect(results.status).toBe('failed');
  expect(results.error).toMatch(reason);
}

describe('Redis faults', () => {
  it('Redis killed and restarted mid-run (AOF on): a worker process and the API reconnect, say so once per interval, and the run completes', async () => {
    const s = await setUp();
    const r = await ownRedis(s);
    const held = await heldDownload(await bratsArchive(s));
    // A 6 s deadline makes the outage reports come every 2 s; a worker and the API ride out any outage.
    const env = { ...BASE_ENV, SLICEWISE_REDIS_DEADLINE_MS: '6000' };
    const api = await startApiProcess({ redisUrl: r.url, databaseUrl: s.h.db.url!, dataDir: s.h.dataDir, prefix: s.h.ctx.prefix, port: await freePort(), extraEnv: env });
    s.procs.push(api);
    const worker = await s.worker({ redisUrl: r.url, extraEnv: env });

    const res = await fetch(`${api.url}/runs`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ mode: 'data-only', sources: { brats: held.url, kaggle: 'synthetic:4' }, overrides: { data: { image_size: 32 } } }),
    });
    expect(res.status, await res.clone().text()).toBe(201);
    const { run: created } = (await res.json()) as { run: { id: string } };
    const runId = created.id;
    await held.requested;

    await r.kill();
    const downAt = Date.now();
    const health = await until('the API to report Redis down', async () => {
      const h = await fetch(`${api.url}/healthz`);
      return h.status === 503 ? ((await h.json()) as { redis: { ok: boolean } }) : undefined;
    }, 10_000, s.logs, 200);
    expect(health.redis.ok).toBe(false);
    // Long enough for two reports at the 2 s interval.
    await until('two outage reports from the worker', async () => lines(worker.output(), /unreachable for \d+ s/).length >= 2, 15_000, s.logs, 100);
    const outageMs = Date.now() - downAt;
    await r.start();
    held.release();

    const run = await until('the run to end', async () => {
      const body = (await (await fetch(`${api.url}/runs/${runId}`)).json()) as { status: string; error: string | null };
      return ['succeeded', 'failed', 'cancelled'].includes(body.status) ? body : undefined;
    }, 90_000, s.logs, 300);
    expect(run.status, `${run.error}\n${s.logs()}`).toBe('succeeded');
    expect((await fetch(`${api.url}/healthz`)).status).toBe(200);

    for (const [name, p] of [['worker', worker], ['api', api]] as const) {
      const out = p.output();
      const reports = lines(out, /Redis at 127\.0\.0\.1:\d+ unreachable for \d+ s/);
      // One per 2 s of outage (plus one for rounding), not one per reconnect attempt.
      expect(reports.length, `${name}:\n${out.slice(-3000)}`).toBeGreaterThanOrEqual(1);
      expect(reports.length, `${name}:\n${out.slice(-3000)}`).toBeLessThanOrEqual(Math.ceil(outageMs / 2000) + 1);
      expect(lines(out, /Redis at 127\.0\.0\.1:\d+ is back after/), name).toHaveLength(1);
      expectNoConnectionFlood(out);
    }
  });

  it("`slicewise pipeline`: its private redis-server killed (-9) mid-run is restarted from its AOF and the run succeeds", async () => {
    const s = await setUp();
    const held = await heldDownload(await bratsArchive(s));
    // The setting of the report: no REDIS_URL, no DATABASE_URL.
    const p = pipeline(s, held.url, {}, { pglite: true });
    await held.requested;
    const first = await until('the private redis-server', async () => privateRedisPid(p), 10_000, s.logs);
    process.kill(first, 'SIGKILL');
    await p.waitFor(/the private redis-server exited \(signal SIGKILL\); restarting it from its AOF/, 20_000);
    await p.waitFor(/the private redis-server is up again/, 20_000);
    const second = privateRedisPid(p);
    expect(second).toBeDefined();
    expect(second).not.toBe(first);
    held.release();

    expect(await p.exited, p.output()).toBe(0);
    expect(p.output()).toMatch(/Run \S+ succeeded/);
    expect(lines(p.output(), /restarting it from its AOF/)).toHaveLength(1);
    expectNoConnectionFlood(p.output());
    expect((await resultsOf(s)).status).toBe('succeeded');
  });

  it('`slicewise pipeline`: a private redis-server that keeps dying is given up on, and the run fails saying so', async () => {
    const s = await setUp();
    const held = await heldDownload(await bratsArchive(s));
    const p = pipeline(s, held.url, {});
    await held.requested;
    // Three restarts are allowed within a minute; the fourth exit is one too many.
    for (let i = 1; i <= 4; i++) {
      const pid = await until(`redis-server #${i}`, async () => privateRedisPid(p), 20_000, s.logs);
      process.kill(pid, 'SIGKILL');
      if (i < 4) await until(`restart #${i}`, async () => lines(p.output(), /is up again/).length >= i, 20_000, () => p.output());
    }
    expect(await p.exited, p.output()).toBe(1);
    await expectFailedRun(s, p, /the private redis-server exited 4 times within 60 s \(last: signal SIGKILL\); giving up on it/);
    expect(privateRedisPid(p)).toBeUndefined();
  });

  it('Redis unreachable past SLICEWISE_REDIS_DEADLINE_MS: the run fails naming Redis and the deadline, logged once per interval', async () => {
    const s = await setUp();
    const r = await ownRedis(s);
    const held = await heldDownload(await bratsArchive(s));
    const p = pipeline(s, held.url, { REDIS_URL: r.url, SLICEWISE_REDIS_DEADLINE_MS: '6000' });
    await held.requested;
    await r.kill();
    const downAt = Date.now();

    expect(await p.exited, p.output()).toBe(1);
    const tookMs = Date.now() - downAt;
    // The deadline, plus the moment it takes to record the verdict and stop.
    expect(tookMs).toBeGreaterThanOrEqual(6000);
    expect(tookMs).toBeLessThan(15_000);
    const out = p.output();
    const reason = new RegExp(`Redis at 127\\.0\\.0\\.1:${r.port} unreachable for more than 6 s \\(SLICEWISE_REDIS_DEADLINE_MS\\)`);
    await expectFailedRun(s, p, reason);
    // Every 2 s (a third of the deadline): three reports over six seconds, not dozens of lines a second.
    const reports = lines(out, /unreachable for \d s \(ECONNREFUSED\); retrying \(the run fails after 6 s, SLICEWISE_REDIS_DEADLINE_MS\)/);
    expect(reports.length, out).toBeGreaterThanOrEqual(2);
    expect(reports.length, out).toBeLessThanOrEqual(4);
    expectNoConnectionFlood(out);
  });

  it("the queues flushed mid-run: the run watchdog fails the run with that reason instead of leaving it running", async () => {
    const s = await setUp();
    const held = await heldDownload(await bratsArchive(s));
    const p = pipeline(s, held.url, { SLICEWISE_WATCHDOG_MS: '1000' });
    await held.requested;
    const url = /private redis-server at (redis:\/\/\S+)/.exec(p.output())?.[1];
    expect(url, p.output()).toBeDefined();
    const admin = new Redis(url!, { maxRetriesPerRequest: 1 });
    try {
      await admin.flushall();
    } finally {
      admin.disconnect();
    }
    const flushedAt = Date.now();

    expect(await p.exited, p.output()).toBe(1);
    // Two checks a second apart, then the run's end.
    expect(Date.now() - flushedAt).toBeLessThan(15_000);
    await expectFailedRun(s, p, /the run's jobs are gone from Redis \(flushed, or restarted without AOF\)/);
  });

  it('the queues flushed while a run is still queued: the watchdog queues it again (nothing of it ran), and it completes', async () => {
    const s = await setUp();
    const r = await ownRedis(s);
    const env = { ...BASE_ENV, SLICEWISE_WATCHDOG_MS: '1000' };
    const api = await startApiProcess({ redisUrl: r.url, databaseUrl: s.h.db.url!, dataDir: s.h.dataDir, prefix: s.h.ctx.prefix, port: await freePort(), extraEnv: env });
    s.procs.push(api);
    const res = await fetch(`${api.url}/runs`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ mode: 'data-only', sources: { brats: 'synthetic:3', kaggle: 'synthetic:4' }, overrides: { data: { image_size: 32 } } }),
    });
    expect(res.status, await res.clone().text()).toBe(201);
    const runId = ((await res.json()) as { run: { id: string } }).run.id;
    const admin = new Redis(r.url, { maxRetriesPerRequest: 1 });
    try {
      const finalize = `${s.h.ctx.prefix}:pipeline:${runId}.finalize`;
      expect(await admin.exists(finalize)).toBe(1);
      await admin.flushall();
      await until('the run to be queued again', async () => (await admin.exists(finalize)) === 1, 15_000, s.logs, 200);
    } finally {
      admin.disconnect();
    }
    expect((await getRunRow(s.h.ctx.db, runId))?.status).toBe('queued');

    await s.worker({ redisUrl: r.url, extraEnv: env });
    const run = await until('the run to end', async () => {
      const row = await getRunRow(s.h.ctx.db, runId);
      return row && ['succeeded', 'failed', 'cancelled'].includes(row.status) ? row : undefined;
    }, 90_000, s.logs, 300);
    expect(run.status, `${run.error}\n${s.logs()}`).toBe('succeeded');
  });

  it('a second SIGTERM ends `slicewise pipeline` within a few seconds while its Redis is dead; the run is left cancelled', async () => {
    const s = await setUp();
    const r = await ownRedis(s);
    const held = await heldDownload(await bratsArchive(s));
    const p = pipeline(s, held.url, { REDIS_URL: r.url });
    await held.requested;
    const runId = /Run (run-\S+): --mode/.exec(p.output())?.[1];
    expect(runId, p.output()).toBeDefined();
    await r.kill();
    await p.waitFor(/unreachable for \d+ s/, 20_000);

    p.signal('SIGTERM');
    await p.waitFor(/Received SIGTERM; cancelling run \S+ and stopping its \d+ active job\(s\), send again to force/, 5000);
    // The graceful stop waits on jobs whose bookkeeping is in the dead Redis; the second signal must not.
    await new Promise((res) => setTimeout(res, 1000));
    const forcedAt = Date.now();
    p.signal('SIGTERM');
    expect(await p.exited, p.output()).toBe(130);
    expect(Date.now() - forcedAt).toBeLessThan(6000);
    expect(p.output()).toMatch(/Received SIGTERM again; forcing/);

    // The first signal's cancel reached the database before Redis was needed.
    expect((await getRunRow(s.h.ctx.db, runId!))?.status).toBe('cancelled');
  });
});
