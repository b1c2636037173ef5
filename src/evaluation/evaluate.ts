/**
 * evaluate_multitask's computation, and `slicewise evaluate`'s: a model over a set of BraTS patients (whole
 * volumes) and Kaggle images -> a MultitaskEvaluation. No queue, database or HTTP code.
 *
 * BraTS, per patient: every axial slice goes through the training path's own slicing (volumeToSlices) and the
 * model once.
 * - Per slice: the slices preprocessing keeps (its seeded rule, selectSlices), at the model's size against the
 *   resized mask, as training validates. Empty truth and empty prediction counts as Dice 1 (the original's
 *   rule), and the same figures without those slices are reported apart.
 * - Per patient, in 3-D: the tumour probability of every slice resized back to the slice's own grid, stacked
 *   into the volume and compared with label > 0 voxel by voxel: the figure published results compare.
 * - Classification: a kept slice is 'tumour' when its resized mask has >= clsTumorPixels pixels (as training).
 * Kaggle: each image's tumour probability against its label.
 */
import { type SamplingOptions, selectSlices, volumeToSlices } from '../imaging/brats.ts';
import type { RawNiftiVolume } from '../imaging/nifti.ts';
import { classificationMetrics, combinedScore, diceIou } from '../model/metrics.ts';
import type { UNetModel } from '../model/unet.ts';
import type { Config } from '../config/schema.ts';
import { loadModel, predict, type SliceBatch } from './predict.ts';
import type { ClassificationReport, MeanStd, MultitaskEvaluation, PatientDice, SegmentationReport } from './report.ts';

export interface EvalPatient {
  id: string;
  /** The model's input modalities, in its channel order. */
  volumes: RawNiftiVolume[];
  seg: RawNiftiVolume;
}

/** Patients are loaded one at a time: a full-size volume is tens of megabytes. */
export interface PatientSource {
  count: number;
  load(): AsyncIterable<EvalPatient>;
}

export interface KaggleSource {
  count: number;
  batches(batchSize: number): AsyncIterable<{ batch: SliceBatch; labels: ArrayLike<number> }>;
}

export interface EvaluateOptions {
  /** The model's input size. */
  imageSize: number;
  /** Which slices preprocessing keeps (seed, minTumorPixels, keepProbability): the per-slice figures use those. */
  sampling: Required<Omit<SamplingOptions, 'imageSize'>>;
  /** A slice is 'tumour' for classification with at least this many mask pixels. */
  clsTumorPixels: number;
  /** Default: 0.5. */
  threshold?: number;
  /** Default: 8. */
  batchSize?: number;
  /** The per-patient 3-D figures (they need the whole volume back at its own size). Default: true. */
  perPatient3d?: boolean;
  signal?: AbortSignal;
  onProgress?(done: number, total: number): void;
}

export type EvaluationFigures = Pick<MultitaskEvaluation, 'segmentation' | 'classification' | 'combined'>;

function meanStd(values: number[]): MeanStd {
  if (values.length === 0) return { mean: null, std: null, n: 0 };
  const mean = values.reduce((a, b) => a + b, 0) / values.length;
  const std = Math.sqrt(values.reduce((a, b) => a + (b - mean) ** 2, 0) / values.length);
  return { mean, std, n: values.length };
}

function median(values: number[]): number | null {
  if (values.length === 0) return null;
  const s = [...values].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

export function classificationReport(probs: ArrayLike<number>, labels: ArrayLike<number>, threshold: number): ClassificationReport | null {
  if (probs.length === 0) return null;
  const m = classificationMetrics(probs, labels, threshold);
  const [[tn, fp], [fn, tp]] = m.confusion;
  return { n: m.samples, accuracy: m.accuracy, precision: m.precision, recall: m.recall, specificity: m.specificity, f1: m.f1, roc_auc: m.rocAuc, confusion: { tp, fp, tn, fn } };
}

/**
 * Whole-tumour overlap of a predicted probability volume with a label volume, both on the label's grid.
 * `probs` holds slice k's rows i and columns j at k * nx * ny + i * ny + j (the slices' order); the labels are in
 * NIfTI order, i fastest. Both empty counts as 1.
 */
export function volumeOverlap(probs: Float32Array, seg: RawNiftiVolume, threshold: number): { dice: number; iou: number; truth: number; predicted: number } {
  const [nx, ny, nz] = seg.dims;
  const { raw, slope, inter } = seg;
  let tp = 0;
  let fp = 0;
  let fn = 0;
  for (let k = 0; k < nz; k++) {
    for (let i = 0; i < nx; i++) {
      const row = k * nx * ny + i * ny;
      for (let j = 0; j < ny; j++) {
        const p = probs[row + j]! > threshold;
        const t = raw[i + nx * (j + ny * k)]! * slope + inter > 0;
        if (p && t) tp++;
        else if (p) fp++;
        else if (t) fn++;
      }
    }
  }
  const denom = 2 * tp + fp + fn;
  return { dice: denom === 0 ? 1 : (2 * tp) / denom, iou: tp + fp + fn === 0 ? 1 : tp / (tp + fp + fn), truth: tp + fn, predicted: tp + fp };
}

export async function evaluateMultitask(
  model: UNetModel,
  { patients, kaggle }: { patients: PatientSource | null; kaggle: KaggleSource | null },
  { imageSize, sampling, clsTumorPixels, threshold = 0.5, batchSize = 8, perPatient3d = true, signal, onProgress }: EvaluateOptions,
): Promise<EvaluationFigures> {
  const total = (patients?.count ?? 0) + (kaggle?.count ?? 0);
  let done = 0;
  const sliceDice: number[] = [];
  const sliceIou: number[] = [];
  const nonEmptyDice: number[] = [];
  const nonEmptyIou: number[] = [];
  const perPatient: PatientDice[] = [];
  const bratsProbs: number[] = [];
  const bratsLabels: number[] = [];
  const area = imageSize * imageSize;

  for await (const p of patients?.load() ?? []) {
    const [nx, ny, nz] = p.seg.dims;
    const all = volumeToSlices(p.volumes, p.seg, { keep: 'all', imageSize });
    const kept = selectSlices(p.seg, { ...sampling, imageSize, keep: 'sampled', sampleKey: p.id });
    const preds = await predict(model, { images: all.images, n: nz, size: imageSize, channels: p.volumes.length }, { batchSize, signal, ...(perPatient3d ? { nativeSize: [nx, ny] } : {}) });
    for (const { slice_idx: z } of kept.slices) {
      const truth = all.masks.subarray(z * area, (z + 1) * area);
      const r = diceIou(preds.seg.subarray(z * area, (z + 1) * area), truth, threshold);
      sliceDice.push(r.dice);
      sliceIou.push(r.iou);
      if (r.tp + r.fp + r.fn > 0) {
        nonEmptyDice.push(r.dice);
        nonEmptyIou.push(r.iou);
      }
      let pixels = 0;
      for (let i = 0; i < area; i++) pixels += truth[i]!;
      bratsProbs.push(preds.cls[z]!);
      bratsLabels.push(pixels >= clsTumorPixels ? 1 : 0);
    }
    if (preds.native) {
      const o = volumeOverlap(preds.native, p.seg, threshold);
      perPatient.push({ patient_id: p.id, dice: o.dice, iou: o.iou, slices: nz, true_voxels: o.truth, predicted_voxels: o.predicted });
    }
    onProgress?.(++done, total);
  }

  const kaggleProbs: number[] = [];
  const kaggleLabels: number[] = [];
  for await (const { batch, labels } of kaggle?.batches(batchSize) ?? []) {
    const preds = await predict(model, batch, { batchSize, classifyOnly: true, signal });
    for (let i = 0; i < batch.n; i++) {
      kaggleProbs.push(preds.cls[i]!);
      kaggleLabels.push(labels[i]!);
    }
    done += batch.n;
    onProgress?.(done, total);
  }

  let segmentation: SegmentationReport | null = null;
  if (patients && sliceDice.length + perPatient.length > 0) {
    const dice3d = perPatient.map((p) => p.dice!).filter((d) => d !== null);
    segmentation = {
      threshold,
      per_slice: { dice: meanStd(sliceDice), iou: meanStd(sliceIou), slices: sliceDice.length, empty_both: sliceDice.length - nonEmptyDice.length },
      per_slice_non_empty: { dice: meanStd(nonEmptyDice), iou: meanStd(nonEmptyIou) },
      per_patient_3d: {
        mean_dice: meanStd(dice3d).mean,
        median_dice: median(dice3d),
        mean_iou: meanStd(perPatient.map((p) => p.iou!)).mean,
        patients: perPatient,
      },
    };
  }
  const overall = classificationReport([...bratsProbs, ...kaggleProbs], [...bratsLabels, ...kaggleLabels], threshold);
  return {
    segmentation,
    classification: {
      brats: classificationReport(bratsProbs, bratsLabels, threshold),
      kaggle: classificationReport(kaggleProbs, kaggleLabels, threshold),
      overall,
    },
    combined: combinedScore(segmentation?.per_slice.dice.mean ?? null, overall?.accuracy ?? null),
  };
}

/** The settings an evaluation takes from a run's config: how its data was sliced, and how to judge. */
export interface EvaluationSettings {
  data: Config['data'];
  seed: number;
  evaluation: Config['evaluation'];
}

export function evaluateOptions({ data, seed, evaluation }: EvaluationSettings, extra: Pick<EvaluateOptions, 'signal' | 'onProgress' | 'perPatient3d'> = {}): EvaluateOptions {
  return {
    imageSize: data.image_size,
    sampling: { seed, minTumorPixels: data.min_tumor_pixels, keepProbability: data.keep_probability },
    clsTumorPixels: data.cls_tumor_pixels,
    threshold: evaluation.threshold,
    batchSize: evaluation.batch_size,
    ...extra,
  };
}

/** A checkpoint on a set of patients and images -> the full report (evaluate_multitask's and `slicewise evaluate`'s). */
export async function evaluateCheckpoint({
  checkpoint,
  stage,
  sources,
  settings,
  runId,
  dataset,
  signal,
  onProgress,
}: {
  checkpoint: string;
  stage: string;
  sources: { patients: PatientSource | null; kaggle: KaggleSource | null };
  settings: EvaluationSettings;
  runId: string;
  dataset: string;
  signal?: AbortSignal;
  onProgress?: EvaluateOptions['onProgress'];
}): Promise<MultitaskEvaluation> {
  const started = Date.now();
  const { model, weightsSha256 } = await loadModel(checkpoint);
  try {
    const figures = await evaluateMultitask(model, sources, evaluateOptions(settings, { signal, onProgress }));
    return {
      run_id: runId,
      checkpoint: { stage, dir: checkpoint, sha256: weightsSha256 },
      created_at: new Date().toISOString(),
      dataset,
      ...figures,
      seconds: (Date.now() - started) / 1000,
    };
  } finally {
    model.dispose();
  }
}
