/**
 * The step registry is what the flow builder and the worker host read: every job a run's flow can hold must be
 * registered, on the queue the flow puts it on, and that queue must be one some default worker consumes.
 */
import type { FlowJob } from 'bullmq';
import { describe, expect, it } from 'vitest';
import { loadConfig } from '../src/config/load.ts';
import { buildRunFlow } from '../src/producers/run-flow.ts';
import { DEFAULT_WORKER_QUEUES, MODEL_QUEUES, QUEUE_NAMES } from '../src/queues/names.ts';
import { PIPELINE_MODES } from '../src/runs/input.ts';
import { SHARD_JOBS, STEP_NAMES, stepsForMode } from '../src/runs/modes.ts';
import { attemptsOf } from '../src/workers/define.ts';
import { STEPS } from '../src/workers/registry.ts';
import { SANDBOXED_STEPS } from '../src/workers/sandboxed.ts';

/** What `slicewise worker` consumes by default, plus the model queues that `--queues train,evaluate` and `slicewise pipeline` add. */
const CONSUMED = new Set([...DEFAULT_WORKER_QUEUES, ...MODEL_QUEUES]);

function flatten(node: FlowJob): FlowJob[] {
  return [node, ...(node.children ?? []).flatMap(flatten)];
}

describe('step registry', () => {
  const config = loadConfig({ trainingMode: 'quick' });

  it('registers every step and shard job under its own name, on a queue some worker consumes', () => {
    for (const name of [...STEP_NAMES, ...SHARD_JOBS]) {
      const def = STEPS[name];
      expect(def, name).toBeDefined();
      expect(def.name).toBe(name);
      expect(QUEUE_NAMES).toContain(def.queue);
      expect(CONSUMED.has(def.queue), `${name} is on queue ${def.queue}, which no default worker consumes`).toBe(true);
      expect(attemptsOf(def, config)).toBeGreaterThanOrEqual(1);
    }
    expect(Object.keys(STEPS).sort()).toEqual([...STEP_NAMES, ...SHARD_JOBS].sort());
  });

  it.each(PIPELINE_MODES.filter((m) => stepsForMode(m).length > 0))('the %s flow holds exactly its mode\'s steps, each on its registered queue', (mode) => {
    const flow = buildRunFlow({ runId: 'run-x', mode, config });
    const jobs = flatten(flow);
    expect(jobs.map((j) => j.name).sort()).toEqual([...stepsForMode(mode)].sort());
    for (const j of jobs) {
      const def = STEPS[j.name as keyof typeof STEPS];
      expect(j.queueName).toBe(def.queue);
      expect(j.opts?.attempts).toBe(attemptsOf(def, config));
      expect(j.data).toEqual({ runId: 'run-x' });
      // Job data is shown in Bull Board and kept in Redis: it must pass the step's own schema as it is.
      expect(def.data.safeParse(j.data).success).toBe(true);
    }
    expect(flow.name).toBe('finalize');
  });

  it('step threads know every sandboxed step, and only those', () => {
    const sandboxed = Object.values(STEPS).filter((d) => d.sandboxed).map((d) => d.name).sort();
    expect(SANDBOXED_STEPS.map((d) => d.name).sort()).toEqual(sandboxed);
    expect(sandboxed).toEqual(['compare_phases', 'evaluate_multitask', 'generate_gradcam', 'preprocess_kaggle', 'preprocess_patient']);
  });
});
