/**
 * A CI-size `full` run (synthetic data, 64 x 64, a few epochs, every stage and the evaluation) for tests that need
 * a trained model in a database: the demo's API tests make one; the browser suite makes one in its globalSetup and
 * every file attaches to it (attachHarness). About 30-60 s on two cores.
 */
import { openDb } from '../../src/db/client.ts';
import { createApp } from '../../src/api/app.ts';
import { createContext } from '../../src/context.ts';
import { createLogger } from '../../src/lib/logger.ts';
import { QUEUE_NAMES } from '../../src/queues/names.ts';
import { harness, json, postRun, TEST_REDIS_URL, waitForRun, type DbKind, type Harness } from './services.ts';

export interface TrainedRunOptions {
  epochs?: number;
  patients?: number;
  kaggleImages?: number;
}

/** Posts the run to the harness and waits for it to succeed; returns its id. Plain errors: usable outside a test. */
export async function trainCiRun(h: Harness, { epochs = 2, patients = 4, kaggleImages = 12 }: TrainedRunOptions = {}): Promise<string> {
  const res = await postRun(h.app, {
    mode: 'full',
    trainingMode: 'quick',
    sources: { brats: `synthetic:${patients}`, kaggle: `synthetic:${kaggleImages}` },
    overrides: { data: { image_size: 64, patients: { fraction: 1 } }, training: { epochs, batch_size: 8 } },
  });
  const body = await json(res);
  if (res.status !== 201) throw new Error(`POST /runs answered ${res.status}: ${JSON.stringify(body)}`);
  const runId: string = body.run.id;
  const done = await waitForRun(h.app, runId, 240_000);
  if (done.status !== 'succeeded') throw new Error(`the CI-size run ${runId} ended ${done.status}: ${done.error}`);
  return runId;
}

/** A harness whose workers consume every queue (so training and evaluation run), with a finished CI-size run. */
export async function harnessWithTrainedRun(kind: DbKind, opts: TrainedRunOptions = {}): Promise<{ h: Harness; runId: string; seconds: number }> {
  const t0 = Date.now();
  const h = await harness(kind, { workerOptions: { queues: [...QUEUE_NAMES] } });
  try {
    const runId = await trainCiRun(h, opts);
    return { h, runId, seconds: (Date.now() - t0) / 1000 };
  } catch (err) {
    await h.close();
    throw err;
  }
}

/** A finished run another process made, as a test file finds it (vitest's provide/inject: plain JSON). */
export interface SharedRun {
  databaseUrl: string;
  dataDir: string;
  /** BullMQ key prefix of the harness that made it (its jobs stay in Redis until that harness closes). */
  prefix: string;
  runId: string;
  epochs: number;
}

declare module 'vitest' {
  export interface ProvidedContext {
    sharedRun: SharedRun;
  }
}

/**
 * A harness over a shared run's database, data dir and queues, without workers. close() lets go of the
 * connections only: the run, its database and its files belong to whoever made them.
 */
export async function attachHarness(shared: SharedRun, appOptions: Parameters<typeof createApp>[1] = {}): Promise<Harness & { runId: string }> {
  const db = await openDb({ url: shared.databaseUrl, migrate: false });
  const ctx = createContext({ db: db.db, redisUrl: TEST_REDIS_URL, dataDir: shared.dataDir, prefix: shared.prefix, logger: createLogger('test', process.env.TEST_LOG_LEVEL ?? 'silent') });
  return {
    ctx,
    app: createApp(ctx, appOptions),
    db: { ...db, url: shared.databaseUrl },
    dataDir: shared.dataDir,
    runId: shared.runId,
    async close() {
      await ctx.close();
      await db.close();
    },
  };
}
