/**
 * The run as one BullMQ flow. Children run before parents:
 *
 *   finalize
 *   ├── split_brats  <- preprocess_brats (fans out one preprocess_patient job per patient) <- download_brats
 *   └── split_kaggle <- preprocess_kaggle <- download_kaggle
 *
 * With training (full, train-eval) the stages and the evaluation sit between the splits and finalize:
 *
 *   finalize <- compare_phases <- generate_gradcam <- evaluate_multitask
 *            <- train_stage3_joint <- train_stage2_cls_head <- train_stage1_seg_warmup <- [split_brats, split_kaggle]
 *
 * The evaluation steps need only the training's checkpoints, which they read from the steps' recorded results;
 * the chain orders them (one model job at a time on a training worker) and lets a failed one stop the rest.
 *
 * Inside a branch a failed child fails its parent (failParentOnFailure), so nothing waits forever in
 * waiting-children. The branches hang under finalize with ignoreDependencyOnFailure: finalize always runs once
 * every branch has settled, and it is the one place that gives the run its verdict.
 *
 * Each job's queue and retry policy come from its step's definition (workers/registry.ts); this file only
 * knows the shape.
 */
import type { FlowJob, JobsOptions } from 'bullmq';
import type { Config } from '../config/schema.ts';
import { jobId } from '../queues/names.ts';
import { STEP_RETENTION } from '../queues/retention.ts';
import type { PipelineMode } from '../runs/input.ts';
import { stepsForMode, type StepName } from '../runs/modes.ts';
import type { RunJobData } from '../workers/define.ts';
import { attemptsOf, backoffOf } from '../workers/define.ts';
import { STEPS } from '../workers/registry.ts';

export interface RunFlowInput {
  runId: string;
  mode: PipelineMode;
  config: Config;
}

/** One step's job: queue and retry policy from its definition, an id from run and step (and the retry's stamp). */
function stepJob(runId: string, config: Config, step: StepName, children: FlowJob[], extra: JobsOptions, idSuffix?: string): FlowJob {
  const def = STEPS[step];
  return {
    name: step,
    queueName: def.queue,
    data: { runId } satisfies RunJobData,
    opts: { jobId: jobId(runId, step, idSuffix), attempts: attemptsOf(def, config), backoff: backoffOf(def), ...STEP_RETENTION, ...extra },
    children,
  };
}

/** Branches hang under finalize with this: finalize runs once they have settled, failed or not. */
const BRANCH: JobsOptions = { failParentOnFailure: false, ignoreDependencyOnFailure: true };

export function buildRunFlow({ runId, mode, config }: RunFlowInput): FlowJob {
  const steps = new Set(stepsForMode(mode));
  const job = (step: StepName, children: FlowJob[] = [], extra: JobsOptions = {}) => stepJob(runId, config, step, children, { failParentOnFailure: true, ...extra });
  const data: FlowJob[] = [];
  if (steps.has('split_brats')) data.push(job('split_brats', [job('preprocess_brats', [job('download_brats')])]));
  if (steps.has('split_kaggle')) data.push(job('split_kaggle', [job('preprocess_kaggle', [job('download_kaggle')])]));
  let children: FlowJob[];
  if (steps.has('train_stage1_seg_warmup')) {
    // The stages run in order, each from the checkpoint the one before returned; a GPU worker takes one at a time.
    const s1 = job('train_stage1_seg_warmup', data);
    const s2 = job('train_stage2_cls_head', [s1]);
    const s3 = job('train_stage3_joint', [s2]);
    const evaluate = job('evaluate_multitask', [s3]);
    const gradcam = job('generate_gradcam', [evaluate]);
    children = [job('compare_phases', [gradcam], BRANCH)];
  } else {
    children = data.map((d) => ({ ...d, opts: { ...d.opts, ...BRANCH } }));
  }
  return job('finalize', children);
}

/**
 * One step of a finished run, alone, under a finalize of its own that settles the run again. The ids carry a
 * stamp: the run's first jobs may still be in Redis under their plain ids.
 */
export function buildRetryFlow({ runId, step, config, stamp }: { runId: string; step: StepName; config: Config; stamp: string }): FlowJob {
  const suffix = `retry-${stamp}`;
  return stepJob(runId, config, 'finalize', [stepJob(runId, config, step, [], BRANCH, suffix)], {}, suffix);
}
