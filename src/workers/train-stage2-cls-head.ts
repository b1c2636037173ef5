/** train_stage2_cls_head: Stage 2: the classification head on BraTS + Kaggle, encoder and decoder frozen, from stage 1's best checkpoint. */
import { defineStep, RunJobData } from './define.ts';
import { trainStage } from './train-stage.ts';

export const trainStage2ClsHead = defineStep({
  name: 'train_stage2_cls_head',
  queue: 'train',
  data: RunJobData,
  // A killed training job resumes from its last epoch checkpoint, so a retry costs at most one epoch.
  attempts: 3,
  backoff: { type: 'fixed', delay: 5000 },
  run: (s) => trainStage('train_stage2_cls_head', 'cls_head', { from: 'train_stage1_seg_warmup' }, s),
});
