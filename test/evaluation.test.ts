/**
 * The evaluation's arithmetic against values computed here by hand, on a tiny U-Net whose weights are set so
 * that its answers are known: its segmentation is "z-scored intensity > 0.5" and its classifier "mean activation
 * above a threshold", so a bright tumour is found exactly where it is.
 */
import * as tf from '@tensorflow/tfjs';
import { beforeAll, describe, expect, it } from 'vitest';
import { classificationReport, evaluateMultitask, volumeOverlap, type PatientSource } from '../src/evaluation/evaluate.ts';
import { brainOf, chooseCamSamples, gradCam, overlayPng } from '../src/evaluation/gradcam.ts';
import type { RawNiftiVolume } from '../src/imaging/nifti.ts';
import { mulberry32 } from '../src/lib/random.ts';
import { initBackend } from '../src/model/engine.ts';
import { createUNet, type UNetModel } from '../src/model/unet.ts';
import sharp from 'sharp';

const N = 32; // volume and model size: no resizing, so every figure can be counted by hand
const Z = 8;
const TUMOUR_SLICES = [2, 3, 4, 5];

function volume(raw: Float32Array): RawNiftiVolume {
  return { dims: [N, N, Z], pixdim: [1, 1, 1], datatype: 'float32', axisCodes: null, raw, slope: 1, inter: 0 };
}

/** A disk of brain (1) with a 6 x 6 tumour square (10) on TUMOUR_SLICES at rows 10..15 and columns `col`..`col`+5. */
function patient({ imageCol = 10, segCol = 10 }: { imageCol?: number; segCol?: number } = {}) {
  const img = new Float32Array(N * N * Z);
  const seg = new Float32Array(N * N * Z);
  for (let k = 0; k < Z; k++)
    for (let j = 0; j < N; j++)
      for (let i = 0; i < N; i++) {
        const at = i + N * (j + N * k);
        if ((i - 16) ** 2 + (j - 16) ** 2 < 144) img[at] = 1;
        if (!TUMOUR_SLICES.includes(k) || i < 10 || i > 15) continue;
        if (j >= imageCol && j <= imageCol + 5) img[at] = 10;
        if (j >= segCol && j <= segCol + 5) seg[at] = 2;
      }
  return { volumes: [volume(img)], seg: volume(seg) };
}

/**
 * depth 0, one channel: the bottleneck is the input block. Its convolutions pass the pixel through (centre tap 1),
 * BatchNorm is the identity, so the features are max(x, 0). Segmentation: sign * 20 * feature - 10, i.e. tumour
 * where the feature exceeds 0.5 (sign 1), or nowhere (sign -1). Classification: p(tumour) > 0.5 exactly when the
 * mean feature exceeds `clsThreshold`.
 */
function knownModel(sign: 1 | -1, clsThreshold: number): UNetModel {
  const model = createUNet({ base: 1, depth: 0, headHidden: 1 }, { inChannels: 1 });
  const set = (name: string, values: number[], shape: number[]) => model.params.get(name)!.assign(tf.tensor(values, shape));
  const centre = [0, 0, 0, 0, 1, 0, 0, 0, 0];
  set('encoder.0.conv1.weight', centre, [3, 3, 1, 1]);
  set('encoder.0.conv2.weight', centre, [3, 3, 1, 1]);
  set('decoder.out.weight', [sign * 20], [1, 1, 1, 1]);
  set('decoder.out.bias', [-10], [1]);
  set('head.fc1.weight', [1], [1, 1]);
  set('head.fc1.bias', [0], [1]);
  set('head.fc2.weight', [-1, 1], [1, 2]);
  set('head.fc2.bias', [clsThreshold, -clsThreshold], [2]);
  return model;
}

const source = (...patients: ReturnType<typeof patient>[]): PatientSource => ({
  count: patients.length,
  async *load() {
    for (const [i, p] of patients.entries()) yield { id: `p${i}`, ...p };
  },
});

const options = { imageSize: N, sampling: { seed: 42, minTumorPixels: 1, keepProbability: 0.5 }, clsTumorPixels: 10 };

describe('evaluation metrics', () => {
  beforeAll(async () => {
    await initBackend();
  });

  it('classification figures of a perfect, an all-wrong and a single-class set', () => {
    const perfect = classificationReport([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0], 0.5)!;
    expect(perfect).toEqual({ n: 4, accuracy: 1, precision: 1, recall: 1, specificity: 1, f1: 1, roc_auc: 1, confusion: { tp: 2, fp: 0, tn: 2, fn: 0 } });
    const wrong = classificationReport([0.1, 0.2, 0.9, 0.8], [1, 1, 0, 0], 0.5)!;
    expect(wrong).toEqual({ n: 4, accuracy: 0, precision: 0, recall: 0, specificity: 0, f1: 0, roc_auc: 0, confusion: { tp: 0, fp: 2, tn: 0, fn: 2 } });
    // One class only: ROC-AUC is undefined (null, not NaN); 3 of 4 tumours found.
    const single = classificationReport([0.9, 0.7, 0.6, 0.2], [1, 1, 1, 1], 0.5)!;
    expect(single).toMatchObject({ accuracy: 0.75, precision: 1, recall: 0.75, specificity: 0, roc_auc: null, confusion: { tp: 3, fp: 0, tn: 0, fn: 1 } });
    expect(single.f1).toBeCloseTo((2 * 0.75) / 1.75, 12);
    expect(classificationReport([], [], 0.5)).toBeNull();
  });

  it('3-D Dice of a prediction against a volume, counted independently', () => {
    const { seg } = patient({ segCol: 10 });
    // The prediction: the tumour square moved two columns right, on the slices' grid (row i, column j).
    const probs = new Float32Array(N * N * Z);
    const predicted = new Set<string>();
    for (const k of TUMOUR_SLICES)
      for (let i = 10; i <= 15; i++)
        for (let j = 12; j <= 17; j++) {
          probs[k * N * N + i * N + j] = 0.9;
          predicted.add(`${i},${j},${k}`);
        }
    const truth = new Set<string>();
    for (let k = 0; k < Z; k++) for (let j = 0; j < N; j++) for (let i = 0; i < N; i++) if (seg.raw[i + N * (j + N * k)]! > 0) truth.add(`${i},${j},${k}`);
    const both = [...predicted].filter((v) => truth.has(v)).length;
    const o = volumeOverlap(probs, seg, 0.5);
    expect(o.truth).toBe(truth.size);
    expect(o.predicted).toBe(predicted.size);
    expect(o.dice).toBeCloseTo((2 * both) / (truth.size + predicted.size), 12);
    expect(o.dice).toBeCloseTo(2 / 3, 12); // 4 of 6 columns overlap
    expect(o.iou).toBeCloseTo(both / (truth.size + predicted.size - both), 12);
    // Nothing predicted and nothing there: 1, the original's rule.
    expect(volumeOverlap(new Float32Array(N * N * Z), volume(new Float32Array(N * N * Z)), 0.5).dice).toBe(1);
  });

  it('a model that finds the tumour exactly scores 1 everywhere', async () => {
    const model = knownModel(1, 0.25);
    try {
      const r = await evaluateMultitask(model, { patients: source(patient()), kaggle: null }, options);
      const seg = r.segmentation!;
      expect(seg.per_slice.dice.mean).toBe(1);
      expect(seg.per_slice.dice.std).toBe(0);
      expect(seg.per_slice_non_empty.dice).toEqual({ mean: 1, std: 0, n: TUMOUR_SLICES.length });
      expect(seg.per_slice.slices).toBe(seg.per_slice.empty_both + TUMOUR_SLICES.length);
      expect(seg.per_patient_3d.patients).toEqual([{ patient_id: 'p0', dice: 1, iou: 1, slices: Z, true_voxels: 144, predicted_voxels: 144 }]);
      expect(r.classification.brats).toMatchObject({ accuracy: 1, recall: 1, specificity: 1, roc_auc: 1 });
      expect(r.classification.kaggle).toBeNull();
      expect(r.combined).toBe(1);
    } finally {
      model.dispose();
    }
  });

  it('a model that finds nothing scores 0 on tumour slices, 1 on empty ones, and the means say how many of each', async () => {
    const model = knownModel(-1, 0.25);
    try {
      const r = await evaluateMultitask(model, { patients: source(patient()), kaggle: null }, options);
      const seg = r.segmentation!;
      const n = seg.per_slice.slices;
      const empty = seg.per_slice.empty_both;
      expect(seg.per_slice_non_empty.dice).toEqual({ mean: 0, std: 0, n: TUMOUR_SLICES.length });
      expect(seg.per_slice.dice.mean).toBeCloseTo(empty / n, 12);
      expect(seg.per_patient_3d.patients[0]).toMatchObject({ dice: 0, true_voxels: 144, predicted_voxels: 0 });
      expect(seg.per_patient_3d.median_dice).toBe(0);
    } finally {
      model.dispose();
    }
  });

  it('3-D Dice follows the overlap when the model lights another place than the label', async () => {
    const model = knownModel(1, 0.25);
    try {
      const r = await evaluateMultitask(model, { patients: source(patient({ imageCol: 12, segCol: 10 })), kaggle: null }, { ...options, sampling: { ...options.sampling, keepProbability: 0 } });
      expect(r.segmentation!.per_patient_3d.mean_dice).toBeCloseTo(2 / 3, 6);
      // Only the tumour slices are kept (keepProbability 0): each overlaps 4 of 6 columns.
      expect(r.segmentation!.per_slice.dice).toMatchObject({ n: 4 });
      expect(r.segmentation!.per_slice.dice.mean).toBeCloseTo(2 / 3, 6);
    } finally {
      model.dispose();
    }
  });
});

describe('Grad-CAM', () => {
  it('lights the region that decides the class, and nothing for the class it argues against', async () => {
    await initBackend();
    const model = knownModel(1, 0.01);
    try {
      const image = new Float32Array(N * N);
      for (let r = 0; r < N; r++) for (let c = 0; c < N; c++) image[r * N + c] = r < 8 && c < 8 ? 3 : 0.2;
      const batch = { images: image, n: 1, size: N, channels: 1 };
      const cam = gradCam(model, batch, { classes: [1] });
      let inside = 0;
      let outside = 0;
      let peak = 0;
      for (let i = 0; i < N * N; i++) {
        const isIn = Math.floor(i / N) < 8 && i % N < 8;
        if (isIn) inside += cam[i]!;
        else outside += cam[i]!;
        if (cam[i]! > cam[peak]!) peak = i;
      }
      expect(Math.floor(peak / N) < 8 && peak % N < 8).toBe(true);
      expect(inside / 64).toBeGreaterThan(0.9);
      expect(outside / (N * N - 64)).toBeLessThan(0.1);
      // Class 0's logit falls as the features grow: its map is ReLU of a negative sum, zero everywhere.
      expect(Math.max(...gradCam(model, batch, { classes: [0] }))).toBe(0);

      const png = await overlayPng(image, cam, brainOf(image, 'kaggle'), N);
      const { data, info } = await sharp(png).raw().toBuffer({ resolveWithObject: true });
      expect([info.width, info.height, info.channels]).toEqual([N, N, 3]);
      // JET's top is red: the square is reddish, the rest of the brain blue-ish.
      const px = (r: number, c: number) => [...data.subarray((r * N + c) * 3, (r * N + c) * 3 + 3)];
      expect(px(3, 3)[0]!).toBeGreaterThan(px(3, 3)[2]!);
      expect(px(20, 20)[2]!).toBeGreaterThan(px(20, 20)[0]!);
    } finally {
      model.dispose();
    }
  });

  it('picks a quarter of each of correct/wrong x tumour/no tumour, and fills a short group from the others', () => {
    const c = (truth: number, pred: number, n: number) => Array.from({ length: n }, () => ({ truth, pred }));
    const candidates = [...c(1, 1, 30), ...c(0, 0, 30), ...c(1, 0, 2), ...c(0, 1, 30)];
    const chosen = chooseCamSamples(candidates, 20, mulberry32(1)).map((i) => candidates[i]!);
    expect(chosen).toHaveLength(20);
    const count = (t: number, p: number) => chosen.filter((s) => s.truth === t && s.pred === p).length;
    expect(count(1, 0)).toBe(2); // only two missed tumours exist
    expect(count(1, 1) + count(0, 0) + count(0, 1)).toBe(18);
    for (const [t, p] of [[1, 1], [0, 0], [0, 1]]) expect(count(t!, p!)).toBeGreaterThanOrEqual(5);
    expect(new Set(chooseCamSamples(candidates, 20, mulberry32(1))).size).toBe(20);
    expect(chooseCamSamples(c(1, 1, 3), 20, mulberry32(1))).toHaveLength(3);
  });
});
