/**
 * The run watchdog: a run lives in two places, its rows in the database and its jobs in Redis. When Redis loses
 * the jobs (FLUSHALL, a restart without AOF, a new empty Redis behind the same URL), nothing would ever give the
 * run a verdict: no finalize job is left to run, and the run would say "running" forever. Every so often the
 * watchdog looks for each unfinished run's root job (its finalize, or the finalize of its latest retry); when it
 * is missing on two checks in a row, a running run is failed with a reason that says what happened, and a queued
 * one (none of its jobs has started, so nothing is lost) is queued again (runs/service.ts, ensureRunEnqueued).
 *
 * Worker hosts, the API and `slicewise pipeline` each run one; they may race, and the guarded update in the store
 * (finishRun settles a run once) makes the first one win and the others do nothing.
 *
 * It judges only a Redis it can talk to: while Redis is unreachable a missing answer says nothing about the jobs
 * (the connection health watcher reports the outage, and the pipeline's deadline handles a Redis that never returns).
 * It assumes one deployment per database: runs queued under another SLICEWISE_QUEUE_PREFIX would look jobless.
 */
import type { AppContext } from '../context.ts';
import { env } from '../env.ts';
import { jobId } from '../queues/names.ts';
import { STEPS } from '../workers/registry.ts';
import { ensureRunEnqueued } from './service.ts';
import { closeOpenSteps, finishRun, getRunRow, unfinishedRuns } from './store.ts';

export const JOBS_GONE = "the run's jobs are gone from Redis (flushed, or restarted without AOF)";

/** A run is failed only after this many checks in a row found no root job: one miss may be a run being set up. */
const STRIKES = 2;

export interface RunWatchdog {
  /** One round now: the runs it failed and those it queued again. */
  check(): Promise<{ failed: string[]; requeued: string[] }>;
  stop(): void;
}

const globChars = /[*?[\]\\]/g;

/** The Redis key of a run's root job, or of the root job of its latest retry; undefined when neither exists. */
async function rootJobKey(ctx: AppContext, runId: string): Promise<string | undefined> {
  const plain = `${ctx.prefix}:${STEPS.finalize.queue}:${jobId(runId, 'finalize')}`;
  if (await ctx.redis.exists(plain)) return plain;
  // A retried step hangs under a finalize of its own, `<run>.finalize.retry-<stamp>` (producers/run-flow.ts);
  // the first one may be gone by then (retention), so look for any.
  const pattern = `${plain.replace(globChars, '\\$&')}.retry-*`;
  let cursor = '0';
  do {
    const [next, keys] = await ctx.redis.scan(cursor, 'MATCH', pattern, 'COUNT', 1000);
    if (keys.length) return keys[0];
    cursor = next;
  } while (cursor !== '0');
  return undefined;
}

export function startRunWatchdog(ctx: AppContext, { intervalMs = env().watchdogMs }: { intervalMs?: number } = {}): RunWatchdog {
  const strikes = new Map<string, number>();
  let lastProblem = '';

  const check = async () => {
    const failed: string[] = [];
    const requeued: string[] = [];
    if (ctx.redis.status !== 'ready') return { failed, requeued };
    const unfinished = await unfinishedRuns(ctx.db);
    for (const { id, status } of unfinished) {
      if (await rootJobKey(ctx, id)) {
        strikes.delete(id);
        continue;
      }
      const n = (strikes.get(id) ?? 0) + 1;
      strikes.set(id, n);
      if (n < STRIKES) continue;
      strikes.delete(id);
      if (status === 'queued') {
        const run = await getRunRow(ctx.db, id);
        if (run && (await ensureRunEnqueued(ctx, run))) requeued.push(id);
        continue;
      }
      const root = `${ctx.prefix}:${STEPS.finalize.queue}:${jobId(id, 'finalize')}`;
      const message = `${JOBS_GONE}: its finalize job ${root} no longer exists, so nothing can finish it`;
      if (await finishRun(ctx.db, id, 'failed', { message, details: { reason: 'jobs_gone', rootJob: root } })) {
        await closeOpenSteps(ctx.db, id, 'skipped');
        ctx.logger.error({ runId: id, rootJob: root }, `Run ${id} failed: ${message}`);
        failed.push(id);
      }
    }
    for (const id of strikes.keys()) if (!unfinished.some((r) => r.id === id)) strikes.delete(id);
    return { failed, requeued };
  };

  let round: Promise<unknown> | undefined;
  const timer = setInterval(() => {
    // A round still waiting on Redis or the database is not joined by another.
    if (round) return;
    round = check()
      .then(() => (lastProblem = ''))
      .catch((err: Error) => {
        // Said once per distinct problem, not once per round.
        if (err.message !== lastProblem) ctx.logger.warn({ err: err.message }, `Run watchdog could not check the runs' jobs: ${err.message}`);
        lastProblem = err.message;
      })
      .finally(() => (round = undefined));
  }, intervalMs);
  // The watchdog never keeps a process alive by itself.
  timer.unref();
  return { check, stop: () => clearInterval(timer) };
}
