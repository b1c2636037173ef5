/**
 * The wasm training kernels (src/wasm-kernels.ts) against tfjs's pure-JS cpu backend.
 *
 * Error bounds:
 * - float kernels (convolutions, sums, means, max-pool grad): max |wasm - cpu| <= 1e-4 * max(1, max |cpu|)
 *   (measured: ~1e-6 relative; both sides accumulate in float32, in different orders);
 * - data movement (Identity, Cast, Slice, SplitV, Concat, Tile): exact;
 * - gradients of a whole tiny U-Net-like loss w.r.t. each of its 36 parameters:
 *   max |wasm - cpu| <= 1e-3 * max |cpu grad of that parameter| (measured: ~6e-6).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as tf from '@tensorflow/tfjs';
import {
  initBackend,
  registerWasmTrainingKernels,
  setSimdKernels,
  unregisterWasmTrainingKernels,
  UnsupportedKernelError,
  WASM_TRAINING_KERNELS,
  wasmTrainingKernelsRegistered,
} from '../src/index.ts';
import { simdPool, startSimdThreads } from '../src/simd-threads.ts';
import { _internal } from '../src/wasm-kernels.ts';
import { initProbeParams, makeProbeBatch, probeLoss, randomValues, type ProbeNetConfig } from '../src/probe-net.ts';

const KERNEL_REL = 1e-4;
const GRAD_REL = 1e-3;

beforeAll(async () => {
  const info = await initBackend({ prefer: 'wasm' });
  expect(info.backend).toBe('wasm');
});

/** Runs f on one backend and returns its output(s) as plain arrays. */
function runOn(backend: 'cpu' | 'wasm', f: () => tf.Tensor | tf.Tensor[]): { shape: number[]; data: Float64Array }[] {
  tf.setBackend(backend);
  const out = tf.tidy(f);
  const list = Array.isArray(out) ? out : [out];
  const res = list.map((t) => ({ shape: [...t.shape], data: Float64Array.from(t.dataSync() as ArrayLike<number>) }));
  tf.dispose(list);
  tf.setBackend('wasm');
  return res;
}

interface Diff {
  maxErr: number;
  maxMag: number;
}

function diff(a: Float64Array, b: Float64Array): Diff {
  expect(b.length).toBe(a.length);
  let maxErr = 0;
  let maxMag = 0;
  for (let i = 0; i < a.length; i++) {
    const e = Math.abs(a[i]! - b[i]!);
    if (!(e <= maxErr)) maxErr = Number.isNaN(e) ? Infinity : e;
    maxMag = Math.max(maxMag, Math.abs(a[i]!));
  }
  return { maxErr, maxMag };
}

let seed = 100;

/** Worst relative error seen per kernel, for the summary printed at the end. */
const worst = new Map<string, number>();

function note(kernel: string, d: Diff): void {
  const rel = d.maxErr / Math.max(1, d.maxMag);
  worst.set(kernel, Math.max(worst.get(kernel) ?? 0, rel));
}

/** Compares f on wasm against cpu; `exact` demands bit equality, otherwise the float bound above. */
function compare(kernel: string, f: () => tf.Tensor | tf.Tensor[], exact = false, compareShapes = true): void {
  const s0 = seed; // f draws its inputs with rnd(): same seeds on both backends
  const ref = runOn('cpu', f);
  seed = s0;
  const got = runOn('wasm', f);
  expect(got.length).toBe(ref.length);
  ref.forEach((r, i) => {
    if (compareShapes) expect(got[i]!.shape).toEqual(r.shape);
    const d = diff(r.data, got[i]!.data);
    note(kernel, d);
    if (exact) expect(d.maxErr).toBe(0);
    else expect(d.maxErr).toBeLessThanOrEqual(KERNEL_REL * Math.max(1, d.maxMag));
  });
}

function rnd(shape: number[], scale = 1): tf.Tensor {
  return tf.tensor(randomValues(shape.reduce((a, b) => a * b, 1), seed++, scale), shape);
}

type Pad = 'same' | 'valid';
// [N, H, W, C, O, K, pad]
const CONV_CASES: Array<[number, number, number, number, number, number, Pad]> = [
  [2, 7, 9, 1, 16, 3, 'same'],
  [2, 7, 9, 3, 16, 3, 'same'],
  [1, 16, 16, 16, 32, 3, 'same'],
  [3, 9, 7, 32, 16, 3, 'same'],
  [2, 9, 7, 32, 32, 3, 'valid'],
  [2, 6, 5, 48, 16, 3, 'same'],
  [3, 8, 8, 16, 1, 1, 'valid'],
  [2, 7, 9, 3, 5, 1, 'same'],
  [2, 10, 11, 5, 7, 5, 'same'],
  [1, 6, 7, 4, 8, 2, 'same'],
  [1, 5, 37, 8, 24, 3, 'same'],
];

function convCase([N, H, W, C, O, K, pad]: (typeof CONV_CASES)[number]) {
  const xv = randomValues(N * H * W * C, seed++);
  const wv = randomValues(K * K * C * O, seed++, 1 / Math.sqrt(K * K * C));
  const outShape = [N, pad === 'same' ? H : H - K + 1, pad === 'same' ? W : W - K + 1, O] as const;
  const dyv = randomValues(outShape.reduce((a, b) => a * b, 1), seed++);
  return {
    x: () => tf.tensor4d(xv, [N, H, W, C]),
    w: () => tf.tensor4d(wv, [K, K, C, O]),
    dy: () => tf.tensor4d(dyv, [...outShape]),
    label: `${N}x${H}x${W}x${C} -> ${O}, ${K}x${K} ${pad}`,
    filterShape: [K, K, C, O] as [number, number, number, number],
    inputShape: [N, H, W, C] as [number, number, number, number],
    pad,
  };
}

function backpropFilter(x: tf.Tensor, dy: tf.Tensor, filterShape: number[], pad: Pad, extra: object = {}): tf.Tensor {
  return tf.engine().runKernel('Conv2DBackpropFilter', { x, dy }, {
    strides: 1,
    pad,
    dataFormat: 'NHWC',
    filterShape,
    ...extra,
  } as unknown as tf.NamedAttrMap) as tf.Tensor;
}

function backpropInput(dy: tf.Tensor, filter: tf.Tensor, inputShape: number[], pad: Pad, extra: object = {}): tf.Tensor {
  return tf.engine().runKernel('Conv2DBackpropInput', { dy, filter }, {
    strides: 1,
    pad,
    dataFormat: 'NHWC',
    inputShape,
    ...extra,
  } as unknown as tf.NamedAttrMap) as tf.Tensor;
}

describe('registration', () => {
  it('registers every kernel for wasm, idempotently', () => {
    expect(wasmTrainingKernelsRegistered()).toBe(true);
    expect(registerWasmTrainingKernels()).toEqual([]);
    for (const { kernelName } of WASM_TRAINING_KERNELS) expect(tf.getKernel(kernelName, 'wasm')).toBeTruthy();
    expect(WASM_TRAINING_KERNELS.map((k) => k.kernelName)).toEqual(
      expect.arrayContaining(['Conv2DBackpropFilter', 'Conv2DBackpropInput']),
    );
  });

  it('initBackend is idempotent and reports the device', async () => {
    const a = await initBackend({ prefer: 'wasm' });
    const b = await initBackend();
    expect(b).toEqual(a);
    expect(a.device).toMatch(/^CPU wasm (SIMD|no SIMD), \d+ threads?$/);
    const one = await initBackend({ prefer: 'wasm', threads: 1 });
    expect(one.device).toMatch(/, 1 thread$/);
    expect(simdPool()).toBeNull();
    const two = await initBackend({ prefer: 'wasm', threads: 2 });
    expect(two.device).toMatch(/, 2 threads$/);
    expect(simdPool()?.threads).toBe(2);
    expect(tf.getBackend()).toBe('wasm');
  });
});

describe('SIMD switch', () => {
  it('initBackend({ simdKernels }) sets it, a call without the option keeps it', async () => {
    await initBackend({ prefer: 'wasm', simdKernels: false });
    await initBackend({ prefer: 'wasm' });
    expect(setSimdKernels(true)).toBe(false);
    await initBackend({ prefer: 'wasm' });
    expect(setSimdKernels(true)).toBe(true);
  });
});

describe('convolution kernels vs cpu', () => {
  it.each(CONV_CASES.map((c) => [convCase(c).label, c] as const))('%s (calling thread)', (_label, c) => {
    const k = convCase(c);
    compare('Conv2D', () => tf.conv2d(k.x() as tf.Tensor4D, k.w() as tf.Tensor4D, 1, k.pad));
    compare('Conv2DBackpropFilter', () => backpropFilter(k.x(), k.dy(), k.filterShape, k.pad));
    compare('Conv2DBackpropInput', () => backpropInput(k.dy(), k.w(), k.inputShape, k.pad));
  });

  describe('on the thread pool (3 threads, every conv split)', () => {
    let prevThreads = 1;
    let prevMin = 0;
    beforeAll(async () => {
      prevThreads = simdPool()?.threads ?? 1;
      expect(await startSimdThreads(3)).toBe(3);
      prevMin = _internal.setThreadMinFlops(0);
    });
    afterAll(async () => {
      _internal.setThreadMinFlops(prevMin);
      await startSimdThreads(prevThreads);
    });
    it.each(CONV_CASES.map((c) => [convCase(c).label, c] as const))('%s', (_label, c) => {
      const k = convCase(c);
      compare('Conv2D (threads)', () => tf.conv2d(k.x() as tf.Tensor4D, k.w() as tf.Tensor4D, 1, k.pad));
      compare('Conv2DBackpropFilter (threads)', () => backpropFilter(k.x(), k.dy(), k.filterShape, k.pad));
      compare('Conv2DBackpropInput (threads)', () => backpropInput(k.dy(), k.w(), k.inputShape, k.pad));
    });
  });

  it('the XNNPACK fallback (no SIMD module) gives the same gradients', () => {
    const prev = setSimdKernels(false);
    try {
      for (const c of CONV_CASES.slice(0, 6)) {
        const k = convCase(c);
        compare('Conv2DBackpropFilter (fallback)', () => backpropFilter(k.x(), k.dy(), k.filterShape, k.pad));
        compare('Conv2DBackpropInput (fallback)', () => backpropInput(k.dy(), k.w(), k.inputShape, k.pad));
      }
    } finally {
      setSimdKernels(prev);
    }
  });

  it('tf.grad of conv2d uses them (batch > 1, 3 input channels)', () => {
    const k = convCase([2, 7, 9, 3, 16, 3, 'same']);
    compare('Conv2D grads', () => {
      const x = k.x();
      const w = k.w();
      const dy = k.dy();
      const f = (a: tf.Tensor, b: tf.Tensor): tf.Tensor => tf.conv2d(a as tf.Tensor4D, b as tf.Tensor4D, 1, 'same').mul(dy).sum();
      return tf.grads(f)([x, w]);
    });
  });
});

describe('fail loudly on unsupported convolutions', () => {
  it('stride 2 conv gradient names the kernel and the attribute', () => {
    const x = tf.randomNormal([1, 8, 8, 4]) as tf.Tensor4D;
    const w = tf.randomNormal([3, 3, 4, 8]) as tf.Tensor4D;
    expect(() => tf.grad((v: tf.Tensor) => tf.conv2d(x, v as tf.Tensor4D, 2, 'same').sum())(w)).toThrow(
      /Conv2DBackpropFilter.*unsupported strides: \[2, 2\]/,
    );
    expect(() => tf.grad((v: tf.Tensor) => tf.conv2d(v as tf.Tensor4D, w, 2, 'same').sum())(x)).toThrow(
      /Conv2DBackpropInput.*unsupported strides/,
    );
    expect(() => tf.grad((v: tf.Tensor) => tf.conv2d(x, v as tf.Tensor4D, 2, 'same').sum())(w)).toThrow(UnsupportedKernelError);
    tf.dispose([x, w]);
  });

  it('NCHW and dilations are rejected by name', () => {
    const x = tf.randomNormal([1, 8, 8, 4]);
    const dy = tf.randomNormal([1, 8, 8, 8]);
    const w = tf.randomNormal([3, 3, 4, 8]);
    expect(() => backpropFilter(x, dy, [3, 3, 4, 8], 'same', { dataFormat: 'NCHW' })).toThrow(
      /Conv2DBackpropFilter.*unsupported dataFormat: 'NCHW'/,
    );
    expect(() => backpropInput(dy, w, [1, 8, 8, 4], 'same', { dilations: 2 })).toThrow(
      /Conv2DBackpropInput.*unsupported dilations: \[2, 2\]/,
    );
    tf.dispose([x, dy, w]);
  });

  it('the forward pass of a stride-2 conv still works (wasm original)', () => {
    const x = rnd([2, 9, 8, 3]) as tf.Tensor4D;
    const w = rnd([3, 3, 3, 8]) as tf.Tensor4D;
    compare('Conv2D stride 2', () => tf.conv2d(x, w, 2, 'same'));
    tf.dispose([x, w]);
  });
});

describe('reductions vs cpu', () => {
  const cases: Array<[string, string, () => tf.Tensor | tf.Tensor[]]> = [
    ['Sum', 'NHW of 2x7x9x16', () => tf.sum(rnd([2, 7, 9, 16]), [0, 1, 2])],
    ['Sum', 'NHW of 3x9x7x3 (channels % 4 != 0)', () => tf.sum(rnd([3, 9, 7, 3]), [0, 1, 2])],
    ['Sum', 'HW keepDims of 2x7x9x32', () => tf.sum(rnd([2, 7, 9, 32]), [1, 2], true)],
    ['Sum', 'all of 2x7x9x3', () => tf.sum(rnd([2, 7, 9, 3]))],
    ['Sum', 'all of 4x8x8x1', () => tf.sum(rnd([4, 8, 8, 1]))],
    ['Sum', 'last axis', () => tf.sum(rnd([2, 7, 9, 5]), 3)],
    ['Sum', 'non-contiguous axes (original kernel)', () => tf.sum(rnd([2, 7, 9, 3]), [0, 2])],
    ['Sum', '8x64x64x32 over NHW (many row blocks)', () => tf.sum(rnd([8, 64, 64, 32]), [0, 1, 2])],
    ['Sum', 'int32 (original kernel)', () => tf.sum(tf.cast(rnd([2, 3, 4], 10), 'int32'), [0, 1])],
    ['Mean', 'NHW of 3x9x7x32', () => tf.mean(rnd([3, 9, 7, 32]), [0, 1, 2])],
    ['Mean', 'HW of 3x9x7x16 (global average pool)', () => tf.mean(rnd([3, 9, 7, 16]), [1, 2])],
    ['Mean', 'all', () => tf.mean(rnd([3, 5, 7, 1]))],
    ['Mean', 'tf.moments', () => Object.values(tf.moments(rnd([2, 7, 9, 16]), [0, 1, 2])) as tf.Tensor[]],
  ];
  it.each(cases)('%s: %s', (kernel, _label, f) => {
    compare(kernel, f);
  });
});

describe('broadcasting binary ops vs cpu', () => {
  const cases: Array<[string, string, () => tf.Tensor]> = [
    ['Multiply', '[2,7,9,16] * [16]', () => tf.mul(rnd([2, 7, 9, 16]), rnd([16]))],
    ['Multiply', '[1,1,1,32] * [2,7,9,32]', () => tf.mul(rnd([1, 1, 1, 32]), rnd([2, 7, 9, 32]))],
    ['Multiply', 'by a scalar', () => tf.mul(rnd([2, 7, 9, 4]), tf.scalar(-1.5))],
    ['Multiply', 'same shape (original kernel)', () => tf.mul(rnd([2, 7, 9, 3]), rnd([2, 7, 9, 3]))],
    ['Add', '[2,7,9,16] + [16]', () => tf.add(rnd([2, 7, 9, 16]), rnd([16]))],
    ['Add', '[3] + [2,7,9,3] (original kernel)', () => tf.add(rnd([3]), rnd([2, 7, 9, 3]))],
    ['Sub', '[2,7,9,16] - [1,1,1,16]', () => tf.sub(rnd([2, 7, 9, 16]), rnd([1, 1, 1, 16]))],
    ['Sub', '[16] - [2,7,9,16]', () => tf.sub(rnd([16]), rnd([2, 7, 9, 16]))],
    ['Sub', 'scalar - tensor', () => tf.sub(tf.scalar(2), rnd([2, 7, 9, 4]))],
    ['RealDiv', 'tensor / scalar', () => tf.div(rnd([2, 7, 9, 16]), tf.scalar(7))],
    ['RealDiv', '[8] / [2,7,9,8]', () => tf.div(rnd([8]), rnd([2, 7, 9, 8], 1).abs().add(0.5))],
    ['RealDiv', '[2,7,9,8] / [8]', () => tf.div(rnd([2, 7, 9, 8]), rnd([8]).abs().add(0.5))],
  ];
  it.each(cases)('%s: %s', (kernel, _label, f) => {
    compare(kernel, f);
  });
});

describe('data movement vs cpu (exact)', () => {
  const cases: Array<[string, string, () => tf.Tensor | tf.Tensor[]]> = [
    ['Identity', 'clone', () => rnd([2, 3, 4]).clone()],
    ['Cast', 'float32 -> float32', () => tf.cast(rnd([2, 7, 9, 3]), 'float32')],
    ['Cast', 'float32 -> int32 -> float32', () => tf.cast(tf.cast(rnd([2, 7, 9, 3], 10), 'int32'), 'float32')],
    ['Slice', 'box of 3x9x7x5', () => tf.slice(rnd([3, 9, 7, 5]), [1, 2, 3, 1], [2, 5, 3, 3])],
    ['Slice', 'contiguous', () => tf.slice(rnd([3, 9, 7, 5]), [1, 0, 0, 0], [2, 9, 7, 5])],
    ['Slice', 'int32', () => tf.cast(tf.slice(tf.cast(rnd([4, 6], 10), 'int32'), [1, 2], [2, 3]), 'float32')],
    ['SplitV', 'channels 48 -> 32 + 16', () => tf.split(rnd([2, 7, 9, 48]), [32, 16], 3)],
    ['SplitV', 'channels 3 -> 1 + 2', () => tf.split(rnd([2, 7, 9, 3]), [1, 2], 3)],
    ['SplitV', 'axis 1', () => tf.split(rnd([2, 7, 9, 3]), [3, 4], 1)],
    ['Concat', 'channels 32 + 16', () => tf.concat([rnd([2, 7, 9, 32]), rnd([2, 7, 9, 16])], 3)],
    ['Concat', 'channels 1 + 3 + 2', () => tf.concat([rnd([2, 5, 3, 1]), rnd([2, 5, 3, 3]), rnd([2, 5, 3, 2])], 3)],
    ['Concat', 'axis 1', () => tf.concat([rnd([2, 3, 9, 3]), rnd([2, 4, 9, 3])], 1)],
    ['Concat', 'bool (original kernel)', () => tf.cast(tf.concat([tf.greater(rnd([2, 3]), 0), tf.greater(rnd([2, 2]), 0)], 1), 'float32')],
    ['Tile', '[1,1,1,16] -> [2,7,9,16]', () => tf.tile(rnd([1, 1, 1, 16]), [2, 7, 9, 1])],
    ['Tile', 'mixed reps', () => tf.tile(rnd([2, 3, 1, 5]), [2, 1, 4, 3])],
  ];
  it.each(cases)('%s: %s', (kernel, _label, f) => {
    compare(kernel, f, true);
  });
});

describe('MaxPoolGrad vs cpu', () => {
  const cases: Array<[string, number[], number, number, Pad]> = [
    ['2x2 stride 2 valid (SIMD path)', [2, 8, 8, 16], 2, 2, 'valid'],
    ['2x2 stride 2 valid, odd 7x9 (SIMD path)', [3, 7, 9, 4], 2, 2, 'valid'],
    ['2x2 stride 2 valid, odd 7x9, 3 channels (JS path)', [2, 7, 9, 3], 2, 2, 'valid'],
    ['3x3 stride 1 same (overlapping)', [2, 7, 9, 3], 3, 1, 'same'],
    ['3x3 stride 2 same (overlapping)', [2, 7, 9, 16], 3, 2, 'same'],
  ];
  it.each(cases)('%s', (_label, shape, size, stride, pad) => {
    const xv = randomValues(shape.reduce((a, b) => a * b, 1), seed++);
    compare('MaxPoolGrad', () => {
      const x = tf.tensor4d(xv, shape as [number, number, number, number]);
      const y = tf.maxPool(x, size, stride, pad);
      const g = tf.tensor(randomValues(y.size, 7), y.shape);
      return tf.grad((v: tf.Tensor) => tf.maxPool(v as tf.Tensor4D, size, stride, pad).mul(g).sum())(x);
    });
  });
});

describe('ResizeBilinearGrad vs cpu', () => {
  // tfjs's cpu kernel labels its output [N, W, H, C] (its data is [N, H, W, C]): compare the flat data.
  const cases: Array<[string, number[], number[], boolean, boolean]> = [
    ['x2 of 2x4x4x16', [2, 4, 4, 16], [8, 8], false, false],
    ['odd 2x3x5x4 -> 7x9', [2, 3, 5, 4], [7, 9], false, false],
    ['alignCorners 2x3x5x8 -> 6x9', [2, 3, 5, 8], [6, 9], true, false],
    ['3 channels (original kernel)', [2, 3, 4, 3], [6, 8], false, false],
    ['halfPixelCenters (original kernel)', [2, 4, 4, 4], [8, 8], false, true],
  ];
  it.each(cases)('%s', (_label, shape, size, alignCorners, halfPixelCenters) => {
    const dyShape = [shape[0]!, size[0]!, size[1]!, shape[3]!];
    compare(
      'ResizeBilinearGrad',
      () =>
        tf.engine().runKernel('ResizeBilinearGrad', { images: rnd(shape), dy: rnd(dyShape) }, {
          alignCorners,
          halfPixelCenters,
        } as unknown as tf.NamedAttrMap) as tf.Tensor,
      false,
      false,
    );
  });
});

describe('gradients of a tiny U-Net-like loss, wasm vs cpu', () => {
  const cfg: ProbeNetConfig = { base: 8, depth: 2, inChannels: 1, headHidden: 8 };

  function lossAndGrads(backend: 'cpu' | 'wasm', size: number): { loss: number; grads: Float64Array[]; names: string[] } {
    tf.setBackend(backend);
    const init = initProbeParams(cfg, 3);
    const names = [...init.keys()];
    const batch = makeProbeBatch(cfg, 2, size, size);
    const params = names.map((n) => tf.tensor(init.get(n)!.values, init.get(n)!.shape));
    const { value, grads } = tf.valueAndGrads((...ts: tf.Tensor[]) =>
      probeLoss(cfg, new Map(names.map((n, i) => [n, ts[i]!])), batch),
    )(params);
    const out = {
      loss: value.dataSync()[0]!,
      grads: grads.map((g) => Float64Array.from(g.dataSync() as Float32Array)),
      names,
    };
    tf.dispose([value, ...grads, ...params, batch.x, batch.mask, batch.cls, batch.keep]);
    tf.setBackend('wasm');
    return out;
  }

  it.each([[16, 16], [15, 15]])('all parameter gradients, input 2 x %i x %i x 1', (size) => {
    const ref = lossAndGrads('cpu', size);
    const got = lossAndGrads('wasm', size);
    expect(Math.abs(got.loss - ref.loss)).toBeLessThanOrEqual(1e-5 * Math.abs(ref.loss));
    expect(ref.names.length).toBe(36);
    let worstRel = 0;
    ref.grads.forEach((g, i) => {
      const d = diff(g, got.grads[i]!);
      expect(d.maxMag).toBeGreaterThan(0);
      const rel = d.maxErr / d.maxMag;
      worstRel = Math.max(worstRel, rel);
      expect(rel, ref.names[i]).toBeLessThanOrEqual(GRAD_REL);
    });
    worst.set(`whole-net grads (${size}x${size})`, worstRel);
  });

  it('BatchNorm as tf.customGrad gives the same gradients as the op-by-op version (wasm)', () => {
    const a = lossAndGrads('wasm', 16);
    const saved = cfg.bn;
    cfg.bn = 'customGrad';
    try {
      const b = lossAndGrads('wasm', 16);
      expect(Math.abs(b.loss - a.loss)).toBeLessThanOrEqual(1e-5 * Math.abs(a.loss));
      a.grads.forEach((g, i) => {
        const d = diff(g, b.grads[i]!);
        expect(d.maxErr, a.names[i]).toBeLessThanOrEqual(GRAD_REL * d.maxMag);
      });
    } finally {
      cfg.bn = saved;
    }
  });
});

describe('Sum / Mean gradients (replaced globally to avoid tf.ones)', () => {
  it('are bit-identical to tfjs-core originals', () => {
    const xv = randomValues(2 * 7 * 9 * 16, 11);
    const f = (): tf.Tensor[] => {
      const x = tf.tensor4d(xv, [2, 7, 9, 16]);
      const w = tf.tensor(randomValues(16, 12), [16]);
      const loss = (v: tf.Tensor): tf.Tensor =>
        tf.mean(v, [0, 1, 2]).mul(w).sum().add(tf.sum(v.square(), [1, 2], true).mean()).add(tf.mean(v));
      return [tf.grad(loss)(x)];
    };
    const ours = runOn('cpu', f)[0]!.data;
    unregisterWasmTrainingKernels();
    let theirs: Float64Array;
    try {
      theirs = runOn('cpu', f)[0]!.data;
    } finally {
      registerWasmTrainingKernels();
    }
    expect(wasmTrainingKernelsRegistered()).toBe(true);
    expect(diff(theirs, ours).maxErr).toBe(0);
    note('Sum/Mean grad', diff(theirs, ours));
  });
});

describe('initBackend choice', () => {
  it('force wins over prefer, an explicit but missing backend fails loudly, bad values are rejected', async () => {
    try {
      expect(await initBackend({ prefer: 'wasm', force: 'cpu' })).toEqual({ backend: 'cpu', device: expect.stringMatching(/^CPU/) });
      expect(tf.getBackend()).toBe('cpu');
      await expect(initBackend({ force: 'gpu-please' as 'cpu' })).rejects.toThrow(/force must be one of tensorflow, wasm, cpu \(got gpu-please\)/);
      await expect(initBackend({ prefer: 'gpu-please' as 'cpu' })).rejects.toThrow(/prefer must be one of/);
      // tfjs-node is not installed here: asked for explicitly, it is an error (auto mode falls through silently).
      const missing = await initBackend({ prefer: 'tensorflow' }).catch((e: unknown) => e);
      expect(missing).toBeInstanceOf(Error);
      expect((missing as Error).message).toMatch(/tfjs-node/);
      expect((missing as Error).cause).toBeTruthy();
    } finally {
      const back = await initBackend({ prefer: 'wasm' });
      expect(back.backend).toBe('wasm');
    }
  });
});

describe('coverage', () => {
  it('every kernel we register was compared against cpu above', () => {
    const compared = new Set([...worst.keys()].map((k) => k.split(' ')[0]));
    const missing = WASM_TRAINING_KERNELS.map((k) => k.kernelName).filter((k) => !compared.has(k));
    expect(missing).toEqual([]);
  });
});

afterAll(() => {
  const lines = [...worst].map(([k, v]) => `  ${k.padEnd(34)} ${v.toExponential(2)}`);
  console.log(`max |wasm - cpu| / max(1, |cpu|) per kernel:\n${lines.join('\n')}`);
});
