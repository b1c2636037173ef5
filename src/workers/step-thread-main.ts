/**
 * The thread side of step-threads.ts: runs the body of a sandboxed step for each task the main thread posts, and
 * answers with progress, log lines and the outcome or the error. No database and no Redis here.
 */
import { parentPort } from 'node:worker_threads';
import type { Config } from '../config/schema.ts';
import type { StepContext } from './define.ts';
import { SANDBOXED_STEPS } from './sandboxed.ts';
import { serializeError, type FromThread, type ToThread } from './step-threads.ts';

const port = parentPort!;
const send = (m: FromThread) => port.postMessage(m);
const aborts = new Map<number, AbortController>();

port.on('message', (m: ToThread) => {
  if (m.type === 'abort') {
    aborts.get(m.id)?.abort(new Error('the run was cancelled or the worker is shutting down'));
    return;
  }
  const { id } = m;
  const abort = new AbortController();
  aborts.set(id, abort);
  void (async () => {
    try {
      const def = SANDBOXED_STEPS.find((d) => d.name === m.jobName);
      if (!def) throw new Error(`no sandboxed step named '${m.jobName}' in this version`);
      const s: StepContext<unknown> & { prepared: unknown } = {
        prepared: m.prepared,
        data: def.data.parse(m.data),
        run: m.run,
        config: m.run.config as Config,
        signal: abort.signal,
        progress: async (counts) => send({ type: 'progress', id, counts }),
        childResults: async () => m.childResults,
        log: (message) => send({ type: 'log', id, message }),
      };
      send({ type: 'done', id, outcome: await def.run(s) });
    } catch (err) {
      send({ type: 'error', id, error: serializeError(err) });
    } finally {
      aborts.delete(id);
    }
  })();
});
