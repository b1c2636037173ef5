/**
 * evaluate_multitask: the final model (stage 3's best checkpoint) on the test split: Dice and IoU per slice and
 * per patient in 3-D, classification per source and overall -> results/multitask_evaluation.json and the
 * `evaluations` table. Sandboxed: the forward passes run in a step thread.
 */
import { readFile } from 'node:fs/promises';
import { sql } from 'drizzle-orm';
import { evaluations } from '../db/schema.ts';
import { runPaths } from '../disk/layout.ts';
import { testSet } from '../evaluation/datasets.ts';
import { evaluateCheckpoint } from '../evaluation/evaluate.ts';
import type { EvaluationName } from '../evaluation/report.ts';
import { writeJsonAtomic } from '../lib/atomic.ts';
import { initBackend } from '../model/engine.ts';
import type { AppContext } from '../context.ts';
import { recordArtifact } from './artifacts.ts';
import { defineStep, RunJobData } from './define.ts';
import { readModelInputs } from './model-inputs.ts';

export interface EvaluateResult {
  kind: 'evaluate';
  file: string;
  dice: number | null;
  dice3d: number | null;
  accuracy: number | null;
  combined: number | null;
}

/** A report file into the `evaluations` table (upsert: a re-run replaces it) and the run's artifacts. */
export async function recordReport(ctx: AppContext, { runId, step, name, file }: { runId: string; step: string; name: EvaluationName; file: string }): Promise<void> {
  const report = JSON.parse(await readFile(file, 'utf8')) as unknown;
  await ctx.db
    .insert(evaluations)
    .values({ runId, name, report })
    .onConflictDoUpdate({ target: [evaluations.runId, evaluations.name], set: { report: sql`excluded.report`, createdAt: new Date() } });
  await recordArtifact(ctx.db, { runId, step, kind: 'report', path: file });
}

// Declared in full, as every step is (define.ts): the same shape as its sibling steps' declarations by design.
export const evaluateMultitaskStep = defineStep({
  name: 'evaluate_multitask',
  queue: 'evaluate',
  sandboxed: true,
  data: RunJobData,
  prepare: ({ ctx, run }) => readModelInputs({ db: ctx.db, run }, 'evaluate_multitask', ['train_stage3_joint']),
  async run({ run, prepared, signal, progress, log }) {
    const device = await initBackend();
    const checkpoint = prepared.checkpoints.joint!;
    const report = await evaluateCheckpoint({
      checkpoint,
      stage: 'joint',
      sources: await testSet(prepared.splitsDir, prepared.data.modalities),
      settings: prepared,
      runId: run.id,
      dataset: 'test split',
      signal,
      onProgress: (done, total) => void progress({ done, total }),
    });
    log(`evaluate_multitask: ${checkpoint} (weights sha256 ${report.checkpoint.sha256.slice(0, 12)}) on the test split, ${device.device}, ${report.seconds.toFixed(1)} s`);
    const file = runPaths(run.dataDir, run.id).multitaskEvaluation;
    await writeJsonAtomic(file, report);
    const seg = report.segmentation;
    const result: EvaluateResult = {
      kind: 'evaluate',
      file,
      dice: seg?.per_slice.dice.mean ?? null,
      dice3d: seg?.per_patient_3d.mean_dice ?? null,
      accuracy: report.classification.overall?.accuracy ?? null,
      combined: report.combined,
    };
    return {
      result,
      counts: { patients: seg?.per_patient_3d.patients.length ?? 0, slices: seg?.per_slice.slices ?? 0, kaggle_images: report.classification.kaggle?.n ?? 0 },
    };
  },
  record: ({ ctx, run }, result) => recordReport(ctx, { runId: run.id, step: 'evaluate_multitask', name: 'multitask', file: result.file }),
});
