/** train_stage1_seg_warmup: Stage 1: segmentation warm-up of encoder and decoder on BraTS slices. */
import { defineStep, RunJobData } from './define.ts';
import { trainStage } from './train-stage.ts';

export const trainStage1SegWarmup = defineStep({
  name: 'train_stage1_seg_warmup',
  queue: 'train',
  data: RunJobData,
  // A killed training job resumes from its last epoch checkpoint, so a retry costs at most one epoch.
  attempts: 3,
  backoff: { type: 'fixed', delay: 5000 },
  run: (s) => trainStage('train_stage1_seg_warmup', 'seg_warmup', {}, s),
});
