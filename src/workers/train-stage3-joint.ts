/** train_stage3_joint: Stage 3: joint fine-tuning of everything, from stage 2's best checkpoint. */
import { defineStep, RunJobData } from './define.ts';
import { TRAIN_RETRY, trainStage } from './train-stage.ts';

// Declared in full, as every step is (define.ts): the same shape as its sibling steps' declarations by design.
export const trainStage3Joint = defineStep({
  name: 'train_stage3_joint',
  queue: 'train',
  data: RunJobData,
  ...TRAIN_RETRY,
  run: (s) => trainStage('train_stage3_joint', 'joint', { from: 'train_stage2_cls_head' }, s),
});
