/**
 * Secrets never leave the worker's environment: a whole data run with Kaggle credentials and a database password
 * set, then every place a secret could land is read back and searched for it: the process's own output (at debug
 * level), every key under the run's Redis prefix, Bull Board's API, every row of every table, every file of the
 * data dir and pipeline_results.json.
 */
import { randomBytes } from 'node:crypto';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Redis } from 'ioredis';
import { createApp } from '../src/api/app.ts';
import { createContext } from '../src/context.ts';
import { openDb } from '../src/db/client.ts';
import { createLogger } from '../src/lib/logger.ts';
import { runCli } from './helpers/cli.ts';
import { FIXTURES, TEST_DATABASE_URL, TEST_REDIS_URL } from './helpers/services.ts';
import { buildZip } from './helpers/zip.ts';

const KAGGLE_USER = `sw-user-${randomBytes(4).toString('hex')}`;
const KAGGLE_KEY = `kaggle-key-${randomBytes(16).toString('hex')}`;
const DB_PASSWORD = `db-pass-${randomBytes(16).toString('hex')}`;
/** Every form a secret could be written in: as is, in a Basic header, URL-encoded. */
const NEEDLES = [KAGGLE_KEY, DB_PASSWORD, Buffer.from(`${KAGGLE_USER}:${KAGGLE_KEY}`).toString('base64')];

async function listFiles(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const e of await readdir(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) out.push(...(await listFiles(p)));
    else if (e.isFile()) out.push(p);
  }
  return out;
}

function expectNoSecret(where: string, text: string) {
  for (const n of NEEDLES) expect(text.includes(n), `${where} holds a secret`).toBe(false);
}

describe('secrets stay out of job data, logs, Bull Board and the database', () => {
  let tmp: string;
  let kaggle: http.Server;
  let kaggleUrl: string;
  const role = `sw_secret_${randomBytes(3).toString('hex')}`;
  const dbName = `${role}_db`;
  let dbUrl: string;
  const prefix = `swsec${randomBytes(3).toString('hex')}`;
  const kaggleHits: string[] = [];

  beforeAll(async () => {
    tmp = await mkdtemp(join(tmpdir(), 'slicewise-secrets-'));
    // A role whose password is a fresh random secret, owning a fresh database.
    const admin = new pg.Client({ connectionString: TEST_DATABASE_URL });
    await admin.connect();
    await admin.query(`create role ${role} login password '${DB_PASSWORD}'`);
    // Membership lets the test's own role hand the new database to it (Postgres 15 asks for that).
    await admin.query(`grant ${role} to current_user`);
    await admin.query(`create database ${dbName} owner ${role}`);
    await admin.end();
    const u = new URL(TEST_DATABASE_URL);
    u.username = role;
    u.password = DB_PASSWORD;
    u.pathname = `/${dbName}`;
    dbUrl = u.toString();

    // A stand-in for the Kaggle API that insists on the credentials, serving real fixture images.
    const entries = [];
    for (const cls of ['yes', 'no']) {
      const files = (await readdir(join(FIXTURES, 'kaggle-navoneel', cls))).sort().slice(0, 6);
      for (const f of files) entries.push({ name: `brain_tumor_dataset/${cls}/${f}`, data: await readFile(join(FIXTURES, 'kaggle-navoneel', cls, f)) });
    }
    const zip = buildZip(entries);
    const expected = 'Basic ' + Buffer.from(`${KAGGLE_USER}:${KAGGLE_KEY}`).toString('base64');
    kaggle = http.createServer((req, res) => {
      kaggleHits.push(req.url ?? '');
      if (req.headers.authorization !== expected) {
        res.writeHead(401, { 'content-type': 'application/json' });
        return res.end(JSON.stringify({ code: 401, message: 'Unauthenticated' }));
      }
      if (req.url !== '/api/v1/datasets/download/navoneel/brain-mri') {
        res.writeHead(404);
        return res.end();
      }
      res.writeHead(200, { 'content-type': 'application/zip', 'content-length': zip.length });
      res.end(zip);
    });
    await new Promise<void>((r) => kaggle.listen(0, '127.0.0.1', () => r()));
    kaggleUrl = `http://127.0.0.1:${(kaggle.address() as AddressInfo).port}`;
  });

  afterAll(async () => {
    if (kaggle) await new Promise((r) => kaggle.close(r));
    const r = new Redis(TEST_REDIS_URL);
    const keys = await r.keys(`${prefix}:*`);
    for (let i = 0; i < keys.length; i += 500) await r.del(...keys.slice(i, i + 500));
    r.disconnect();
    const admin = new pg.Client({ connectionString: TEST_DATABASE_URL });
    await admin.connect();
    await admin.query(`drop database if exists ${dbName} with (force)`);
    await admin.query(`drop role if exists ${role}`);
    await admin.end();
    await rm(tmp, { recursive: true, force: true });
  });

  it('a data run with Kaggle credentials and a database password writes neither anywhere', async () => {
    const dataDir = join(tmp, 'data');
    const env: NodeJS.ProcessEnv = {
      ...process.env,
      REDIS_URL: TEST_REDIS_URL,
      DATABASE_URL: dbUrl,
      SLICEWISE_QUEUE_PREFIX: prefix,
      KAGGLE_USERNAME: KAGGLE_USER,
      KAGGLE_KEY,
      KAGGLE_CONFIG_DIR: join(tmp, 'no-kaggle-dir'),
      KAGGLE_API_BASE: `${kaggleUrl}/api/v1`,
      // The stand-in Kaggle API is on loopback, which downloads refuse unless the operator allows it.
      SLICEWISE_ALLOW_PRIVATE_NETWORKS: '1',
      LOG_LEVEL: 'debug',
      SLICEWISE_LOG: '',
    };
    const r = await runCli(
      ['pipeline', '--mode', 'data-only', '--brats-source', 'synthetic:3', '--kaggle-source', 'kaggle:navoneel/brain-mri', '--image-size', '32', '--data-dir', dataDir],
      tmp,
      env,
    );
    expect(r.code, r.out).toBe(0);
    // The credentials were really used: the stand-in saw the download and answered it.
    expect(kaggleHits).toContain('/api/v1/datasets/download/navoneel/brain-mri');

    // 1. Everything the process printed, at debug level.
    expectNoSecret('the pipeline output', r.out);

    // 2. Every key under the run's prefix in Redis (job data, results, events, logs).
    const redis = new Redis(TEST_REDIS_URL);
    const keys = await redis.keys(`${prefix}:*`);
    expect(keys.length).toBeGreaterThan(0);
    let redisText = '';
    for (const k of keys) {
      const type = await redis.type(k);
      const v =
        type === 'hash' ? await redis.hgetall(k)
        : type === 'list' ? await redis.lrange(k, '0', '-1')
        : type === 'zset' ? await redis.zrange(k, '0', '-1')
        : type === 'set' ? await redis.smembers(k)
        : type === 'stream' ? await redis.xrange(k, '-', '+')
        : type === 'string' ? await redis.get(k)
        : null;
      redisText += `${k} ${JSON.stringify(v)}\n`;
    }
    expect(redisText).toContain('kaggle:navoneel/brain-mri'); // the source is there, its secret is not
    expectNoSecret('Redis', redisText);

    // 3. Every row of every table.
    const client = new pg.Client({ connectionString: dbUrl });
    await client.connect();
    const tables = await client.query<{ tablename: string }>(`select tablename from pg_tables where schemaname in ('public', 'drizzle')`);
    let dbText = '';
    for (const { tablename } of tables.rows) {
      const rows = await client.query(`select * from "${tablename}"`).catch(() => client.query(`select * from drizzle."${tablename}"`));
      dbText += `${tablename} ${JSON.stringify(rows.rows)}\n`;
    }
    await client.end();
    expect(dbText).toContain('navoneel');
    expectNoSecret('Postgres', dbText);

    // 4. Bull Board: what an operator's browser is sent for every queue.
    const h = await openDb({ url: dbUrl });
    const ctx = createContext({ db: h.db, redisUrl: TEST_REDIS_URL, dataDir, prefix, logger: createLogger('test', 'silent') });
    try {
      const app = createApp(ctx);
      const queues = await app.request('/admin/queues/api/queues?activeQueue=download&status=completed&page=1');
      expect(queues.status).toBe(200);
      let board = await queues.text();
      for (const q of Object.keys(ctx.queues)) {
        for (const status of ['completed', 'failed', 'waiting', 'active']) {
          board += await (await app.request(`/admin/queues/api/queues?activeQueue=${q}&status=${status}&page=1`)).text();
        }
      }
      expect(board).toContain('download_kaggle');
      expectNoSecret('Bull Board', board);
      // And the REST API's view of the run.
      const runs = await (await app.request('/runs')).text();
      expectNoSecret('GET /runs', runs);
    } finally {
      await ctx.close();
      await h.close();
    }

    // 5. Every file the run wrote, and the results file in the working directory.
    for (const f of [...(await listFiles(dataDir)), join(tmp, 'pipeline_results.json')]) {
      expectNoSecret(f, (await readFile(f)).toString('latin1'));
    }
  });
});
