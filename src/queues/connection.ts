import { EventEmitter } from 'node:events';
import { Redis, type RedisOptions } from 'ioredis';
import { env } from '../env.ts';
import { SliceWiseError } from '../lib/errors.ts';
import { createLogger } from '../lib/logger.ts';
import { redactPassword } from '../lib/redact.ts';

/**
 * BullMQ needs `maxRetriesPerRequest: null` on worker connections (blocking commands must not be cut short).
 * Every connection in the process comes from here so the options stay consistent, and so one health watcher per
 * Redis sees every connection's ups and downs (see RedisHealth).
 */
export function createRedis(url: string, extra: RedisOptions = {}): Redis {
  const r = new Redis(url, { maxRetriesPerRequest: null, enableReadyCheck: true, lazyConnect: false, ...extra });
  // ioredis reconnects on its own; an unhandled 'error' event would crash the process instead. What the
  // operator needs to know about a lost Redis, the health watcher says once per interval.
  r.on('error', () => {});
  redisHealth(url).track(r);
  return r;
}

const CONNECTION_CODES = new Set(['ECONNREFUSED', 'ECONNRESET', 'ETIMEDOUT', 'EPIPE', 'EHOSTUNREACH', 'ENETUNREACH', 'ENOTFOUND', 'EAI_AGAIN', 'ECONNABORTED']);

/**
 * True for the errors every Redis client throws while Redis is down or coming back (refused, reset, closed,
 * still loading its AOF). These are the health watcher's to report; anything else is a real error worth a line.
 */
export function isConnectionError(err: unknown): boolean {
  const e = err as { code?: string; message?: string } | undefined;
  if (e?.code && CONNECTION_CODES.has(e.code)) return true;
  return /Connection is closed|connect ETIMEDOUT|ECONNREFUSED|ECONNRESET|Stream isn't writeable|enableOfflineQueue|^LOADING|Socket closed unexpectedly/.test(e?.message ?? '');
}

/** `host:port` of a Redis URL, for log lines (no credentials). */
export function redisWhere(url: string): string {
  try {
    const u = new URL(url);
    return `${u.hostname}:${u.port || '6379'}`;
  } catch {
    return redactPassword(url);
  }
}

export type HealthReporter = (level: 'info' | 'warn', line: string) => void;

/**
 * How this process sees one Redis: down from the first connection that loses it (ioredis 'reconnecting', or a
 * refused connect) until one is ready again. ioredis retries every connection on its own, and BullMQ forwards
 * each failed attempt as an 'error' event of every Queue and Worker on it: dozens of lines a second during an
 * outage. Those events are dropped (createRedis, context.ts, workers/host.ts) and this watcher says instead,
 * once, that Redis is gone, then once per interval how long for, then that it is back.
 *
 * Events: 'down', 'up' (with the outage's length in ms), 'deadline' (once per outage, when it has lasted
 * SLICEWISE_REDIS_DEADLINE_MS; the owner of a run decides what that means).
 */
export class RedisHealth extends EventEmitter {
  readonly where: string;
  readonly deadlineMs: number;
  /** How often an ongoing outage is reported: every 10 s, or a third of the deadline when that is shorter. */
  readonly reportEveryMs: number;
  private clients = new Set<Redis>();
  private downSince: number | undefined;
  private lastCause = '';
  private reported = 0;
  private deadlineFired = false;
  private timer: NodeJS.Timeout | undefined;
  private report: HealthReporter;
  /** What the process does about an outage, appended to each line: "retrying (the run fails after 60 s, ...)". */
  private consequence = '';

  constructor(url: string) {
    super();
    this.where = redisWhere(url);
    this.deadlineMs = env().redisDeadlineMs;
    this.reportEveryMs = Math.max(1000, Math.min(10_000, Math.round(this.deadlineMs / 3)));
    const logger = createLogger('slicewise');
    this.report = (level, line) => logger[level]({ redis: this.where }, line);
  }

  /** Where the lines go (the pipeline command narrates on stderr; services log through pino) and what is at stake. */
  configure({ report, consequence }: { report?: HealthReporter; consequence?: string }): this {
    if (report) this.report = report;
    if (consequence !== undefined) this.consequence = consequence;
    return this;
  }

  track(r: Redis): void {
    this.clients.add(r);
    r.on('ready', () => this.markUp());
    r.on('reconnecting', () => this.markDown());
    r.on('error', (err: Error) => {
      if (!isConnectionError(err)) return;
      this.lastCause = (err as { code?: string }).code ?? err.message;
      // A refused first connect never reaches 'reconnecting' when retries are off.
      if (r.status !== 'ready') this.markDown();
    });
    // Closed on purpose (disconnect, quit): no longer a witness either way.
    r.on('end', () => {
      this.clients.delete(r);
      if (this.clients.size === 0) this.reset();
    });
  }

  reachable(): boolean {
    return this.downSince === undefined;
  }

  /** How long Redis has been unreachable (0 when it is not). */
  downForMs(): number {
    return this.downSince === undefined ? 0 : Date.now() - this.downSince;
  }

  private markDown(): void {
    if (this.downSince !== undefined) return;
    this.downSince = Date.now();
    this.reported = 0;
    this.deadlineFired = false;
    this.emit('down');
    // Checked every 250 ms: cheap, and the deadline is kept to within a quarter of a second.
    this.timer = setInterval(() => this.tick(), 250);
    this.timer.unref();
  }

  private tick(): void {
    if (this.downSince === undefined) return;
    const ms = Date.now() - this.downSince;
    if (ms >= (this.reported + 1) * this.reportEveryMs) {
      this.reported = Math.floor(ms / this.reportEveryMs);
      const cause = this.lastCause ? ` (${this.lastCause})` : '';
      this.report('warn', `Redis at ${this.where} unreachable for ${Math.round(ms / 1000)} s${cause}; retrying${this.consequence ? ` (${this.consequence})` : ''}`);
    }
    if (!this.deadlineFired && ms >= this.deadlineMs) {
      this.deadlineFired = true;
      this.emit('deadline', ms);
    }
  }

  private markUp(): void {
    if (this.downSince === undefined) return;
    const ms = Date.now() - this.downSince;
    // A blip that healed before the first report is not worth a line either way.
    if (this.reported > 0) this.report('info', `Redis at ${this.where} is back after ${(ms / 1000).toFixed(1)} s`);
    this.reset();
    this.emit('up', ms);
  }

  private reset(): void {
    clearInterval(this.timer);
    this.timer = undefined;
    this.downSince = undefined;
    this.lastCause = '';
  }
}

const healthByUrl = new Map<string, RedisHealth>();

/** The one health watcher of this process for a Redis URL. */
export function redisHealth(url: string): RedisHealth {
  let h = healthByUrl.get(url);
  if (!h) healthByUrl.set(url, (h = new RedisHealth(url)));
  return h;
}

/** Resolves with `promise`, or with undefined after `ms`: for shutdown paths that must not wait on a dead Redis. */
export async function within<T>(ms: number, promise: Promise<T>): Promise<T | undefined> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([promise.catch(() => undefined), new Promise<undefined>((res) => (timer = setTimeout(() => res(undefined), ms)))]);
  } finally {
    clearTimeout(timer);
  }
}

/** Fails fast, with the URL in the message, when Redis is not there: better than a worker hanging in reconnects. */
export async function assertRedisReachable(url: string, timeoutMs = 3000): Promise<void> {
  const probe = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null, connectTimeout: timeoutMs });
  probe.on('error', () => {});
  try {
    await probe.connect();
    await probe.ping();
    const policy = (await probe.config('GET', 'maxmemory-policy').catch(() => [])) as string[];
    if (policy[1] && policy[1] !== 'noeviction') {
      process.emitWarning(`Redis at ${redactPassword(url)} has maxmemory-policy ${policy[1]}; BullMQ needs noeviction or jobs can vanish`);
    }
  } catch (err) {
    throw new SliceWiseError(`cannot reach Redis at ${redactPassword(url)}: ${(err as Error).message}. Is redis-server running? (set REDIS_URL, or unset it to let slicewise start a private one)`, {
      status: 503,
      code: 'redis_unreachable',
      cause: err,
    });
  } finally {
    probe.disconnect();
  }
}
