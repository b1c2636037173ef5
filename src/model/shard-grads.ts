/**
 * One (micro-)batch shard's loss and gradients: the piece of a training step that the trainer runs in its own
 * thread and that data-parallel replicas (parallel.ts, replica-thread-main.ts) run in theirs. Both call the very
 * same functions, so a shard's gradients do not depend on which thread computed them (same backend, same kernels).
 *
 * The loss of a shard is divided by the *full batch's* denominators (samples with a mask, samples), so the sum of
 * the shards' losses and gradients is the batch's loss and gradient (losses.ts).
 */
import * as tf from '@tensorflow/tfjs';
import type { StageName } from '../config/schema.ts';
import { crossEntropy, jointLoss, segLoss, type SegLossWeights } from './losses.js';
import type { ParamGroup, UNetModel } from './unet.js';

/** Samples of a batch as plain arrays (NHWC images, N x H x W x 1 masks). */
export interface ShardData {
  n: number;
  height: number;
  width: number;
  channels: number;
  x: Float32Array;
  /** null: no sample has a mask (zeros are used). */
  mask: Float32Array | null;
  hasMask: Float32Array;
  labels: Int32Array;
}

export interface ShardTensors {
  x: tf.Tensor4D;
  mask: tf.Tensor4D;
  hasMask: tf.Tensor1D;
  labels: tf.Tensor1D;
}

/** What a stage's loss needs besides the data. */
export interface LossSpec {
  stage: StageName;
  /** Groups whose BatchNorm layers run in eval mode (and whose dropout is off). */
  frozen: readonly ParamGroup[];
  labelSmoothing: number;
  lambdaSeg: number;
  lambdaCls: number;
  /** Terms of the segmentation loss (default: losses.ts's SEG_LOSS_DEFAULTS). */
  segWeights?: SegLossWeights;
}

/** Samples [from, to) of batch-like arrays, as views (no copy). */
export function sliceShard(
  b: { x: Float32Array; mask: Float32Array | null; hasMask: Float32Array; clsLabel: Int32Array; height: number; width: number; channels: number },
  from: number,
  to: number,
): ShardData {
  const area = b.height * b.width;
  const px = area * b.channels;
  return {
    n: to - from,
    height: b.height,
    width: b.width,
    channels: b.channels,
    x: b.x.subarray(from * px, to * px),
    mask: b.mask ? b.mask.subarray(from * area, to * area) : null,
    hasMask: b.hasMask.subarray(from, to),
    labels: b.clsLabel.subarray(from, to),
  };
}

/** A copy of a shard with arrays of their own (transferable to another thread). */
export function copyShard(s: ShardData): ShardData {
  return { ...s, x: s.x.slice(), mask: s.mask ? s.mask.slice() : null, hasMask: s.hasMask.slice(), labels: s.labels.slice() };
}

export function shardTensors(s: ShardData): ShardTensors {
  const { n, height: h, width: w, channels: c } = s;
  return {
    x: tf.tensor4d(s.x, [n, h, w, c]),
    mask: s.mask ? tf.tensor4d(s.mask, [n, h, w, 1]) : tf.zeros([n, h, w, 1]),
    hasMask: tf.tensor1d(s.hasMask),
    labels: tf.tensor1d(s.labels, 'int32'),
  };
}

export function disposeShardTensors(t: ShardTensors): void {
  t.x.dispose();
  t.mask.dispose();
  t.hasMask.dispose();
  t.labels.dispose();
}

/** The stage's training loss of a shard (a scalar), divided by the full batch's denominators. Creates tensors. */
export function stageLoss(model: UNetModel, spec: LossSpec, t: ShardTensors, segDen: number, clsDen: number): tf.Scalar {
  const fo = { training: true, frozen: spec.frozen };
  if (spec.stage === 'seg_warmup') return segLoss(model.forwardSeg(t.x, fo), t.mask, t.hasMask, segDen, spec.segWeights);
  if (spec.stage === 'cls_head') return crossEntropy(model.forwardCls(t.x, fo), t.labels, spec.labelSmoothing, clsDen);
  const { segLogits, clsLogits } = model.forward(t.x, fo);
  return jointLoss({
    segLogits,
    mask: t.mask,
    hasMask: t.hasMask,
    clsLogits,
    clsLabel: t.labels,
    lambdaSeg: spec.lambdaSeg,
    lambdaCls: spec.lambdaCls,
    labelSmoothing: spec.labelSmoothing,
    segWeights: spec.segWeights,
    segDenominator: segDen,
    clsDenominator: clsDen,
  }).total;
}

export interface ShardGradients {
  loss: number;
  /** By parameter name; the caller disposes them. */
  grads: Map<string, tf.Tensor>;
}

/**
 * Forward (training mode: updates the running statistics of the non-frozen BatchNorm layers) and backward over
 * one shard; gradients of `params` (our names -> variables).
 */
export function shardGradients(model: UNetModel, spec: LossSpec, params: ReadonlyMap<string, tf.Variable>, t: ShardTensors, segDen: number, clsDen: number): ShardGradients {
  const { value, grads } = tf.variableGrads(() => stageLoss(model, spec, t, segDen, clsDen), [...params.values()]);
  const loss = value.dataSync()[0]!;
  value.dispose();
  // In `params` order (a parameter the loss does not reach has no gradient, as with tf.variableGrads).
  const out = new Map<string, tf.Tensor>();
  for (const [name, v] of params) {
    const g = grads[v.name];
    if (g) out.set(name, g);
  }
  return { loss, grads: out };
}
