/**
 * A finished run written straight into the database and the data dir, for the report endpoints' tests and for
 * working on the run page without training: run and step rows, per-epoch metrics, evaluation reports and
 * recorded artifacts (files on disk with their sha256, as a step records them).
 */
import { randomBytes } from 'node:crypto';
import { mkdir, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import type { AppContext } from '../../src/context.ts';
import { evaluations, metrics, runs, steps } from '../../src/db/schema.ts';
import { runPaths } from '../../src/disk/layout.ts';
import type { MultitaskEvaluation, PhaseComparison } from '../../src/evaluation/report.ts';
import { recordArtifact } from '../../src/workers/artifacts.ts';

export const SEEDED_STAGES = ['train_stage1_seg_warmup', 'train_stage2_cls_head', 'train_stage3_joint'] as const;

export async function insertRun(ctx: AppContext, { dataDir, id = `run-test-${randomBytes(3).toString('hex')}`, status = 'succeeded' }: { dataDir: string; id?: string; status?: 'succeeded' | 'running' }) {
  const t0 = new Date(Date.now() - 300_000);
  await ctx.db.insert(runs).values({
    id,
    status,
    mode: 'full',
    trainingMode: 'quick',
    config: {},
    sources: { brats: 'synthetic:4', kaggle: 'synthetic:12', skipDownload: false },
    dataDir,
    device: 'wasm: CPU wasm SIMD, 1 thread',
    createdAt: t0,
    startedAt: t0,
    finishedAt: status === 'succeeded' ? new Date() : null,
  });
  const names = ['download_brats', 'download_kaggle', 'preprocess_brats', 'preprocess_kaggle', 'split_brats', 'split_kaggle', ...SEEDED_STAGES, 'finalize'];
  await ctx.db.insert(steps).values(
    names.map((name, i) => ({
      runId: id,
      name,
      status: 'success' as const,
      queue: name.startsWith('train_') ? 'train' : name.startsWith('download') ? 'download' : name === 'preprocess_kaggle' ? 'preprocess' : name.startsWith('split') ? 'split' : 'pipeline',
      attempts: 1,
      startedAt: new Date(t0.getTime() + i * 10_000),
      finishedAt: new Date(t0.getTime() + i * 10_000 + 8_000),
      durationMs: 8_000 + i * 137,
      counts: (name === 'preprocess_brats' ? { done: 4, total: 4, slices: 96 } : name.startsWith('train_') ? { epoch: 3, epochs: 3, done: 3, total: 3, best_epoch: 2, epochs_run: 3 } : {}) as Record<string, number>,
    })),
  );
  return id;
}

/** Per-epoch metrics of the three stages; stage 2 lacks val_dice at epoch 2 (a gap the series must keep). */
export async function insertMetrics(ctx: AppContext, runId: string, epochs = 3) {
  const rows: (typeof metrics.$inferInsert)[] = [];
  for (const step of SEEDED_STAGES) {
    for (let e = 1; e <= epochs; e++) {
      const v = (base: number) => Math.round((base + e * 0.05 + SEEDED_STAGES.indexOf(step) * 0.01) * 1e6) / 1e6;
      const figures: Record<string, number> = { train_loss: 1.2 - v(0.1), val_loss: 1.3 - v(0.1), lr: 3e-4 / e, seconds: 4 + e, val_dice: v(0.5), val_iou: v(0.4), val_accuracy: v(0.6), val_auc: v(0.7) };
      if (step === 'train_stage2_cls_head' && e === 2) delete figures.val_dice;
      for (const [name, value] of Object.entries(figures)) rows.push({ runId, step, epoch: e, name, value });
    }
  }
  rows.push({ runId, step: 'train_stage3_joint', epoch: -1, name: 'test_dice', value: 0.71 });
  await ctx.db.insert(metrics).values(rows);
  return rows;
}

export function sampleMultitask(runId: string): MultitaskEvaluation {
  const cls = (n: number, acc: number) => ({ n, accuracy: acc, precision: acc - 0.05, recall: acc + 0.02, specificity: acc - 0.1, f1: acc - 0.012345, roc_auc: acc + 0.04321, confusion: { tp: 10, fp: 2, tn: 9, fn: 3 } });
  return {
    run_id: runId,
    checkpoint: { stage: 'joint', dir: `checkpoints/${runId}/joint/best`, sha256: 'ab'.repeat(32) },
    created_at: new Date().toISOString(),
    dataset: 'test split',
    segmentation: {
      threshold: 0.5,
      per_slice: { dice: { mean: 0.812345, std: 0.101, n: 24 }, iou: { mean: 0.70123, std: 0.12, n: 24 }, slices: 24, empty_both: 5 },
      per_slice_non_empty: { dice: { mean: 0.774, std: 0.15, n: 19 }, iou: { mean: 0.65, std: 0.16, n: 19 } },
      per_patient_3d: {
        mean_dice: 0.8456,
        median_dice: 0.85,
        mean_iou: 0.7333,
        patients: [{ patient_id: 'BraTS20_Training_003', dice: 0.8456, iou: 0.7333, slices: 24, true_voxels: 1234, predicted_voxels: 1180 }],
      },
    },
    classification: { brats: cls(24, 0.875), kaggle: cls(6, 0.8333333), overall: cls(30, 0.8666667) },
    combined: 0.8395,
    seconds: 3.2,
  };
}

export function samplePhaseComparison(runId: string): PhaseComparison {
  const row = (phase: string, step: string, stage: string, d: number | null, a: number | null) => ({ phase, step, checkpoint: `checkpoints/${runId}/${stage}/best`, dice: d, iou: d == null ? null : d - 0.1, accuracy: a, f1: a == null ? null : a - 0.02, roc_auc: a == null ? null : a + 0.05, combined: d != null && a != null ? (d + a) / 2 : null });
  return {
    run_id: runId,
    created_at: new Date().toISOString(),
    phases: [row('seg warm-up', 'train_stage1_seg_warmup', 'seg_warmup', 0.78, null), row('cls head', 'train_stage2_cls_head', 'cls_head', 0.78, 0.81), row('joint', 'train_stage3_joint', 'joint', 0.812345, 0.8666667)],
  };
}

export async function insertEvaluations(ctx: AppContext, runId: string) {
  const multitask = sampleMultitask(runId);
  const phase = samplePhaseComparison(runId);
  await ctx.db.insert(evaluations).values([
    { runId, name: 'multitask', report: multitask },
    { runId, name: 'phase_comparison', report: phase },
  ]);
  return { multitask, phase_comparison: phase };
}

/** Writes a file under the run's data dir and records it as the step would (sha256, size). */
export async function recordFile(ctx: AppContext, { runId, dataDir, rel, content, kind, step }: { runId: string; dataDir: string; rel: string; content: Buffer | string; kind: string; step: string }) {
  const path = join(dataDir, rel);
  await mkdir(dirname(path), { recursive: true });
  await writeFile(path, content);
  await recordArtifact(ctx.db, { runId, step, kind, path });
  return path;
}

/** Where a run's Grad-CAM image goes, relative to the data dir. */
export function gradcamRel(dataDir: string, runId: string, name: string) {
  return join(runPaths(dataDir, runId).gradcam, name).slice(dataDir.length + 1);
}
