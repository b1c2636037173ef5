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
}

const MIGRATIONS = fileURLToPath(new URL('../../migrations', import.meta.url));

export async function openDb({ url = env().databaseUrl, pgliteDir, migrate = true }: OpenDbOptions = {}): Promise<DbHandle> {
  if (url) {
    const pool = new pg.Pool({ connectionString: url, max: 10 });
    // An idle client that loses its server emits 'error' on the pool; without a listener that kills the process.
    pool.on('error', () => {});
    const db = drizzlePg(pool, { schema }) as unknown as Db;
    const where = redactPassword(url);
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
