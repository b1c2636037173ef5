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
 * everywhere stays zero). Runs the encoder; a caller that has just run the model passes that pass's bottleneck to
 * camFromBottleneck instead (the demo does), which skips this second encoder pass.
 */
export function gradCam(model: UNetModel, batch: SliceBatch, { classes }: CamOptions): Float32Array {
  const { n, size } = batch;
  if (classes.length !== n) throw new RangeError(`gradCam: ${classes.length} classes for ${n} samples`);
  const bottleneck = tf.tidy(() => model.encode(toModelInput(batch), { training: false }).bottleneck);
  try {
    return camFromBottleneck(model, bottleneck, classes, size);
  } finally {
    bottleneck.dispose();
  }
}

/**
 * The Grad-CAM maps (N x S x S, [0, 1]) of `classes` from bottleneck activations already computed (N x h x w x C);
 * nothing here runs the encoder.
 *
 * The head starts with a global average pool, so the gradient of a logit with respect to the bottleneck is the
 * same at every pixel: its gradient with respect to the pooled features, divided by h x w, which is what Grad-CAM
 * averages over space anyway. So the channel weights come from a backward pass through the head on the pooled
 * N x 1 x 1 x C features alone (the pool of a 1 x 1 map is itself), not on the full bottleneck. The rest (the
 * weighted sum, ReLU, the bilinear resize with half-pixel centres as tf.image.resizeBilinear does it, the min-max
 * normalisation) is a few plain loops over one small map: as tfjs ops on the wasm backend they cost ~10 ms of
 * dispatch and allocation for well under 1 ms of arithmetic.
 */
export function camFromBottleneck(model: UNetModel, bottleneck: tf.Tensor4D, classes: readonly number[], size: number): Float32Array {
  const [n, h, w, c] = bottleneck.shape;
  if (classes.length !== n) throw new RangeError(`camFromBottleneck: ${classes.length} classes for ${n} samples`);
  const weights = tf.tidy(() => {
    const chosen = tf.oneHot(tf.tensor1d(classes as number[], 'int32'), 2);
    const pooled = bottleneck.mean([1, 2], true);
    return tf.grad((p: tf.Tensor) => model.classify(p as tf.Tensor4D, { training: false }).mul(chosen).sum())(pooled).dataSync() as Float32Array;
  });
  return camMaps(bottleneck.dataSync() as Float32Array, 'nhwc', [n, h, w, c], weights, size);
}

/**
 * camFromBottleneck's maths on plain arrays, for any engine: `activations` are the bottleneck (N x h x w x C for
 * 'nhwc', tfjs's layout; N x C x h x w for 'nchw', ONNX's), `weights` the N x C gradients of the chosen logits with
 * respect to the pooled features. Per sample: ReLU(sum over channels of activation x weight) / (h x w), resized to
 * size x size with half-pixel centres, min-max normalised (a flat map stays 0).
 */
export function camMaps(activations: Float32Array, layout: 'nhwc' | 'nchw', [n, h, w, c]: readonly [number, number, number, number], weights: Float32Array, size: number): Float32Array {
  const a = activations;
  const hw = h * w;
  // Where channel k of pixel i is, relative to the sample's start.
  const pixelStride = layout === 'nhwc' ? c : 1;
  const channelStride = layout === 'nhwc' ? 1 : hw;
  const area = size * size;
  const out = new Float32Array(n * area);
  const cam = new Float32Array(hw);
  for (let s = 0; s < n; s++) {
    const wt = weights.subarray(s * c, (s + 1) * c);
    const base = s * hw * c;
    for (let i = 0; i < hw; i++) {
      let sum = 0;
      for (let k = 0, o = base + i * pixelStride; k < c; k++, o += channelStride) sum += a[o]! * wt[k]!;
      cam[i] = sum > 0 ? sum / hw : 0;
    }
    const up = out.subarray(s * area, (s + 1) * area);
    resizeBilinearHalfPixel(cam, h, w, up, size, size);
    let lo = Infinity;
    let hi = -Infinity;
    for (let i = 0; i < area; i++) {
      if (up[i]! < lo) lo = up[i]!;
      if (up[i]! > hi) hi = up[i]!;
    }
    // A flat map (range 0) stays 0 instead of dividing by zero.
    const range = hi - lo;
    for (let i = 0; i < area; i++) up[i] = range > 0 ? (up[i]! - lo) / range : 0;
  }
  return out;
}

/** One channel resized bilinearly, half-pixel centres, edges clamped: tf.image.resizeBilinear(x, size, false, true). */
export function resizeBilinearHalfPixel(src: Float32Array, h: number, w: number, dst: Float32Array, outH: number, outW: number): void {
  const axis = (o: number, inN: number, outN: number) => {
    const x = (inN / outN) * (o + 0.5) - 0.5;
    const f = Math.floor(x);
    return { lo: Math.max(0, f), hi: Math.min(inN - 1, Math.ceil(x)), frac: x - f };
  };
  const cols = Array.from({ length: outW }, (_, x) => axis(x, w, outW));
  for (let y = 0; y < outH; y++) {
    const r = axis(y, h, outH);
    const top = r.lo * w;
    const bottom = r.hi * w;
    for (let x = 0; x < outW; x++) {
      const col = cols[x]!;
      const t = src[top + col.lo]! + (src[top + col.hi]! - src[top + col.lo]!) * col.frac;
      const b = src[bottom + col.lo]! + (src[bottom + col.hi]! - src[bottom + col.lo]!) * col.frac;
      dst[y * outW + x] = t + (b - t) * r.frac;
    }
  }
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
