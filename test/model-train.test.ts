/**
 * Data loading, checkpoints and the training loop on tiny synthetic data (32 x 32 noise images in which a bright
 * square is the tumour), tfjs cpu backend, a small custom U-Net (base 4, depth 2).
 */
import { mkdtemp, readFile, rm, writeFile, readdir } from 'node:fs/promises';
import { createHash } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { patientFiles, readSplits, writePatientMeta } from '../src/disk/layout.ts';
import { encodeNpy, openNpyRows } from '../src/imaging/npy.js';
import { DataFileError } from '../src/lib/errors.ts';
import { writeFileAtomic } from '../src/lib/atomic.js';
import { loadCheckpoint, readModelJson, readTrainingState, saveCheckpoint } from '../src/model/checkpoint.js';
import { installFastCpuKernels } from '../src/model/cpu-kernels.js';
import { createBatches, newLoaderStats, type Batch, type BatchOptions } from '../src/model/data.js';
import { AdamW } from '../src/model/optim.js';
import { syntheticPatientMeta, writeSyntheticData, type SyntheticLayout } from '../src/model/synthetic.js';
import { trainStage, type EpochInfo, type StageData } from '../src/model/trainer.js';
import { createUNet, type ParamGroup, type UNetModel } from '../src/model/unet.js';
import { resumeSegWarmup, syntheticStageData, tinyTrainConfig, trainSegWarmup, trainSegWarmupUntil } from './helpers/model-training.ts';

const ARCH = { base: 4, depth: 2, headHidden: 8 };
let tmp: string;
let syn: SyntheticLayout;

beforeAll(async () => {
  await tf.setBackend('cpu');
  await tf.ready();
  installFastCpuKernels();
  tmp = await mkdtemp(join(tmpdir(), 'slicewise-train-'));
  syn = await writeSyntheticData(join(tmp, 'syn'), { patients: 6, slicesPerPatient: 8, kaggleImages: 20, size: 32, seed: 3 });
});
afterAll(async () => {
  await rm(tmp, { recursive: true, force: true });
});

async function collect(opts: BatchOptions): Promise<Batch[]> {
  const out: Batch[] = [];
  for await (const b of createBatches(opts)) out.push(b);
  return out;
}

const bytesOf = (v: tf.Tensor): Buffer => Buffer.from((v.dataSync() as Float32Array).slice().buffer);
function snapshot(model: UNetModel, groups: ParamGroup[]): Map<string, Buffer> {
  const out = new Map<string, Buffer>();
  for (const g of groups) {
    for (const [name, v] of model.group(g)) out.set(name, bytesOf(v));
    for (const [name, v] of model.groupBuffers(g)) out.set(name, bytesOf(v));
  }
  return out;
}

describe('data', () => {
  it('reads the split files', async () => {
    const s = await readSplits(syn.splitsDir);
    expect(s.brats!.train).toEqual(syn.bratsSplit.train);
    expect(s.brats!.processed_dir).toBe(syn.bratsDir);
    expect(s.kaggle!.val).toEqual(syn.kaggleSplit.val);
    expect((await readSplits(join(tmp, 'nowhere'))).brats).toBeNull();
  });

  it('one epoch: every slice once, NHWC, masks and labels from the files, shuffled per epoch, seeded', async () => {
    const opts: BatchOptions = { brats: { dir: syn.bratsDir, patients: syn.patients }, batchSize: 5, shuffle: true, seed: 9, epoch: 1 };
    const batches = await collect(opts);
    const ids = batches.flatMap((b) => b.ids);
    expect(ids.length).toBe(6 * 8);
    expect(new Set(ids).size).toBe(48);
    expect(batches.map((b) => b.n)).toEqual([5, 5, 5, 5, 5, 5, 5, 5, 5, 3]);
    const b0 = batches[0]!;
    expect([b0.height, b0.width, b0.channels]).toEqual([32, 32, 1]);
    expect(b0.x.length).toBe(5 * 32 * 32);
    expect(Array.from(b0.hasMask)).toEqual([1, 1, 1, 1, 1]);
    // Each sample equals its slice on disk; the label is (mask pixels >= 10).
    const [pid, slice] = b0.ids[2]!.split(':') as [string, string];
    const meta = JSON.parse(await readFile(join(syn.bratsDir, pid, 'meta.json'), 'utf8')) as { slices: { tumor_pixels: number }[] };
    const pixels = b0.mask!.subarray(2 * 1024, 3 * 1024).reduce((a, v) => a + v, 0);
    expect(pixels).toBe(meta.slices[Number(slice)]!.tumor_pixels);
    expect(b0.clsLabel[2]).toBe(pixels >= 10 ? 1 : 0);
    // Patients are mixed within batches, the order changes with the epoch and repeats with the seed.
    expect(batches.some((b) => new Set(b.ids.map((i) => i.split(':')[0])).size > 1)).toBe(true);
    const again = await collect(opts);
    expect(again.flatMap((b) => b.ids)).toEqual(ids);
    const next = await collect({ ...opts, epoch: 2 });
    expect(next.flatMap((b) => b.ids)).not.toEqual(ids);
    // Without shuffle: file order.
    const ordered = await collect({ ...opts, shuffle: false });
    expect(ordered[0]!.ids.slice(0, 3)).toEqual([`${syn.patients[0]}:0`, `${syn.patients[0]}:1`, `${syn.patients[0]}:2`]);
  });

  it('memory-bounded: at most maxCachedPatients decoded patients, each decoded once per epoch', async () => {
    const stats = newLoaderStats();
    const batches = await collect({ brats: { dir: syn.bratsDir, patients: syn.patients }, batchSize: 4, shuffle: true, seed: 1, epoch: 3, maxCachedPatients: 2, stats });
    expect(batches.flatMap((b) => b.ids).length).toBe(48);
    expect(stats.maxResidentPatients).toBeLessThanOrEqual(2);
    expect(stats.patientLoads).toBe(6);
  });

  it('class label threshold, multi-channel images, Kaggle rows without masks', async () => {
    const dir = join(tmp, 'custom');
    const area = 16;
    // patient P: 2 slices, 2 channels (N x C x H x W), slice 0 has 9 tumour pixels, slice 1 has 12
    const images = new Float32Array(2 * 2 * area).map((_, i) => i);
    const masks = new Uint8Array(2 * area);
    masks.fill(1, 0, 9);
    masks.fill(1, area, area + 12);
    const files = patientFiles(dir, 'P');
    await writeFileAtomic(files.images, encodeNpy(images, [2, 2, 4, 4]));
    await writeFileAtomic(files.masks, encodeNpy(masks, [2, 4, 4]));
    await writePatientMeta(files, syntheticPatientMeta('P', 4, [9, 12]));
    const [b] = await collect({ brats: { dir, patients: ['P'] }, batchSize: 8, shuffle: false, seed: 1, epoch: 0 });
    expect(Array.from(b!.clsLabel)).toEqual([0, 1]);
    const [b5] = await collect({ brats: { dir, patients: ['P'] }, batchSize: 8, shuffle: false, seed: 1, epoch: 0, clsTumorPixels: 5 });
    expect(Array.from(b5!.clsLabel)).toEqual([1, 1]);
    expect(b!.channels).toBe(2);
    // x is channels-last: pixel k of slice 0 is (channel 0: k, channel 1: 16 + k)
    expect(Array.from(b!.x.subarray(0, 4))).toEqual([0, 16, 1, 17]);
    expect(Array.from(b!.x.subarray(32, 34))).toEqual([32, 48]); // slice 1, pixel 0

    const k = await collect({ kaggle: { dir: syn.kaggleDir, indices: [3, 0, 7] }, batchSize: 8, shuffle: false, seed: 1, epoch: 0 });
    expect(k[0]!.ids).toEqual(['kaggle:3', 'kaggle:0', 'kaggle:7']);
    expect(k[0]!.mask).toBeNull();
    expect(Array.from(k[0]!.hasMask)).toEqual([0, 0, 0]);
    const labels = await readFile(join(syn.kaggleDir, 'labels.npy'));
    const all = labels.subarray(labels.length - 20);
    expect(Array.from(k[0]!.clsLabel)).toEqual([all[3], all[0], all[7]]);
    const imgs = await readFile(join(syn.kaggleDir, 'images.npy'));
    const row0 = new Float32Array(imgs.buffer.slice(imgs.byteOffset + imgs.length - 20 * 4096, imgs.byteOffset + imgs.length - 19 * 4096));
    expect(k[0]!.x.subarray(1024, 2048)).toEqual(row0);
  });

  it('row reads of a .npy file (the Kaggle images): shape, rows, errors that name the file and keep their cause', async () => {
    const dir = join(tmp, 'rows');
    const file = join(dir, 'images.npy');
    await writeFileAtomic(file, encodeNpy(Float32Array.from({ length: 12 }, (_, i) => i), [2, 2, 3]));
    const rows = await openNpyRows(file);
    try {
      expect([rows.shape, rows.rows]).toEqual([[2, 2, 3], 2]);
      const out = new Float32Array(8);
      await rows.readRow(1, out, 2);
      expect(Array.from(out)).toEqual([0, 0, 6, 7, 8, 9, 10, 11]);
      await expect(rows.readRow(2, out, 0)).rejects.toThrow(/row 2 is out of range/);
    } finally {
      await rows.close();
    }
    const missing = (await openNpyRows(join(dir, 'none.npy')).catch((e: unknown) => e)) as DataFileError;
    expect(missing).toBeInstanceOf(DataFileError);
    expect(missing.message).toMatch(/none\.npy: file not found$/);
    expect((missing.cause as NodeJS.ErrnoException).code).toBe('ENOENT');
    const whole = encodeNpy(new Float32Array(12), [2, 2, 3]);
    await writeFile(join(dir, 'short.npy'), whole.subarray(0, whole.length - 4));
    await expect(openNpyRows(join(dir, 'short.npy'))).rejects.toThrow(/short\.npy: truncated/);
    await writeFile(join(dir, 'bytes.npy'), encodeNpy(new Uint8Array(4), [1, 2, 2]));
    await expect(openNpyRows(join(dir, 'bytes.npy'))).rejects.toThrow(/expected float32/);
    await writeFile(join(dir, 'text.npy'), 'not a numpy file at all');
    await expect(openNpyRows(join(dir, 'text.npy'))).rejects.toThrow(/text\.npy: not a \.npy file/);
  });

  it('mix 0.3 / 0.7 is honoured in every batch; without mix each sample is drawn once', async () => {
    const stats = newLoaderStats();
    const batches = await collect({
      brats: { dir: syn.bratsDir, patients: syn.patients },
      kaggle: { dir: syn.kaggleDir, indices: syn.kaggleSplit.train },
      mix: { brats: 0.3, kaggle: 0.7 },
      epochSize: 100,
      batchSize: 10,
      shuffle: true,
      seed: 2,
      epoch: 1,
      stats,
    });
    expect(batches.length).toBe(10);
    for (const b of batches) expect(b.source.filter((s) => s === 'brats').length).toBe(3);
    expect(stats.samples).toEqual({ brats: 30, kaggle: 70 });
    const mixed = batches.find((b) => b.mask !== null)!;
    for (let i = 0; i < mixed.n; i++) {
      expect(mixed.hasMask[i]).toBe(mixed.source[i] === 'brats' ? 1 : 0);
      if (mixed.source[i] === 'kaggle') expect(mixed.mask!.subarray(i * 1024, (i + 1) * 1024).every((v) => v === 0)).toBe(true);
    }
    const natural = await collect({
      brats: { dir: syn.bratsDir, patients: syn.patients },
      kaggle: { dir: syn.kaggleDir, indices: syn.kaggleSplit.train },
      batchSize: 10,
      shuffle: true,
      seed: 2,
      epoch: 1,
    });
    const ids = natural.flatMap((b) => b.ids);
    expect(ids.length).toBe(48 + syn.kaggleSplit.train.length);
    expect(new Set(ids).size).toBe(ids.length);
  });
});

describe('checkpoints', () => {
  it('round trip: same outputs, sha256 of the files, optimizer state for resume', async () => {
    const model = createUNet(ARCH, { seed: 1 });
    // Move the BN statistics off their initial values so that the buffers are part of what is checked.
    tf.tidy(() => void model.forward(tf.randomNormal([2, 32, 32, 1], 0, 1, 'float32', 1) as tf.Tensor4D, { training: true }));
    const opt = new AdamW([{ name: 'head', params: model.group('head'), lr: 1e-3 }]);
    const dir = join(tmp, 'ck-roundtrip');
    try {
      const saved = await saveCheckpoint(dir, model, { trainingState: { stage: 'joint', epoch: 4, bestMetric: 0.5, bestEpoch: 3 }, optimizer: opt.getState() });
      for (const f of ['model.json', 'weights.bin', 'training_state.json', 'optimizer.bin']) {
        expect(saved.files[f]).toBe(createHash('sha256').update(await readFile(join(dir, f))).digest('hex'));
      }
      const mj = await readModelJson(dir);
      expect(mj.format).toBe('slicewise-unet');
      expect(mj.config).toMatchObject(ARCH);
      expect(mj.weightsManifest[0]!.paths).toEqual(['weights.bin']);
      expect(mj.weightsManifest[0]!.weights[0]).toEqual({ name: 'encoder.0.conv1.weight', shape: [3, 3, 1, 4], dtype: 'float32', group: 'encoder', kind: 'param' });
      expect((await readdir(dir)).sort()).toEqual(['model.json', 'optimizer.bin', 'training_state.json', 'weights.bin']);

      const { model: loaded } = await loadCheckpoint(dir, { seed: 99 });
      try {
        const x = tf.randomNormal([2, 32, 32, 1], 0, 1, 'float32', 2) as tf.Tensor4D;
        const a = tf.tidy(() => model.forward(x, { training: false }).segLogits.dataSync().slice());
        const b = tf.tidy(() => loaded.forward(x, { training: false }).segLogits.dataSync().slice());
        const ca = tf.tidy(() => model.forward(x, { training: false }).clsLogits.dataSync().slice());
        const cb = tf.tidy(() => loaded.forward(x, { training: false }).clsLogits.dataSync().slice());
        x.dispose();
        expect(Buffer.from(b.buffer).equals(Buffer.from(a.buffer))).toBe(true);
        expect(Buffer.from(cb.buffer).equals(Buffer.from(ca.buffer))).toBe(true);
      } finally {
        loaded.dispose();
      }
      const state = await readTrainingState(dir);
      expect(state).toMatchObject({ stage: 'joint', epoch: 4, bestMetric: 0.5, bestEpoch: 3 });
      expect(state!.optimizer!.slots.map((s) => s.name)).toEqual([...model.group('head').keys()]);

      // A damaged weights file is refused.
      const w = await readFile(join(dir, 'weights.bin'));
      w[100] ^= 0xff;
      await writeFile(join(dir, 'weights.bin'), w);
      await expect(loadCheckpoint(dir)).rejects.toThrow(/sha256/);
    } finally {
      opt.dispose();
      model.dispose();
    }
  });

  it('stage 2 takes encoder + decoder from stage 1 byte-identical and keeps its own head', async () => {
    const stage1 = createUNet(ARCH, { seed: 1 });
    tf.tidy(() => void stage1.forward(tf.randomNormal([2, 32, 32, 1], 0, 1, 'float32', 4) as tf.Tensor4D, { training: true }));
    const dir = join(tmp, 'ck-stage1');
    await saveCheckpoint(dir, stage1);
    const fresh = createUNet(ARCH, { seed: 2 });
    const { model: stage2, loaded } = await loadCheckpoint(dir, { groups: ['encoder', 'decoder'], seed: 2 });
    try {
      const want = snapshot(stage1, ['encoder', 'decoder']);
      const got = snapshot(stage2, ['encoder', 'decoder']);
      expect([...got.keys()]).toEqual([...want.keys()]);
      for (const [name, buf] of want) expect(got.get(name)!.equals(buf), name).toBe(true);
      expect(loaded.length).toBe(want.size);
      const head2 = snapshot(stage2, ['head']);
      const headFresh = snapshot(fresh, ['head']);
      const head1 = snapshot(stage1, ['head']);
      for (const [name, buf] of head2) {
        expect(buf.equals(headFresh.get(name)!)).toBe(true);
        expect(buf.equals(head1.get(name)!)).toBe(false);
      }
      // An architecture mismatch is an error, not a silent partial load.
      const other = createUNet({ base: 8, depth: 2, headHidden: 8 }, { seed: 1 });
      await expect(loadCheckpoint(dir, { model: other })).rejects.toThrow(/architecture/);
      other.dispose();
    } finally {
      stage1.dispose();
      stage2.dispose();
      fresh.dispose();
    }
  });
});

describe('training', () => {
  const baseConfig = tinyTrainConfig();
  const bratsData = (): StageData => syntheticStageData(syn);
  let stage1Best = '';
  let referenceFinal: Map<string, Buffer>;

  it('stage 1: loss decreases, tensors do not leak, checkpoints rotate', async () => {
    const model = createUNet(ARCH, { seed: 3 });
    const ckdir = join(tmp, 'run-a');
    const counts: number[] = [];
    const epochs: EpochInfo[] = [];
    const start = tf.memory().numTensors;
    const r = await trainSegWarmup(model, bratsData(), baseConfig, {
      checkpointDir: ckdir,
      keepLastN: 2,
      onBatch: () => void counts.push(tf.memory().numTensors),
      onEpoch: (e) => void epochs.push(e),
    });
    expect(r.epochsRun).toBe(3);
    expect(r.history.map((h) => h.epoch)).toEqual([1, 2, 3]);
    expect(epochs[2]!.trainLoss).toBeLessThan(epochs[0]!.trainLoss);
    expect(epochs[0]!.lr).toBeCloseTo(1e-2, 10);
    expect(epochs[1]!.lr).toBeCloseTo(1e-6 + (1e-2 - 1e-6) * (1 + Math.cos(Math.PI / 3)) / 2, 10);
    expect(epochs.every((e) => e.valMetrics.dice !== null && e.valMetrics.accuracy === null)).toBe(true);
    expect(r.bestMetric).toBe(Math.max(...epochs.map((e) => e.metric!)));
    // numTensors: the same after every batch, and back to the start once the optimizer is gone
    expect(new Set(counts).size).toBe(1);
    expect(tf.memory().numTensors).toBe(start);
    expect((await readdir(ckdir)).sort()).toEqual(['best', 'epoch-2', 'epoch-3']);
    stage1Best = join(ckdir, 'best');
    expect((await readTrainingState(stage1Best))!.epoch).toBe(r.bestEpoch);
    referenceFinal = snapshot(model, ['encoder', 'decoder']);
    model.dispose();
  });

  it('resume from a saved epoch continues at epoch + 1 with the saved optimizer state and ends where the uninterrupted run did', async () => {
    const ckdir = join(tmp, 'run-b');
    const first = createUNet(ARCH, { seed: 3 });
    // Stopped after epoch 2, e.g. the worker was asked to stop.
    const r1 = await trainSegWarmupUntil(first, bratsData(), baseConfig, 2, { checkpointDir: ckdir, keepLastN: 3 });
    expect(r1).toMatchObject({ epochsRun: 2, lastEpoch: 2, cancelled: true });
    first.dispose();

    const model = createUNet(ARCH, { seed: 77 }); // different init: everything must come from the checkpoint
    const seen: number[] = [];
    const { prep, result: r2 } = await resumeSegWarmup(model, bratsData(), baseConfig, ckdir, { keepLastN: 3, onEpoch: (e) => void seen.push(e.epoch) });
    expect(prep.startEpoch).toBe(3);
    expect(prep.dir).toBe(join(ckdir, 'epoch-2'));
    const perEpoch = Math.ceil((syn.bratsSplit.train.length * 8) / baseConfig.batchSize);
    expect(prep.optimizerState!.slots.every((s) => s.step === 2 * perEpoch)).toBe(true);
    expect(seen).toEqual([3]);
    expect(r2.history.map((h) => h.epoch)).toEqual([1, 2, 3]);
    const state3 = (await readTrainingState(join(ckdir, 'epoch-3')))!;
    expect(state3.optimizer!.slots.every((s) => s.step === 3 * perEpoch)).toBe(true);
    const final = snapshot(model, ['encoder', 'decoder']);
    for (const [name, buf] of referenceFinal) expect(final.get(name)!.equals(buf), name).toBe(true);
    model.dispose();
  });

  it('stage 2: only the head learns, encoder and decoder (weights and BN statistics) stay byte-identical; then stage 3 trains all', async () => {
    const { model } = await loadCheckpoint(stage1Best, { groups: ['encoder', 'decoder'], seed: 11 });
    const frozenBefore = snapshot(model, ['encoder', 'decoder']);
    const headBefore = snapshot(model, ['head']);
    const data = syntheticStageData(syn, { kaggle: true });
    const r = await trainStage({
      model,
      stage: 'cls_head',
      data,
      config: { ...baseConfig, epochs: 2, microBatch: 4, augmentation: 'moderate' },
      trainable: ['head'],
      checkpointDir: join(tmp, 'run-stage2'),
      keepLastN: 1,
    });
    expect(r.epochsRun).toBe(2);
    expect(r.history.every((h) => h.valMetrics.accuracy !== null && h.valMetrics.dice === null)).toBe(true);
    const frozenAfter = snapshot(model, ['encoder', 'decoder']);
    for (const [name, buf] of frozenBefore) expect(frozenAfter.get(name)!.equals(buf), name).toBe(true);
    const headAfter = snapshot(model, ['head']);
    for (const [name, buf] of headBefore) expect(headAfter.get(name)!.equals(buf), name).toBe(false);
    // Stage 3 (joint) from here: BraTS / Kaggle mixed 0.3 / 0.7, per-group learning rates, micro-batches.
    const jointData: StageData = {
      train: ({ epoch, batchSize }) =>
        createBatches({
          brats: { dir: syn.bratsDir, patients: syn.bratsSplit.train },
          kaggle: { dir: syn.kaggleDir, indices: syn.kaggleSplit.train },
          mix: { brats: 0.3, kaggle: 0.7 },
          epochSize: 20,
          batchSize,
          shuffle: true,
          seed: 1,
          epoch,
        }),
      val: data.val,
    };
    const before = snapshot(model, ['encoder', 'decoder', 'head']);
    const infos: EpochInfo[] = [];
    const j = await trainStage({
      model,
      stage: 'joint',
      data: jointData,
      config: { ...baseConfig, epochs: 1, batchSize: 10, microBatch: 5, lrGroups: { encoder: 1e-4, decoder: 3e-4, head: 3e-4 } },
      trainable: ['encoder', 'decoder', 'head'],
      onEpoch: (e) => void infos.push(e),
    });
    expect(j.epochsRun).toBe(1);
    expect(infos[0]!.lrs).toEqual({ encoder: 1e-4, decoder: 3e-4, head: 3e-4 });
    const v = infos[0]!.valMetrics;
    expect(infos[0]!.metric).toBeCloseTo((v.dice! + v.accuracy!) / 2, 12);
    const after = snapshot(model, ['encoder', 'decoder', 'head']);
    for (const [name, buf] of before) if (name.endsWith('.weight')) expect(after.get(name)!.equals(buf), name).toBe(false);
    // The stage's config is checked: a seg-only stage cannot train the head.
    await expect(trainStage({ model, stage: 'seg_warmup', data, config: baseConfig, trainable: ['head'] })).rejects.toThrow(/cannot train the head/);
    model.dispose();
  });
});
