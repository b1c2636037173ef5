/** train_stage2_cls_head: Stage 2: the classification head on BraTS + Kaggle, encoder and decoder frozen, from stage 1's best checkpoint. */
import { defineStep, RunJobData } from './define.ts';
import { TRAIN_RETRY, trainStage } from './train-stage.ts';

// Declared in full, as every step is (define.ts): the same shape as its sibling steps' declarations by design.
export const trainStage2ClsHead = defineStep({
  name: 'train_stage2_cls_head',
  queue: 'train',
  data: RunJobData,
  ...TRAIN_RETRY,
  run: (s) => trainStage('train_stage2_cls_head', 'cls_head', { from: 'train_stage1_seg_warmup' }, s),
});
