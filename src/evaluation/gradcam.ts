/**
 * Grad-CAM (REFERENCE.md, "Evaluation") on the last encoder block, the bottleneck the classification head reads:
 * the gradient of the chosen class's logit with respect to the block's activations, averaged over space, weighs
 * its channels; the map is ReLU(weighted sum), resized to the image, min-max normalised to [0, 1], and zero
 * outside the brain. The overlay is the JET colour map over the greyscale image at alpha 0.4, the background left
 * grey.
 */
import colormap from 'colormap';
import sharp from 'sharp';
import * as tf from '@tensorflow/tfjs';
import { shuffled } from '../lib/random.ts';
import type { UNetModel } from '../model/unet.ts';
import { toModelInput, type SliceBatch } from './predict.ts';

/** JET as 256 RGB triples, from the colormap package (matplotlib's and OpenCV's jet). */
const JET: [number, number, number][] = colormap({ colormap: 'jet', nshades: 256, format: 'rgba' }).map(([r, g, b]) => [r, g, b]);

export interface CamOptions {
  /** The class each sample's map explains (1 = tumour). */
  classes: number[];
}

/**
 * Grad-CAM maps for every sample of a batch: N x S x S in [0, 1], not yet brain-masked (a map that is zero
 * everywhere stays zero).
 */
export function gradCam(model: UNetModel, batch: SliceBatch, { classes }: CamOptions): Float32Array {
  const { n, size } = batch;
  if (classes.length !== n) throw new RangeError(`gradCam: ${classes.length} classes for ${n} samples`);
  return tf.tidy(() => {
    const x = toModelInput(batch);
    const { bottleneck } = model.encode(x, { training: false });
    const chosen = tf.oneHot(tf.tensor1d(classes, 'int32'), 2);
    const grads = tf.grad((b: tf.Tensor) => model.classify(b as tf.Tensor4D, { training: false }).mul(chosen).sum())(bottleneck);
    const weights = grads.mean([1, 2], true);
    const cam = tf.relu(bottleneck.mul(weights).sum(3, true)) as tf.Tensor4D;
    const up = tf.image.resizeBilinear(cam, [size, size], false, true);
    const lo = up.min([1, 2, 3], true);
    const range = up.max([1, 2, 3], true).sub(lo);
    // A flat map (range 0) stays 0 instead of dividing by zero.
    return up.sub(lo).div(range.add(tf.scalar(1e-12))).mul(range.greater(0).cast('float32')).dataSync() as Float32Array;
  });
}

/**
 * The brain, for masking a map: Kaggle inputs are exactly 0 outside the brain mask preprocessing made; a BraTS
 * slice's background is its volume's lowest value after the z-score (the zeros around the head).
 */
export function brainOf(image: Float32Array, source: 'brats' | 'kaggle'): Uint8Array {
  const mask = new Uint8Array(image.length);
  if (source === 'kaggle') {
    for (let i = 0; i < image.length; i++) mask[i] = image[i] !== 0 ? 1 : 0;
    return mask;
  }
  let min = Infinity;
  for (let i = 0; i < image.length; i++) if (image[i]! < min) min = image[i]!;
  for (let i = 0; i < image.length; i++) mask[i] = image[i]! > min + 1e-6 ? 1 : 0;
  return mask;
}

/** The map over the image as an RGB PNG: JET at `alpha` inside the brain, the greyscale image elsewhere. */
export async function overlayPng(image: Float32Array, cam: Float32Array, brain: Uint8Array, size: number, alpha = 0.4): Promise<Buffer> {
  const area = size * size;
  // Grey levels from the brain's own range, so that the z-scored background does not wash the image out.
  let lo = Infinity;
  let hi = -Infinity;
  for (let i = 0; i < area; i++) {
    if (!brain[i]) continue;
    if (image[i]! < lo) lo = image[i]!;
    if (image[i]! > hi) hi = image[i]!;
  }
  const span = hi > lo ? hi - lo : 1;
  const rgb = Buffer.alloc(area * 3);
  for (let i = 0; i < area; i++) {
    const grey = brain[i] ? Math.max(0, Math.min(255, ((image[i]! - lo) / span) * 255)) : 0;
    let r = grey;
    let g = grey;
    let b = grey;
    if (brain[i]) {
      const [jr, jg, jb] = JET[Math.max(0, Math.min(255, Math.round(cam[i]! * 255)))]!;
      r = (1 - alpha) * grey + alpha * jr;
      g = (1 - alpha) * grey + alpha * jg;
      b = (1 - alpha) * grey + alpha * jb;
    }
    rgb[i * 3] = Math.round(r);
    rgb[i * 3 + 1] = Math.round(g);
    rgb[i * 3 + 2] = Math.round(b);
  }
  return sharp(rgb, { raw: { width: size, height: size, channels: 3 } }).png().toBuffer();
}

export interface Candidate {
  /** 1 = tumour. */
  truth: number;
  pred: number;
}

/**
 * Which samples get a Grad-CAM: a quarter of `count` each of correct tumour, correct no tumour, wrong tumour (a
 * missed tumour) and wrong no tumour (a false alarm), drawn with `rng`; a group with too few samples leaves its
 * share to the others, in that order. Returns indices into `candidates`, grouped in that order.
 */
export function chooseCamSamples(candidates: readonly Candidate[], count: number, rng: () => number): number[] {
  const groups: number[][] = [[], [], [], []];
  candidates.forEach((c, i) => {
    const correct = c.pred === c.truth;
    groups[c.truth === 1 ? (correct ? 0 : 2) : correct ? 1 : 3]!.push(i);
  });
  const pools = groups.map((g) => shuffled(g, rng));
  const quota = Math.floor(count / 4);
  const taken = pools.map((p) => p.splice(0, quota));
  let missing = Math.min(count, candidates.length) - taken.reduce((a, t) => a + t.length, 0);
  for (let g = 0; missing > 0; g = (g + 1) % 4) {
    const next = pools[g]!.shift();
    if (next !== undefined) {
      taken[g]!.push(next);
      missing--;
    }
  }
  return taken.flat();
}
