/**
 * The evaluation reports a run writes (results/multitask_evaluation.json, results/phase_comparison.json) and
 * stores in Postgres (`evaluations`). Plain JSON: the API returns them as they are and the run page renders them.
 * A figure that cannot be computed (no tumour in the test set, a single class) is null, never NaN.
 */

export interface MeanStd {
  mean: number | null;
  std: number | null;
  n: number;
}

export interface Confusion {
  tp: number;
  fp: number;
  tn: number;
  fn: number;
}

export interface ClassificationReport {
  n: number;
  accuracy: number | null;
  precision: number | null;
  /** Sensitivity. */
  recall: number | null;
  specificity: number | null;
  f1: number | null;
  roc_auc: number | null;
  confusion: Confusion;
}

export interface PatientDice {
  patient_id: string;
  /** Whole-tumour Dice over every axial slice of the volume, stacked back in 3-D. */
  dice: number | null;
  iou: number | null;
  slices: number;
  true_voxels: number;
  predicted_voxels: number;
}

export interface SegmentationReport {
  threshold: number;
  /** Over the test slices preprocessing kept: empty-vs-empty slices count as Dice 1, as the original counted them. */
  per_slice: { dice: MeanStd; iou: MeanStd; slices: number; empty_both: number };
  /** The same, over slices where the truth or the prediction has tumour (empty-vs-empty left out). */
  per_slice_non_empty: { dice: MeanStd; iou: MeanStd };
  /** Every axial slice of each test patient, stacked back into the volume: the figure published results use. */
  per_patient_3d: { mean_dice: number | null; median_dice: number | null; mean_iou: number | null; patients: PatientDice[] };
}

export interface MultitaskEvaluation {
  run_id: string;
  /** The checkpoint evaluated, e.g. the stage 3 best, with the sha256 of its weights. */
  checkpoint: { stage: string; dir: string; sha256: string };
  created_at: string;
  /** 'test split' or a description of an external set. */
  dataset: string;
  segmentation: SegmentationReport | null;
  classification: { brats: ClassificationReport | null; kaggle: ClassificationReport | null; overall: ClassificationReport | null };
  /** (per-slice Dice + overall accuracy) / 2, as the original's stage 3 metric. */
  combined: number | null;
  seconds: number;
}

export interface PhaseRow {
  phase: string;
  step: string;
  checkpoint: string;
  dice: number | null;
  iou: number | null;
  accuracy: number | null;
  f1: number | null;
  roc_auc: number | null;
  combined: number | null;
}

export interface PhaseComparison {
  run_id: string;
  created_at: string;
  phases: PhaseRow[];
}

export type EvaluationName = 'multitask' | 'phase_comparison';
