/**
 * compare_phases: each training stage's best checkpoint on the same test set, one row per phase, ->
 * results/phase_comparison.json and the `evaluations` table (the run page draws the chart). Per-slice figures
 * only: the per-patient 3-D Dice is evaluate_multitask's, for the final model. Sandboxed, like the evaluation.
 */
import { runPaths } from '../disk/layout.ts';
import { testSet } from '../evaluation/datasets.ts';
import { evaluateMultitask, evaluateOptions } from '../evaluation/evaluate.ts';
import { loadModel } from '../evaluation/predict.ts';
import type { PhaseComparison, PhaseRow } from '../evaluation/report.ts';
import { writeJsonAtomic } from '../lib/atomic.ts';
import { STAGES } from '../config/schema.ts';
import { initBackend } from '../model/engine.ts';
import { TRAIN_STEPS } from '../runs/modes.ts';
import { defineStep, RunJobData } from './define.ts';
import { recordReport } from './evaluate-multitask.ts';
import { readModelInputs } from './model-inputs.ts';

export interface PhasesResult {
  kind: 'phases';
  file: string;
  phases: number;
}

// Declared in full, as every step is (define.ts): the same shape as its sibling steps' declarations by design.
export const comparePhases = defineStep({
  name: 'compare_phases',
  queue: 'evaluate',
  sandboxed: true,
  data: RunJobData,
  prepare: ({ ctx, run }) => readModelInputs({ db: ctx.db, run }, 'compare_phases'),
  async run({ run, prepared, signal, progress, log }) {
    await initBackend();
    const sources = await testSet(prepared.splitsDir, prepared.data.modalities);
    const rows: PhaseRow[] = [];
    for (const [i, stage] of STAGES.entries()) {
      const checkpoint = prepared.checkpoints[stage]!;
      const { model } = await loadModel(checkpoint);
      try {
        const f = await evaluateMultitask(model, sources, evaluateOptions(prepared, { signal, perPatient3d: false }));
        const overall = f.classification.overall;
        rows.push({
          phase: stage,
          step: TRAIN_STEPS[i]!,
          checkpoint,
          dice: f.segmentation?.per_slice.dice.mean ?? null,
          iou: f.segmentation?.per_slice.iou.mean ?? null,
          accuracy: overall?.accuracy ?? null,
          f1: overall?.f1 ?? null,
          roc_auc: overall?.roc_auc ?? null,
          combined: f.combined,
        });
      } finally {
        model.dispose();
      }
      log(`compare_phases: ${stage} done`);
      void progress({ done: i + 1, total: STAGES.length });
    }
    const report: PhaseComparison = { run_id: run.id, created_at: new Date().toISOString(), phases: rows };
    const file = runPaths(run.dataDir, run.id).phaseComparison;
    await writeJsonAtomic(file, report);
    return { result: { kind: 'phases', file, phases: rows.length } satisfies PhasesResult, counts: { phases: rows.length } };
  },
  record: ({ ctx, run }, result) => recordReport(ctx, { runId: run.id, step: 'compare_phases', name: 'phase_comparison', file: result.file }),
});
