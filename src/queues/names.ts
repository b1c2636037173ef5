/** Queues by kind of work. Workers choose which they consume (`slicewise worker --queues preprocess`). */
export const QUEUE_NAMES = ['pipeline', 'download', 'preprocess', 'split', 'train', 'evaluate'] as const;
export type QueueName = (typeof QUEUE_NAMES)[number];

/**
 * Step names are the original controller's (pipeline_results.json keeps them), plus our internal ones.
 * The order here is the order steps are shown in.
 */
export const STEP_QUEUE = {
  download_brats: 'download',
  download_kaggle: 'download',
  // The coordinator only discovers patients and fans out; the CPU work is its preprocess_patient children on
  // the preprocess queue, which runs sandboxed and so cannot reach an embedded database.
  preprocess_brats: 'pipeline',
  preprocess_kaggle: 'preprocess',
  split_brats: 'split',
  split_kaggle: 'split',
  train_stage1_seg_warmup: 'train',
  train_stage2_cls_head: 'train',
  train_stage3_joint: 'train',
  finalize: 'pipeline',
} as const satisfies Record<string, QueueName>;
export type StepName = keyof typeof STEP_QUEUE;
export const STEP_NAMES = Object.keys(STEP_QUEUE) as StepName[];

export const TRAIN_STEPS = ['train_stage1_seg_warmup', 'train_stage2_cls_head', 'train_stage3_joint'] as const;
export type TrainStep = (typeof TRAIN_STEPS)[number];

/** The per-patient shard job; its bookkeeping rolls up into preprocess_brats. */
export const PATIENT_JOB = 'preprocess_patient';

/** BullMQ rejects ':' in custom ids; ids are built from run and step so a retried producer adds nothing new. */
export function jobId(runId: string, step: string, shard?: string): string {
  const safe = (s: string) => s.replace(/[^A-Za-z0-9_.-]/g, '_');
  return [runId, step, shard].filter(Boolean).map((s) => safe(s!)).join('.');
}

/** Pub/sub channel (under the BullMQ prefix) on which a cancelled run's id is announced to every worker. */
export const CANCEL_CHANNEL = 'cancel';
