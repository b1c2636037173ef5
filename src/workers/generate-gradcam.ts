/**
 * generate_gradcam: Grad-CAM of the final model's predicted class for a quarter each of correct/wrong x tumour/no
 * tumour test samples (20 in quick mode, 50 otherwise: evaluation.gradcam_samples), written as
 * visualizations/multitask_gradcam/gradcam_{i:03d}_{source}_pred{p}_true{t}.png (the original's names) and
 * recorded as artifacts. Sandboxed: the model runs in a step thread.
 */
import { mkdir, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { patientFiles, readSplits, runPaths } from '../disk/layout.ts';
import { splitKaggle } from '../evaluation/datasets.ts';
import { brainOf, chooseCamSamples, gradCam, overlayPng } from '../evaluation/gradcam.ts';
import { loadModel, predict, type SliceBatch } from '../evaluation/predict.ts';
import { readNpy } from '../imaging/npy.ts';
import { deriveSeed, mulberry32 } from '../lib/random.ts';
import { initBackend } from '../model/engine.ts';
import type { UNetModel } from '../model/unet.ts';
import { recordArtifact } from './artifacts.ts';
import { defineStep, RunJobData } from './define.ts';
import { throwIfAborted } from './errors.ts';
import { readModelInputs } from './model-inputs.ts';

export interface GradcamResult {
  kind: 'gradcam';
  dir: string;
  files: { file: string; source: 'brats' | 'kaggle'; pred: number; truth: number; probability: number }[];
}

interface Sample {
  source: 'brats' | 'kaggle';
  /** BraTS: patient id and slice row; Kaggle: the batch-local image copied out. */
  patientId?: string;
  row: number;
  image?: Float32Array;
  truth: number;
  pred: number;
  probability: number;
}

/** One patient's kept test slices at the model's size, as preprocessing wrote them. */
async function patientSlices(processedDir: string, id: string): Promise<{ batch: SliceBatch; masks: Uint8Array }> {
  const files = patientFiles(processedDir, id);
  const [images, masks] = await Promise.all([readNpy(files.images), readNpy(files.masks)]);
  const s = images.shape;
  const [n, channels, size] = s.length === 4 ? [s[0]!, s[1]!, s[2]!] : [s[0]!, 1, s[1]!];
  return { batch: { images: images.data as Float32Array, n, size, channels }, masks: masks.data as Uint8Array };
}

function sliceOf(batch: SliceBatch, row: number): SliceBatch {
  const per = batch.channels * batch.size * batch.size;
  return { images: batch.images.slice(row * per, (row + 1) * per), n: 1, size: batch.size, channels: batch.channels };
}

async function camPng(model: UNetModel, sample: Sample, batch: SliceBatch): Promise<Buffer> {
  const cam = gradCam(model, batch, { classes: [sample.pred] });
  // The overlay's grey image is the first channel (FLAIR by default).
  const grey = batch.images.subarray(0, batch.size * batch.size);
  return overlayPng(grey, cam, brainOf(grey, sample.source), batch.size);
}

// Declared in full, as every step is (define.ts): the same shape as its sibling steps' declarations by design.
export const generateGradcam = defineStep({
  name: 'generate_gradcam',
  queue: 'evaluate',
  sandboxed: true,
  data: RunJobData,
  prepare: ({ ctx, run }) => readModelInputs({ db: ctx.db, run }, 'generate_gradcam', ['train_stage3_joint']),
  async run({ run, prepared, signal, progress, log }) {
    await initBackend();
    const { evaluation, data, seed } = prepared;
    const splits = await readSplits(prepared.splitsDir);
    const { model } = await loadModel(prepared.checkpoints.joint!);
    try {
      // Pass 1: classify every test sample, keeping only what identifies it (a test set may not fit in memory).
      const samples: Sample[] = [];
      const label = (p: number): number => (p > evaluation.threshold ? 1 : 0);
      for (const id of splits.brats?.test ?? []) {
        throwIfAborted(signal, 'generate_gradcam');
        const { batch, masks } = await patientSlices(splits.brats!.processed_dir, id);
        const { cls } = await predict(model, batch, { batchSize: evaluation.batch_size, classifyOnly: true, signal });
        const area = batch.size * batch.size;
        for (let r = 0; r < batch.n; r++) {
          let pixels = 0;
          for (let i = r * area; i < (r + 1) * area; i++) pixels += masks[i]!;
          samples.push({ source: 'brats', patientId: id, row: r, truth: pixels >= data.cls_tumor_pixels ? 1 : 0, pred: label(cls[r]!), probability: cls[r]! });
        }
      }
      if (splits.kaggle) {
        const kaggle = await splitKaggle(splits.kaggle);
        for await (const { batch, labels } of kaggle.batches(evaluation.batch_size)) {
          const { cls } = await predict(model, batch, { classifyOnly: true, signal });
          for (let r = 0; r < batch.n; r++) {
            samples.push({ source: 'kaggle', row: r, image: sliceOf(batch, r).images, truth: labels[r]!, pred: label(cls[r]!), probability: cls[r]! });
          }
        }
      }
      const chosen = chooseCamSamples(samples, evaluation.gradcam_samples, mulberry32(deriveSeed(seed, 'gradcam'))).map((i) => samples[i]!);
      // Kaggle images of samples not chosen are not needed any more.
      for (const s of samples) if (s.source === 'kaggle' && !chosen.includes(s)) s.image = undefined;

      // Pass 2: the maps, into a fresh folder that replaces the old one whole (a re-run leaves no stale image).
      const dir = runPaths(run.dataDir, run.id).gradcam;
      const tmp = `${dir}.tmp-${process.pid}-${Date.now()}`;
      await mkdir(tmp, { recursive: true });
      const files: GradcamResult['files'] = [];
      const byPatient = new Map<string, SliceBatch>();
      for (const [i, s] of chosen.entries()) {
        throwIfAborted(signal, 'generate_gradcam');
        let batch: SliceBatch;
        if (s.source === 'kaggle') batch = { images: s.image!, n: 1, size: Math.sqrt(s.image!.length), channels: 1 };
        else {
          if (!byPatient.has(s.patientId!)) byPatient.set(s.patientId!, (await patientSlices(splits.brats!.processed_dir, s.patientId!)).batch);
          batch = sliceOf(byPatient.get(s.patientId!)!, s.row);
        }
        const name = `gradcam_${String(i).padStart(3, '0')}_${s.source}_pred${s.pred}_true${s.truth}.png`;
        await writeFile(join(tmp, name), await camPng(model, s, batch));
        files.push({ file: join(dir, name), source: s.source, pred: s.pred, truth: s.truth, probability: s.probability });
        void progress({ done: i + 1, total: chosen.length });
      }
      await rm(dir, { recursive: true, force: true });
      await rename(tmp, dir);
      log(`generate_gradcam: ${files.length} Grad-CAM images of ${samples.length} test samples in ${dir}`);
      return { result: { kind: 'gradcam', dir, files } satisfies GradcamResult, counts: { images: files.length, candidates: samples.length } };
    } finally {
      model.dispose();
    }
  },
  async record({ ctx, run }, result) {
    for (const f of result.files) await recordArtifact(ctx.db, { runId: run.id, step: 'generate_gradcam', kind: 'gradcam', path: f.file });
  },
});
