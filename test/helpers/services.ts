import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll } from 'vitest';
import { createApp } from '../../src/api/app.ts';
import { createContext, type AppContext } from '../../src/context.ts';
import type { DbHandle } from '../../src/db/client.ts';
import { freshDb, type DbKind } from './db.ts';
import { createLogger } from '../../src/lib/logger.ts';
import { assertRedisReachable } from '../../src/queues/connection.ts';
import { startWorkers, type WorkerHost, type WorkerHostOptions } from '../../src/workers/host.ts';

/** The real services the suite runs against; `.ci/services.sh` starts them and prints these variables. */
export const TEST_REDIS_URL = process.env.TEST_REDIS_URL ?? 'redis://127.0.0.1:6390';
export const TEST_DATABASE_URL = process.env.TEST_DATABASE_URL ?? 'postgres://slicewise:slicewise@127.0.0.1:5432/slicewise_test';
export const FIXTURES = resolve(process.env.SLICEWISE_FIXTURES ?? join(__dirname, '../../../shared/fixtures'));

export type { DbKind } from './db.ts';

export { freshDb };

export interface Harness {
  ctx: AppContext;
  app: ReturnType<typeof createApp>;
  db: DbHandle & { url?: string };
  dataDir: string;
  workers?: WorkerHost;
  close(): Promise<void>;
}

/** Real Redis (own key prefix), a real database, real workers in this process, and the Hono app. */
export async function harness(kind: DbKind, { workers = true, workerOptions }: { workers?: boolean; workerOptions?: WorkerHostOptions } = {}): Promise<Harness> {
  await assertRedisReachable(TEST_REDIS_URL).catch((err) => {
    throw new Error(`${err.message}\nStart the test services with: eval "$(bash .ci/services.sh)"`);
  });
  const db = await freshDb(kind);
  const dataDir = await mkdtemp(join(tmpdir(), 'slicewise-test-'));
  const prefix = `swt${randomBytes(3).toString('hex')}`;
  const ctx = createContext({ db: db.db, redisUrl: TEST_REDIS_URL, dataDir, prefix, logger: createLogger('test', process.env.TEST_LOG_LEVEL ?? 'silent') });
  const host = workers ? await startWorkers(ctx, workerOptions) : undefined;
  return {
    ctx,
    app: createApp(ctx),
    db,
    dataDir,
    workers: host,
    async close() {
      await host?.close(true);
      // Leave no keys behind in the shared test Redis.
      const keys = await ctx.redis.keys(`${prefix}:*`);
      for (let i = 0; i < keys.length; i += 500) await ctx.redis.del(...keys.slice(i, i + 500));
      await ctx.close();
      await db.close();
      await rm(dataDir, { recursive: true, force: true });
    },
  };
}

export async function json<T = any>(res: Response): Promise<T> {
  const text = await res.text();
  try {
    return JSON.parse(text) as T;
  } catch {
    throw new Error(`expected JSON, got ${res.status}: ${text.slice(0, 500)}`);
  }
}

/** Polls GET /runs/:id until the run ends (or the timeout passes, which fails the test with the last state). */
export async function waitForRun(app: Harness['app'], runId: string, timeoutMs = 90_000): Promise<any> {
  const deadline = Date.now() + timeoutMs;
  let last: any;
  while (Date.now() < deadline) {
    last = await json(await app.request(`/runs/${runId}`));
    if (['succeeded', 'failed', 'cancelled'].includes(last.status)) return last;
    await new Promise((r) => setTimeout(r, 200));
  }
  throw new Error(`run ${runId} did not finish in ${timeoutMs} ms; last state: ${JSON.stringify(last, null, 2)}`);
}

export function postRun(app: Harness['app'], body: unknown, headers: Record<string, string> = {}) {
  return app.request('/runs', { method: 'POST', body: JSON.stringify(body), headers: { 'content-type': 'application/json', ...headers } });
}

/**
 * A harness and a scratch folder for one describe block: made before its tests, closed and removed after them.
 * Read `scope.h` and `scope.root` inside the tests.
 */
export function harnessWithScratch(kind: DbKind, scratchPrefix: string): { h: Harness; root: string } {
  const scope = {} as { h: Harness; root: string };
  beforeAll(async () => {
    scope.h = await harness(kind);
    scope.root = await mkdtemp(join(tmpdir(), scratchPrefix));
  });
  afterAll(async () => {
    await scope.h?.close();
    if (scope.root) await rm(scope.root, { recursive: true, force: true });
  });
  return scope;
}
