/**
 * Tiny synthetic training data in the pipeline's processed layout, for tests and smoke runs of the training code:
 * noise images in which a tumour is a bright square (its mask the square), written with layout's paths and
 * writers (src/disk/layout.ts) as
 *   <dir>/brats/<patientId>/{images.npy, masks.npy, meta.json}   (patientFiles)
 *   <dir>/kaggle/{images.npy, labels.npy, meta.json}             (kaggleFiles)
 *   <dir>/splits/{brats.json, kaggle.json}                       (splitFile)
 */
import { join } from 'node:path';
import {
  kaggleFiles,
  patientFiles,
  splitFile,
  writeBratsSplit,
  writeKaggleMeta,
  writeKaggleSplit,
  writePatientMeta,
  type PatientMeta,
} from '../disk/layout.ts';
import { writeFileAtomic } from '../lib/atomic.js';
import { deriveSeed, mulberry32 } from '../lib/random.js';
import { encodeNpy } from '../imaging/npy.js';

interface SyntheticOptions {
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

/** A complete meta.json for arrays written without preprocessing: `tumourPixels[s]` is slice s's mask pixel count. */
export function syntheticPatientMeta(patientId: string, imageSize: number, tumourPixels: readonly number[]): PatientMeta {
  return {
    patient_id: patientId,
    source_files: {},
    original_shape: [imageSize, imageSize, tumourPixels.length],
    pixdim: [1, 1, 1],
    modality: ['flair'],
    normalize_method: 'zscore',
    image_size: imageSize,
    num_slices: tumourPixels.length,
    orientation: { array_axes: ['k', 'i', 'j'], axis_codes: null },
    slices: tumourPixels.map((pixels, s) => ({ slice_idx: s, has_tumor: pixels > 0, tumor_pixels: pixels })),
  };
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
    const tumourPixels: number[] = [];
    for (let s = 0; s < nSlices; s++) {
      const tumour = rng() < share;
      drawSample(size, tumour, rng, images, masks, s * area);
      let pixels = 0;
      for (let k = 0; k < area; k++) pixels += masks[s * area + k]!;
      tumourPixels.push(pixels);
    }
    const files = patientFiles(bratsDir, id);
    await writeFileAtomic(files.images, encodeNpy(images, [nSlices, size, size]));
    await writeFileAtomic(files.masks, encodeNpy(masks, [nSlices, size, size]));
    await writePatientMeta(files, syntheticPatientMeta(id, size, tumourPixels));
  }

  const rng = mulberry32(deriveSeed(seed, 'kaggle'));
  const kImages = new Float32Array(nKaggle * area);
  const labels = new Uint8Array(nKaggle);
  for (let i = 0; i < nKaggle; i++) {
    labels[i] = rng() < share ? 1 : 0;
    drawSample(size, labels[i] === 1, rng, kImages, null, i * area);
  }
  const kFiles = kaggleFiles(kaggleDir);
  await writeFileAtomic(kFiles.images, encodeNpy(kImages, [nKaggle, size, size]));
  await writeFileAtomic(kFiles.labels, encodeNpy(labels, [nKaggle]));
  await writeKaggleMeta(kFiles, {
    image_size: size,
    items: Array.from(labels, (l, i) => ({ index: i, relPath: `${l ? 'yes' : 'no'}/img${i}.jpg`, label: l ? 1 : 0, brain_fraction: 1 })),
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
  await writeBratsSplit(splitFile(splitsDir, 'brats'), { seed, ...bratsSplit, processed_dir: bratsDir });
  await writeKaggleSplit(splitFile(splitsDir, 'kaggle'), { seed, ...kaggleSplit, processed_dir: kaggleDir });
  return { bratsDir, kaggleDir, splitsDir, patients, bratsSplit, kaggleSplit };
}
