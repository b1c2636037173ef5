/**
 * Evaluation metrics (REFERENCE.md, "Evaluation"), plain arithmetic on arrays.
 *
 * Segmentation, at threshold 0.5 (a pixel is predicted tumour when its probability is > 0.5):
 * - per-sample Dice = 2|P n T| / (|P| + |T|) and IoU = |P n T| / |P u T|, 1 when both P and T are empty, averaged
 *   over the samples that have a mask (Kaggle images have none and are skipped);
 * - global Dice / IoU from the pixel counts summed over those samples.
 * Classification (tumour = class 1, predicted when p(tumour) > threshold): accuracy, precision, recall
 * (sensitivity), specificity, F1 (0 when undefined, as sklearn's zero_division=0), ROC-AUC from ranks (ties get
 * their average rank; null with a single class present) and the confusion matrix [[TN, FP], [FN, TP]] (rows =
 * truth, columns = prediction, as sklearn).
 */

export interface SegMetrics {
  /** Mean per-sample Dice over samples with a mask (null when there are none). */
  dice: number | null;
  diceStd: number | null;
  iou: number | null;
  /** Dice / IoU from pixel counts pooled over the samples. */
  diceGlobal: number | null;
  iouGlobal: number | null;
  /** Samples that had a mask. */
  samples: number;
}

/** Dice and IoU of one binary prediction against one binary target. */
export function diceIou(pred: ArrayLike<number>, target: ArrayLike<number>, threshold = 0.5): { dice: number; iou: number; tp: number; fp: number; fn: number } {
  if (pred.length !== target.length) throw new RangeError(`diceIou: ${pred.length} predictions for ${target.length} targets`);
  let tp = 0;
  let fp = 0;
  let fn = 0;
  for (let i = 0; i < pred.length; i++) {
    const p = pred[i]! > threshold;
    const t = target[i]! > 0.5;
    if (p && t) tp++;
    else if (p) fp++;
    else if (t) fn++;
  }
  const denom = 2 * tp + fp + fn;
  return { dice: denom === 0 ? 1 : (2 * tp) / denom, iou: tp + fp + fn === 0 ? 1 : tp / (tp + fp + fn), tp, fp, fn };
}

export class SegMetricAccumulator {
  private readonly dices: number[] = [];
  private readonly ious: number[] = [];
  private tp = 0;
  private fp = 0;
  private fn = 0;

  constructor(readonly threshold = 0.5) {}

  /**
   * Add a batch: `probs` and `targets` hold n samples of equal size back to back; `hasMask` (optional, [n])
   * excludes samples with 0.
   */
  add(probs: ArrayLike<number>, targets: ArrayLike<number>, n: number, hasMask?: ArrayLike<number>): void {
    if (n === 0) return;
    if (probs.length !== targets.length || probs.length % n !== 0) throw new RangeError('SegMetricAccumulator.add: sizes do not match');
    const per = probs.length / n;
    const view = (a: ArrayLike<number>, i: number): ArrayLike<number> =>
      ArrayBuffer.isView(a) ? (a as unknown as Float32Array).subarray(i * per, (i + 1) * per) : Array.prototype.slice.call(a, i * per, (i + 1) * per);
    for (let i = 0; i < n; i++) {
      if (hasMask && !(hasMask[i]! > 0)) continue;
      const r = diceIou(view(probs, i), view(targets, i), this.threshold);
      this.dices.push(r.dice);
      this.ious.push(r.iou);
      this.tp += r.tp;
      this.fp += r.fp;
      this.fn += r.fn;
    }
  }

  result(): SegMetrics {
    const n = this.dices.length;
    if (n === 0) return { dice: null, diceStd: null, iou: null, diceGlobal: null, iouGlobal: null, samples: 0 };
    const mean = (a: number[]): number => a.reduce((s, x) => s + x, 0) / a.length;
    const dice = mean(this.dices);
    const diceStd = Math.sqrt(this.dices.reduce((s, x) => s + (x - dice) ** 2, 0) / n);
    const denom = 2 * this.tp + this.fp + this.fn;
    return {
      dice,
      diceStd,
      iou: mean(this.ious),
      diceGlobal: denom === 0 ? 1 : (2 * this.tp) / denom,
      iouGlobal: this.tp + this.fp + this.fn === 0 ? 1 : this.tp / (this.tp + this.fp + this.fn),
      samples: n,
    };
  }
}

export interface ClsMetrics {
  accuracy: number | null;
  precision: number;
  recall: number;
  specificity: number;
  f1: number;
  rocAuc: number | null;
  /** [[TN, FP], [FN, TP]]. */
  confusion: [[number, number], [number, number]];
  samples: number;
}

/**
 * ROC-AUC as the Mann-Whitney statistic: (sum of the positives' ranks - nPos (nPos + 1) / 2) / (nPos nNeg), tied
 * scores sharing their average rank (so a tie between a positive and a negative counts one half).
 */
export function rocAuc(scores: ArrayLike<number>, labels: ArrayLike<number>): number | null {
  const n = scores.length;
  if (labels.length !== n) throw new RangeError(`rocAuc: ${n} scores for ${labels.length} labels`);
  const order = Array.from({ length: n }, (_, i) => i).sort((a, b) => scores[a]! - scores[b]!);
  let nPos = 0;
  let rankSum = 0;
  for (let i = 0; i < n; ) {
    let j = i;
    while (j + 1 < n && scores[order[j + 1]!] === scores[order[i]!]) j++;
    const avgRank = (i + j + 2) / 2; // ranks are 1-based: positions i..j hold ranks i+1..j+1
    for (let k = i; k <= j; k++) {
      if (labels[order[k]!]! > 0) {
        nPos++;
        rankSum += avgRank;
      }
    }
    i = j + 1;
  }
  const nNeg = n - nPos;
  if (nPos === 0 || nNeg === 0) return null;
  return (rankSum - (nPos * (nPos + 1)) / 2) / (nPos * nNeg);
}

/** Classification metrics from p(tumour) scores and 0/1 labels. */
export function classificationMetrics(probs: ArrayLike<number>, labels: ArrayLike<number>, threshold = 0.5): ClsMetrics {
  const n = probs.length;
  if (labels.length !== n) throw new RangeError(`classificationMetrics: ${n} scores for ${labels.length} labels`);
  let tp = 0;
  let tn = 0;
  let fp = 0;
  let fn = 0;
  for (let i = 0; i < n; i++) {
    const p = probs[i]! > threshold;
    const t = labels[i]! > 0;
    if (p && t) tp++;
    else if (p) fp++;
    else if (t) fn++;
    else tn++;
  }
  const div = (a: number, b: number): number => (b === 0 ? 0 : a / b);
  const precision = div(tp, tp + fp);
  const recall = div(tp, tp + fn);
  return {
    accuracy: n === 0 ? null : (tp + tn) / n,
    precision,
    recall,
    specificity: div(tn, tn + fp),
    f1: div(2 * precision * recall, precision + recall),
    rocAuc: rocAuc(probs, labels),
    confusion: [
      [tn, fp],
      [fn, tp],
    ],
    samples: n,
  };
}

/** Collects scores and labels over batches, then computes classificationMetrics. */
export class ClsMetricAccumulator {
  private readonly probs: number[] = [];
  private readonly labels: number[] = [];

  constructor(readonly threshold = 0.5) {}

  add(probTumour: ArrayLike<number>, labels: ArrayLike<number>): void {
    if (probTumour.length !== labels.length) throw new RangeError('ClsMetricAccumulator.add: sizes do not match');
    for (let i = 0; i < probTumour.length; i++) {
      this.probs.push(probTumour[i]!);
      this.labels.push(labels[i]!);
    }
  }

  result(): ClsMetrics {
    return classificationMetrics(this.probs, this.labels, this.threshold);
  }
}

/** The stage-3 selection metric: (Dice + accuracy) / 2. */
export function combinedScore(dice: number | null, accuracy: number | null): number | null {
  if (dice === null || accuracy === null) return null;
  return (dice + accuracy) / 2;
}
