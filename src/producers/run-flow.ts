/**
 * The run as one BullMQ flow. Children run before parents:
 *
 *   finalize
 *   ├── split_brats  <- preprocess_brats (fans out one preprocess_patient job per patient) <- download_brats
 *   └── split_kaggle <- preprocess_kaggle <- download_kaggle
 *
 * With training (full, train-eval) the stages sit between the splits and finalize:
 *
 *   finalize <- train_stage3_joint <- train_stage2_cls_head <- train_stage1_seg_warmup <- [split_brats, split_kaggle]
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

export function buildRunFlow({ runId, mode, config }: RunFlowInput): FlowJob {
  const steps = new Set(stepsForMode(mode));
  const job = (step: StepName, children: FlowJob[] = [], extra: JobsOptions = {}): FlowJob => {
    const def = STEPS[step];
    return {
      name: step,
      queueName: def.queue,
      data: { runId } satisfies RunJobData,
      opts: { jobId: jobId(runId, step), attempts: attemptsOf(def, config), backoff: backoffOf(def), failParentOnFailure: true, ...STEP_RETENTION, ...extra },
      children,
    };
  };
  const branch = { failParentOnFailure: false, ignoreDependencyOnFailure: true };
  const data: FlowJob[] = [];
  if (steps.has('split_brats')) data.push(job('split_brats', [job('preprocess_brats', [job('download_brats')])]));
  if (steps.has('split_kaggle')) data.push(job('split_kaggle', [job('preprocess_kaggle', [job('download_kaggle')])]));
  let children: FlowJob[];
  if (steps.has('train_stage1_seg_warmup')) {
    // The stages run in order, each from the checkpoint the one before returned; a GPU worker takes one at a time.
    const s1 = job('train_stage1_seg_warmup', data);
    const s2 = job('train_stage2_cls_head', [s1]);
    children = [job('train_stage3_joint', [s2], branch)];
  } else {
    children = data.map((d) => ({ ...d, opts: { ...d.opts, ...branch } }));
  }
  return job('finalize', children);
}
