/**
 * The model's building blocks on the tfjs cpu backend: U-Net architecture and BatchNorm, losses, AdamW and the
 * schedule, augmentation, metrics. Values are checked against numbers worked out by hand (or with PyTorch's
 * formulas written out in double precision).
 */
import * as tf from '@tensorflow/tfjs';
import { beforeAll, describe, expect, it } from 'vitest';
import { AUGMENT_PRESETS, augmentBatch } from '../src/model/augment.js';
import { installFastCpuKernels } from '../src/model/cpu-kernels.js';
import { bcePerSample, crossEntropy, crossEntropyPerSample, diceLossPerSample, jointLoss, segLoss, segLossPerSample } from '../src/model/losses.js';
import { classificationMetrics, ClsMetricAccumulator, combinedScore, diceIou, rocAuc, SegMetricAccumulator } from '../src/model/metrics.js';
import { AdamW, clipByGlobalNorm, cosineLr, EarlyStopping, globalNorm } from '../src/model/optim.js';
import { countParameters, createUNet, PRESETS, resolveConfig } from '../src/model/unet.js';
import { mulberry32 } from '../src/lib/random.js';

beforeAll(async () => {
  await tf.setBackend('cpu');
  await tf.ready();
});

const arr = (t: tf.Tensor): number[] => Array.from(t.dataSync());
const bytes = (v: tf.Tensor): Buffer => Buffer.from((v.dataSync() as Float32Array).slice().buffer);

describe('U-Net architecture', () => {
  it('small preset: exactly 119,379 parameters, within 3% of the original 119k', () => {
    const m = createUNet('small', { seed: 1 });
    try {
      // encoder: 1->16 (144 + 32 + 2304 + 32) + 16->32 (4608 + 64 + 9216 + 64) + 32->64 (18432 + 128 + 36864 + 128)
      expect(m.countParams('encoder')).toBe(2512 + 13952 + 55552);
      // decoder: (64+32)->32 (27648 + 64 + 9216 + 64) + (32+16)->16 (6912 + 32 + 2304 + 32) + 1x1 conv 16 + 1
      expect(m.countParams('decoder')).toBe(36992 + 9280 + 17);
      // head: 64*16 + 16 + 16*2 + 2
      expect(m.countParams('head')).toBe(1074);
      expect(m.countParams()).toBe(119379);
      expect(Math.abs(m.countParams() - 119_000) / 119_000).toBeLessThan(0.03);
      expect(countParameters(resolveConfig('small'))).toBe(119379);
    } finally {
      m.dispose();
    }
  });

  it('medium and large presets (counted without building)', () => {
    expect(PRESETS.medium).toEqual({ base: 32, depth: 4, headHidden: 64 });
    expect(PRESETS.large).toEqual({ base: 64, depth: 5, headHidden: 512 });
    expect(countParameters(resolveConfig('medium'))).toBe(7881987);
    expect(countParameters(resolveConfig('large'))).toBe(126817923);
    expect(countParameters(resolveConfig('medium', 4))).toBe(7881987 + 9 * 3 * 32);
  });

  it('names, groups, shapes, PyTorch-style init and seeding', () => {
    const a = createUNet('small', { seed: 7 });
    const b = createUNet('small', { seed: 7 });
    const c = createUNet('small', { seed: 8 });
    try {
      expect([...a.params.keys()].slice(0, 6)).toEqual([
        'encoder.0.conv1.weight',
        'encoder.0.bn1.weight',
        'encoder.0.bn1.bias',
        'encoder.0.conv2.weight',
        'encoder.0.bn2.weight',
        'encoder.0.bn2.bias',
      ]);
      expect(a.params.get('decoder.0.conv1.weight')!.shape).toEqual([3, 3, 96, 32]);
      expect(a.params.get('decoder.out.weight')!.shape).toEqual([1, 1, 16, 1]);
      expect(a.params.get('head.fc1.weight')!.shape).toEqual([64, 16]);
      expect(a.params.get('head.fc2.bias')!.shape).toEqual([2]);
      expect(a.buffers.get('encoder.2.bn2.running_var')!.shape).toEqual([64]);
      expect([...a.group('head').keys()]).toEqual(['head.fc1.weight', 'head.fc1.bias', 'head.fc2.weight', 'head.fc2.bias']);
      expect(a.groupOf('decoder.1.bn2.running_mean')).toBe('decoder');
      // kaiming_uniform(a = sqrt 5): U(-1/sqrt(fan_in), 1/sqrt(fan_in)); fan_in = 3*3*16 here
      const w = arr(a.params.get('encoder.0.conv2.weight')!);
      const bound = 1 / Math.sqrt(9 * 16);
      expect(Math.max(...w.map(Math.abs))).toBeLessThanOrEqual(bound);
      expect(Math.max(...w.map(Math.abs))).toBeGreaterThan(0.9 * bound);
      expect(arr(a.params.get('encoder.0.bn1.weight')!)).toEqual(new Array(16).fill(1));
      expect(arr(a.buffers.get('encoder.0.bn1.running_var')!)).toEqual(new Array(16).fill(1));
      for (const [name, v] of a.params) expect(bytes(v).equals(bytes(b.params.get(name)!))).toBe(true);
      expect(bytes(a.params.get('encoder.0.conv1.weight')!).equals(bytes(c.params.get('encoder.0.conv1.weight')!))).toBe(false);
    } finally {
      a.dispose();
      b.dispose();
      c.dispose();
    }
  });

  it('forward: NHWC in, N x H x W x 1 and N x 2 out; eval is deterministic, training has dropout', () => {
    const m = createUNet({ base: 4, depth: 2, headHidden: 8 }, { seed: 3 });
    try {
      const before = tf.memory().numTensors;
      tf.tidy(() => {
        const x = tf.randomNormal([2, 32, 32, 1], 0, 1, 'float32', 1) as tf.Tensor4D;
        const e1 = m.forward(x, { training: false });
        const e2 = m.forward(x, { training: false });
        expect(e1.segLogits.shape).toEqual([2, 32, 32, 1]);
        expect(e1.clsLogits.shape).toEqual([2, 2]);
        expect(arr(e1.clsLogits)).toEqual(arr(e2.clsLogits));
        expect(arr(m.forwardSeg(x, { training: false }))).toEqual(arr(e1.segLogits));
        expect(arr(m.forwardCls(x, { training: false }))).toEqual(arr(e1.clsLogits));
        // Dropout: two training passes of the head differ (BN frozen so that only the dropout masks change).
        const frozen = ['encoder', 'decoder'] as const;
        const t1 = arr(m.forwardCls(x, { training: true, frozen }));
        const t2 = arr(m.forwardCls(x, { training: true, frozen }));
        expect(t1).not.toEqual(t2);
        // An odd size still lines up (the upsampling resizes to the skip's size).
        expect(m.forward(tf.zeros([1, 30, 30, 1]) as tf.Tensor4D, { training: false }).segLogits.shape).toEqual([1, 30, 30, 1]);
      });
      expect(tf.memory().numTensors).toBe(before);
      expect(() => m.forward(tf.zeros([1, 8, 8, 3]) as tf.Tensor4D, { training: false })).toThrow(/N x H x W x 1/);
    } finally {
      m.dispose();
    }
  });

  it('BatchNorm: training updates running stats like PyTorch (momentum 0.1, unbiased var); eval and frozen groups do not', () => {
    const m = createUNet({ base: 4, depth: 1, headHidden: 4 }, { seed: 5 });
    try {
      const x = tf.randomNormal([3, 8, 8, 1], 0.5, 2, 'float32', 9) as tf.Tensor4D;
      const rm = m.buffers.get('encoder.0.bn1.running_mean')!;
      const rv = m.buffers.get('encoder.0.bn1.running_var')!;
      const dm = m.buffers.get('decoder.0.bn1.running_mean')!;
      // eval mode: nothing moves
      tf.tidy(() => void m.forward(x, { training: false }));
      expect(arr(rm)).toEqual([0, 0, 0, 0]);
      // frozen encoder: the encoder's stats stay, the decoder's move
      tf.tidy(() => void m.forward(x, { training: true, frozen: ['encoder'] }));
      expect(arr(rm)).toEqual([0, 0, 0, 0]);
      expect(arr(dm).some((v) => v !== 0)).toBe(true);
      // training: running = 0.9 running + 0.1 batch stat of the first conv's output
      const { mean, unbiased } = tf.tidy(() => {
        const y = tf.conv2d(x, m.params.get('encoder.0.conv1.weight') as unknown as tf.Tensor4D, 1, 'same');
        const mo = tf.moments(y, [0, 1, 2]);
        const n = 3 * 8 * 8;
        return { mean: arr(mo.mean), unbiased: arr(mo.variance.mul(n / (n - 1))) };
      });
      tf.tidy(() => void m.forward(x, { training: true }));
      arr(rm).forEach((v, i) => expect(v).toBeCloseTo(0.1 * mean[i]!, 5));
      arr(rv).forEach((v, i) => expect(v).toBeCloseTo(0.9 * 1 + 0.1 * unbiased[i]!, 4));
    } finally {
      m.dispose();
    }
  });
});

describe('losses', () => {
  it('soft Dice (smooth 1) + BCE with logits, per sample, against hand-computed values', () => {
    tf.tidy(() => {
      // sample 0: logits 0 -> p = 0.5 everywhere, target one pixel of four:
      //   Dice = (2 * 0.5 + 1) / (2 + 1 + 1) = 0.5 -> loss 0.5; BCE = ln 2; seg = 0.6 * 0.5 + 0.4 ln 2
      // sample 1: logits [2, -1, 0, 3], target [1, 0, 0, 1]
      const logits = tf.tensor4d([0, 0, 0, 0, 2, -1, 0, 3], [2, 2, 2, 1]);
      const target = tf.tensor4d([1, 0, 0, 0, 1, 0, 0, 1], [2, 2, 2, 1]);
      const sig = (z: number): number => 1 / (1 + Math.exp(-z));
      const p = [2, -1, 0, 3].map(sig);
      const dice1 = 1 - (2 * (p[0]! + p[3]!) + 1) / (p.reduce((a, b) => a + b) + 2 + 1);
      const bce1 = (Math.log1p(Math.exp(-2)) + (Math.log1p(Math.exp(-1))) + Math.LN2 + Math.log1p(Math.exp(-3))) / 4;
      expect(dice1).toBeCloseTo(0.166997145, 8);
      expect(bce1).toBeCloseTo(0.295481058, 8);
      const dice = arr(diceLossPerSample(logits, target));
      expect(dice[0]).toBeCloseTo(0.5, 6);
      expect(dice[1]).toBeCloseTo(dice1, 6);
      const bce = arr(bcePerSample(logits, target));
      expect(bce[0]).toBeCloseTo(Math.LN2, 6);
      expect(bce[1]).toBeCloseTo(bce1, 6);
      const seg = arr(segLossPerSample(logits, target));
      expect(seg[0]).toBeCloseTo(0.577258872, 6);
      expect(seg[1]).toBeCloseTo(0.218390710, 6);
      expect(arr(segLoss(logits, target))[0]).toBeCloseTo((0.577258872 + 0.21839071) / 2, 6);
      // The configured terms (stage.loss.dice_weight, bce_weight, dice_smooth) replace 0.6 / 0.4 / 1.
      const diceOnly = arr(segLossPerSample(logits, target, { diceWeight: 1, bceWeight: 0, diceSmooth: 1 }));
      expect(diceOnly[1]).toBeCloseTo(dice1, 6);
      const terms = { diceWeight: 0.3, bceWeight: 0.7, diceSmooth: 2 };
      // sample 0 with smooth 2: Dice = (2 * 0.5 + 2) / (2 + 1 + 2) = 0.6 -> loss 0.4
      expect(arr(segLossPerSample(logits, target, terms))[0]).toBeCloseTo(0.3 * 0.4 + 0.7 * Math.LN2, 6);
      expect(arr(segLoss(logits, target, undefined, undefined, terms))[0]).toBeCloseTo(arr(segLossPerSample(logits, target, terms)).reduce((a, b) => a + b) / 2, 6);
    });
  });

  it('cross-entropy applies label smoothing (PyTorch semantics)', () => {
    tf.tidy(() => {
      const logits = tf.tensor2d([2, 0, 0.5, -1.5], [2, 2]);
      const labels = tf.tensor1d([0, 1], 'int32');
      // log softmax([2, 0]) = [-0.126928, -2.126928]; q = [0.95, 0.05] -> 0.95 * 0.126928 + 0.05 * 2.126928
      const plain = arr(crossEntropyPerSample(logits, labels, 0));
      const smooth = arr(crossEntropyPerSample(logits, labels, 0.1));
      expect(plain[0]).toBeCloseTo(0.126928011, 6);
      expect(smooth[0]).toBeCloseTo(0.226928011, 6);
      // [0.5, -1.5], label 1: log softmax = [-0.126928, -2.126928]; q = [0.05, 0.95]
      expect(smooth[1]).toBeCloseTo(2.026928011, 6);
      expect(arr(crossEntropy(logits, labels, 0.1))[0]).toBeCloseTo((0.226928011 + 2.026928011) / 2, 6);
    });
  });

  it('joint loss: segmentation only over samples with a mask; denominators make micro-batches add up', () => {
    tf.tidy(() => {
      const segLogits = tf.tensor4d([0, 0, 0, 0, 2, -1, 0, 3], [2, 2, 2, 1]);
      const mask = tf.tensor4d([1, 0, 0, 0, 0, 0, 0, 0], [2, 2, 2, 1]);
      const hasMask = tf.tensor1d([1, 0]);
      const clsLogits = tf.tensor2d([2, 0, 0.5, -1.5], [2, 2]);
      const clsLabel = tf.tensor1d([0, 1], 'int32');
      const j = jointLoss({ segLogits, mask, hasMask, clsLogits, clsLabel, lambdaSeg: 1, lambdaCls: 0.5, labelSmoothing: 0.1 });
      const ce = (0.226928011 + 2.026928011) / 2;
      expect(arr(j.seg)[0]).toBeCloseTo(0.577258872, 6); // sample 1 has no mask: ignored
      expect(arr(j.cls)[0]).toBeCloseTo(ce, 6);
      expect(arr(j.total)[0]).toBeCloseTo(0.577258872 + 0.5 * ce, 6);
      // No mask at all: the segmentation term is 0, not NaN.
      expect(arr(segLoss(segLogits, mask, tf.tensor1d([0, 0])))[0]).toBe(0);
      // Micro-batches with the full batch's denominators sum to the batch loss.
      const whole = arr(segLoss(segLogits, mask, tf.tensor1d([1, 1]), 2))[0]!;
      const a = arr(segLoss(segLogits.slice([0], [1]), mask.slice([0], [1]), tf.tensor1d([1]), 2))[0]!;
      const b = arr(segLoss(segLogits.slice([1], [1]), mask.slice([1], [1]), tf.tensor1d([1]), 2))[0]!;
      expect(a + b).toBeCloseTo(whole, 6);
    });
  });
});

describe('optimisation', () => {
  it('AdamW: two steps match PyTorch\'s formula (decoupled weight decay, bias correction)', () => {
    const p = tf.variable(tf.tensor1d([1, -2]));
    const opt = new AdamW([{ name: 'g', params: [['p', p]], lr: 0.1 }], { betas: [0.9, 0.999], eps: 1e-8, weightDecay: 0.01 });
    try {
      const step = (g: number[]): void => {
        const t = tf.tensor1d(g);
        opt.step(new Map([['p', t]]));
        t.dispose();
      };
      step([0.5, -1]);
      // t=1: p (1 - 0.001) - 0.1 * g / |g| (m_hat = g, v_hat = g^2)
      expect(arr(p)[0]).toBeCloseTo(0.899, 6);
      expect(arr(p)[1]).toBeCloseTo(-1.898, 6);
      step([0.1, 0.3]);
      expect(arr(p)[0]).toBeCloseTo(0.8177969064, 5);
      expect(arr(p)[1]).toBeCloseTo(-1.8533171424, 5);
      const s = opt.getState();
      expect(s.slots[0]!.step).toBe(2);
      expect(Array.from(s.slots[0]!.m)[0]).toBeCloseTo(0.055, 6);
      expect(Array.from(s.slots[0]!.v)[1]).toBeCloseTo(0.001089, 7);
      // state round trip into a fresh optimizer continues identically
      const q = tf.variable(p.clone());
      const opt2 = new AdamW([{ name: 'g', params: [['p', q]], lr: 0.1 }], { betas: [0.9, 0.999], eps: 1e-8, weightDecay: 0.01 });
      opt2.setState(s);
      const g = tf.tensor1d([-0.2, 0.05]);
      opt.step(new Map([['p', g]]));
      opt2.step(new Map([['p', g]]));
      expect(arr(q)).toEqual(arr(p));
      g.dispose();
      opt2.dispose();
      q.dispose();
    } finally {
      opt.dispose();
      p.dispose();
    }
  });

  it('per-group learning rates (stage 3: encoder 1e-4, decoder / head 3e-4) follow the cosine schedule each', () => {
    const a = tf.variable(tf.tensor1d([0]));
    const b = tf.variable(tf.tensor1d([0]));
    const opt = new AdamW(
      [
        { name: 'encoder', params: [['a', a]], lr: 1e-4 },
        { name: 'head', params: [['b', b]], lr: 3e-4 },
      ],
      { weightDecay: 0 },
    );
    try {
      const g = tf.tensor1d([1]);
      opt.step(new Map([['a', g], ['b', g]]));
      expect(arr(a)[0]).toBeCloseTo(-1e-4, 8);
      expect(arr(b)[0]).toBeCloseTo(-3e-4, 8);
      opt.scheduleLr((base) => cosineLr(base, 0, 5, 10));
      expect(opt.groups.map((x) => x.lr)).toEqual([0.5e-4, 1.5e-4]);
      g.dispose();
    } finally {
      opt.dispose();
      a.dispose();
      b.dispose();
    }
  });

  it('cosine schedule at 0, T/2 and T', () => {
    expect(cosineLr(1e-3, 1e-6, 0, 10)).toBeCloseTo(1e-3, 12);
    expect(cosineLr(1e-3, 1e-6, 5, 10)).toBeCloseTo(5.005e-4, 12);
    expect(cosineLr(1e-3, 1e-6, 10, 10)).toBeCloseTo(1e-6, 12);
    expect(cosineLr(1e-3, 1e-6, 12, 10)).toBeCloseTo(1e-6, 12);
  });

  it('clipping by global norm (PyTorch clip_grad_norm_)', () => {
    tf.tidy(() => {
      const grads = new Map<string, tf.Tensor>([
        ['a', tf.tensor1d([3, 4])],
        ['b', tf.tensor1d([12])],
      ]);
      expect(globalNorm(grads.values())).toBeCloseTo(13, 5);
      const c = clipByGlobalNorm(grads, 1);
      expect(c.norm).toBeCloseTo(13, 5);
      expect(c.scale).toBeCloseTo(1 / 13, 6);
      expect(globalNorm(c.grads.values())).toBeCloseTo(1, 5);
      expect(arr(c.grads.get('a')!)[0]).toBeCloseTo(3 / 13, 6);
      const unclipped = clipByGlobalNorm(grads, 20);
      expect(unclipped.scale).toBe(1);
      expect(unclipped.grads).toBe(grads);
    });
  });

  it('early stopping (mode max, min_delta, patience)', () => {
    const es = new EarlyStopping({ patience: 2, minDelta: 0.01, mode: 'max' });
    expect(es.step(0.5)).toBe(false);
    expect(es.step(0.505)).toBe(false); // not > 0.5 + 0.01: counter 1
    expect(es.step(0.52)).toBe(false); // improvement: counter 0
    expect(es.step(0.52)).toBe(false);
    expect(es.step(0.525)).toBe(true);
    const restored = new EarlyStopping({ patience: 2, minDelta: 0.01 });
    restored.setState({ best: 0.52, counter: 1, stopped: false });
    expect(restored.step(0.4)).toBe(true);
  });
});

describe('augmentation', () => {
  const batchOf = (n: number, size: number): { x: Float32Array; mask: Float32Array } => {
    const rng = mulberry32(11);
    const x = new Float32Array(n * size * size);
    for (let i = 0; i < x.length; i++) x[i] = rng() * 2 - 1;
    const mask = Float32Array.from(x, (v) => (v > 0.3 ? 1 : 0));
    return { x, mask };
  };

  it("'none' is the identity", () => {
    const { x, mask } = batchOf(4, 16);
    const x0 = x.slice();
    const m0 = mask.slice();
    augmentBatch({ x, mask, n: 4, height: 16, width: 16, channels: 1 }, 'none', mulberry32(1));
    expect(x).toEqual(x0);
    expect(mask).toEqual(m0);
  });

  it('flips move image and mask together (minimal preset), seeded', () => {
    const { x, mask } = batchOf(16, 12);
    const x0 = x.slice();
    const t = augmentBatch({ x, mask, n: 16, height: 12, width: 12, channels: 1 }, 'minimal', mulberry32(5));
    expect(t.some((s) => s.hflip)).toBe(true);
    expect(t.some((s) => !s.hflip)).toBe(true);
    for (let k = 0; k < x.length; k++) expect(mask[k]).toBe(x[k]! > 0.3 ? 1 : 0);
    // A flipped sample is the mirror image of the original.
    const i = t.findIndex((s) => s.hflip);
    const at = (a: Float32Array, r: number, c: number): number => a[i * 144 + r * 12 + c]!;
    for (let r = 0; r < 12; r++) for (let c = 0; c < 12; c++) expect(at(x, r, c)).toBe(at(x0, r, 11 - c));
    // Same seed, same draws.
    const again = batchOf(16, 12);
    augmentBatch({ x: again.x, mask: again.mask, n: 16, height: 12, width: 12, channels: 1 }, 'minimal', mulberry32(5));
    expect(again.x).toEqual(x);
  });

  it('rotations keep image and mask aligned; intensity jitter touches the image only', () => {
    // A bright disc; mask = disc. Rotate by up to 20 deg and rescale: the mask must still cover the bright pixels.
    const S = 32;
    const x = new Float32Array(8 * S * S);
    const mask = new Float32Array(8 * S * S);
    for (let i = 0; i < 8; i++) {
      const cy = 10 + i;
      const cx = 20 - i;
      for (let r = 0; r < S; r++) {
        for (let c = 0; c < S; c++) {
          const inside = (r - cy) ** 2 + (c - cx) ** 2 <= 25;
          x[i * S * S + r * S + c] = inside ? 1 : 0;
          mask[i * S * S + r * S + c] = inside ? 1 : 0;
        }
      }
    }
    const spec = { ...AUGMENT_PRESETS.aggressive, rotateP: 1, contrast: 0, brightness: 0, noiseP: 0, intensityP: 0 };
    const t = augmentBatch({ x, mask, n: 8, height: S, width: S, channels: 1 }, spec, mulberry32(3));
    expect(t.every((s) => s.angle !== 0)).toBe(true);
    let agree = 0;
    for (let k = 0; k < x.length; k++) if ((x[k]! > 0.5 ? 1 : 0) === mask[k]) agree++;
    expect(agree / x.length).toBeGreaterThan(0.99);
    expect(new Set(mask).size).toBe(2); // still binary
    // intensity only
    const y = x.slice();
    const m2 = mask.slice();
    augmentBatch({ x: y, mask: m2, n: 8, height: S, width: S, channels: 1 }, { intensityP: 1, contrast: 0.2, brightness: 0.2 }, mulberry32(4));
    expect(m2).toEqual(mask);
    expect(y).not.toEqual(x);
  });
});

describe('metrics', () => {
  it('Dice / IoU at 0.5, per sample (over samples with a mask) and global', () => {
    // sample 0: pred {0, 2}, truth {0, 1}: tp 1, fp 1, fn 1 -> Dice 0.5, IoU 1/3
    // sample 1: both empty -> 1, 1;  sample 2: no mask (Kaggle) -> skipped
    const probs = new Float32Array([0.9, 0.4, 0.6, 0.1, 0.2, 0.1, 0.3, 0.4, 0.9, 0.9, 0.9, 0.9]);
    const truth = new Float32Array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    expect(diceIou(probs.subarray(0, 4), truth.subarray(0, 4))).toMatchObject({ dice: 0.5, iou: 1 / 3 });
    const acc = new SegMetricAccumulator();
    acc.add(probs, truth, 3, new Float32Array([1, 1, 0]));
    const r = acc.result();
    expect(r.samples).toBe(2);
    expect(r.dice).toBeCloseTo(0.75, 10);
    expect(r.diceStd).toBeCloseTo(0.25, 10);
    expect(r.iou).toBeCloseTo(2 / 3, 10);
    expect(r.diceGlobal).toBeCloseTo(0.5, 10);
    expect(r.iouGlobal).toBeCloseTo(1 / 3, 10);
    expect(new SegMetricAccumulator().result().dice).toBeNull();
  });

  it('accuracy, precision, recall, F1, confusion matrix, ROC-AUC (ties)', () => {
    // preds [1, 0, 1, 0, 1] vs truth [1, 0, 0, 1, 1]: TP 2, FP 1, FN 1, TN 1
    const m = classificationMetrics([0.9, 0.2, 0.7, 0.4, 0.6], [1, 0, 0, 1, 1]);
    expect(m.accuracy).toBeCloseTo(0.6, 10);
    expect(m.precision).toBeCloseTo(2 / 3, 10);
    expect(m.recall).toBeCloseTo(2 / 3, 10);
    expect(m.f1).toBeCloseTo(2 / 3, 10);
    expect(m.specificity).toBeCloseTo(0.5, 10);
    expect(m.confusion).toEqual([
      [1, 1],
      [1, 2],
    ]);
    // positives 0.9, 0.4, 0.6 vs negatives 0.2, 0.7: 4 of 6 pairs ordered
    expect(m.rocAuc).toBeCloseTo(4 / 6, 10);
    expect(rocAuc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])).toBeCloseTo(0.75, 10);
    // a positive and a negative tied at 0.5 count one half: (0.5 + 1 + 1 + 1) / 4
    expect(rocAuc([0.5, 0.5, 0.2, 0.9], [1, 0, 0, 1])).toBeCloseTo(0.875, 10);
    expect(rocAuc([0.3, 0.6], [1, 1])).toBeNull();
    const none = classificationMetrics([0.1, 0.2], [0, 0]);
    expect(none).toMatchObject({ accuracy: 1, precision: 0, recall: 0, f1: 0, rocAuc: null });
    const acc = new ClsMetricAccumulator();
    acc.add([0.9, 0.2], [1, 0]);
    acc.add([0.7, 0.4, 0.6], [0, 1, 1]);
    expect(acc.result()).toEqual(m);
    expect(combinedScore(0.8, 0.9)).toBeCloseTo(0.85, 10);
    expect(combinedScore(null, 0.9)).toBeNull();
  });
});

describe('cpu training kernels', () => {
  it('fast Conv2D / backprop kernels agree with tfjs', () => {
    type Shape4 = [number, number, number, number];
    const shapes: [Shape4, Shape4, [number, number], 'same' | 'valid'][] = [
      [[2, 9, 7, 3], [3, 3, 3, 5], [2, 1], 'same'],
      [[1, 6, 6, 2], [1, 1, 2, 1], [1, 1], 'valid'],
    ];
    const run = (): number[][] =>
      shapes.flatMap(([xs, ws, st, pad], i) =>
        tf.tidy(() => {
          const x = tf.randomNormal(xs, 0, 1, 'float32', i + 1) as tf.Tensor4D;
          const w = tf.randomNormal(ws, 0, 1, 'float32', i + 50) as tf.Tensor4D;
          const y = tf.conv2d(x, w, st, pad);
          const dy = tf.randomNormal(y.shape, 0, 1, 'float32', 7);
          const [gx, gw] = tf.grads((a: tf.Tensor, b: tf.Tensor) => tf.conv2d(a as tf.Tensor4D, b as tf.Tensor4D, st, pad).mul(dy).sum())([x, w]);
          return [arr(y), arr(gx!), arr(gw!)];
        }),
      );
    // Reference values from tfjs's own kernels unless the fast ones are already installed by another test file.
    const reference = run();
    installFastCpuKernels();
    const fast = run();
    fast.forEach((a, i) => a.forEach((v, k) => expect(v).toBeCloseTo(reference[i]![k]!, 3)));
  });
});
