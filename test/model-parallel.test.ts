/**
 * Data-parallel training (src/model/parallel.ts): replica worker threads, exact gradient sums, BatchNorm running
 * statistics, a stage trained over 2 replicas (loss, checkpoints, resume), and no thread left behind on close,
 * cancel or error. tfjs cpu backend with the fast kernels (in this thread and, by the pool, in every replica),
 * a tiny U-Net (base 4, depth 2) on 16 x 16 / 32 x 32 images.
 */
import { readFileSync } from 'node:fs';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { env, ENV_KNOBS } from '../src/env.ts';
import { readTrainingState } from '../src/model/checkpoint.js';
import { installFastCpuKernels } from '../src/model/cpu-kernels.js';
import { createReplicaPool, dataParallelGradients, packVariables, splitEven, type GradientSpec } from '../src/model/parallel.js';
import { copyShard, disposeShardTensors, shardGradients, shardTensors, sliceShard } from '../src/model/shard-grads.js';
import { autoReplicas } from '../src/model/stage.js';
import { writeSyntheticData, type SyntheticLayout } from '../src/model/synthetic.js';
import type { EpochInfo } from '../src/model/trainer.js';
import { createUNet, type UNetModel } from '../src/model/unet.js';
import { resumeSegWarmup, syntheticStageData, tinyTrainConfig, trainSegWarmup, trainSegWarmupUntil } from './helpers/model-training.ts';

const ARCH = { base: 4, depth: 2, headHidden: 8 };
let tmp: string;
let syn: SyntheticLayout;
let baseThreads = 0;

/** OS threads of this process: a worker thread is one of them until it has exited. */
const osThreads = (): number => Number(/Threads:\s+(\d+)/.exec(readFileSync('/proc/self/status', 'utf8'))![1]);
/**
 * The process's OS threads once they have settled: a terminated worker's thread leaves a moment after terminate()
 * resolves, so "no thread left behind" is checked as "back to the base count within 5 s".
 */
async function settledThreads(): Promise<number> {
  for (let i = 0; i < 50 && osThreads() > baseThreads; i++) await new Promise((r) => setTimeout(r, 100));
  return osThreads();
}

beforeAll(async () => {
  await tf.setBackend('cpu');
  await tf.ready();
  installFastCpuKernels();
  tmp = await mkdtemp(join(tmpdir(), 'slicewise-parallel-'));
  syn = await writeSyntheticData(join(tmp, 'syn'), { patients: 5, slicesPerPatient: 6, kaggleImages: 0, size: 32, seed: 4 });
  baseThreads = osThreads();
});
afterAll(async () => {
  await rm(tmp, { recursive: true, force: true });
});

/** A deterministic batch of n samples (size x size, 1 channel). */
function makeBatch(n: number, size: number, hasMask: number[]) {
  const area = size * size;
  return {
    n,
    height: size,
    width: size,
    channels: 1,
    x: Float32Array.from({ length: n * area }, (_, i) => Math.sin(i * 0.37) + 0.3 * Math.cos(i * 0.05)),
    mask: Float32Array.from({ length: n * area }, (_, i) => (Math.cos(i * 0.11) > 0.4 ? 1 : 0)),
    hasMask: Float32Array.from(hasMask),
    clsLabel: Int32Array.from({ length: n }, (_, i) => i % 2),
  };
}

const valuesOf = (v: tf.Tensor): Float32Array => (v.dataSync() as Float32Array).slice();
const bytes = (a: Float32Array): Buffer => Buffer.from(a.buffer, a.byteOffset, a.byteLength);

function copyWeights(from: UNetModel, to: UNetModel): void {
  for (const [name, v] of from.params) to.params.get(name)!.assign(v);
  for (const [name, v] of from.buffers) to.buffers.get(name)!.assign(v);
}

describe('replica pool', () => {
  it('splits chunks evenly, larger shards first', () => {
    expect(splitEven(8, 2)).toEqual([4, 4]);
    expect(splitEven(7, 2)).toEqual([4, 3]);
    expect(splitEven(1, 2)).toEqual([1, 0]);
    expect(splitEven(5, 3)).toEqual([2, 2, 1]);
  });

  it('2 replicas: the summed gradients and the loss equal the two shards computed here and summed, bit for bit; BN running stats are the weighted average', async () => {
    const pool = await createReplicaPool({ replicas: 2, arch: ARCH, inChannels: 1, seed: 9 });
    try {
      expect(pool.threadIds.length).toBe(1);
      expect(osThreads()).toBeGreaterThan(baseThreads); // a worker thread (and tsx's loader-hooks thread in it)
      const model = createUNet(ARCH, { seed: 5 });
      const refA = createUNet(ARCH, { seed: 6 });
      const refB = createUNet(ARCH, { seed: 7 });
      // Move the running statistics off their initial values so that the averaging is visible.
      tf.tidy(() => void model.forward(tf.randomNormal([2, 32, 32, 1], 0, 1, 'float32', 1) as tf.Tensor4D, { training: true }));
      const batch = makeBatch(7, 32, [1, 1, 0, 1, 0, 1, 1]); // 4 + 3 samples; 5 with a mask
      const segDen = 5;
      const clsDen = 7;
      // joint with the head frozen: no dropout anywhere, so both sides are deterministic.
      const cases: GradientSpec[] = [
        { stage: 'joint', frozen: ['head'], labelSmoothing: 0.1, lambdaSeg: 1, lambdaCls: 0.5, params: [...model.group('encoder').keys(), ...model.group('decoder').keys()] },
        { stage: 'seg_warmup', frozen: ['head'], labelSmoothing: 0.1, lambdaSeg: 1, lambdaCls: 0.5, params: [...model.group('decoder').keys()] },
      ];
      for (const spec of cases) {
        copyWeights(model, refA);
        copyWeights(model, refB);
        pool.publishParams(model);
        const before = tf.memory().numTensors;
        const r = await dataParallelGradients(pool, model, batch, 0, 7, spec, segDen, clsDen);
        expect(tf.memory().numTensors - before).toBe(r.grads.size);
        expect([...r.grads.keys()]).toEqual(spec.params);

        const ref = (m: UNetModel, from: number, to: number) => {
          const params = new Map(spec.params.map((name) => [name, m.params.get(name)!]));
          const t = shardTensors(sliceShard(batch, from, to));
          try {
            return shardGradients(m, spec, params, t, segDen, clsDen);
          } finally {
            disposeShardTensors(t);
          }
        };
        const a = ref(refA, 0, 4);
        const b = ref(refB, 4, 7);
        expect(r.loss).toBe(a.loss + b.loss);
        for (const name of spec.params) {
          const want = tf.tidy(() => valuesOf(tf.add(a.grads.get(name)!, b.grads.get(name)!)));
          const got = valuesOf(r.grads.get(name)!);
          expect(bytes(got).equals(bytes(want)), name).toBe(true);
        }
        for (const g of [...a.grads.values(), ...b.grads.values(), ...r.grads.values()]) g.dispose();
        // Running statistics: weighted 4/7, 3/7 (written v_A + 3/7 (v_B - v_A)); frozen groups untouched.
        for (const [name, v] of model.buffers) {
          const va = valuesOf(refA.buffers.get(name)!);
          const vb = valuesOf(refB.buffers.get(name)!);
          const got = valuesOf(v);
          if (name.startsWith('head.')) continue;
          const want = Float32Array.from(va, (x, i) => (vb[i] === x ? x : x + (3 / 7) * (vb[i]! - x)));
          expect(bytes(got).equals(bytes(want)), name).toBe(true);
        }
        // seg_warmup never runs the head; joint with the head frozen runs it in eval mode. Encoder BN moved.
        expect(bytes(valuesOf(model.buffers.get('encoder.0.bn1.running_mean')!)).equals(bytes(valuesOf(refA.buffers.get('encoder.0.bn1.running_mean')!)))).toBe(false);
      }
      for (const m of [model, refA, refB]) m.dispose();
    } finally {
      await pool.close();
    }
    expect(pool.closed).toBe(true);
    expect(await settledThreads()).toBe(baseThreads);
    await expect(pool.run([])).rejects.toThrow(/closed/);
  });

  it('dropout masks differ between replicas; a job error rejects and leaves the pool usable; close ends the threads', async () => {
    const pool = await createReplicaPool({ replicas: 3, arch: ARCH, inChannels: 1, seed: 9 });
    try {
      expect(osThreads()).toBeGreaterThan(baseThreads);
      const model = createUNet(ARCH, { seed: 5 });
      pool.publishParams(model);
      const batch = makeBatch(4, 16, [1, 1, 1, 1]);
      const spec: GradientSpec = { stage: 'cls_head', frozen: ['encoder', 'decoder'], labelSmoothing: 0, lambdaSeg: 1, lambdaCls: 1, params: [...model.group('head').keys()] };
      const buffers = packVariables(pool.layout.buffers, model.buffers, new Float32Array(pool.layout.bufferSize));
      const job = { shard: sliceShard(batch, 0, 4), spec, buffers, segDen: 4, clsDen: 4 };
      const [r1, r2] = await pool.run([job, { ...job, shard: copyShard(job.shard) }]);
      expect(r1!.n).toBe(4);
      expect(bytes(r1!.grads).equals(bytes(r2!.grads))).toBe(false);
      // The batch's own arrays were copied, not transferred away.
      expect(batch.x.length).toBe(4 * 256);

      const bad = { ...job, shard: { ...job.shard, channels: 2, x: new Float32Array(4 * 256 * 2) } };
      await expect(pool.run([bad])).rejects.toThrow(/replica 1: .*expected an N x H x W x 1 input/);
      const [again] = await pool.run([job]);
      expect(again!.grads.length).toBe(r1!.grads.length);
      model.dispose();
    } finally {
      await pool.close();
    }
    expect(await settledThreads()).toBe(baseThreads);
  });

  it('a replica that cannot start fails the pool and leaves no thread behind', async () => {
    // tfjs-node is not installed: the worker's initBackend throws.
    await expect(createReplicaPool({ replicas: 2, arch: ARCH, inChannels: 1, seed: 1, backend: 'tensorflow' })).rejects.toThrow(/replica 1: .*tfjs-node/);
    expect(await settledThreads()).toBe(baseThreads);
  });

  it('replica count: SLICEWISE_TRAIN_REPLICAS, 1 on tensorflow, min(cores, 2) elsewhere', () => {
    expect(autoReplicas('wasm', undefined, 2)).toBe(2);
    expect(autoReplicas('cpu', undefined, 16)).toBe(2);
    expect(autoReplicas('wasm', undefined, 1)).toBe(1);
    expect(autoReplicas('tensorflow', undefined, 8)).toBe(1);
    const name = ENV_KNOBS.trainReplicas.name;
    const configured = (raw: string) => env({ [name]: raw }).trainReplicas;
    expect(autoReplicas('tensorflow', configured('2'), 8)).toBe(2);
    expect(autoReplicas('wasm', configured(' 1 '), 8)).toBe(1);
    expect(autoReplicas('wasm', configured(''), 8)).toBe(2);
    expect(() => configured('0')).toThrow(name);
    expect(() => configured('two')).toThrow(name);
  });
});

describe('training over 2 replicas', () => {
  // microBatch is per replica: a chunk of 8 = 4 + 4 per batch (18 training slices: 8, 8, then 2 = 1 + 1).
  const config = tinyTrainConfig({ epochs: 2, microBatch: 4 });
  const data = (failAt?: number) => syntheticStageData(syn, { failAt });
  let reference: Map<string, Buffer>;
  const snapshot = (m: UNetModel): Map<string, Buffer> => {
    const out = new Map<string, Buffer>();
    for (const [name, v] of [...m.params, ...m.buffers]) out.set(name, bytes(valuesOf(v)));
    return out;
  };

  it('stage 1: loss goes down, checkpoints are written, tensors do not leak, the threads end with the stage', async () => {
    const model = createUNet(ARCH, { seed: 3 });
    const ckdir = join(tmp, 'run-a');
    const counts: number[] = [];
    const threads: number[] = [];
    const epochs: EpochInfo[] = [];
    const start = tf.memory().numTensors;
    const r = await trainSegWarmup(model, data(), config, {
      checkpointDir: ckdir,
      keepLastN: 3,
      replicas: 2,
      onBatch: () => {
        counts.push(tf.memory().numTensors);
        threads.push(osThreads());
      },
      onEpoch: (e) => void epochs.push(e),
    });
    expect(r.epochsRun).toBe(2);
    expect(epochs[1]!.trainLoss).toBeLessThan(epochs[0]!.trainLoss);
    expect(epochs.every((e) => e.valMetrics.dice !== null && Number.isFinite(e.gradNorm))).toBe(true);
    expect(new Set(counts).size).toBe(1);
    expect(tf.memory().numTensors).toBe(start);
    expect(threads.every((n) => n > baseThreads)).toBe(true); // the worker thread while training ...
    expect(await settledThreads()).toBe(baseThreads); // ... none after
    expect((await readdir(ckdir)).sort()).toEqual(['best', 'epoch-1', 'epoch-2']);
    expect((await readTrainingState(join(ckdir, 'epoch-2')))!.epoch).toBe(2);
    reference = snapshot(model);
    model.dispose();
  });

  it('cancel, then resume over 2 replicas: ends bit for bit where the uninterrupted run did', async () => {
    const ckdir = join(tmp, 'run-b');
    const first = createUNet(ARCH, { seed: 3 });
    const r1 = await trainSegWarmupUntil(first, data(), config, 1, { checkpointDir: ckdir, replicas: 2 });
    expect(r1).toMatchObject({ epochsRun: 1, lastEpoch: 1, cancelled: true });
    expect(await settledThreads()).toBe(baseThreads);
    first.dispose();

    const model = createUNet(ARCH, { seed: 77 });
    const { prep, result: r2 } = await resumeSegWarmup(model, data(), config, ckdir, { replicas: 2 });
    expect(prep.startEpoch).toBe(2);
    expect(r2.history.map((h) => h.epoch)).toEqual([1, 2]);
    const final = snapshot(model);
    for (const [name, buf] of reference) expect(final.get(name)!.equals(buf), name).toBe(true);
    model.dispose();
    expect(await settledThreads()).toBe(baseThreads);
  });

  it('an error during training closes the pool: no worker thread left, no tensor leaked', async () => {
    const model = createUNet(ARCH, { seed: 3 });
    const start = tf.memory().numTensors;
    let sawThreads = 0;
    await expect(trainSegWarmup(model, data(2), config, { replicas: 2, onBatch: () => void (sawThreads = osThreads()) })).rejects.toThrow(/disk on fire/);
    expect(sawThreads).toBeGreaterThan(baseThreads);
    expect(await settledThreads()).toBe(baseThreads);
    expect(tf.memory().numTensors).toBe(start);
    // A bad replica count is refused before anything starts.
    await expect(trainSegWarmup(model, data(), config, { trainable: ['encoder'], replicas: 0 })).rejects.toThrow(/replicas/);
    model.dispose();
  });
});
