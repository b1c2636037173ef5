/**
 * The ONNX Runtime engine (src/serving/onnx-graph.ts, onnx-engine.ts) against the tfjs forward pass of the same
 * checkpoint, which is what training and evaluation run: p(tumour), the segmentation probabilities, the volume
 * path's resize back to the slice grid and the Grad-CAM maps, on real fixtures (a Kaggle JPEG through the training
 * path's preprocessing, a BraTS FLAIR volume through volumeToSlices) and on a random batch.
 *
 * Two architectures: the small preset, and base 6 / depth 3 / head 5 at 90 x 90, whose levels (90, 45, 22, 11)
 * are odd: the upsampling there resizes to the skip's size, not x2, the path the presets at 256 never take. The
 * weights are made to matter: BatchNorm statistics, scales and shifts moved off their initial values and the
 * segmentation logit's weights scaled up, so that p(tumour) per pixel spreads over (0, 1) instead of sitting at 0.5,
 * where a wrong convention (half-pixel instead of asymmetric upsampling, a filter not transposed, the concat
 * swapped) would hide. The spread is asserted too.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { env } from '../src/env.ts';
import { gradCam } from '../src/evaluation/gradcam.ts';
import { predict, toModelInput, type SliceBatch } from '../src/evaluation/predict.ts';
import { volumeToSlices } from '../src/imaging/brats.ts';
import { kaggleImageToInput } from '../src/imaging/kaggle.ts';
import { parseNiftiRaw } from '../src/imaging/nifti.ts';
import { initBackend } from '../src/model/engine.ts';
import { createUNet, type ArchConfig, type PresetName, type UNetModel } from '../src/model/unet.ts';
import { analyzeVolume, runImageModel, tfjsEngine } from '../src/serving/analyze.ts';
import { buildOnnxGraph, hwioToOihw, weightsOf } from '../src/serving/onnx-graph.ts';
import { headGradient, OnnxEngine, OnnxRuntimeUnavailableError } from '../src/serving/onnx-engine.ts';
import { FIXTURES } from './helpers/services.ts';

/** Probabilities (p(tumour), per pixel) may differ by this much: float32 sums in another order. */
const PROB_TOL = 1e-4;
/** Grad-CAM maps are min-max normalised: a small map's relative rounding grows by its range; still tight. */
const CAM_TOL = 1e-3;

function maxDiff(a: Float32Array, b: Float32Array): number {
  expect(a.length).toBe(b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}

/** Standard deviation: the outputs compared must spread, or a wrong convention could pass unseen. */
function spread(a: Float32Array): number {
  let s = 0;
  let s2 = 0;
  for (const v of a) {
    s += v;
    s2 += v * v;
  }
  return Math.sqrt(Math.max(0, s2 / a.length - (s / a.length) ** 2));
}

/** A model as training leaves one: BatchNorm not at identity, a segmentation logit that is not ~0 everywhere. */
function trainedLike(arch: PresetName | ArchConfig, seed: number): UNetModel {
  const model = createUNet(arch, { seed });
  const wave = (n: number, f: (i: number) => number) => tf.tensor1d(Array.from({ length: n }, (_, i) => f(i)));
  for (const [name, v] of model.buffers) {
    const n = v.size;
    v.assign(wave(n, name.endsWith('running_mean') ? (i) => 0.05 * Math.sin(i + n) : (i) => 0.5 + 0.4 * Math.cos(i)));
  }
  for (const [name, v] of model.params) {
    if (/\.bn\d\.weight$/.test(name)) v.assign(wave(v.size, (i) => 1 + 0.3 * Math.sin(3 * i)));
    else if (/\.bn\d\.bias$/.test(name)) v.assign(wave(v.size, (i) => 0.1 * Math.cos(5 * i)));
  }
  const out = model.params.get('decoder.out.weight')!;
  out.assign(out.mul(40));
  return model;
}

function randomBatch(n: number, size: number, seed: number): SliceBatch {
  let x = seed;
  const images = new Float32Array(n * size * size).map(() => {
    x = (x * 1103515245 + 12345) % 2 ** 31;
    return (x / 2 ** 31) * 4 - 2;
  });
  return { images, n, size, channels: 1 };
}

async function kaggleBatch(rel: string, size: number): Promise<SliceBatch> {
  const input = await kaggleImageToInput(await readFile(join(FIXTURES, 'kaggle-navoneel', rel)), { imageSize: size });
  if (!input.ok) throw new Error(`${rel}: ${input.reason}`);
  return { images: input.image, n: 1, size, channels: 1 };
}

const CASES: { name: string; arch: PresetName | ArchConfig; size: number; seed: number }[] = [
  { name: 'small preset at 128', arch: 'small', size: 128, seed: 7 },
  { name: 'base 6, depth 3, head 5 at 90 (odd levels)', arch: { base: 6, depth: 3, headHidden: 5 }, size: 90, seed: 11 },
];

beforeAll(async () => {
  await initBackend();
});

describe.each(CASES)('ONNX Runtime engine vs tfjs: $name', ({ arch, size, seed }) => {
  let model: UNetModel;
  let engine: OnnxEngine;

  beforeAll(async () => {
    model = trainedLike(arch, seed);
    engine = await OnnxEngine.create(model, { imageSize: size, threads: 2 });
  });
  afterAll(async () => {
    await engine?.dispose();
    model?.dispose();
  });

  it('one real image: p(tumour), the segmentation and the Grad-CAM of the predicted class', async () => {
    let lit = 0;
    for (const rel of ['yes/Y28.jpg', 'no/No17.jpg', 'yes/Y1.jpg']) {
      const batch = await kaggleBatch(rel, size);
      const mine = await engine.runImage(batch, { segment: () => true, gradcam: true });
      const ref = await runImageModel(model, batch, { segment: () => true, gradcam: true });
      expect(Math.abs(mine.p - ref.p), rel).toBeLessThan(PROB_TOL);
      expect(maxDiff(mine.seg!, ref.seg!), rel).toBeLessThan(PROB_TOL);
      expect(spread(ref.seg!), `${rel}: segmentation probabilities spread`).toBeGreaterThan(0.05);
      expect(maxDiff(mine.cam!, ref.cam!), rel).toBeLessThan(CAM_TOL);
      if (Math.max(...ref.cam!) === 1) lit++;
    }
    expect(lit, 'Grad-CAMs that are not all zero (ReLU may zero a whole map)').toBeGreaterThan(0);
  });

  it('skips the decoder when the answer needs no segmentation, and the Grad-CAM when it needs none', async () => {
    const batch = await kaggleBatch('no/No17.jpg', size);
    const seen: number[] = [];
    const out = await engine.runImage(batch, { segment: (p) => (seen.push(p), false), gradcam: false });
    expect(seen).toEqual([out.p]);
    expect([out.seg, out.cam]).toEqual([null, null]);
  });

  it('a random batch: p(tumour) and the segmentation per sample, and the head gradient of both classes', async () => {
    const batch = randomBatch(3, size, seed);
    const mine = await engine.predict(batch, { batchSize: 2 });
    const ref = await predict(model, batch);
    expect(maxDiff(mine.cls, ref.cls)).toBeLessThan(PROB_TOL);
    expect(maxDiff(mine.seg, ref.seg)).toBeLessThan(PROB_TOL);
    expect(spread(ref.seg)).toBeGreaterThan(0.05);
    // Grad-CAM for both classes: headGradient (the head's gradient written out) against tfjs's autodiff.
    for (const c of [0, 1]) {
      const weights = tf.tidy(() => {
        const pooled = model.encode(toModelInput(batch), { training: false }).bottleneck.mean([1, 2], true);
        const chosen = tf.oneHot(tf.tensor1d([c, c, c], 'int32'), 2);
        return tf.grad((p: tf.Tensor) => model.classify(p as tf.Tensor4D, { training: false }).mul(chosen).sum())(pooled).dataSync() as Float32Array;
      });
      const hidden = tf.tidy(() => {
        const pooled = tf.mean(model.encode(toModelInput(batch), { training: false }).bottleneck, [1, 2]);
        return pooled.matMul(model.params.get('head.fc1.weight')! as tf.Tensor2D).add(model.params.get('head.fc1.bias')!).dataSync() as Float32Array;
      });
      const { config } = model;
      const head = { channels: config.base * 2 ** config.depth, hidden: config.headHidden, fc1: model.params.get('head.fc1.weight')!.dataSync() as Float32Array, fc2: model.params.get('head.fc2.weight')!.dataSync() as Float32Array };
      expect(maxDiff(headGradient(head, hidden, [c, c, c]), weights), `class ${c}`).toBeLessThan(1e-5);
    }
    // And the engine's Grad-CAM of each sample against gradCam() (its predicted class).
    for (let s = 0; s < batch.n; s++) {
      const one: SliceBatch = { ...batch, images: batch.images.subarray(s * size * size, (s + 1) * size * size), n: 1 };
      const out = await engine.runImage(one, { segment: () => false, gradcam: true });
      expect(maxDiff(out.cam!, gradCam(model, one, { classes: [out.p >= 0.5 ? 1 : 0] })), `sample ${s}`).toBeLessThan(CAM_TOL);
    }
  });
});

describe('ONNX Runtime engine on a real volume', () => {
  it("analyzeVolume's slices: p(tumour), the probabilities on the volume's own grid, the same labels as tfjs", async () => {
    const size = 64;
    const model = trainedLike('small', 3);
    const engine = await OnnxEngine.create(model, { threads: 2 }); // graphs built on first use
    try {
      const bytes = await readFile(join(FIXTURES, 'brats2015-deepmedic/pat0001/Flair_subtrMeanDivStd.nii.gz'));
      const volume = await parseNiftiRaw(bytes, 'pat0001');
      const [nx, ny, nz] = volume.dims;
      const slices = volumeToSlices(volume, null, { imageSize: size });
      const batch: SliceBatch = { images: slices.images, n: nz, size, channels: 1 };
      const mine = await engine.predict(batch, { nativeSize: [nx, ny] });
      const ref = await predict(model, batch, { nativeSize: [nx, ny] });
      expect(maxDiff(mine.cls, ref.cls)).toBeLessThan(PROB_TOL);
      expect(maxDiff(mine.seg, ref.seg)).toBeLessThan(PROB_TOL);
      expect(maxDiff(mine.native!, ref.native!)).toBeLessThan(PROB_TOL);
      expect(spread(ref.native!)).toBeGreaterThan(0.05);

      const a = await analyzeVolume(engine, bytes, 'pat0001.nii.gz', { imageSize: size });
      const b = await analyzeVolume(tfjsEngine(model), bytes, 'pat0001.nii.gz', { imageSize: size });
      expect(a.shape).toEqual([nx, ny, nz]);
      let differ = 0;
      for (let i = 0; i < a.labels.length; i++) if (a.labels[i] !== b.labels[i]) differ++;
      // Only a voxel within PROB_TOL of the threshold (and the small regions it joins) may flip.
      expect(differ / a.labels.length).toBeLessThan(1e-4);
      expect(a.tumor_voxels).toBeGreaterThan(0);
    } finally {
      await engine.dispose();
      model.dispose();
    }
  });
});

describe('the ONNX graph', () => {
  it('transposes tfjs filters (HWIO) to ONNX (OIHW)', () => {
    const src = Float32Array.from({ length: 2 * 3 * 4 * 5 }, (_, i) => i);
    const dst = hwioToOihw(src, [2, 3, 4, 5]);
    for (let y = 0; y < 2; y++) for (let x = 0; x < 3; x++) for (let i = 0; i < 4; i++) for (let o = 0; o < 5; o++) expect(dst[((o * 4 + i) * 2 + y) * 3 + x]).toBe(src[((y * 3 + x) * 4 + i) * 5 + o]);
  });

  it('refuses an image size the depth cannot take, and a model missing a weight', () => {
    const model = createUNet({ base: 2, depth: 3, headHidden: 3 }, { seed: 1 });
    try {
      const weights = weightsOf(model);
      expect(() => buildOnnxGraph(model.config, weights, 'full', { imageSize: 4 })).toThrow(/cannot take 4 x 4 images/);
      weights.delete('decoder.1.bn2.running_var');
      expect(() => buildOnnxGraph(model.config, weights, 'full', { imageSize: 32 })).toThrow(/no decoder\.1\.bn2\.running_var/);
    } finally {
      model.dispose();
    }
  });

  it('says which engine runs, and fails loudly, naming the package and the switch, when onnxruntime-node cannot load', async () => {
    const model = createUNet('small', { seed: 1 });
    const engine = await OnnxEngine.create(model, { threads: 2, othersBusy: () => false });
    expect(engine.info).toMatchObject({ engine: 'onnx', backend: 'onnxruntime', threads: 2 });
    expect(engine.info.device).toMatch(/^CPU \(onnxruntime-node \d+\.\d+\.\d+, 2 intra-op threads \(1 while another inference thread computes\)\)$/);
    await engine.dispose();
    model.dispose();
    const err = new OnnxRuntimeUnavailableError(new Error('libonnxruntime.so.1: cannot open shared object file'));
    expect(err.message).toMatch(/onnxruntime-node cannot be loaded \(libonnxruntime\.so\.1: .*\).*SLICEWISE_DEMO_ENGINE=tfjs/);
    expect([err.status, err.code]).toEqual([503, 'engine_unavailable']);
  });

  it('SLICEWISE_DEMO_ENGINE: onnx by default, tfjs on demand, anything else an error naming the variable', () => {
    expect(env({}).demoEngine).toBe('onnx');
    expect(env({ SLICEWISE_DEMO_ENGINE: 'TFJS' }).demoEngine).toBe('tfjs');
    expect(() => env({ SLICEWISE_DEMO_ENGINE: 'torch' })).toThrow(/SLICEWISE_DEMO_ENGINE=torch is not one of onnx, tfjs/);
  });
});
