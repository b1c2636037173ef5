import type { FlowJob, JobsOptions } from 'bullmq';
import { join } from 'node:path';
import type { Config } from '../config/schema.ts';
import { jobId, STEP_QUEUE, TRAIN_STEPS, type StepName } from '../queues/names.ts';
import type { PipelineMode } from '../runs/input.ts';

/** What every job of a run carries. Never credentials: job data is shown in Bull Board. */
export interface RunJobData {
  runId: string;
}

export interface RunFlowInput {
  runId: string;
  mode: PipelineMode;
  config: Config;
  dataDir: string;
}

/** preprocess_kaggle runs sandboxed (no database there), so it carries what it needs. */
export interface KaggleJobData extends RunJobData {
  outDir: string;
  imageSize: number;
}

/** Jobs stay visible in Bull Board for a week, then Redis forgets them (the database keeps the record). */
const KEEP = { removeOnComplete: { age: 7 * 24 * 3600, count: 5000 }, removeOnFail: { age: 14 * 24 * 3600, count: 5000 } } as const;

const DATA_STEPS: StepName[] = ['download_brats', 'download_kaggle', 'preprocess_brats', 'preprocess_kaggle', 'split_brats', 'split_kaggle'];

/** Which steps a mode runs, in display order. Evaluation and the demo arrive with their own issues. */
export function stepsForMode(mode: PipelineMode): StepName[] {
  switch (mode) {
    case 'data-only':
      return [...DATA_STEPS, 'finalize'];
    case 'full':
      return [...DATA_STEPS, ...TRAIN_STEPS, 'finalize'];
    case 'train-eval':
      return [...TRAIN_STEPS, 'finalize'];
    default:
      return [];
  }
}

export function runDir(dataDir: string, runId: string): string {
  return join(dataDir, 'runs', runId);
}

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
 */
export function buildRunFlow({ runId, mode, config, dataDir }: RunFlowInput): FlowJob {
  const steps = new Set(stepsForMode(mode));
  const job = (step: StepName, children: FlowJob[] = [], extra: JobsOptions = {}, data: RunJobData = { runId }): FlowJob => ({
    name: step,
    queueName: STEP_QUEUE[step],
    data,
    opts: {
      jobId: jobId(runId, step),
      attempts: step.startsWith('download') ? config.workers.download_attempts : 2,
      backoff: { type: 'exponential', delay: 2000 },
      failParentOnFailure: true,
      ...KEEP,
      ...extra,
    },
    children,
  });
  const kaggleData: KaggleJobData = {
    runId,
    outDir: join(runDir(dataDir, runId), 'processed', 'kaggle'),
    imageSize: config.data.kaggle_image_size ?? config.data.image_size,
  };
  const branch = { failParentOnFailure: false, ignoreDependencyOnFailure: true };
  const data: FlowJob[] = [];
  if (steps.has('split_brats')) data.push(job('split_brats', [job('preprocess_brats', [job('download_brats')])]));
  if (steps.has('split_kaggle')) data.push(job('split_kaggle', [job('preprocess_kaggle', [job('download_kaggle')], {}, kaggleData)]));
  let children: FlowJob[];
  if (steps.has('train_stage1_seg_warmup')) {
    // The stages run in order, each from the checkpoint the one before recorded; a GPU worker takes one at a time.
    const train = { attempts: 3, backoff: { type: 'fixed', delay: 5000 } };
    const s1 = job('train_stage1_seg_warmup', data, train);
    const s2 = job('train_stage2_cls_head', [s1], train);
    children = [job('train_stage3_joint', [s2], { ...train, ...branch })];
  } else {
    children = data.map((d) => ({ ...d, opts: { ...d.opts, ...branch } }));
  }
  return job('finalize', children, { attempts: 3 });
}
