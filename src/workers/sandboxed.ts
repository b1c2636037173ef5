/**
 * The steps whose bodies run in step threads. The thread imports this list, not the whole registry: a thread
 * starts faster without the queue and training code it never runs.
 */
import { comparePhases } from './compare-phases.ts';
import type { SandboxedStep } from './define.ts';
import { evaluateMultitaskStep } from './evaluate-multitask.ts';
import { generateGradcam } from './generate-gradcam.ts';
import { preprocessKaggle } from './preprocess-kaggle.ts';
import { preprocessPatientStep } from './preprocess-patient.ts';

export const SANDBOXED_STEPS: SandboxedStep<any, any, any>[] = [preprocessPatientStep, preprocessKaggle, evaluateMultitaskStep, generateGradcam, comparePhases];
