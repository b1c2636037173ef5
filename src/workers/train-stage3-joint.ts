/** train_stage3_joint: Stage 3: joint fine-tuning of everything, from stage 2's best checkpoint. */
import { defineStep, RunJobData } from './define.ts';
import { trainStage } from './train-stage.ts';

export const trainStage3Joint = defineStep({
  name: 'train_stage3_joint',
  queue: 'train',
  data: RunJobData,
  // A killed training job resumes from its last epoch checkpoint, so a retry costs at most one epoch.
  attempts: 3,
  backoff: { type: 'fixed', delay: 5000 },
  run: (s) => trainStage('train_stage3_joint', 'joint', { from: 'train_stage2_cls_head' }, s),
});
