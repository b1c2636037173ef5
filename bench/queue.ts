/**
 * Benchmark: the queue layer's cost per shard. A data-only run's preprocess_brats on synthetic patients, through
 * the real flow (the API's createRun, the worker host, the runner, step threads, the database), timed from the
 * coordinator's start to the last shard's completion, against the floor: the same number of no-op jobs through
 * a bare BullMQ queue and worker on the same Redis, with the same concurrency, measured in the same run.
 *
 * - tiny shards (32 x 32 x 8 patients): what bookkeeping costs per shard, at 100 and 1,000 shards (10,000 with
 *   --shards), on the embedded PGlite and on a real Postgres;
 * - CPU-bound shards (bigger patients): two `slicewise worker --queues preprocess` processes against one
 *   (Postgres only: PGlite serves one process);
 * - the load wave at full size (the fault suite runs it scaled down): 20 runs created at once, 1,000 tiny shards in
 *   all, three worker processes; how long it takes to drain, what is left in the queues, and the Redis memory under
 *   the bench's prefix before, at its peak and after (Postgres only).
 *
 * The workers of a series start once and serve all its runs, after a warm-up run, as long-lived workers do; each
 * size has a dataset of its own, as a run discovers every patient of its source.
 *
 * Redis: REDIS_URL, or a private redis-server started for the bench. Postgres: DATABASE_URL (a throwaway database
 * is created on that server and dropped after); without it the Postgres rows say so.
 *
 *   npx tsx bench/queue.ts [--shards 100,1000,10000] [--db pglite,postgres] [--no-scale-out] [--no-load-wave]
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { realpathSync } from 'node:fs';
import { link, mkdir, mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { cpus, tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { performance } from 'node:perf_hooks';
import { Queue, QueueEvents, Worker, type Job } from 'bullmq';
import pg from 'pg';
import { median, printTable, writeResult } from 'tfjs-wasm-training/bench/table';
import { startPrivateRedis, type PrivateRedis } from '../src/cli/redis-server.ts';
import { createContext, type AppContext } from '../src/context.ts';
import type { DbHandle } from '../src/db/client.ts';
import { env } from '../src/env.ts';
import { createLogger } from '../src/lib/logger.ts';
import { redactPassword } from '../src/lib/redact.ts';
import { createRedis } from '../src/queues/connection.ts';
import { runPaths } from '../src/disk/layout.ts';
import { createRun } from '../src/runs/service.ts';
import { QUEUE_NAMES } from '../src/queues/names.ts';
import { countPatients, getRunRow } from '../src/runs/store.ts';
import { synthesize } from '../src/synth/index.ts';
import { startWorkers, type WorkerHost } from '../src/workers/host.ts';
import { freshDb, type DbKind } from '../test/helpers/db.ts';
import { mb, redisFootprint, type RedisFootprint } from '../test/helpers/redis-footprint.ts';
import { parallelSpeedup } from './machine.ts';

const here = dirname(fileURLToPath(import.meta.url));
const BIN = resolve(here, '../bin/slicewise.mjs');
const TINY: [number, number, number] = [32, 32, 8];
/** Big enough that a shard is mostly CPU work, small enough that the bench stays short. */
const CPU_BOUND: [number, number, number] = [240, 240, 96];
/** The output slice size of the CPU-bound runs: the default config's. */
const CPU_BOUND_SIZE = 128;
const CPU_BOUND_PATIENTS = 40;


export interface FlowFigure {
  db: DbKind;
  shards: number;
  /** Coordinator start (its job active) to the last shard job finished. */
  ms: number;
  per_shard_ms: number;
  /** Coordinator start to the first shard taken: discovering the patients and adding their jobs. */
  first_shard_ms: number;
  /** The share of the run the worker process's main thread was busy (event loop utilisation, 0-1). */
  main_thread_busy: number;
  /** Coordinator start to preprocess_brats done (its collect phase included). */
  step_ms: number;
  /**
   * CPU time of the process that runs the workers (all its threads), coordinator start to run end, per shard:
   * steadier than wall time on a shared machine. Redis's and Postgres's own CPU are not in it.
   */
  cpu_per_shard_ms: number;
  /** Bare BullMQ no-op jobs, the same count and concurrency, measured just before. */
  floor_ms: number;
  floor_per_job_ms: number;
  ratio: number;
}

export interface ScaleOutFigure {
  processes: number;
  /** Each worker process confined to a core of its own (taskset), as one machine per worker would give it. */
  pinned: boolean;
  shards: number;
  ms: number;
  per_shard_ms: number;
  /** Coordinator start to the first shard taken: the part of the run no worker process can share. */
  first_shard_ms: number;
  /**
   * CPU time of the worker processes (all their threads) over the run's wall time: how many cores they kept busy.
   * One process above 1.0 already uses part of the second core (its step thread reads, inflates and writes a
   * shard's files at once through libuv's thread pool, alongside its computing, and V8's helper threads mark its
   * heap), which a second process can then only share.
   */
  worker_cores_busy: number;
  /**
   * Shards per second of the worker processes' CPU time: what a shard costs them in CPU. Equal for one and two
   * processes when nothing is lost to their sharing one Redis, one Postgres and one coordinator.
   */
  shards_per_cpu_second: number;
}

/** Queue states that must all be empty once the load wave has drained (the ones its fault test checks). */
const LEFT_STATES = ['waiting-children', 'wait', 'active', 'delayed', 'prioritized', 'failed'] as const;

export interface LoadWaveFigure {
  runs: number;
  shards: number;
  worker_processes: number;
  /** The runs' creation to the last of them finished. */
  seconds: number;
  shards_per_second: number;
  runs_succeeded: number;
  patients_done: number;
  /** Jobs left in any queue afterwards, by state: all zero when the wave drained. */
  left: Record<(typeof LEFT_STATES)[number], number>;
  /** Redis memory under the bench's prefix: its keys' MEMORY USAGE, before the wave, at its peak, after it. */
  redis_before: RedisFootprint;
  redis_peak: RedisFootprint;
  redis_after: RedisFootprint;
}

export interface QueueBenchResult {
  bench: 'queue';
  date: string;
  node: string;
  cores: number;
  redis: string;
  postgres: string | null;
  /** Why the Postgres rows are missing, when they are. */
  postgres_note?: string;
  concurrency: number;
  tiny: FlowFigure[];
  scale_out: ScaleOutFigure[];
  scale_out_note?: string;
  scale_out_ratio?: number;
  /** The same, each worker process on a core of its own. */
  scale_out_ratio_pinned?: number;
  /** Why that series is missing, when it is. */
  scale_out_pinned_note?: string;
  /**
   * Two processes' shards per CPU-second over one's (medians of the runs), as the OS places them and with a core
   * each: 1.0 means the second process costs nothing in coordination, so the wall-time ratio is bounded only by
   * the cores the processes get.
   */
  scale_out_cpu_efficiency?: number;
  scale_out_cpu_efficiency_pinned?: number;
  /** The machine's own speed-up from a second core, before and after the scale-out runs (bench/machine.ts). */
  machine_speedup_ceiling?: number[];
  load_wave?: LoadWaveFigure;
  /** Why the load wave is missing, when it is. */
  load_wave_note?: string;
  goal: { per_shard_ms: number; scale_out_ratio: number };
  [key: string]: unknown;
}

export interface QueueBenchOptions {
  /** Tiny-shard run sizes (default [100, 1000]). */
  shards?: number[];
  /** Databases for the tiny shards (default both). */
  dbs?: DbKind[];
  /** Two worker processes against one on CPU-bound shards (default true; needs Postgres). */
  scaleOut?: boolean;
  /** The full-size load wave (default true; needs Postgres). */
  loadWave?: boolean;
}

const round = (x: number, digits = 2): number => Math.round(x * 10 ** digits) / 10 ** digits;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** The floor: `n` no-op jobs through a bare BullMQ queue and worker, from the worker's start to the last completion. */
async function bareBullmq(redisUrl: string, n: number, concurrency: number): Promise<number> {
  const prefix = `swbfloor${randomBytes(3).toString('hex')}`;
  const conn = createRedis(redisUrl);
  const queue = new Queue('noop', { connection: conn, prefix });
  try {
    for (let i = 0; i < n; i += 1000) {
      await queue.addBulk(Array.from({ length: Math.min(1000, n - i) }, (_, k) => ({ name: 'noop', data: { i: i + k }, opts: { removeOnComplete: true } })));
    }
    let done = 0;
    let finished!: () => void;
    const all = new Promise<void>((r) => (finished = r));
    const t0 = performance.now();
    const workerConn = createRedis(redisUrl);
    const worker = new Worker('noop', async () => undefined, { connection: workerConn, prefix, concurrency });
    worker.on('completed', () => {
      if (++done === n) finished();
    });
    await all;
    const ms = performance.now() - t0;
    await worker.close();
    workerConn.disconnect();
    return ms;
  } finally {
    await queue.obliterate({ force: true }).catch(() => {});
    await queue.close();
    conn.disconnect();
  }
}

/** A database for one measurement: a throwaway PGlite, or a new database on the Postgres server. */
function benchDb(kind: DbKind, serverUrl: string | undefined): Promise<DbHandle & { url?: string }> {
  return freshDb(kind, { serverUrl, namePrefix: 'slicewise_bench' });
}

async function clearPrefix(ctx: AppContext): Promise<void> {
  const keys = await ctx.redis.keys(`${ctx.prefix}:*`);
  for (let i = 0; i < keys.length; i += 500) await ctx.redis.del(...keys.slice(i, i + 500));
}

/** Patients are listed before a run: its shards are the ones the run's max_patients picks. */
interface Dataset {
  brats: string;
  kaggle: string;
}

/** synth names patients BraTS20_Training_NNN, so at most 999 of them. */
const SYNTH_MAX = 999;

/**
 * `patients` synthetic patients. Beyond synth's 999, the dataset is a BraTS-2021-named tree (BraTS2021_NNNNN) of
 * hard links to the synthesized files, cycling through them: as many patients as asked, for no more disk.
 */
async function makeDataset(root: string, patients: number, size: [number, number, number]): Promise<Dataset> {
  const res = await synthesize({ out: join(root, 'synth'), patients: Math.min(patients, SYNTH_MAX), size, kaggleYes: 3, kaggleNo: 3, kaggleSize: 64, seed: 7 });
  const kaggle = `path:${res.kaggleDir}`;
  if (patients <= SYNTH_MAX) return { brats: `path:${res.bratsDir}`, kaggle };
  const tree = join(root, 'brats2021');
  for (let i = 0; i < patients; i++) {
    const src = res.patients[i % res.patients.length]!;
    const id = `BraTS2021_${String(i).padStart(5, '0')}`;
    await mkdir(join(tree, id), { recursive: true });
    for (const f of await readdir(join(res.bratsDir, src))) {
      await link(join(res.bratsDir, src, f), join(tree, id, f.replace(src, id)));
    }
  }
  return { brats: `path:${tree}`, kaggle };
}

/**
 * The workers of one measurement series, started once and kept for all its runs as a deployment keeps them: this
 * process's worker host (all queues, or all but preprocess) and `preprocessProcs` `slicewise worker --queues
 * preprocess --concurrency 1` processes. What starting them costs (loading the step threads' modules, seconds of
 * CPU) is a warm-up run's, not a measured one's.
 */
interface Fleet {
  ctx: AppContext;
  host: WorkerHost;
  dataDir: string;
  /** Output of the worker processes, for an error message. */
  out: string[];
  /** CPU time so far of the worker processes (all threads), ms. */
  procCpuMs(): Promise<number>;
  close(): Promise<void>;
}

/** Whether worker processes can each be given a core of their own: taskset (util-linux) and 2 cores or more. */
function canPin(): boolean {
  return cpus().length >= 2 && spawnSync('taskset', ['--version'], { stdio: 'ignore' }).status === 0;
}

/** utime + stime of a process, all its threads, from /proc (Linux): ms. */
async function processCpuMs(pid: number): Promise<number> {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
  // Fields after the command name (which may hold spaces, so split after its closing parenthesis): utime is the
  // 14th field, stime the 15th, in clock ticks (100 per second on Linux).
  const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return ((Number(rest[11]) + Number(rest[12])) * 1000) / 100;
}

async function startFleet(opts: { kind: DbKind; serverUrl?: string; redisUrl: string; dataDir: string; preprocessProcs?: number; pinned?: boolean }): Promise<Fleet> {
  const db = await benchDb(opts.kind, opts.serverUrl);
  const prefix = `swbench${randomBytes(3).toString('hex')}`;
  const ctx = createContext({ db: db.db, redisUrl: opts.redisUrl, dataDir: opts.dataDir, prefix, logger: createLogger('bench', 'warn') });
  const external = opts.preprocessProcs ?? 0;
  const host = await startWorkers(ctx, external ? { queues: ['pipeline', 'download', 'split'] } : {});
  const procs: ChildProcess[] = [];
  const out: string[] = [];
  const close = async () => {
    for (const p of procs) if (p.exitCode === null) p.kill('SIGKILL');
    await host.close(true);
    await clearPrefix(ctx);
    await ctx.close();
    await db.close();
  };
  try {
    for (let i = 0; i < external; i++) {
      const args = [BIN, 'worker', '--queues', 'preprocess', '--concurrency', '1', '--data-dir', opts.dataDir];
      // taskset execs node: the pid stays the worker's own.
      const p = spawn(opts.pinned ? 'taskset' : process.execPath, opts.pinned ? ['-c', String(i % cpus().length), process.execPath, ...args] : args, {
        env: { ...process.env, REDIS_URL: opts.redisUrl, DATABASE_URL: db.url, SLICEWISE_QUEUE_PREFIX: prefix, LOG_LEVEL: 'warn' },
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      p.stdout!.on('data', (d) => out.push(String(d)));
      p.stderr!.on('data', (d) => out.push(String(d)));
      procs.push(p);
    }
    const deadline = Date.now() + 60_000;
    while (external && (await ctx.queues.preprocess.getWorkers()).length < external) {
      if (Date.now() > deadline) throw new Error(`the bench's worker processes did not come up:\n${out.join('')}`);
      await sleep(100);
    }
  } catch (err) {
    await close();
    throw err;
  }
  const procCpuMs = async () => (await Promise.all(procs.map((p) => processCpuMs(p.pid!)))).reduce((a, b) => a + b, 0);
  return { ctx, host, dataDir: opts.dataDir, out, procCpuMs, close };
}

/** The Redis time (ms) of the newest completion of one of `runId`'s shard jobs on the preprocess queue's event stream. */
async function lastShardCompletion(ctx: AppContext, runId: string): Promise<number> {
  const key = `${ctx.prefix}:preprocess:events`;
  let end = '+';
  // Newest first, a page at a time: later events of the queue (another run's, the Kaggle step's) come before it.
  for (;;) {
    const page = (await ctx.redis.xrevrange(key, end, '-', 'COUNT', 500)) as Array<[string, string[]]>;
    for (const [id, fields] of page) {
      const f = new Map<string, string>();
      for (let i = 0; i + 1 < fields.length; i += 2) f.set(fields[i]!, fields[i + 1]!);
      const jobId = f.get('jobId') ?? '';
      if (f.get('event') === 'completed' && jobId.startsWith(`${runId}.`) && jobId.includes('.patient.')) return Number(id.split('-')[0]);
    }
    if (page.length < 500) throw new Error(`no completion of a shard of run ${runId} on ${key}`);
    end = `(${page[page.length - 1]![0]}`;
  }
}

/** Creates a data-only run whose preprocess_brats fans out `shards` patients of `dataset`. */
function createDataRun(ctx: AppContext, { dataset, shards, imageSize }: { dataset: Dataset; shards: number; imageSize: number }) {
  return createRun(ctx, {
    mode: 'data-only',
    trainingMode: 'quick',
    sources: { brats: dataset.brats, kaggle: dataset.kaggle },
    overrides: { data: { image_size: imageSize, max_patients: shards, patients: { fraction: 1 } } },
  });
}

/** One data-only run on `fleet` whose preprocess_brats fans out `shards` patients of `dataset`. */
async function timedRun(
  fleet: Fleet,
  opts: { dataset: Dataset; shards: number; imageSize: number },
): Promise<{ ms: number; firstMs: number; stepMs: number; cpuMs: number; workerCpuMs: number; mainBusy: number }> {
  const { ctx, host } = fleet;
  const cleanup: (() => Promise<unknown>)[] = [];
  let runDir: string | undefined;
  let runId = '';
  try {
    // Shard times come from the queue's event stream (an entry's id is a Redis timestamp in ms; completed shard
    // jobs themselves are trimmed from Redis, SHARD_RETENTION). The first shard's start is watched live, and the
    // listener stops once it is seen; the last completion is read back after the run: a listener reading every
    // event while the shards run would spend the measured process's CPU (one XREAD and its parsing per shard or so).
    const eventsConn = createRedis(ctx.redisUrl);
    const events = new QueueEvents('preprocess', { connection: eventsConn, prefix: ctx.prefix });
    let first = 0;
    let stopWatching: Promise<void> | undefined;
    const stop = () => (stopWatching ??= events.close().then(() => eventsConn.disconnect()));
    events.on('active', ({ jobId: id }, eventId) => {
      if (!first && runId && id.startsWith(`${runId}.`) && id.includes('.patient.')) {
        first = Number(eventId.split('-')[0]);
        void stop();
      }
    });
    await events.waitUntilReady();
    cleanup.push(stop);
    const pipelineWorker = host.workers.find((w) => w.name === 'pipeline')!;
    let t0 = 0;
    let tStep = 0;
    let cpu0: NodeJS.CpuUsage | undefined;
    let elu0: ReturnType<typeof performance.eventLoopUtilization> | undefined;
    const onActive = (job: Job) => {
      if (job.name === 'preprocess_brats' && job.data.runId === runId && !t0) {
        t0 = Date.now();
        cpu0 = process.cpuUsage();
        elu0 = performance.eventLoopUtilization();
      }
    };
    let finalized = false;
    const onCompleted = (job: Job) => {
      if (job.data.runId !== runId) return;
      if (job.name === 'preprocess_brats') tStep = Date.now();
      if (job.name === 'finalize') finalized = true;
    };
    pipelineWorker.on('active', onActive);
    pipelineWorker.on('completed', onCompleted);
    cleanup.push(async () => {
      pipelineWorker.off('active', onActive);
      pipelineWorker.off('completed', onCompleted);
    });
    const workerCpu0 = await fleet.procCpuMs();
    const { run } = await createDataRun(ctx, opts);
    runId = run.id;
    runDir = runPaths(fleet.dataDir, run.id).root;
    for (;;) {
      const row = await getRunRow(ctx.db, run.id);
      if (row?.status === 'succeeded') break;
      if (row && ['failed', 'cancelled'].includes(row.status)) throw new Error(`bench run ${run.id} ${row.status}: ${row.error}\n${fleet.out.join('')}`);
      await sleep(100);
    }
    const cpu = process.cpuUsage(cpu0);
    const workerCpuMs = (await fleet.procCpuMs()) - workerCpu0;
    const elu = performance.eventLoopUtilization(elu0);
    const settle = Date.now() + 5000;
    const done = (await countPatients(ctx.db, run.id)).done;
    if (done !== opts.shards) throw new Error(`expected ${opts.shards} patients done, the run has ${done}`);
    const last = await lastShardCompletion(ctx, run.id);
    // finalize writes pipeline_results.json after the run's verdict: the run's folder is removed after that.
    while (!finalized && Date.now() < settle) await sleep(20);
    return { ms: last - t0, firstMs: first - t0, stepMs: tStep - t0, cpuMs: (cpu.user + cpu.system) / 1000, workerCpuMs, mainBusy: elu.utilization };
  } finally {
    for (const c of cleanup) await c();
    if (runDir) await rm(runDir, { recursive: true, force: true });
  }
}

const WAVE_RUNS = 20;
const WAVE_SHARDS = 1000;
const WAVE_PROCS = 3;

async function jobsLeft(ctx: AppContext): Promise<LoadWaveFigure['left']> {
  const left = Object.fromEntries(LEFT_STATES.map((k) => [k, 0])) as LoadWaveFigure['left'];
  for (const q of QUEUE_NAMES) {
    const counts = await ctx.queues[q].getJobCounts(...LEFT_STATES);
    for (const k of LEFT_STATES) left[k] += counts[k] ?? 0;
  }
  return left;
}

/**
 * The load wave at full size: WAVE_RUNS data-only runs created at once on `fleet` (WAVE_PROCS preprocess worker
 * processes), WAVE_SHARDS tiny shards in all. The fault suite (test/faults/load.faults.ts) asserts the same wave at
 * a fifth of the size; here it is timed, and what it leaves in the queues and in Redis is reported.
 */
async function loadWave(fleet: Fleet, dataset: Dataset): Promise<LoadWaveFigure> {
  const { ctx } = fleet;
  const perRun = WAVE_SHARDS / WAVE_RUNS;
  const before = await redisFootprint(ctx.redis, ctx.prefix);
  let peak = before;
  const t0 = Date.now();
  const created = await Promise.all(Array.from({ length: WAVE_RUNS }, () => createDataRun(ctx, { dataset, shards: perRun, imageSize: 32 })));
  const ids = created.map((c) => c.run.id);
  try {
    let rows: Array<Awaited<ReturnType<typeof getRunRow>>>;
    for (;;) {
      rows = await Promise.all(ids.map((id) => getRunRow(ctx.db, id)));
      const f = await redisFootprint(ctx.redis, ctx.prefix);
      if (f.bytes > peak.bytes) peak = f;
      const ended = rows.find((r) => r?.status === 'failed' || r?.status === 'cancelled');
      if (ended) throw new Error(`load wave: run ${ended.id} ${ended.status}: ${ended.error}\n${fleet.out.join('')}`);
      if (rows.every((r) => r?.status === 'succeeded')) break;
      if (Date.now() - t0 > 600_000) throw new Error(`load wave: ${rows.filter((r) => r?.status !== 'succeeded').length} of ${WAVE_RUNS} runs still open after 10 minutes`);
      await sleep(250);
    }
    // The runs' own finish times, not this loop's polling: the wave ends with the last of them.
    const end = Math.max(...rows.map((r) => r!.finishedAt!.getTime()));
    // A run's verdict comes before its finalize job is acknowledged: wait for the queues to empty (10 s at most).
    let left = await jobsLeft(ctx);
    for (const until = Date.now() + 10_000; Object.values(left).some((n) => n > 0) && Date.now() < until; ) {
      await sleep(100);
      left = await jobsLeft(ctx);
    }
    let patientsDone = 0;
    for (const id of ids) patientsDone += (await countPatients(ctx.db, id)).done;
    const seconds = (end - t0) / 1000;
    return {
      runs: WAVE_RUNS,
      shards: WAVE_SHARDS,
      worker_processes: WAVE_PROCS,
      seconds: round(seconds, 1),
      shards_per_second: round(WAVE_SHARDS / seconds, 0),
      runs_succeeded: rows.filter((r) => r?.status === 'succeeded').length,
      patients_done: patientsDone,
      left,
      redis_before: before,
      redis_peak: peak,
      redis_after: await redisFootprint(ctx.redis, ctx.prefix),
    };
  } finally {
    for (const id of ids) await rm(runPaths(fleet.dataDir, id).root, { recursive: true, force: true });
  }
}

async function postgresServer(): Promise<{ url?: string; note?: string }> {
  const url = env().databaseUrl;
  if (!url) return { note: 'DATABASE_URL is not set: no Postgres figures (set it to a server where the role may create databases)' };
  const c = new pg.Client({ connectionString: url });
  try {
    await c.connect();
    await c.query('select 1');
    return { url };
  } catch (err) {
    return { note: `Postgres at ${redactPassword(url)} is not reachable (${(err as Error).message}): no Postgres figures` };
  } finally {
    await c.end().catch(() => {});
  }
}

export async function runQueueBench({ shards = [100, 1000], dbs = ['pglite', 'postgres'], scaleOut = true, loadWave: wave = true }: QueueBenchOptions = {}): Promise<QueueBenchResult> {
  const work = await mkdtemp(join(tmpdir(), 'slicewise-bench-'));
  let privateRedis: PrivateRedis | undefined;
  try {
    let redisUrl = env().redisUrl;
    if (!redisUrl) {
      privateRedis = await startPrivateRedis(join(work, 'redis-home'));
      redisUrl = privateRedis.url;
    }
    const server = await postgresServer();
    const concurrency = Math.max(1, cpus().length);
    // One data dir for every run: `path:` sources must lie inside it (or SLICEWISE_ALLOWED_ROOTS).
    const dataDir = join(work, 'data');
    // A dataset per size: a run discovers every patient of its source (a cost per patient, so per shard).
    const tinyData = new Map<number, Dataset>();
    for (const n of shards) tinyData.set(n, await makeDataset(join(dataDir, 'bench-sources', `tiny-${n}`), n, TINY));

    const tiny: FlowFigure[] = [];
    for (const kind of dbs) {
      if (kind === 'postgres' && !server.url) continue;
      const fleet = await startFleet({ kind, serverUrl: server.url, redisUrl, dataDir });
      try {
        // Warm-up: the first run pays for loading the step threads' modules and the JIT.
        await timedRun(fleet, { dataset: tinyData.get(Math.min(...shards))!, shards: Math.min(50, ...shards), imageSize: 32 });
        for (const n of shards) {
          const floorMs = await bareBullmq(redisUrl, n, concurrency);
          const r = await timedRun(fleet, { dataset: tinyData.get(n)!, shards: n, imageSize: 32 });
          tiny.push({
            db: kind,
            shards: n,
            ms: Math.round(r.ms),
            per_shard_ms: round(r.ms / n),
            first_shard_ms: Math.round(r.firstMs),
            main_thread_busy: round(r.mainBusy),
            step_ms: Math.round(r.stepMs),
            cpu_per_shard_ms: round(r.cpuMs / n),
            floor_ms: Math.round(floorMs),
            floor_per_job_ms: round(floorMs / n, 3),
            ratio: round(r.ms / floorMs, 1),
          });
          console.error(`queue bench: ${n} tiny shards on ${kind}: ${(r.ms / n).toFixed(2)} ms per shard (floor ${(floorMs / n).toFixed(3)} ms)`);
        }
      } finally {
        await fleet.close();
      }
    }

    const scale: ScaleOutFigure[] = [];
    /** parallelSpeedup() just before and just after the scale-out runs: the most a second process could give. */
    const ceiling: number[] = [];
    let scaleNote: string | undefined;
    if (!scaleOut) scaleNote = 'skipped (--no-scale-out)';
    else if (!server.url) scaleNote = 'needs Postgres (PGlite serves one process); set DATABASE_URL';
    else {
      const cpuData = await makeDataset(join(dataDir, 'bench-sources', 'cpu'), CPU_BOUND_PATIENTS, CPU_BOUND);
      const warm = await makeDataset(join(dataDir, 'bench-sources', 'cpu-warm'), 4, CPU_BOUND);
      // All fleets up at once (idle workers only wait on Redis), their runs interleaved, three each: the machine's
      // load drifts under a bench, and interleaving spreads it over every series. Two series: worker processes as
      // the OS schedules them on this one machine, and each on a core of its own, as a machine per worker would
      // give it (the coordinator, Redis and Postgres still share both cores with them).
      const fleets: Array<{ procs: number; pinned: boolean; fleet: Fleet }> = [];
      try {
        for (const pinned of canPin() ? [false, true] : [false]) {
          for (const procs of [1, 2]) {
            const fleet = await startFleet({ kind: 'postgres', serverUrl: server.url, redisUrl, dataDir, preprocessProcs: procs, pinned });
            fleets.push({ procs, pinned, fleet });
            await timedRun(fleet, { dataset: warm, shards: 4, imageSize: CPU_BOUND_SIZE });
          }
        }
        ceiling.push(await parallelSpeedup());
        for (let rep = 0; rep < 3; rep++) {
          for (const { procs, pinned, fleet } of fleets) {
            const r = await timedRun(fleet, { dataset: cpuData, shards: CPU_BOUND_PATIENTS, imageSize: CPU_BOUND_SIZE });
            scale.push({
              processes: procs,
              pinned,
              shards: CPU_BOUND_PATIENTS,
              ms: Math.round(r.ms),
              per_shard_ms: round(r.ms / CPU_BOUND_PATIENTS),
              first_shard_ms: Math.round(r.firstMs),
              worker_cores_busy: round(r.workerCpuMs / r.ms),
              shards_per_cpu_second: round((CPU_BOUND_PATIENTS * 1000) / r.workerCpuMs, 1),
            });
            console.error(
              `queue bench: ${CPU_BOUND_PATIENTS} CPU-bound shards on ${procs} worker process(es)${pinned ? ', each on a core of its own' : ''}: ${(r.ms / 1000).toFixed(2)} s, ${(r.workerCpuMs / r.ms).toFixed(2)} cores busy`,
            );
          }
        }
        ceiling.push(await parallelSpeedup());
      } finally {
        for (const f of fleets) await f.fleet.close();
      }
    }
    let waveFigure: LoadWaveFigure | undefined;
    let waveNote: string | undefined;
    if (!wave) waveNote = 'skipped (--no-load-wave)';
    else if (!server.url) waveNote = 'needs Postgres (PGlite serves one process); set DATABASE_URL';
    else {
      const data = await makeDataset(join(dataDir, 'bench-sources', 'wave'), WAVE_SHARDS / WAVE_RUNS, TINY);
      const fleet = await startFleet({ kind: 'postgres', serverUrl: server.url, redisUrl, dataDir, preprocessProcs: WAVE_PROCS });
      try {
        await timedRun(fleet, { dataset: data, shards: 10, imageSize: 32 });
        waveFigure = await loadWave(fleet, data);
        console.error(`queue bench: load wave of ${WAVE_RUNS} runs drained in ${waveFigure.seconds} s`);
      } finally {
        await fleet.close();
      }
    }
    const series = (p: number, pinned: boolean) => scale.filter((s) => s.processes === p && s.pinned === pinned);
    const best = (p: number, pinned: boolean) => Math.min(...series(p, pinned).map((s) => s.ms));
    const efficiency = (pinned: boolean) => round(median(series(2, pinned).map((s) => s.shards_per_cpu_second)) / median(series(1, pinned).map((s) => s.shards_per_cpu_second)));
    return {
      bench: 'queue',
      date: new Date().toISOString(),
      node: process.version,
      cores: cpus().length,
      redis: privateRedis ? 'a private redis-server started by the bench' : redactPassword(redisUrl),
      postgres: server.url ? redactPassword(server.url) : null,
      ...(server.note ? { postgres_note: server.note } : {}),
      concurrency,
      floor: 'no-op jobs through a bare BullMQ Queue + Worker on the same Redis, the same concurrency, removeOnComplete',
      tiny_patients: TINY,
      cpu_bound_patients: CPU_BOUND,
      tiny,
      scale_out: scale,
      ...(scaleNote ? { scale_out_note: scaleNote } : {}),
      ...(scale.length
        ? {
            scale_out_ratio: round(best(1, false) / best(2, false)),
            scale_out_cpu_efficiency: efficiency(false),
            ...(scale.some((f) => f.pinned)
              ? { scale_out_ratio_pinned: round(best(1, true) / best(2, true)), scale_out_cpu_efficiency_pinned: efficiency(true) }
              : { scale_out_pinned_note: 'skipped: needs taskset (util-linux) and 2 cores' }),
            machine_speedup_ceiling: ceiling,
          }
        : {}),
      ...(waveFigure ? { load_wave: waveFigure } : { load_wave_note: waveNote }),
      goal: { per_shard_ms: 3, scale_out_ratio: 1.8 },
    };
  } finally {
    await privateRedis?.stop();
    await rm(work, { recursive: true, force: true });
  }
}

export function printQueueTables(r: QueueBenchResult): void {
  if (r.postgres_note) console.log(`Postgres: ${r.postgres_note}`);
  printTable([
    ['tiny shards (32 x 32 x 8)', 'shards', 'total ms', 'ms per shard', 'cpu ms per shard', 'main thread busy', 'first shard ms', 'step ms', 'bare BullMQ ms per job', 'ratio'],
    ...r.tiny.map((f) => [f.db, String(f.shards), String(f.ms), f.per_shard_ms.toFixed(2), f.cpu_per_shard_ms.toFixed(2), `${Math.round(f.main_thread_busy * 100)} %`, String(f.first_shard_ms), String(f.step_ms), f.floor_per_job_ms.toFixed(3), `${f.ratio}x`]),
  ]);
  console.log('');
  if (r.scale_out_note) console.log(`scale-out: ${r.scale_out_note}`);
  else {
    printTable([
      [`CPU-bound shards (${CPU_BOUND.join(' x ')})`, 'shards', 'total ms', 'ms per shard', 'first shard ms', 'worker cores busy', 'shards per worker CPU-second'],
      ...r.scale_out.map((s) => [
        `${s.processes} worker process(es)${s.pinned ? ', a core each' : ''}`,
        String(s.shards),
        String(s.ms),
        s.per_shard_ms.toFixed(1),
        String(s.first_shard_ms),
        s.worker_cores_busy.toFixed(2),
        s.shards_per_cpu_second.toFixed(1),
      ]),
    ]);
    console.log(
      `two processes / one (best of each): ${r.scale_out_ratio}x as the OS places them, ${r.scale_out_ratio_pinned ? `${r.scale_out_ratio_pinned}x` : `not measured (${r.scale_out_pinned_note})`} with a core each (goal ${r.goal.scale_out_ratio}x); ` +
        `the machine's own speed-up from its second core, before / after: ${(r.machine_speedup_ceiling ?? []).map((c) => `${c}x`).join(' / ')}`,
    );
    console.log(
      `shards per worker CPU-second, two processes / one (medians): ${r.scale_out_cpu_efficiency}x as the OS places them` +
        `${r.scale_out_cpu_efficiency_pinned ? `, ${r.scale_out_cpu_efficiency_pinned}x with a core each` : ''} (1.0: the second process costs no CPU in coordination)`,
    );
  }
  console.log('');
  const w = r.load_wave;
  if (!w) console.log(`load wave: ${r.load_wave_note}`);
  else {
    const fp = (f: RedisFootprint) => `${f.keys} keys, ${mb(f.bytes)}`;
    console.log(
      `load wave: ${w.runs} runs created at once, ${w.shards} tiny shards, ${w.worker_processes} worker processes: drained in ${w.seconds} s (${w.shards_per_second} shards/s); ` +
        `${w.runs_succeeded} of ${w.runs} runs succeeded, ${w.patients_done} patients done in Postgres`,
    );
    console.log(`  left in the queues: ${LEFT_STATES.map((k) => `${k} ${w.left[k]}`).join(', ')}`);
    console.log(
      `  Redis under the bench's prefix: before ${fp(w.redis_before)}; peak ${fp(w.redis_peak)}; after ${fp(w.redis_after)} ` +
        `(event streams ${mb(w.redis_after.streamBytes)}; jobs kept by the retention policy ${JSON.stringify(w.redis_after.jobs)})`,
    );
  }
}

function parseArgs(args: string[]): QueueBenchOptions {
  const o: QueueBenchOptions = {};
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (a === '--shards') o.shards = args[++i]!.split(',').map(Number);
    else if (a === '--db') o.dbs = args[++i]!.split(',') as DbKind[];
    else if (a === '--no-scale-out') o.scaleOut = false;
    else if (a === '--no-load-wave') o.loadWave = false;
    else throw new Error(`unknown argument ${a} (usage: bench/queue.ts [--shards 100,1000,10000] [--db pglite,postgres] [--no-scale-out] [--no-load-wave])`);
  }
  if (o.shards?.some((n) => !Number.isInteger(n) || n < 1)) throw new Error('--shards takes positive integers, e.g. --shards 100,1000,10000');
  return o;
}

const invoked = process.argv[1] ? pathToFileURL(realpathSync(process.argv[1])).href : '';
if (invoked === import.meta.url) {
  (async () => {
    const result = await runQueueBench(parseArgs(process.argv.slice(2)));
    printQueueTables(result);
    await writeResult(resolve(here, 'results/queue.json'), result);
  })()
    .catch((err) => {
      console.error(err);
      process.exitCode = 1;
    })
    // A forced worker host leaves its step threads to the process's exit (host.ts): this is it.
    .finally(() => process.exit());
}
