/**
 * The steps whose bodies run in step threads. The thread imports this list, not the whole registry: a thread
 * starts faster without the queue, database and training code it never runs.
 */
import type { SandboxedStep } from './define.ts';
import { preprocessKaggle } from './preprocess-kaggle.ts';
import { preprocessPatientStep } from './preprocess-patient.ts';

export const SANDBOXED_STEPS: SandboxedStep<any, any>[] = [preprocessPatientStep, preprocessKaggle];
