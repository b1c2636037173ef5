/**
 * Throwaway databases, for tests and benchmarks alike (so no vitest import here): an in-memory PGlite, or a new
 * database on a Postgres server, dropped on close.
 */
import { randomBytes } from 'node:crypto';
import pg from 'pg';
import { openDb, type DbHandle } from '../../src/db/client.ts';

export type DbKind = 'pglite' | 'postgres';

const DEFAULT_SERVER = process.env.TEST_DATABASE_URL ?? 'postgres://slicewise:slicewise@127.0.0.1:5432/slicewise_test';

/** A fresh database: a throwaway PGlite, or a new database named `<namePrefix>_<hex>` on `serverUrl`. */
export async function freshDb(kind: DbKind, { serverUrl = DEFAULT_SERVER, namePrefix = 'slicewise_t' }: { serverUrl?: string; namePrefix?: string } = {}): Promise<DbHandle & { url?: string }> {
  if (kind === 'pglite') return openDb({ url: '', pgliteDir: 'memory://' });
  const name = `${namePrefix}_${randomBytes(4).toString('hex')}`;
  const admin = new pg.Client({ connectionString: serverUrl });
  await admin.connect().catch((err) => {
    throw new Error(`Postgres at ${serverUrl} is not reachable (${err.message}); run: eval "$(bash .ci/services.sh)"`);
  });
  await admin.query(`create database ${name}`);
  await admin.end();
  const url = new URL(serverUrl);
  url.pathname = `/${name}`;
  const h = await openDb({ url: url.toString() });
  return {
    ...h,
    url: url.toString(),
    async close() {
      await h.close();
      const a = new pg.Client({ connectionString: serverUrl });
      await a.connect();
      await a.query(`drop database if exists ${name} with (force)`);
      await a.end();
    },
  };
}
