/**
 * Which steps a run of each mode has, in the order they are shown (GET /runs/:id, pipeline_results.json, the
 * CLI). Step names are the original controller's, plus finalize; the flow's shape is in producers/run-flow.ts.
 */
import type { PipelineMode } from './input.ts';

const DATA_STEPS = ['download_brats', 'download_kaggle', 'preprocess_brats', 'preprocess_kaggle', 'split_brats', 'split_kaggle'] as const;
export const TRAIN_STEPS = ['train_stage1_seg_warmup', 'train_stage2_cls_head', 'train_stage3_joint'] as const;
/** The original controller's last three steps; each can also run again alone on a finished run. */
export const EVAL_STEPS = ['evaluate_multitask', 'generate_gradcam', 'compare_phases'] as const;

/** Every step that has a row in `steps`, in display order. */
export const STEP_NAMES = [...DATA_STEPS, ...TRAIN_STEPS, ...EVAL_STEPS, 'finalize'] as const;
export type StepName = (typeof STEP_NAMES)[number];
export type TrainStep = (typeof TRAIN_STEPS)[number];

/** Jobs that are not steps of their own: one per patient, recorded in `patients` and rolled up into preprocess_brats. */
export const SHARD_JOBS = ['preprocess_patient'] as const;
export type JobName = StepName | (typeof SHARD_JOBS)[number];

/** Which steps a mode runs, in display order. The demo arrives with its own issue. */
export function stepsForMode(mode: PipelineMode): StepName[] {
  switch (mode) {
    case 'data-only':
      return [...DATA_STEPS, 'finalize'];
    case 'full':
      return [...DATA_STEPS, ...TRAIN_STEPS, ...EVAL_STEPS, 'finalize'];
    case 'train-eval':
      return [...TRAIN_STEPS, ...EVAL_STEPS, 'finalize'];
    default:
      return [];
  }
}

/** Orders step rows for display; unknown names go last. */
export function byStepOrder<T extends { name: string }>(rows: T[]): T[] {
  const at = (n: string) => {
    const i = (STEP_NAMES as readonly string[]).indexOf(n);
    return i < 0 ? STEP_NAMES.length : i;
  };
  return [...rows].sort((a, b) => at(a.name) - at(b.name));
}
