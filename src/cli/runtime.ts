import { resolve } from 'node:path';
import { createContext, type AppContext } from '../context.ts';
import { openDb, type DbHandle } from '../db/client.ts';
import { SliceWiseError } from '../lib/errors.ts';
import { createLogger } from '../lib/logger.ts';
import { assertRedisReachable, within } from '../queues/connection.ts';
import { redactPassword } from '../lib/redact.ts';
import { installRedisIfPossible, RedisMissingError, startPrivateRedis, type PrivateRedis } from './redis-server.ts';
import { env } from '../env.ts';
import { pgliteDir, redisDir } from '../disk/layout.ts';

export interface RuntimeOptions {
  dataDir: string;
  /** Refuse the embedded database (for processes that must share one with others). Default: false. */
  needsSharedDb?: boolean;
  say?: (line: string) => void;
  /** Default: LOG_LEVEL or 'info'. The pipeline command narrates by itself and only wants warnings. */
  logLevel?: string;
}

export interface Runtime {
  ctx: AppContext;
  db: DbHandle;
  /** True when both Redis and the database are this process's own (no REDIS_URL, no DATABASE_URL). */
  embedded: boolean;
  /**
   * What to do when this process's own Redis is lost for good (its supervisor gave up). Default: say why and
   * exit 1; `slicewise pipeline` fails its run first.
   */
  onFatal(cb: (err: SliceWiseError) => void): void;
  /** `force`: each part gets a moment and no more (a second signal, a dead Redis). */
  close(force?: boolean): Promise<void>;
}

/** Resolves Redis and the database from the environment, starting private ones where none is given. */
export async function openRuntime({ dataDir, needsSharedDb = false, say = (l) => console.error(l), logLevel }: RuntimeOptions): Promise<Runtime> {
  dataDir = resolve(dataDir);
  const logger = createLogger('slicewise', logLevel ?? env().logLevel ?? 'info');
  let privateRedis: PrivateRedis | undefined;
  const settings = env();
  let redisUrl = settings.redisUrl;
  if (redisUrl) {
    await assertRedisReachable(redisUrl);
  } else {
    if (!installRedisIfPossible(say)) throw new RedisMissingError();
    privateRedis = await startPrivateRedis(dataDir, { say });
    redisUrl = privateRedis.url;
    say(`Started a private redis-server at ${redisUrl} (data in ${redisDir(dataDir)}); it stops when this command exits`);
  }
  if (needsSharedDb && !settings.databaseUrl) {
    await privateRedis?.stop();
    throw new SliceWiseError(
      'this process must share its database with others, and the embedded PGlite serves one process only: set DATABASE_URL=postgres://... (e.g. `docker compose up -d postgres`)',
      { status: 400, code: 'needs_database_url' },
    );
  }
  let db: DbHandle;
  try {
    db = await openDb({ pgliteDir: pgliteDir(dataDir) });
  } catch (err) {
    await privateRedis?.stop();
    throw err;
  }
  say(db.kind === 'pglite' ? `Database: embedded PGlite in ${db.where}` : `Database: ${db.where}`);
  if (!privateRedis) say(`Redis: ${redactPassword(redisUrl)}`);
  const ctx = createContext({ db: db.db, redisUrl, dataDir, logger, prefix: settings.queuePrefix });
  let fatal: (err: SliceWiseError) => void = (err) => {
    say(`Error: ${err.message}`);
    process.exit(1);
  };
  privateRedis?.onGiveUp((err) => fatal(err));
  return {
    ctx,
    db,
    embedded: !settings.redisUrl && !settings.databaseUrl,
    onFatal(cb) {
      fatal = cb;
    },
    async close(force = false) {
      await within(force ? 500 : 5000, ctx.close());
      // PGlite writes its files as it goes; closing it is what a forced stop should still try to do.
      await within(force ? 1000 : 30_000, db.close());
      await privateRedis?.stop(force ? 1000 : 5000);
    },
  };
}
