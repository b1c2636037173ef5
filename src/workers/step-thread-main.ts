/**
 * The thread side of step-threads.ts: runs the body of a sandboxed step for each task the main thread posts, and
 * answers with progress, log lines and the outcome or the error. No database and no Redis here.
 */
import { parentPort } from 'node:worker_threads';
import type { Config } from '../config/schema.ts';
import type { SandboxedStep, StepContext } from './define.ts';
import type { RunRow } from '../db/schema.ts';
import { RUNS_KEPT_PER_THREAD, serializeError, type FromThread, type ToThread } from './step-threads.ts';

type AnyStep = SandboxedStep<any, any, any>; // eslint-disable-line @typescript-eslint/no-explicit-any

/**
 * The per-patient steps' modules, imported alone: the full list (sandboxed.ts) brings the model and evaluation
 * code, seconds of CPU to load in every new thread, which a thread that only preprocesses never runs. Any other
 * step loads the full list, so a sandboxed step missing here only starts slower.
 */
const LIGHT: Record<string, () => Promise<AnyStep>> = {
  preprocess_patient: async () => (await import('./preprocess-patient.ts')).preprocessPatientStep,
  preprocess_kaggle: async () => (await import('./preprocess-kaggle.ts')).preprocessKaggle,
};
const loaded = new Map<string, Promise<AnyStep | undefined>>();

function stepNamed(name: string): Promise<AnyStep | undefined> {
  let step = loaded.get(name);
  if (!step) {
    step = LIGHT[name]?.() ?? import('./sandboxed.ts').then((m) => m.SANDBOXED_STEPS.find((d) => d.name === name));
    loaded.set(name, step);
  }
  return step;
}

// Loaded while the thread waits for its first task (the pool starts threads early): the per-patient step's module.
void stepNamed('preprocess_patient').catch(() => undefined);

const port = parentPort!;
const send = (m: FromThread) => port.postMessage(m);
const aborts = new Map<number, AbortController>();
/** The rows of the runs this thread has had tasks of, oldest first (see ToThread). */
const runs = new Map<string, RunRow>();

port.on('message', (m: ToThread) => {
  if (m.type === 'abort') {
    aborts.get(m.id)?.abort(new Error('the run was cancelled or the worker is shutting down'));
    return;
  }
  const { id } = m;
  if (m.run) {
    runs.set(m.runId, m.run);
    if (runs.size > RUNS_KEPT_PER_THREAD) runs.delete(runs.keys().next().value!);
  }
  const run = runs.get(m.runId);
  const abort = new AbortController();
  aborts.set(id, abort);
  void (async () => {
    try {
      if (!run) throw new Error(`step thread: no row of run ${m.runId} was sent with its first task`);
      const def = await stepNamed(m.jobName);
      if (!def) throw new Error(`no sandboxed step named '${m.jobName}' in this version`);
      const s: StepContext<unknown> & { prepared: unknown } = {
        prepared: m.prepared,
        // Parsed by the main thread before it was posted (runner.ts): not again here.
        data: m.data,
        run,
        config: run.config as Config,
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
