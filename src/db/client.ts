import { AsyncLocalStorage } from 'node:async_hooks';
import { mkdir } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { drizzle as drizzlePg } from 'drizzle-orm/node-postgres';
import { migrate as migratePg } from 'drizzle-orm/node-postgres/migrator';
import { drizzle as drizzlePglite } from 'drizzle-orm/pglite';
import { migrate as migratePglite } from 'drizzle-orm/pglite/migrator';
import type { PgDatabase, PgQueryResultHKT } from 'drizzle-orm/pg-core';
import { sql } from 'drizzle-orm';
import pg from 'pg';
import { PGlite } from '@electric-sql/pglite';
import * as schema from './schema.ts';
import { SliceWiseError } from '../lib/errors.ts';
import { redactPassword } from '../lib/redact.ts';
import { env } from '../env.ts';
import { createLogger, type Logger } from '../lib/logger.ts';

export type Db = PgDatabase<PgQueryResultHKT, typeof schema>;

export interface DbHandle {
  db: Db;
  /** 'postgres' for a server, 'pglite' for the embedded one. */
  kind: 'postgres' | 'pglite';
  /** Printable location: a URL with the password masked, or the PGlite directory. */
  where: string;
  close(): Promise<void>;
}

export interface OpenDbOptions {
  /** A postgres:// URL. Default: DATABASE_URL; when neither is set, PGlite in `pgliteDir`. */
  url?: string;
  /** Where the embedded PGlite keeps its files. Default: `<dataDir>/pglite`; 'memory://' for a throwaway one. */
  pgliteDir?: string;
  /** Apply pending migrations on open. Default: true. */
  migrate?: boolean;
  /** Where a Postgres outage is reported (once when it starts, once when it ends). Default: a new logger. */
  logger?: Logger;
}

/**
 * Statements issued inside `waitingOutDbOutages` (a step's job, see workers/runner.ts) wait out a Postgres outage:
 * on a lost or refused connection they are sent again, with backoff, for up to DB_OUTAGE_WAIT_MS. Everything else
 * (an API request, /healthz) fails at once, as a caller waiting for an answer wants. Only statements that are safe
 * to send twice may run inside: every write of a step is an upsert or a guarded update.
 */
const waitingOut = new AsyncLocalStorage<true>();
const DB_OUTAGE_WAIT_MS = 10 * 60_000;
const DB_RETRY_FIRST_MS = 100;
const DB_RETRY_MAX_MS = 5000;

export function waitingOutDbOutages<T>(fn: () => Promise<T>): Promise<T> {
  return waitingOut.run(true, fn);
}

/** A lost, refused or timed-out connection, or a server shutting down or refusing connections (SQLSTATE 08, 57P0x). */
function isConnectionLoss(err: unknown): boolean {
  const e = err as { code?: unknown; message?: unknown };
  const code = typeof e?.code === 'string' ? e.code : '';
  if (['ECONNREFUSED', 'ECONNRESET', 'EPIPE', 'ETIMEDOUT', 'EHOSTUNREACH', 'ENETUNREACH', 'EAI_AGAIN', '53300'].includes(code)) return true;
  if (/^08/.test(code) || /^57P0/.test(code)) return true;
  return /Connection terminated|connection timeout|timeout exceeded when trying to connect|not queryable|ECONNREFUSED|ECONNRESET/i.test(String(e?.message ?? ''));
}

/** Says once that the database went away and once that it is back, however many statements wait meanwhile. */
class OutageLog {
  private since: number | undefined;
  private failures = 0;
  constructor(
    private readonly where: string,
    private readonly log: Logger,
  ) {}
  lost(err: unknown): void {
    this.failures++;
    if (this.since !== undefined) return;
    this.since = Date.now();
    const msg = (err as Error)?.message ?? String(err);
    this.log.warn({ db: this.where, err: msg }, `Postgres at ${this.where} is unreachable (${msg}); steps wait for it and retry their database writes`);
  }
  ok(): void {
    if (this.since === undefined) return;
    const s = ((Date.now() - this.since) / 1000).toFixed(1);
    this.log.info({ db: this.where, seconds: Number(s) }, `Postgres at ${this.where} is reachable again after ${s} s (${this.failures} attempt(s) failed meanwhile); the steps go on`);
    this.since = undefined;
    this.failures = 0;
  }
}

async function retryingConnectionLoss<T>(outage: OutageLog, send: () => Promise<T>): Promise<T> {
  const start = Date.now();
  for (let delay = DB_RETRY_FIRST_MS; ; delay = Math.min(delay * 2, DB_RETRY_MAX_MS)) {
    try {
      const res = await send();
      outage.ok();
      return res;
    } catch (err) {
      if (!isConnectionLoss(err) || Date.now() - start + delay > DB_OUTAGE_WAIT_MS) throw err;
      outage.lost(err);
      await new Promise((r) => setTimeout(r, delay));
    }
  }
}

const MIGRATIONS = fileURLToPath(new URL('../../migrations', import.meta.url));

export async function openDb({ url = env().databaseUrl, pgliteDir, migrate = true, logger }: OpenDbOptions = {}): Promise<DbHandle> {
  if (url) {
    // A connection that cannot be made in 10 s fails (and, inside a step, is tried again) rather than hang.
    const pool = new pg.Pool({ connectionString: url, max: 10, connectionTimeoutMillis: 10_000 });
    // An idle client that loses its server emits 'error' on the pool; without a listener that kills the process.
    pool.on('error', () => {});
    const where = redactPassword(url);
    const outage = new OutageLog(where, logger ?? createLogger());
    // drizzle sends every statement outside a transaction through pool.query: the one place to wait out an outage.
    const send = pool.query.bind(pool) as (...args: unknown[]) => Promise<unknown>;
    pool.query = ((...args: unknown[]) => (waitingOut.getStore() ? retryingConnectionLoss(outage, () => send(...args)) : send(...args))) as typeof pool.query;
    const db = drizzlePg(pool, { schema }) as unknown as Db;
    try {
      await pool.query('select 1');
    } catch (err) {
      await pool.end().catch(() => {});
      throw new SliceWiseError(`cannot reach Postgres at ${where}: ${(err as Error).message}`, { status: 503, code: 'db_unreachable', cause: err });
    }
    if (migrate) await migratePg(drizzlePg(pool), { migrationsFolder: MIGRATIONS });
    return { db, kind: 'postgres', where, close: () => pool.end() };
  }
  const dir = pgliteDir ?? 'memory://';
  if (!dir.startsWith('memory://')) await mkdir(dir, { recursive: true });
  let client: PGlite;
  try {
    client = await PGlite.create(dir);
  } catch (err) {
    throw new SliceWiseError(
      `cannot open the embedded database in ${dir}: ${(err as Error).message}. ` +
        'PGlite serves one process: if another slicewise process uses this data dir, stop it or set DATABASE_URL.',
      { status: 503, code: 'db_unreachable', cause: err },
    );
  }
  const db = drizzlePglite(client, { schema }) as unknown as Db;
  if (migrate) await migratePglite(drizzlePglite(client), { migrationsFolder: MIGRATIONS });
  return { db, kind: 'pglite', where: dir, close: () => client.close() };
}

/** Cheap liveness probe for /healthz. */
export async function pingDb(db: Db): Promise<void> {
  await db.execute(sql`select 1`);
}
