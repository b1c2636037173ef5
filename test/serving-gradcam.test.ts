/**
 * The demo's one-pass inference (runImageModel in src/serving/analyze.ts) against what it replaced: the Grad-CAM
 * from the forward pass's own bottleneck against gradCam(), which runs the encoder again, against the old
 * computation (autodiff through the head on the whole bottleneck) and against the Grad-CAM written out by hand
 * from the head's weights (GAP -> dense -> ReLU -> dense: the gradient of a logit
 * with respect to the bottleneck is the same for every pixel, W1 (relu'(h) * W2[:, c]) / HW); the probabilities
 * and the segmentation against predict(); the overlay PNGs pixel for pixel. Real Kaggle fixture images through
 * the training path's preprocessing, a small-preset model with its BatchNorm statistics moved off their initial
 * values so that the maps are not trivial.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { brainOf, gradCam, overlayPng } from '../src/evaluation/gradcam.ts';
import { predict, toModelInput, type SliceBatch } from '../src/evaluation/predict.ts';
import { kaggleImageToInput } from '../src/imaging/kaggle.ts';
import { initBackend } from '../src/model/engine.ts';
import { createUNet, type UNetModel } from '../src/model/unet.ts';
import { runImageModel } from '../src/serving/analyze.ts';
import { FIXTURES } from './helpers/services.ts';

const SIZE = 128;
const IMAGES = ['yes/Y28.jpg', 'yes/Y1.jpg', 'no/No17.jpg', 'no/N19.JPG'];

async function batchOf(rel: string): Promise<{ batch: SliceBatch; image: Float32Array }> {
  const input = await kaggleImageToInput(await readFile(join(FIXTURES, 'kaggle-navoneel', rel)), { imageSize: SIZE });
  if (!input.ok) throw new Error(`${rel}: ${input.reason}`);
  return { batch: { images: input.image, n: 1, size: SIZE, channels: 1 }, image: input.image };
}

/** Grad-CAM as gradCam() computed it before: autodiff of the class logit through the head on the full bottleneck. */
function autodiffCam(model: UNetModel, batch: SliceBatch, c: number): Float32Array {
  return tf.tidy(() => {
    const { bottleneck } = model.encode(toModelInput(batch), { training: false });
    const chosen = tf.oneHot(tf.tensor1d([c], 'int32'), 2);
    const grads = tf.grad((b: tf.Tensor) => model.classify(b as tf.Tensor4D, { training: false }).mul(chosen).sum())(bottleneck);
    const cam = tf.relu(bottleneck.mul(grads.mean([1, 2], true)).sum(3, true)) as tf.Tensor4D;
    const up = tf.image.resizeBilinear(cam, [SIZE, SIZE], false, true);
    const lo = up.min([1, 2, 3], true);
    const range = up.max([1, 2, 3], true).sub(lo);
    return up.sub(lo).div(range.add(tf.scalar(1e-12))).mul(range.greater(0).cast('float32')).dataSync() as Float32Array;
  });
}

/** The Grad-CAM of class c written out from the head's weights, with tf only for the encoder and the resize. */
function handCam(model: UNetModel, batch: SliceBatch, c: number): Float32Array {
  return tf.tidy(() => {
    const { bottleneck } = model.encode(toModelInput(batch), { training: false });
    const [, h, w, C] = bottleneck.shape;
    const a = bottleneck.dataSync();
    const w1 = model.params.get('head.fc1.weight')!.dataSync();
    const b1 = model.params.get('head.fc1.bias')!.dataSync();
    const w2 = model.params.get('head.fc2.weight')!.dataSync();
    const K = b1.length;
    const pooled = new Float64Array(C);
    for (let i = 0; i < h * w; i++) for (let ch = 0; ch < C; ch++) pooled[ch]! += a[i * C + ch]! / (h * w);
    const weights = new Float64Array(C);
    for (let k = 0; k < K; k++) {
      let pre = b1[k]!;
      for (let ch = 0; ch < C; ch++) pre += pooled[ch]! * w1[ch * K + k]!;
      if (pre <= 0) continue; // ReLU: no gradient through a unit that is off
      for (let ch = 0; ch < C; ch++) weights[ch]! += (w1[ch * K + k]! * w2[k * 2 + c]!) / (h * w);
    }
    const cam = new Float32Array(h * w);
    for (let i = 0; i < h * w; i++) {
      let s = 0;
      for (let ch = 0; ch < C; ch++) s += a[i * C + ch]! * weights[ch]!;
      cam[i] = Math.max(0, s);
    }
    const up = tf.image.resizeBilinear(tf.tensor4d(cam, [1, h, w, 1]), [SIZE, SIZE], false, true).dataSync();
    let lo = Infinity;
    let hi = -Infinity;
    for (const v of up) {
      lo = Math.min(lo, v);
      hi = Math.max(hi, v);
    }
    return Float32Array.from(up, (v) => (hi > lo ? (v - lo) / (hi - lo) : 0));
  });
}

function maxDiff(a: Float32Array, b: Float32Array): number {
  expect(a.length).toBe(b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}

describe('one forward pass for the demo: Grad-CAM from its bottleneck', () => {
  let model: UNetModel;

  beforeAll(async () => {
    await initBackend();
    model = createUNet('small', { seed: 7 });
    // Running statistics as training leaves them (not 0 / 1), so that BatchNorm in eval mode does real work.
    for (const [name, v] of model.buffers) {
      const n = v.size;
      v.assign(tf.tensor1d(Array.from({ length: n }, (_, i) => (name.endsWith('running_mean') ? 0.05 * Math.sin(i + n) : 0.5 + 0.4 * Math.cos(i)))));
    }
  });

  afterAll(() => model?.dispose());

  it('gives the map gradCam() gives, and the one written out from the weights, for each fixture and both classes', async () => {
    let lit = 0;
    for (const rel of IMAGES) {
      const { batch } = await batchOf(rel);
      const before = tf.memory().numTensors;
      const out = await runImageModel(model, batch, { segment: () => true, gradcam: true });
      expect(tf.memory().numTensors, 'tensors left behind').toBe(before);
      const predicted = out.p >= 0.5 ? 1 : 0;
      const old = gradCam(model, batch, { classes: [predicted] });
      expect(maxDiff(out.cam!, old), rel).toBeLessThan(1e-5);
      for (const c of [0, 1]) {
        const mine = gradCam(model, batch, { classes: [c] });
        expect(maxDiff(mine, autodiffCam(model, batch, c)), `${rel} class ${c}, autodiff`).toBeLessThan(1e-4);
        expect(maxDiff(mine, handCam(model, batch, c)), `${rel} class ${c}, by hand`).toBeLessThan(1e-4);
        if (Math.max(...mine) > 0) lit++;
      }
      // The rest of the pass: the same probabilities as predict(), which runs forward() as training does.
      const ref = await predict(model, batch);
      expect(out.p).toBeCloseTo(ref.cls[0]!, 6);
      expect(maxDiff(out.seg!, ref.seg)).toBeLessThan(1e-6);
    }
    expect(lit, 'maps that are not all zero').toBeGreaterThan(0);
  });

  it('draws the same overlay PNG as the old two-pass computation', async () => {
    const { batch, image } = await batchOf('yes/Y28.jpg');
    const out = await runImageModel(model, batch, { segment: () => false, gradcam: true });
    const brain = brainOf(image, 'kaggle');
    const decode = async (png: Buffer) => (await sharp(png).raw().toBuffer()) as Buffer;
    const a = await decode(await overlayPng(image, out.cam!, brain, SIZE));
    const b = await decode(await overlayPng(image, gradCam(model, batch, { classes: [out.p >= 0.5 ? 1 : 0] }), brain, SIZE));
    let off = 0;
    for (let i = 0; i < a.length; i++) off = Math.max(off, Math.abs(a[i]! - b[i]!));
    // A map value on a JET bin's edge may round to the next bin: one colour step at most.
    expect(off).toBeLessThanOrEqual(4);
  });

  it('skips the decoder when the answer needs no segmentation, and the Grad-CAM when it needs none', async () => {
    const { batch } = await batchOf('no/No17.jpg');
    const seen: number[] = [];
    const out = await runImageModel(model, batch, { segment: (p) => (seen.push(p), false), gradcam: false });
    expect(seen).toEqual([out.p]);
    expect(out.seg).toBeNull();
    expect(out.cam).toBeNull();
    expect(out.p).toBeCloseTo((await predict(model, batch, { classifyOnly: true })).cls[0]!, 6);
  });
});
