/**
 * Losses of the three training stages (REFERENCE.md, "Training").
 *
 * - Segmentation: 0.6 x soft Dice (per sample, smooth 1) + 0.4 x BCE-with-logits (per sample mean over pixels);
 *   the weights and the smoothing are the stage config's loss.dice_weight, bce_weight and dice_smooth.
 * - Classification: cross-entropy with label smoothing, as PyTorch's CrossEntropyLoss(label_smoothing=eps): the
 *   target distribution is (1 - eps) x one-hot + eps / K. The original configured 0.1 and never passed it on;
 *   here it is applied.
 * - Joint: lambda_seg x segmentation loss over the samples that have a mask (a per-sample 0/1 weight; Kaggle
 *   images have none) + lambda_cls x cross-entropy over all samples.
 *
 * Every reduction can take an explicit denominator so that gradient accumulation over micro-batches adds up to
 * the full batch's loss exactly: each micro-batch divides its sums by the full batch's counts (number of samples
 * with a mask, number of samples) instead of its own.
 *
 * All functions create tensors: call them inside tf.tidy (or a gradient function).
 */
import * as tf from '@tensorflow/tfjs';

/** The segmentation loss's terms: diceWeight x soft Dice (smoothed by diceSmooth) + bceWeight x BCE. */
export interface SegLossWeights {
  diceWeight: number;
  bceWeight: number;
  diceSmooth: number;
}

/** The original's 0.6 x Dice + 0.4 x BCE, smooth 1 (configs/base.yaml holds the same values). */
export const SEG_LOSS_DEFAULTS: Readonly<SegLossWeights> = { diceWeight: 0.6, bceWeight: 0.4, diceSmooth: 1 };

/** Sum over every axis but the first: [N, ...] -> [N]. */
function perSampleSum(t: tf.Tensor): tf.Tensor1D {
  const n = t.shape[0]!;
  return tf.sum(tf.reshape(t, [n, -1]), 1) as tf.Tensor1D;
}

function perSampleMean(t: tf.Tensor): tf.Tensor1D {
  const n = t.shape[0]!;
  return tf.mean(tf.reshape(t, [n, -1]), 1) as tf.Tensor1D;
}

/** Soft Dice loss per sample: 1 - (2 sum(p t) + s) / (sum p + sum t + s), p = sigmoid(logits). Shape [N]. */
export function diceLossPerSample(logits: tf.Tensor, target: tf.Tensor, smooth = SEG_LOSS_DEFAULTS.diceSmooth): tf.Tensor1D {
  const p = tf.sigmoid(logits);
  const inter = perSampleSum(tf.mul(p, target));
  const denom = tf.add(perSampleSum(p), perSampleSum(target));
  return tf.sub(1, tf.div(tf.add(tf.mul(inter, 2), smooth), tf.add(denom, smooth))) as tf.Tensor1D;
}

/** Numerically stable BCE with logits, per element: max(x, 0) - x t + log(1 + exp(-|x|)). */
function bceWithLogits(logits: tf.Tensor, target: tf.Tensor): tf.Tensor {
  return tf.add(tf.sub(tf.relu(logits), tf.mul(logits, target)), tf.log1p(tf.exp(tf.neg(tf.abs(logits)))));
}

/** BCE with logits averaged over the pixels of each sample. Shape [N]. */
export function bcePerSample(logits: tf.Tensor, target: tf.Tensor): tf.Tensor1D {
  return perSampleMean(bceWithLogits(logits, target));
}

/** diceWeight x Dice + bceWeight x BCE per sample (default 0.6 x Dice + 0.4 x BCE). Shape [N]. */
export function segLossPerSample(logits: tf.Tensor, target: tf.Tensor, terms: SegLossWeights = SEG_LOSS_DEFAULTS): tf.Tensor1D {
  return tf.add(tf.mul(diceLossPerSample(logits, target, terms.diceSmooth), terms.diceWeight), tf.mul(bcePerSample(logits, target), terms.bceWeight)) as tf.Tensor1D;
}

/**
 * Segmentation loss over the samples with weight 1: sum(w_i l_i) / denominator, the denominator defaulting to
 * max(sum(w), 1) (so a batch without any mask contributes 0, not NaN).
 */
export function segLoss(logits: tf.Tensor, target: tf.Tensor, weight?: tf.Tensor1D, denominator?: number, terms: SegLossWeights = SEG_LOSS_DEFAULTS): tf.Scalar {
  const per = segLossPerSample(logits, target, terms);
  const w = weight ?? tf.onesLike(per);
  const den = denominator ?? Math.max(1, tf.sum(w).arraySync() as number);
  return tf.div(tf.sum(tf.mul(per, w)), den) as tf.Scalar;
}

/**
 * Cross-entropy with label smoothing per sample: -sum_k q_k log softmax(z)_k, q = (1 - eps) onehot(y) + eps / K.
 * `labels` is an int32 [N] tensor of class indices. Shape [N].
 */
export function crossEntropyPerSample(logits: tf.Tensor2D, labels: tf.Tensor1D, labelSmoothing = 0): tf.Tensor1D {
  if (labelSmoothing < 0 || labelSmoothing > 1) throw new RangeError(`label smoothing must be in [0, 1], got ${labelSmoothing}`);
  const k = logits.shape[1];
  const logp = tf.logSoftmax(logits);
  const onehot = tf.oneHot(tf.cast(labels, 'int32'), k);
  const q = tf.add(tf.mul(onehot, 1 - labelSmoothing), labelSmoothing / k);
  return tf.neg(tf.sum(tf.mul(q, logp), 1)) as tf.Tensor1D;
}

/** Mean cross-entropy (sum / denominator, the denominator defaulting to N). */
export function crossEntropy(logits: tf.Tensor2D, labels: tf.Tensor1D, labelSmoothing = 0, denominator?: number): tf.Scalar {
  const per = crossEntropyPerSample(logits, labels, labelSmoothing);
  return tf.div(tf.sum(per), denominator ?? logits.shape[0]) as tf.Scalar;
}

interface JointLossInput {
  segLogits: tf.Tensor4D;
  /** N x H x W x 1 target (zeros for samples without a mask). */
  mask: tf.Tensor4D;
  /** [N] 1 where the sample has a mask, else 0. */
  hasMask: tf.Tensor1D;
  clsLogits: tf.Tensor2D;
  /** [N] int32 class labels. */
  clsLabel: tf.Tensor1D;
  lambdaSeg: number;
  lambdaCls: number;
  labelSmoothing: number;
  /** Terms of the segmentation loss (default SEG_LOSS_DEFAULTS). */
  segWeights?: SegLossWeights;
  /** Full-batch denominators for gradient accumulation (defaults: this batch's counts). */
  segDenominator?: number;
  clsDenominator?: number;
}

interface JointLoss {
  total: tf.Scalar;
  seg: tf.Scalar;
  cls: tf.Scalar;
}

/** lambda_seg x masked segmentation loss + lambda_cls x smoothed cross-entropy. */
export function jointLoss(i: JointLossInput): JointLoss {
  const seg = segLoss(i.segLogits, i.mask, i.hasMask, i.segDenominator, i.segWeights);
  const cls = crossEntropy(i.clsLogits, i.clsLabel, i.labelSmoothing, i.clsDenominator);
  const total = tf.add(tf.mul(seg, i.lambdaSeg), tf.mul(cls, i.lambdaCls)) as tf.Scalar;
  return { total, seg, cls };
}
