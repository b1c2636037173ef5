/**
 * src/model/engine.ts: SliceWise's environment applied to the training engine (packages/tfjs-wasm-training, whose
 * own tests cover the kernels and its initBackend). The variables must act as they did when the engine read them
 * itself: SLICEWISE_TF_BACKEND wins over `prefer`, SLICEWISE_WASM_THREADS is the default thread count, and a
 * malformed value is an error naming the variable.
 */
import * as tf from '@tensorflow/tfjs';
import { afterEach, describe, expect, it } from 'vitest';
import { initBackend } from '../src/model/engine.ts';

const VARS = ['SLICEWISE_TF_BACKEND', 'SLICEWISE_WASM_THREADS', 'SLICEWISE_WASM_NO_SIMD_KERNELS'] as const;
const saved = Object.fromEntries(VARS.map((v) => [v, process.env[v]]));

afterEach(() => {
  for (const v of VARS) {
    if (saved[v] === undefined) delete process.env[v];
    else process.env[v] = saved[v];
  }
});

describe('initBackend with the environment', () => {
  it('SLICEWISE_WASM_THREADS is the default thread count; an explicit `threads` wins over it', async () => {
    for (const v of VARS) delete process.env[v];
    process.env.SLICEWISE_WASM_THREADS = '2';
    const info = await initBackend({ prefer: 'wasm' });
    expect(info.backend).toBe('wasm');
    // Without SIMD there is no kernel pool and the thread count is tfjs's own: nothing to compare then.
    if (info.device.includes('wasm SIMD')) {
      expect(info.device).toMatch(/, 2 threads$/);
      expect((await initBackend({ prefer: 'wasm', threads: 1 })).device).toMatch(/, 1 thread$/);
    }
  });

  it('SLICEWISE_TF_BACKEND wins over prefer', async () => {
    process.env.SLICEWISE_TF_BACKEND = 'cpu';
    expect(await initBackend({ prefer: 'wasm' })).toEqual({ backend: 'cpu', device: expect.stringMatching(/^CPU/) });
    expect(tf.getBackend()).toBe('cpu');
    delete process.env.SLICEWISE_TF_BACKEND;
    expect((await initBackend({ prefer: 'wasm' })).backend).toBe('wasm');
  });

  it('malformed values are rejected by name', async () => {
    process.env.SLICEWISE_TF_BACKEND = 'gpu-please';
    await expect(initBackend()).rejects.toThrow(/SLICEWISE_TF_BACKEND=gpu-please/);
    delete process.env.SLICEWISE_TF_BACKEND;
    process.env.SLICEWISE_WASM_NO_SIMD_KERNELS = 'yes';
    await expect(initBackend({ prefer: 'wasm' })).rejects.toThrow(/SLICEWISE_WASM_NO_SIMD_KERNELS=yes/);
  });

  it('SLICEWISE_WASM_NO_SIMD_KERNELS=1 still trains a conv (on the portable kernels)', async () => {
    process.env.SLICEWISE_WASM_NO_SIMD_KERNELS = '1';
    await initBackend({ prefer: 'wasm' });
    const x = tf.ones([1, 5, 5, 2]) as tf.Tensor4D;
    const w = tf.ones([3, 3, 2, 8]) as tf.Tensor4D;
    const g = tf.grad((v: tf.Tensor) => tf.conv2d(x, v as tf.Tensor4D, 1, 'same').sum())(w);
    // dL/dw[kh, kw, c, o] = sum of x over the positions that tap (kh, kw): 4 x 4 of the 5 x 5 ones at the corners.
    expect(g.shape).toEqual([3, 3, 2, 8]);
    expect(g.dataSync()[0]).toBe(16);
    tf.dispose([x, w, g]);
    process.env.SLICEWISE_WASM_NO_SIMD_KERNELS = '0';
    await initBackend({ prefer: 'wasm' });
  });
});
