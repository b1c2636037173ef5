/** train_stage1_seg_warmup: Stage 1: segmentation warm-up of encoder and decoder on BraTS slices. */
import { defineStep, RunJobData } from './define.ts';
import { TRAIN_RETRY, trainStage } from './train-stage.ts';

// Declared in full, as every step is (define.ts): the same shape as its sibling steps' declarations by design.
export const trainStage1SegWarmup = defineStep({
  name: 'train_stage1_seg_warmup',
  queue: 'train',
  data: RunJobData,
  ...TRAIN_RETRY,
  run: (s) => trainStage('train_stage1_seg_warmup', 'seg_warmup', {}, s),
});
