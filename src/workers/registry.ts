/**
 * Every job a worker can run, by job name. The flow builder (producers/run-flow.ts) and the worker host
 * (host.ts) read this: adding a step is one new file, its line here, and its place in the flow's shape.
 */
import type { JobName } from '../runs/modes.ts';
import { comparePhases } from './compare-phases.ts';
import type { StepDefinition } from './define.ts';
import { downloadBrats } from './download-brats.ts';
import { downloadKaggle } from './download-kaggle.ts';
import { evaluateMultitaskStep } from './evaluate-multitask.ts';
import { finalize } from './finalize.ts';
import { generateGradcam } from './generate-gradcam.ts';
import { preprocessBrats } from './preprocess-brats.ts';
import { preprocessKaggle } from './preprocess-kaggle.ts';
import { preprocessPatientStep } from './preprocess-patient.ts';
import { splitBrats } from './split-brats.ts';
import { splitKaggle } from './split-kaggle.ts';
import { trainStage1SegWarmup } from './train-stage1-seg-warmup.ts';
import { trainStage2ClsHead } from './train-stage2-cls-head.ts';
import { trainStage3Joint } from './train-stage3-joint.ts';

export const STEPS: Record<JobName, StepDefinition> = {
  download_brats: downloadBrats,
  download_kaggle: downloadKaggle,
  preprocess_brats: preprocessBrats,
  preprocess_patient: preprocessPatientStep,
  preprocess_kaggle: preprocessKaggle,
  split_brats: splitBrats,
  split_kaggle: splitKaggle,
  train_stage1_seg_warmup: trainStage1SegWarmup,
  train_stage2_cls_head: trainStage2ClsHead,
  train_stage3_joint: trainStage3Joint,
  evaluate_multitask: evaluateMultitaskStep,
  generate_gradcam: generateGradcam,
  compare_phases: comparePhases,
  finalize,
};
