/**
 * Tiny synthetic training data in the pipeline's processed layout, for tests and smoke runs of the training code:
 * noise images in which a tumour is a bright square (its mask the square), written as
 *   <dir>/brats/<patientId>/{images.npy, masks.npy, meta.json}
 *   <dir>/kaggle/{images.npy, labels.npy, meta.json}
 *   <dir>/splits/{brats.json, kaggle.json}
 */
import { join } from 'node:path';
import { writeFileAtomic, writeJsonAtomic } from '../lib/atomic.js';
import { deriveSeed, mulberry32 } from '../lib/random.js';
import { encodeNpy } from '../imaging/npy.js';

export interface SyntheticOptions {
  patients?: number;
  slicesPerPatient?: number;
  kaggleImages?: number;
  size?: number;
  /** Share of slices / images with a tumour (default 0.6). */
  tumourShare?: number;
  seed?: number;
}

export interface SyntheticLayout {
  bratsDir: string;
  kaggleDir: string;
  splitsDir: string;
  patients: string[];
  bratsSplit: { train: string[]; val: string[]; test: string[] };
  kaggleSplit: { train: number[]; val: number[]; test: number[] };
}

/** Draw one image (size x size) into `img` and its square into `mask` (when tumour). */
function drawSample(size: number, tumour: boolean, rng: () => number, img: Float32Array, mask: Uint8Array | null, offset: number): void {
  for (let k = 0; k < size * size; k++) img[offset + k] = (rng() - 0.5) * 0.6;
  if (!tumour) return;
  const side = 4 + Math.floor(rng() * Math.max(1, size / 4));
  const r0 = Math.floor(rng() * (size - side));
  const c0 = Math.floor(rng() * (size - side));
  for (let r = r0; r < r0 + side; r++) {
    for (let c = c0; c < c0 + side; c++) {
      img[offset + r * size + c] += 2;
      if (mask) mask[offset + r * size + c] = 1;
    }
  }
}

export async function writeSyntheticData(dir: string, opts: SyntheticOptions = {}): Promise<SyntheticLayout> {
  const nPatients = opts.patients ?? 5;
  const nSlices = opts.slicesPerPatient ?? 8;
  const nKaggle = opts.kaggleImages ?? 20;
  const size = opts.size ?? 32;
  const share = opts.tumourShare ?? 0.6;
  const seed = opts.seed ?? 1;
  const bratsDir = join(dir, 'brats');
  const kaggleDir = join(dir, 'kaggle');
  const splitsDir = join(dir, 'splits');
  const area = size * size;

  const patients: string[] = [];
  for (let p = 0; p < nPatients; p++) {
    const id = `SYN_${String(p + 1).padStart(3, '0')}`;
    patients.push(id);
    const rng = mulberry32(deriveSeed(seed, id));
    const images = new Float32Array(nSlices * area);
    const masks = new Uint8Array(nSlices * area);
    const slices = [];
    for (let s = 0; s < nSlices; s++) {
      const tumour = rng() < share;
      drawSample(size, tumour, rng, images, masks, s * area);
      let pixels = 0;
      for (let k = 0; k < area; k++) pixels += masks[s * area + k]!;
      slices.push({ slice_idx: s, has_tumor: pixels > 0, tumor_pixels: pixels });
    }
    await writeFileAtomic(join(bratsDir, id, 'images.npy'), encodeNpy(images, [nSlices, size, size]));
    await writeFileAtomic(join(bratsDir, id, 'masks.npy'), encodeNpy(masks, [nSlices, size, size]));
    await writeJsonAtomic(join(bratsDir, id, 'meta.json'), { patient_id: id, image_size: size, num_slices: nSlices, slices });
  }

  const rng = mulberry32(deriveSeed(seed, 'kaggle'));
  const kImages = new Float32Array(nKaggle * area);
  const labels = new Uint8Array(nKaggle);
  for (let i = 0; i < nKaggle; i++) {
    labels[i] = rng() < share ? 1 : 0;
    drawSample(size, labels[i] === 1, rng, kImages, null, i * area);
  }
  await writeFileAtomic(join(kaggleDir, 'images.npy'), encodeNpy(kImages, [nKaggle, size, size]));
  await writeFileAtomic(join(kaggleDir, 'labels.npy'), encodeNpy(labels, [nKaggle]));
  await writeJsonAtomic(join(kaggleDir, 'meta.json'), {
    image_size: size,
    items: Array.from(labels, (l, i) => ({ index: i, relPath: `${l ? 'yes' : 'no'}/img${i}.jpg`, label: l })),
    rejected: [],
  });

  const nVal = Math.max(1, Math.floor(nPatients * 0.2));
  const nTest = Math.max(1, Math.floor(nPatients * 0.2));
  const nTrain = Math.max(1, nPatients - nVal - nTest);
  const bratsSplit = { train: patients.slice(0, nTrain), val: patients.slice(nTrain, nTrain + nVal), test: patients.slice(nTrain + nVal) };
  const kIdx = Array.from({ length: nKaggle }, (_, i) => i);
  const kVal = Math.max(1, Math.floor(nKaggle * 0.2));
  const kTest = Math.max(1, Math.floor(nKaggle * 0.2));
  const kTrain = nKaggle - kVal - kTest;
  const kaggleSplit = { train: kIdx.slice(0, kTrain), val: kIdx.slice(kTrain, kTrain + kVal), test: kIdx.slice(kTrain + kVal) };
  await writeJsonAtomic(join(splitsDir, 'brats.json'), { ...bratsSplit, processed_dir: bratsDir });
  await writeJsonAtomic(join(splitsDir, 'kaggle.json'), { ...kaggleSplit, processed_dir: kaggleDir });
  return { bratsDir, kaggleDir, splitsDir, patients, bratsSplit, kaggleSplit };
}
