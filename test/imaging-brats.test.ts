import { mkdir, mkdtemp, readFile, readdir, rm, writeFile, copyFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { execFile, spawnSync } from 'node:child_process';
import { promisify } from 'node:util';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { patientFiles, readPatientMeta, type PatientMeta } from '../src/disk/layout.ts';
import { patientRng, preprocessPatient, SliceInputError, volumeToSlices } from '../src/imaging/brats.js';
import { discoverPatients, parseLayout, type BratsLayout, type PatientFiles } from '../src/imaging/layout.js';
import { readNifti, readNiftiRaw, type RawNiftiVolume } from '../src/imaging/nifti.js';
import { readNpy } from '../src/imaging/npy.js';
import { PatientDataError, SliceWiseError } from '../src/lib/errors.js';
import { expectSliceWiseError, rejection, thrownBy } from './helpers/errors.js';
import { encodeNifti, writeNifti, type NiftiDatatype } from './helpers/nifti-writer.js';

const execFileAsync = promisify(execFile);
const here = path.dirname(fileURLToPath(import.meta.url));
const FIXTURES = process.env.SLICEWISE_FIXTURES ?? path.resolve(here, '../../shared/fixtures');
const BRATS = path.join(FIXTURES, 'brats2015-deepmedic');
const LAYOUT: BratsLayout = { flair: 'Flair_*.nii.gz', seg: 'OTMultiClass.nii.gz' };

let tmp: string;
beforeAll(async () => {
  tmp = await mkdtemp(path.join(tmpdir(), 'slicewise-brats-'));
});
afterAll(async () => {
  await rm(tmp, { recursive: true, force: true });
});

async function touch(file: string, content: string | Buffer = ''): Promise<void> {
  await mkdir(path.dirname(file), { recursive: true });
  await writeFile(file, content);
}

/** Expect a PatientDataError naming the patient and the file. */
async function expectPatientError(p: Promise<unknown>, patientId: string, fileName: string, reason: RegExp): Promise<PatientDataError> {
  const err = await rejection(p);
  expect(err).toBeInstanceOf(PatientDataError);
  const e = err as PatientDataError;
  expect(e.patientId).toBe(patientId);
  expect(e.message).toContain(patientId);
  expect(e.message).toContain(fileName);
  expect(path.basename(e.file)).toBe(fileName);
  expect(e.reason).toMatch(reason);
  expect(e.status).toBe(422);
  return e;
}

describe('parseLayout', () => {
  it('parses modality=pattern entries', () => {
    expect(parseLayout('flair=Flair_*.nii.gz,seg=OTMultiClass.nii.gz')).toEqual(LAYOUT);
    expect(parseLayout(' FLAIR = a?.nii , seg=b.nii.gz ')).toEqual({ flair: 'a?.nii', seg: 'b.nii.gz' });
  });

  it.each([
    ['flair=Flair_*.nii.gz', /no seg entry/],
    ['flair,seg=x.nii', /bad layout entry "flair"/],
    ['flair=,seg=x.nii', /bad layout entry "flair=": empty file pattern/],
    ['flair=a.nii,,seg=x.nii', /empty entry/],
    ['flair=a.nii,flair=b.nii,seg=x.nii', /bad layout entry "flair=b.nii": modality "flair" given twice/],
    ['flair=sub/a.nii,seg=x.nii', /bad layout entry "flair=sub\/a.nii".*path separator/],
    ['fl air=a.nii,seg=x.nii', /bad layout entry "fl air=a.nii"/],
    ['', /empty layout/],
  ])('rejects %j', (spec, message) => {
    expectSliceWiseError(thrownBy(() => parseLayout(spec)), { status: 400, code: 'bad_layout', message });
  });
});

describe('discoverPatients', () => {
  it('finds BraTS 2020 cases nested as on Kaggle, .nii and .nii.gz', async () => {
    const root = path.join(tmp, 'kaggle2020');
    const base = path.join(root, 'BraTS2020_TrainingData', 'MICCAI_BraTS2020_TrainingData');
    for (const id of ['BraTS20_Training_002', 'BraTS20_Training_001']) {
      for (const m of ['flair', 't1', 't1ce', 't2', 'seg']) await touch(path.join(base, id, `${id}_${m}.nii`));
    }
    await touch(path.join(base, 'name_mapping.csv'), 'x');
    await touch(path.join(base, 'BraTS20_Training_003', 'BraTS20_Training_003_flair.nii.gz'));
    await touch(path.join(base, 'BraTS20_Training_003', 'BraTS20_Training_003_seg.nii.gz'));
    const ps = await discoverPatients(root);
    expect(ps.map((p) => p.patientId)).toEqual(['BraTS20_Training_001', 'BraTS20_Training_002', 'BraTS20_Training_003']);
    expect(ps[0].dir).toBe(path.join(base, 'BraTS20_Training_001'));
    expect(Object.keys(ps[0].files).sort()).toEqual(['flair', 'seg', 't1', 't1ce', 't2']);
    expect(ps[0].files.t1ce).toBe(path.join(base, 'BraTS20_Training_001', 'BraTS20_Training_001_t1ce.nii'));
    expect(ps[0].expected?.seg).toBe('BraTS20_Training_001_seg.nii');
    expect(Object.keys(ps[2].files).sort()).toEqual(['flair', 'seg']);
    expect(ps[2].expected?.t1).toBe('BraTS20_Training_003_t1.nii.gz');
  });

  it('returns a patient whose seg is missing (the preprocessing step reports it)', async () => {
    const root = path.join(tmp, 'missing-seg-2020');
    const id = 'BraTS20_Training_355';
    for (const m of ['flair', 't1', 't1ce', 't2']) await touch(path.join(root, id, `${id}_${m}.nii`));
    await touch(path.join(root, id, 'W39_1998.09.19_Segm.nii'));
    const [p] = await discoverPatients(root);
    expect(p.patientId).toBe(id);
    expect(p.files.seg).toBeUndefined();
  });

  it('finds BraTS 2021 cases', async () => {
    const root = path.join(tmp, 'brats2021');
    for (const id of ['BraTS2021_00002', 'BraTS2021_00000']) {
      for (const m of ['flair', 't1', 't1ce', 't2', 'seg']) await touch(path.join(root, id, `${id}_${m}.nii.gz`));
    }
    const ps = await discoverPatients(root);
    expect(ps.map((p) => p.patientId)).toEqual(['BraTS2021_00000', 'BraTS2021_00002']);
    expect(ps[1].files.seg).toBe(path.join(root, 'BraTS2021_00002', 'BraTS2021_00002_seg.nii.gz'));
  });

  it('finds BraTS 2023 cases and maps t2f/t1n/t1c/t2w to flair/t1/t1ce/t2', async () => {
    const root = path.join(tmp, 'brats2023');
    const id = 'BraTS-GLI-00000-000';
    for (const m of ['t1n', 't1c', 't2w', 't2f', 'seg']) await touch(path.join(root, 'train', id, `${id}-${m}.nii.gz`));
    const [p] = await discoverPatients(root);
    expect(p.patientId).toBe(id);
    expect(p.files).toEqual({
      t1: path.join(root, 'train', id, `${id}-t1n.nii.gz`),
      t1ce: path.join(root, 'train', id, `${id}-t1c.nii.gz`),
      t2: path.join(root, 'train', id, `${id}-t2w.nii.gz`),
      flair: path.join(root, 'train', id, `${id}-t2f.nii.gz`),
      seg: path.join(root, 'train', id, `${id}-seg.nii.gz`),
    });
    expect(p.expected?.flair).toBe(`${id}-t2f.nii.gz`);
  });

  it('uses a layout: each directory with a matching file is a patient named after it', async () => {
    const ps = await discoverPatients(BRATS, LAYOUT);
    expect(ps.map((p) => p.patientId)).toEqual(['pat0001', 'pat0005']);
    expect(ps[0].files).toEqual({
      flair: path.join(BRATS, 'pat0001', 'Flair_subtrMeanDivStd.nii.gz'),
      seg: path.join(BRATS, 'pat0001', 'OTMultiClass.nii.gz'),
    });
    const withT1c = await discoverPatients(BRATS, { ...LAYOUT, t1ce: 'T1c_*.nii.gz' });
    expect(withT1c[1].files.t1ce).toBe(path.join(BRATS, 'pat0005', 'T1c_subtrMeanDivStd.nii.gz'));
  });

  it('reports no patients, naming the root and what was tried', async () => {
    const root = path.join(tmp, 'empty-dataset');
    await touch(path.join(root, 'readme.txt'), 'x');
    for (const layout of [undefined, LAYOUT]) {
      const err = expectSliceWiseError(await rejection(discoverPatients(root, layout)), { status: 422, code: 'no_patients', message: root });
      expect(err.message).toContain(layout ? 'flair=Flair_*.nii.gz,seg=OTMultiClass.nii.gz' : 'BraTS20_Training_001_flair.nii.gz');
    }
    const missing = (await rejection(discoverPatients(path.join(tmp, 'no-such-dir')))) as SliceWiseError;
    expect(missing.code).toBe('no_patients');
    expect(missing.message).toMatch(/does not exist/);
  });

  it('refuses ambiguous layouts and duplicate patient ids', async () => {
    const root = path.join(tmp, 'ambiguous');
    await touch(path.join(root, 'p1', 'Flair_a.nii.gz'));
    await touch(path.join(root, 'p1', 'Flair_b.nii.gz'));
    const amb = (await rejection(discoverPatients(root, LAYOUT))) as SliceWiseError;
    expect(amb.code).toBe('ambiguous_layout');
    expect(amb.message).toContain('Flair_a.nii.gz');
    expect(amb.message).toContain('Flair_b.nii.gz');

    const dup = path.join(tmp, 'duplicates');
    await touch(path.join(dup, 'train', 'p1', 'OTMultiClass.nii.gz'));
    await touch(path.join(dup, 'val', 'p1', 'OTMultiClass.nii.gz'));
    const err = (await rejection(discoverPatients(dup, LAYOUT))) as SliceWiseError;
    expect(err.code).toBe('duplicate_patient');
    expect(err.message).toContain(path.join(dup, 'train', 'p1'));
    expect(err.message).toContain(path.join(dup, 'val', 'p1'));
  });
});

describe('patientRng', () => {
  it('is deterministic per (seed, patient) and uniform-looking', () => {
    const a = patientRng(42, 'pat0001');
    const b = patientRng(42, 'pat0001');
    const xs = Array.from({ length: 10_000 }, () => a());
    expect(Array.from({ length: 10_000 }, () => b())).toEqual(xs);
    expect(xs.every((x) => x >= 0 && x < 1)).toBe(true);
    const mean = xs.reduce((s, x) => s + x, 0) / xs.length;
    expect(mean).toBeGreaterThan(0.48);
    expect(mean).toBeLessThan(0.52);
    expect(xs.filter((x) => x < 0.3).length / xs.length).toBeCloseTo(0.3, 1);
    const c = patientRng(42, 'pat0005');
    const d = patientRng(43, 'pat0001');
    expect(c()).not.toBe(xs[0]);
    expect(d()).not.toBe(xs[0]);
  });
});

/** Independent per-slice tumour counts from readNifti. */
async function tumourCounts(segFile: string): Promise<number[]> {
  const seg = await readNifti(segFile);
  const plane = seg.dims[0] * seg.dims[1];
  return Array.from({ length: seg.dims[2] }, (_, z) => {
    let c = 0;
    for (let i = z * plane; i < (z + 1) * plane; i++) if (seg.data[i] > 0) c++;
    return c;
  });
}

describe('preprocessPatient on the real fixtures', () => {
  let patients: PatientFiles[];
  beforeAll(async () => {
    patients = await discoverPatients(BRATS, LAYOUT);
  });

  it.each([
    ['pat0001', 69],
    ['pat0005', 70],
  ])('%s: keeps every slice with >= 100 tumour pixels, writes consistent arrays, deterministic', async (id, atLeast100) => {
    const patient = patients.find((p) => p.patientId === id)!;
    const out = path.join(tmp, 'out-fixtures');
    const meta = await preprocessPatient(patient, out);
    const counts = await tumourCounts(patient.files.seg);

    expect(meta.patient_id).toBe(id);
    expect(meta.original_shape).toEqual([240, 240, 155]);
    expect(meta.pixdim).toEqual([1, 1, 1]);
    expect(meta.modality).toEqual(['flair']);
    expect(meta.normalize_method).toBe('zscore');
    expect(meta.image_size).toBe(256);
    expect(meta.source_files).toEqual({ flair: patient.files.flair, seg: patient.files.seg });
    expect(meta.orientation).toEqual({ array_axes: ['k', 'i', 'j'], axis_codes: 'LPS' });
    expect(meta.num_slices).toBe(meta.slices.length);

    // Slices with >= 100 tumour pixels: all kept, and there are as many as nibabel counts.
    expect(meta.slices.filter((s) => s.tumor_pixels >= 100).length).toBe(atLeast100);
    const big = counts.flatMap((c, z) => (c >= 100 ? [z] : []));
    expect(meta.slices.filter((s) => s.tumor_pixels >= 100).map((s) => s.slice_idx)).toEqual(big);
    // Every kept slice's counts match the independent count on the original slice.
    for (const s of meta.slices) {
      expect(s.tumor_pixels).toBe(counts[s.slice_idx]);
      expect(s.has_tumor).toBe(counts[s.slice_idx] > 0);
    }
    // Slices in increasing order, and roughly 30 % of the others kept.
    const idx = meta.slices.map((s) => s.slice_idx);
    expect([...idx].sort((a, b) => a - b)).toEqual(idx);
    const others = counts.length - big.length;
    const keptOthers = meta.slices.length - big.length;
    expect(keptOthers).toBeGreaterThan(others * 0.15);
    expect(keptOthers).toBeLessThan(others * 0.45);

    const dir = path.join(out, id);
    const images = await readNpy(path.join(dir, 'images.npy'));
    const masks = await readNpy(path.join(dir, 'masks.npy'));
    expect(images.dtype).toBe('<f4');
    expect(images.shape).toEqual([meta.num_slices, 256, 256]);
    expect(masks.dtype).toBe('|u1');
    expect(masks.shape).toEqual([meta.num_slices, 256, 256]);
    expect(images.data.every(Number.isFinite)).toBe(true);
    const area = 256 * 256;
    let notBinary = 0;
    const problems: string[] = [];
    for (let s = 0; s < meta.num_slices; s++) {
      let ones = 0;
      for (let i = s * area; i < (s + 1) * area; i++) {
        const m = masks.data[i];
        if (m !== 0 && m !== 1) notBinary++;
        ones += m;
      }
      const info = meta.slices[s];
      // Nearest-neighbour upscaling keeps every source pixel: tumour slices have mask pixels, others none.
      if (ones > 0 !== info.has_tumor) problems.push(`slice ${info.slice_idx}: ${ones} mask pixels, has_tumor ${info.has_tumor}`);
      // Upscaling 240 -> 256 copies each source pixel into 1, 2 or 4 output pixels (about (256/240)^2 on average).
      const tolerance = info.tumor_pixels >= 100 ? 1.3 : 4;
      if (info.has_tumor && (ones < info.tumor_pixels || ones > info.tumor_pixels * tolerance)) {
        problems.push(`slice ${info.slice_idx}: ${ones} mask pixels for ${info.tumor_pixels} tumour pixels`);
      }
    }
    expect(notBinary).toBe(0);
    expect(problems).toEqual([]);
    const onDisk = JSON.parse(await readFile(path.join(dir, 'meta.json'), 'utf8')) as PatientMeta;
    expect(onDisk).toEqual(meta);
    // The layout's validating reader accepts it (orientation included).
    expect(await readPatientMeta(patientFiles(out, id))).toEqual(meta);

    // A re-run gives byte-identical files.
    const before = await Promise.all(['images.npy', 'masks.npy', 'meta.json'].map((f) => readFile(path.join(dir, f))));
    const again = await preprocessPatient(patient, out);
    expect(again).toEqual(meta);
    const after = await Promise.all(['images.npy', 'masks.npy', 'meta.json'].map((f) => readFile(path.join(dir, f))));
    for (let i = 0; i < 3; i++) expect(after[i].equals(before[i])).toBe(true);
  });

  it('stacks several modalities as channels (N x C x H x W)', async () => {
    const [patient] = await discoverPatients(path.join(BRATS, 'pat0001'), { ...LAYOUT, t1ce: 'T1c_*.nii.gz' });
    const out = path.join(tmp, 'out-multi');
    const meta = await preprocessPatient(patient, out, { modalities: ['flair', 't1ce'], imageSize: 128 });
    expect(meta.modality).toEqual(['flair', 't1ce']);
    const images = await readNpy(path.join(out, 'pat0001', 'images.npy'));
    expect(images.shape).toEqual([meta.num_slices, 2, 128, 128]);
    const masks = await readNpy(path.join(out, 'pat0001', 'masks.npy'));
    expect(masks.shape).toEqual([meta.num_slices, 128, 128]);
    // Channel 0 is the FLAIR channel of a FLAIR-only run with the same options.
    const flairOnly = await preprocessPatient(patient, path.join(tmp, 'out-multi-flair'), { imageSize: 128 });
    expect(flairOnly.slices).toEqual(meta.slices);
    const single = await readNpy(path.join(tmp, 'out-multi-flair', 'pat0001', 'images.npy'));
    const area = 128 * 128;
    expect(Array.from(images.data.subarray(0, area))).toEqual(Array.from(single.data.subarray(0, area)));
    expect(Array.from(images.data.subarray(2 * area, 3 * area))).toEqual(Array.from(single.data.subarray(area, 2 * area)));
  });
});

/** Mean and population standard deviation, as the z-score uses them. */
function zStats(values: ArrayLike<number>): { mean: number; std: number } {
  let sum = 0;
  for (let i = 0; i < values.length; i++) sum += values[i];
  const mean = sum / values.length;
  let sq = 0;
  for (let i = 0; i < values.length; i++) sq += (values[i] - mean) ** 2;
  return { mean, std: Math.sqrt(sq / values.length) };
}

describe('preprocessPatient on synthetic volumes', () => {
  /** Write a BraTS-2020-named patient with the given FLAIR and seg arrays. */
  async function synthPatient(root: string, id: string, dims: number[], flair: ArrayLike<number>, seg: ArrayLike<number>): Promise<PatientFiles> {
    const dir = path.join(root, id);
    await mkdir(dir, { recursive: true });
    await writeNifti(path.join(dir, `${id}_flair.nii.gz`), { dims, datatype: 'int16', data: flair, gzip: true });
    await writeNifti(path.join(dir, `${id}_seg.nii.gz`), { dims, datatype: 'uint8', data: seg, gzip: true });
    const [p] = await discoverPatients(root);
    return p;
  }

  it('z-scores over the whole volume and puts voxel (i, j, k) at row i, column j of slice k when no resize is needed', async () => {
    const [nx, ny, nz] = [8, 8, 3];
    const flair = new Int16Array(nx * ny * nz);
    const seg = new Uint8Array(nx * ny * nz);
    // Background zeros, a block of tissue, one bright voxel at (i=1, j=5, k=1), tumour label at (i=6, j=2, k=2).
    for (let k = 0; k < nz; k++) for (let j = 1; j < 7; j++) for (let i = 1; i < 7; i++) flair[i + nx * (j + ny * k)] = 100 + i + 2 * j + 3 * k;
    flair[1 + nx * (5 + ny * 1)] = 1000;
    seg[6 + nx * (2 + ny * 2)] = 4;
    const p = await synthPatient(path.join(tmp, 'synth-identity'), 'BraTS20_Training_010', [nx, ny, nz], flair, seg);
    const out = path.join(tmp, 'out-identity');
    const meta = await preprocessPatient(p, out, { imageSize: 8, keepProbability: 1 });
    expect(meta.slices.map((s) => s.slice_idx)).toEqual([0, 1, 2]);
    expect(meta.slices.map((s) => s.tumor_pixels)).toEqual([0, 0, 1]);
    expect(meta.slices.map((s) => s.has_tumor)).toEqual([false, false, true]);
    const images = await readNpy(path.join(out, p.patientId, 'images.npy'));
    const masks = await readNpy(path.join(out, p.patientId, 'masks.npy'));
    // Same size: the output is exactly the z-scored volume, in nibabel's order.
    const { mean, std } = zStats(flair);
    for (let k = 0; k < nz; k++) {
      for (let i = 0; i < nx; i++) for (let j = 0; j < ny; j++) expect(images.data[k * 64 + i * 8 + j]).toBeCloseTo((flair[i + nx * (j + ny * k)] - mean) / std, 5);
    }
    const out01 = zStats(images.data);
    expect(out01.mean).toBeCloseTo(0, 5);
    expect(out01.std).toBeCloseTo(1, 5);
    // Slice 1, row 1, column 5 is the bright voxel; slice 2, row 6, column 2 the tumour.
    const slice1 = images.data.subarray(64, 128);
    expect(slice1.indexOf(Math.max(...slice1))).toBe(1 * 8 + 5);
    expect(Array.from(masks.data.subarray(128, 192)).indexOf(1)).toBe(6 * 8 + 2);
    expect(Array.from(masks.data).reduce((a, b) => a + b, 0)).toBe(1);
  });

  /** (row, column) of the pixels of slice s of an N x S x S array for which `lit` holds, sorted. */
  function litPixels(data: ArrayLike<number>, size: number, s: number, lit: (v: number) => boolean): [number, number][] {
    const out: [number, number][] = [];
    for (let r = 0; r < size; r++) for (let c = 0; c < size; c++) if (lit(data[s * size * size + r * size + c])) out.push([r, c]);
    return out;
  }

  /** A patient whose slice k holds `marker` (voxels (i, j)): FLAIR `value` on `background`, seg label 1. */
  async function markerPatient(id: string, dims: number[], k: number, marker: [number, number][], background: number, value: number): Promise<PatientFiles> {
    const [nx, ny, nz] = dims;
    const flair = new Int16Array(nx * ny * nz).fill(background);
    const seg = new Uint8Array(nx * ny * nz);
    for (const [i, j] of marker) {
      flair[i + nx * (j + ny * k)] = value;
      seg[i + nx * (j + ny * k)] = 1;
    }
    return synthPatient(path.join(tmp, `synth-${id}`), id, dims, flair, seg);
  }

  it('an L-shaped marker near small i, large j lands at rows i, columns j (images[s][i][j]), not mirrored', async () => {
    // An L on slice k = 2: a bar along j at i = 1 (j = 7..9) and a foot along i at j = 9 (i = 2..3).
    const marker: [number, number][] = [[1, 7], [1, 8], [1, 9], [2, 9], [3, 9]];
    const p = await markerPatient('BraTS20_Training_014', [12, 12, 4], 2, marker, 0, 500);
    const out = path.join(tmp, 'out-marker');
    const meta = await preprocessPatient(p, out, { imageSize: 12, keepProbability: 1 });
    expect(meta.slices.map((s) => s.slice_idx)).toEqual([0, 1, 2, 3]);
    const images = await readNpy(path.join(out, p.patientId, 'images.npy'));
    const masks = await readNpy(path.join(out, p.patientId, 'masks.npy'));
    expect(litPixels(images.data, 12, 2, (v) => v > 0)).toEqual(marker);
    expect(litPixels(masks.data, 12, 2, (v) => v === 1)).toEqual(marker);
    for (const s of [0, 1, 3]) expect(litPixels(masks.data, 12, s, (v) => v !== 0)).toEqual([]);
  });

  it('keeps the orientation through a resize of a non-square volume', async () => {
    // i: 10 -> 20 (each source row twice), j: 5 -> 20 (each source column four times), nearest for the mask.
    const marker: [number, number][] = [[1, 3], [1, 4], [2, 4]];
    const p = await markerPatient('BraTS20_Training_015', [10, 5, 2], 1, marker, 10, 900);
    const out = path.join(tmp, 'out-marker-resize');
    await preprocessPatient(p, out, { imageSize: 20, keepProbability: 1 });
    const masks = await readNpy(path.join(out, p.patientId, 'masks.npy'));
    const expected = marker.flatMap(([i, j]) => [0, 1].flatMap((di) => [0, 1, 2, 3].map((dj): [number, number] => [2 * i + di, 4 * j + dj])));
    expect(litPixels(masks.data, 20, 1, (v) => v === 1)).toEqual(expected.sort((a, b) => a[0] - b[0] || a[1] - b[1]));
    const images = await readNpy(path.join(out, p.patientId, 'images.npy'));
    const slice = images.data.subarray(400, 800);
    const brightest = slice.indexOf(Math.max(...slice));
    const [r, c] = [Math.floor(brightest / 20), brightest % 20];
    expect(marker).toContainEqual([Math.floor(r / 2), Math.floor(c / 4)]);
  });

  it('resizes bilinearly when upscaling and averages when downscaling', async () => {
    const [nx, ny, nz] = [16, 16, 2];
    const flair = new Int16Array(nx * ny * nz);
    for (let k = 0; k < nz; k++) for (let j = 0; j < ny; j++) for (let i = 0; i < nx; i++) flair[i + nx * (j + ny * k)] = 10 * i + (k + 1);
    const seg = new Uint8Array(nx * ny * nz);
    const p = await synthPatient(path.join(tmp, 'synth-ramp'), 'BraTS20_Training_011', [nx, ny, nz], flair, seg);
    const { mean, std } = zStats(flair);
    const raw = (v: number): number => v * std + mean;

    // Upscale 16 -> 32: the ramp runs along i, i.e. down the rows; interior rows follow it at source coordinate
    // (r + 0.5) / 2 - 0.5.
    const up = path.join(tmp, 'out-up');
    await preprocessPatient(p, up, { imageSize: 32, keepProbability: 1 });
    const big = await readNpy(path.join(up, p.patientId, 'images.npy'));
    for (let r = 1; r < 31; r++) {
      const i = (r + 0.5) / 2 - 0.5;
      expect(raw(big.data[r * 32 + 10])).toBeCloseTo(10 * i + 1, 3);
    }
    // Mirror at the border: row 0 reads i = -0.25, i.e. 0.75 * i0 + 0.25 * i1.
    expect(raw(big.data[10])).toBeCloseTo(0.25 * 10 + 1, 3);

    // Downscale 16 -> 4: each output averages its 4-pixel block with a triangle (linear data keeps its centre value).
    const down = path.join(tmp, 'out-down');
    await preprocessPatient(p, down, { imageSize: 4, keepProbability: 1 });
    const small = await readNpy(path.join(down, p.patientId, 'images.npy'));
    for (const r of [1, 2]) expect(raw(small.data[r * 4 + 1])).toBeCloseTo(10 * (4 * r + 1.5) + 1, 3);
    expect(small.data.every(Number.isFinite)).toBe(true);
  });

  it('matches a direct 2-D evaluation of the filter, zero background skipping included', async () => {
    // A "brain" of noise in the middle of zeros, with a few isolated voxels near the borders.
    const [nx, ny, nz] = [20, 18, 2];
    const flair = new Int16Array(nx * ny * nz);
    let state = 12345;
    const rand = (): number => (state = (state * 1103515245 + 12345) % 2147483648) / 2147483648;
    for (let z = 0; z < nz; z++) for (let y = 5; y < 14; y++) for (let x = 6; x < 15; x++) flair[x + nx * (y + ny * z)] = 100 + Math.floor(rand() * 400);
    flair[0] = 700;
    flair[nx - 1 + nx * (ny - 1)] = 300;
    flair[3 + nx * (17 + ny)] = 50;
    const seg = new Uint8Array(nx * ny * nz);
    const p = await synthPatient(path.join(tmp, 'synth-direct'), 'BraTS20_Training_013', [nx, ny, nz], flair, seg);
    const { mean, std } = zStats(flair);

    /** Triangle-filter weights of one axis as a dense matrix [out][in], mirror borders. */
    const weights = (inSize: number, outSize: number): number[][] => {
      const scale = inSize / outSize;
      const support = Math.max(1, scale);
      return Array.from({ length: outSize }, (_, o) => {
        const row = new Array<number>(inSize).fill(0);
        const c = (o + 0.5) * scale - 0.5;
        for (let i = Math.floor(c - support) - 1; i <= Math.ceil(c + support) + 1; i++) {
          const w = Math.max(0, 1 - Math.abs(i - c) / support);
          let j = i;
          while (j < 0 || j >= inSize) j = j < 0 ? -j : 2 * (inSize - 1) - j;
          row[j] += w;
        }
        const total = row.reduce((a, b) => a + b, 0);
        return row.map((w) => w / total);
      });
    };
    for (const size of [32, 8, 13]) {
      const out = path.join(tmp, `out-direct-${size}`);
      await preprocessPatient(p, out, { imageSize: size, keepProbability: 1 });
      const images = await readNpy(path.join(out, p.patientId, 'images.npy'));
      const wx = weights(nx, size);
      const wy = weights(ny, size);
      let worst = 0;
      for (let z = 0; z < nz; z++) {
        for (let oy = 0; oy < size; oy++) {
          for (let ox = 0; ox < size; ox++) {
            let v = 0;
            for (let y = 0; y < ny; y++) {
              if (wy[oy][y] === 0) continue;
              for (let x = 0; x < nx; x++) v += wy[oy][y] * wx[ox][x] * ((flair[x + nx * (y + ny * z)] - mean) / std);
            }
            // Row ox (the volume's i axis), column oy (its j axis).
            worst = Math.max(worst, Math.abs(images.data[z * size * size + ox * size + oy] - v));
          }
        }
      }
      expect({ size, worst: worst < 1e-5 }).toEqual({ size, worst: true });
    }
  });

  it('counts tumour pixels exactly whatever the label datatype, row length and scaling', async () => {
    type Case = { name: string; nx: number; datatype: NiftiDatatype; labels: (z: number, i: number) => number; slope?: number; inter?: number };
    const cases: Case[] = [
      // 128 as the last byte of an 8-byte group: must count (unsigned labels are read as 32-bit words).
      { name: 'u8', nx: 8, datatype: 'uint8', labels: (z, i) => (i % 8 === 7 ? 128 : i % 5 === z ? 1 : 0) },
      { name: 'u8odd', nx: 5, datatype: 'uint8', labels: (z, i) => (i % 3 === z ? 4 : 0) },
      // -32768 at the top of an 8-byte group: not tumour (signed labels are read as 64-bit floats).
      { name: 'i16', nx: 8, datatype: 'int16', labels: (z, i) => (i % 4 === 3 ? -32768 : i % 7 === z ? 2 : 0) },
      { name: 'u16', nx: 8, datatype: 'uint16', labels: (z, i) => (i % 4 === 3 ? 32768 : 0) },
      { name: 'f32', nx: 8, datatype: 'float32', labels: (z, i) => (i % 2 === 1 ? -0 : i % 6 === z ? 0.5 : 0) },
      { name: 'f64', nx: 8, datatype: 'float64', labels: (z, i) => (i % 9 === z ? 3 : -1) },
      { name: 'scaled', nx: 8, datatype: 'uint8', labels: (z, i) => (i % 4 === z ? 1 : 0), slope: 2, inter: -1 },
    ];
    for (const c of cases) {
      const [nx, ny, nz] = [c.nx, 4, 3];
      const plane = nx * ny;
      const labels = Array.from({ length: plane * nz }, (_, j) => c.labels(Math.floor(j / plane), j % plane));
      const expected = Array.from({ length: nz }, (_, z) =>
        labels.slice(z * plane, (z + 1) * plane).filter((l) => l * (c.slope ?? 1) + (c.inter ?? 0) > 0).length,
      );
      const id = `count-${c.name}`;
      const dir = path.join(tmp, 'synth-count', id);
      await mkdir(dir, { recursive: true });
      const flair = Array.from({ length: plane * nz }, (_, j) => j % 11);
      await writeNifti(path.join(dir, 'Flair_a.nii'), { dims: [nx, ny, nz], datatype: 'int16', data: flair });
      await writeNifti(path.join(dir, 'OTMultiClass.nii.gz'), {
        dims: [nx, ny, nz],
        datatype: c.datatype,
        data: labels,
        gzip: true,
        sclSlope: c.slope,
        sclInter: c.inter,
      });
      const p: PatientFiles = { patientId: id, dir, files: { flair: path.join(dir, 'Flair_a.nii'), seg: path.join(dir, 'OTMultiClass.nii.gz') } };
      const meta = await preprocessPatient(p, path.join(tmp, 'out-count'), { keepProbability: 1, imageSize: 8 });
      expect({ name: c.name, counts: meta.slices.map((s) => s.tumor_pixels) }).toEqual({ name: c.name, counts: expected });
    }
  });

  it('keepProbability 0 keeps only slices with enough tumour; 1 keeps all', async () => {
    const [nx, ny, nz] = [12, 12, 10];
    const flair = Int16Array.from({ length: nx * ny * nz }, (_, i) => (i * 7919) % 500);
    const seg = new Uint8Array(nx * ny * nz);
    for (const [z, pixels] of [[2, 5], [4, 20], [7, 1]] as const) for (let i = 0; i < pixels; i++) seg[z * nx * ny + i] = 2;
    const p = await synthPatient(path.join(tmp, 'synth-keep'), 'BraTS20_Training_012', [nx, ny, nz], flair, seg);
    const none = await preprocessPatient(p, path.join(tmp, 'out-keep0'), { keepProbability: 0, minTumorPixels: 5, imageSize: 16 });
    expect(none.slices.map((s) => s.slice_idx)).toEqual([2, 4]);
    const all = await preprocessPatient(p, path.join(tmp, 'out-keep1'), { keepProbability: 1, imageSize: 16 });
    expect(all.slices.map((s) => s.slice_idx)).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
    expect(all.slices.filter((s) => s.has_tumor).map((s) => s.tumor_pixels)).toEqual([5, 20, 1]);
    const seeded = await preprocessPatient(p, path.join(tmp, 'out-keep-seed'), { keepProbability: 0.5, seed: 7, imageSize: 16 });
    const rng = patientRng(7, p.patientId);
    const expected = Array.from({ length: nz }, (_, z) => ({ z, r: rng() })).filter(({ z, r }) => [4].includes(z) || r < 0.5).map(({ z }) => z);
    expect(seeded.slices.map((s) => s.slice_idx)).toEqual(expected);
  });
});

/** The bytes of a typed array, for byte-for-byte comparisons. */
const bytesOf = (a: Float32Array | Uint8Array): Buffer => Buffer.from(a.buffer, a.byteOffset, a.byteLength);

describe('volumeToSlices: the pure path training and inference share', () => {
  let flair: RawNiftiVolume;
  let seg: RawNiftiVolume;
  beforeAll(async () => {
    flair = await readNiftiRaw(path.join(BRATS, 'pat0001', 'Flair_subtrMeanDivStd.nii.gz'));
    seg = await readNiftiRaw(path.join(BRATS, 'pat0001', 'OTMultiClass.nii.gz'));
  });

  it('gives what preprocessPatient writes, byte for byte', async () => {
    const [patient] = await discoverPatients(path.join(BRATS, 'pat0001'), LAYOUT);
    const out = path.join(tmp, 'out-pure');
    const meta = await preprocessPatient(patient, out, { imageSize: 64 });
    const r = volumeToSlices(flair, seg, { imageSize: 64, sampleKey: 'pat0001' });
    expect(r.slices).toEqual(meta.slices);
    expect(r.imageShape).toEqual([meta.num_slices, 64, 64]);
    expect(r.originalShape).toEqual(meta.original_shape);
    expect(r.orientation).toEqual(meta.orientation);
    const images = await readNpy(path.join(out, 'pat0001', 'images.npy'));
    const masks = await readNpy(path.join(out, 'pat0001', 'masks.npy'));
    expect(bytesOf(r.images).equals(bytesOf(images.data))).toBe(true);
    expect(bytesOf(r.masks).equals(bytesOf(masks.data))).toBe(true);
  });

  it('without a segmentation keeps every slice, with the pixels the labelled path gives', () => {
    const unlabelled = volumeToSlices(flair, null, { imageSize: 64 });
    expect(unlabelled.masks).toBeNull();
    expect(unlabelled.slices).toEqual(Array.from({ length: 155 }, (_, k) => ({ slice_idx: k })));
    expect(unlabelled.imageShape).toEqual([155, 64, 64]);
    const all = volumeToSlices([flair], seg, { imageSize: 64, keep: 'all' });
    expect(all.slices.map((s) => s.slice_idx)).toEqual(unlabelled.slices.map((s) => s.slice_idx));
    expect(all.slices.filter((s) => s.has_tumor)).toHaveLength(74);
    expect(all.masks).toHaveLength(155 * 64 * 64);
    expect(bytesOf(all.images).equals(bytesOf(unlabelled.images))).toBe(true);
  });

  it('refuses bad options and volumes unfit for slicing', () => {
    const refuse = (fn: () => unknown, status: number, code: string, message: RegExp) => expectSliceWiseError(thrownBy(fn), { status, code, message });
    refuse(() => volumeToSlices(flair, null, { keep: 'sampled' }), 400, 'bad_options', /needs a segmentation/);
    refuse(() => volumeToSlices(flair, seg), 400, 'bad_options', /needs a sampleKey/);
    refuse(() => volumeToSlices([], null), 400, 'bad_options', /no volumes/);
    const flat: RawNiftiVolume = { ...flair, raw: new Float32Array(flair.raw.length).fill(3) };
    const e = refuse(() => volumeToSlices([flair, flat], null, { imageSize: 8 }), 422, 'bad_volume', /^volume 1: constant volume/);
    expect(e).toBeInstanceOf(SliceInputError);
    expect((e as SliceInputError).input).toBe(1);
    const short: RawNiftiVolume = { ...flair, dims: [240, 240, 100], raw: flair.raw.subarray(0, 240 * 240 * 100) };
    refuse(() => volumeToSlices(short, seg, { sampleKey: 'x' }), 422, 'bad_volume', /image shape 240x240x100 does not match/);
  });

  it('checks the z-scored output itself: a scaling past float32 never comes out as Inf or NaN', () => {
    // Built by hand, past the reader's own check: the slicing must not trust its callers for this.
    const raw = Int16Array.from({ length: 8 * 8 * 3 }, (_, i) => i % 13);
    const overflow: RawNiftiVolume = { dims: [8, 8, 3], pixdim: [1, 1, 1], datatype: 'int16', axisCodes: null, raw, slope: 3e38, inter: 0 };
    const e = expectSliceWiseError(thrownBy(() => volumeToSlices(overflow, null, { imageSize: 8 })), {
      status: 422,
      code: 'bad_volume',
      message: /^volume 0: z-scored slice 0 has a non-finite value \((NaN|-?Infinity)\): the voxel values or their scaling overflow float32$/,
    });
    expect(e).toBeInstanceOf(SliceInputError);
    // The same values at a slope that fits give finite z-scores.
    const fine = volumeToSlices({ ...overflow, slope: 1e30 }, null, { imageSize: 8 });
    expect(fine.images.every(Number.isFinite)).toBe(true);
  });

  it('reduces a very long axis in time linear in its length (found by the fuzz pass: the filter taps were quadratic)', () => {
    // 200000 samples to 8: 50000 taps per output. Looking each tap up by a linear search took ~10^10 steps.
    const nx = 200_000;
    const raw = Uint8Array.from({ length: nx }, (_, i) => (i * 7) % 251);
    const long: RawNiftiVolume = { dims: [nx, 1, 1], pixdim: [1, 1, 1], datatype: 'uint8', axisCodes: null, raw, slope: 1, inter: 0 };
    const t0 = performance.now();
    const out = volumeToSlices(long, null, { imageSize: 8 });
    expect(performance.now() - t0).toBeLessThan(5000);
    // Each row of the slice averages its 25000 samples: all close to the mean, so z-scores near 0, and finite.
    expect(out.images.every((v) => Number.isFinite(v) && Math.abs(v) < 0.1)).toBe(true);
  });

  it('refuses an output far larger than its input before allocating it (1 x 1 x 30000 voxels as 256 x 256 slices)', () => {
    const raw = Uint8Array.from({ length: 30000 }, (_, i) => i % 7);
    const thin: RawNiftiVolume = { dims: [1, 1, 30000], pixdim: [1, 1, 1], datatype: 'uint8', axisCodes: null, raw, slope: 1, inter: 0 };
    const t0 = performance.now();
    expectSliceWiseError(thrownBy(() => volumeToSlices(thin, null, { imageSize: 256 })), {
      status: 422,
      code: 'bad_volume',
      message: 'volume 0: 30000 slices of 256 x 256 make 7.3 GiB of float32 images, more than the 1.0 GiB',
    });
    expect(performance.now() - t0).toBeLessThan(2000);
    // At a size that fits, the same volume slices.
    expect(volumeToSlices(thin, null, { imageSize: 4 }).imageShape).toEqual([30000, 4, 4]);
  });
});

const PYTHON = '/usr/bin/python3';
/** Why the nibabel comparison cannot run here, or null when it can. */
function nibabelMissing(): string | null {
  if (!existsSync(PYTHON)) return `${PYTHON} not found`;
  const r = spawnSync(PYTHON, ['-c', 'import nibabel, numpy'], { encoding: 'utf8', timeout: 60_000 });
  if (r.status === 0) return null;
  return `${PYTHON} cannot import nibabel and numpy (apt-get install python3-nibabel python3-numpy): ${(r.stderr || r.error?.message || '').trim().split('\n').at(-1)}`;
}
const noNibabel = nibabelMissing();
if (noNibabel) console.warn(`imaging-brats: skipping the nibabel comparison: ${noNibabel}`);

/** Compares our arrays with nibabel's reading of the same files; prints one JSON line. */
const NIBABEL_CHECK = `
import json, sys
import numpy as np, nibabel as nib
flair_file, seg_file, out = sys.argv[1:4]
flair_img = nib.load(flair_file)
flair = flair_img.get_fdata(dtype=np.float64)
seg = nib.load(seg_file).get_fdata()
meta = json.load(open(out + '/meta.json'))
images, masks = np.load(out + '/images.npy'), np.load(out + '/masks.npy')
z = (flair - flair.mean()) / flair.std()
ks = [s['slice_idx'] for s in meta['slices']]
print(json.dumps({
    'shape': list(masks.shape),
    'mask_mismatches': [k for n, k in enumerate(ks) if not np.array_equal(masks[n], (seg[:, :, k] > 0).astype(np.uint8))],
    'image_max_abs_diff': max(float(np.abs(images[n] - z[:, :, k]).max()) for n, k in enumerate(ks)),
    'asymmetric_masks': sum(1 for n in range(len(ks)) if not np.array_equal(masks[n], masks[n].T)),
    'axcodes': ''.join(nib.aff2axcodes(flair_img.affine)),
}))
`;

describe.skipIf(noNibabel !== null)(`agreement with nibabel${noNibabel ? ` (skipped: ${noNibabel})` : ''}`, () => {
  it('pat0001 at its native 240 x 240: masks.npy[s] == seg[:, :, k] > 0 and images.npy[s] == z-scored flair[:, :, k]', async () => {
    const [patient] = await discoverPatients(path.join(BRATS, 'pat0001'), LAYOUT);
    const out = path.join(tmp, 'out-nibabel');
    const meta = await preprocessPatient(patient, out, { imageSize: 240 });
    const { stdout } = await execFileAsync(PYTHON, ['-c', NIBABEL_CHECK, patient.files.flair, patient.files.seg, path.join(out, 'pat0001')], {
      timeout: 120_000,
      maxBuffer: 1 << 20,
    });
    const res = JSON.parse(stdout) as { shape: number[]; mask_mismatches: number[]; image_max_abs_diff: number; asymmetric_masks: number; axcodes: string };
    expect(res.shape).toEqual([meta.num_slices, 240, 240]);
    expect(res.mask_mismatches).toEqual([]);
    expect(res.image_max_abs_diff).toBeLessThan(1e-4);
    // The check has teeth: these masks differ from their transposes, so the old (transposed) order would fail it.
    expect(res.asymmetric_masks).toBeGreaterThan(50);
    expect(meta.orientation.axis_codes).toBe(res.axcodes);
  }, 120_000);
});

describe('z-score of 16-bit volumes', () => {
  // Below 65,536 voxels the statistics are summed directly, above it through a histogram: both must give the
  // z-score computed here in float64, with the file's scaling applied.
  for (const [datatype, dims] of [
    ['int16', [24, 24, 8]],
    ['int16', [48, 48, 32]],
    ['uint16', [24, 24, 8]],
    ['uint16', [48, 48, 32]],
  ] as const) {
    it(`${datatype} ${dims.join(' x ')} (${dims[0] * dims[1] * dims[2]} voxels)`, async () => {
      const [nx, ny, nz] = dims;
      const n = nx * ny * nz;
      const signed = datatype === 'int16';
      const data = signed ? Int16Array.from({ length: n }, (_, i) => ((i * 7919) % 60001) - 30000) : Uint16Array.from({ length: n }, (_, i) => (i * 104729) % 65521);
      const [slope, inter] = [0.5, -3];
      const file = path.join(tmp, `zscore-${datatype}-${n}.nii`);
      await writeNifti(file, { dims: [nx, ny, nz], datatype, data, sclSlope: slope, sclInter: inter });
      const vol = await readNiftiRaw(file);
      const values = Array.from(data, (v) => v * slope + inter);
      const mean = values.reduce((a, v) => a + v, 0) / n;
      const std = Math.sqrt(values.reduce((a, v) => a + (v - mean) ** 2, 0) / n);
      const r = volumeToSlices(vol, null, { imageSize: nx, keep: 'all' });
      expect(r.images.length).toBe(nz * nx * ny);
      // Sorted per slice: the orientation of a slice is not this test's question.
      for (let z = 0; z < nz; z++) {
        const got = Array.from(r.images.subarray(z * nx * ny, (z + 1) * nx * ny)).sort((a, b) => a - b);
        const want = values.slice(z * nx * ny, (z + 1) * nx * ny).map((v) => (v - mean) / std).sort((a, b) => a - b);
        let worst = 0;
        for (let i = 0; i < want.length; i++) worst = Math.max(worst, Math.abs(got[i]! - want[i]!));
        expect(worst).toBeLessThan(1e-5);
      }
    });
  }
});

describe('preprocessPatient errors', () => {
  const dims = [10, 10, 4];
  const count = 400;
  const flairData = Int16Array.from({ length: count }, (_, i) => i % 37);
  const segData = Uint8Array.from({ length: count }, (_, i) => (i % 50 === 0 ? 1 : 0));

  async function layoutPatient(name: string, files: Record<string, Buffer>): Promise<PatientFiles> {
    const dir = path.join(tmp, 'errors', name, name);
    await mkdir(dir, { recursive: true });
    for (const [f, content] of Object.entries(files)) await writeFile(path.join(dir, f), content);
    const [p] = await discoverPatients(path.dirname(dir), LAYOUT);
    return p;
  }
  const flair = (): Buffer => encodeNifti({ dims, datatype: 'int16', data: flairData, gzip: true });
  const seg = (d = dims, n = count): Buffer => encodeNifti({ dims: d, datatype: 'uint8', data: segData.subarray(0, n), gzip: true });

  it('corrupt .nii.gz', async () => {
    const bad = Buffer.concat([Buffer.from([0x1f, 0x8b, 0x08, 0, 0, 0, 0, 0, 0, 3]), randomBytes(3000)]);
    const p = await layoutPatient('corrupt01', { 'Flair_x.nii.gz': bad, 'OTMultiClass.nii.gz': seg() });
    await expectPatientError(preprocessPatient(p, path.join(tmp, 'out-err')), 'corrupt01', 'Flair_x.nii.gz', /^gzip data is corrupt or truncated/);
  });

  it('truncated volume', async () => {
    const full = encodeNifti({ dims, datatype: 'int16', data: flairData });
    const p = await layoutPatient('trunc02', { 'Flair_x.nii.gz': full.subarray(0, 352 + 300), 'OTMultiClass.nii.gz': seg() });
    await expectPatientError(
      preprocessPatient(p, path.join(tmp, 'out-err')),
      'trunc02',
      'Flair_x.nii.gz',
      /^truncated: header says 10x10x4 int16 \(800 bytes\) but only 300 bytes of voxel data$/,
    );
  });

  it('truncated real fixture (gzip cut in half)', async () => {
    const gz = await readFile(path.join(BRATS, 'pat0001', 'OTMultiClass.nii.gz'));
    const p = await layoutPatient('half03', { 'Flair_x.nii.gz': flair(), 'OTMultiClass.nii.gz': gz.subarray(0, gz.length >> 1) });
    await expectPatientError(preprocessPatient(p, path.join(tmp, 'out-err')), 'half03', 'OTMultiClass.nii.gz', /^gzip data is corrupt or truncated/);
  });

  it('missing seg file (layout)', async () => {
    const p = await layoutPatient('noseg04', { 'Flair_x.nii.gz': flair() });
    const e = await expectPatientError(preprocessPatient(p, path.join(tmp, 'out-err')), 'noseg04', 'OTMultiClass.nii.gz', /^no seg file matching 'OTMultiClass.nii.gz' in /);
    expect(e.reason).toContain(p.dir);
  });

  it('missing seg file (BraTS 2020 names), pointing at the stray file', async () => {
    const root = path.join(tmp, 'errors', 'kaggle355');
    const id = 'BraTS20_Training_355';
    const dir = path.join(root, id);
    await mkdir(dir, { recursive: true });
    await writeFile(path.join(dir, `${id}_flair.nii`), encodeNifti({ dims, datatype: 'int16', data: flairData }));
    await writeFile(path.join(dir, 'W39_1998.09.19_Segm.nii'), encodeNifti({ dims, datatype: 'uint8', data: segData }));
    const [p] = await discoverPatients(root);
    const e = await expectPatientError(preprocessPatient(p, path.join(tmp, 'out-err')), id, `${id}_seg.nii`, /^no seg file \(expected BraTS20_Training_355_seg.nii\)/);
    expect(e.reason).toContain('W39_1998.09.19_Segm.nii');
  });

  it('missing modality', async () => {
    const p = await layoutPatient('not1c05', { 'Flair_x.nii.gz': flair(), 'OTMultiClass.nii.gz': seg() });
    const withT1c = { ...p, layout: { ...p.layout, t1ce: 'T1c_*.nii.gz' } };
    await expectPatientError(
      preprocessPatient(withT1c, path.join(tmp, 'out-err'), { modalities: ['flair', 't1ce'] }),
      'not1c05',
      'T1c_*.nii.gz',
      /^no t1ce file matching 'T1c_\*.nii.gz'/,
    );
  });

  it('modality absent from the layout', async () => {
    const p = await layoutPatient('nolayout09', { 'Flair_x.nii.gz': flair(), 'OTMultiClass.nii.gz': seg() });
    const err = (await rejection(preprocessPatient(p, path.join(tmp, 'out-err'), { modalities: ['t2'] }))) as PatientDataError;
    expect(err).toBeInstanceOf(PatientDataError);
    expect(err.message).toContain('nolayout09');
    expect(err.reason).toBe('the dataset layout has no t2 entry (it maps flair, seg)');
  });

  /** What a patient's output folder and its siblings hold: the patient's files, and any hidden leftovers. */
  async function outputState(out: string, id: string): Promise<{ files: string[]; hidden: string[] }> {
    const files = ['images.npy', 'masks.npy', 'meta.json'].filter((f) => existsSync(path.join(out, id, f)));
    const hidden = existsSync(out) ? (await readdir(out)).filter((n) => n.startsWith('.')) : [];
    return { files, hidden };
  }

  it('image and seg shapes differ: no output at all (not even the masks, made first); fixed, a re-run completes', async () => {
    const p = await layoutPatient('shape06', { 'Flair_x.nii.gz': flair(), 'OTMultiClass.nii.gz': seg([10, 10, 3], 300) });
    const out = path.join(tmp, 'out-shape');
    await expectPatientError(
      preprocessPatient(p, out, { imageSize: 16 }),
      'shape06',
      'Flair_x.nii.gz',
      /image shape 10x10x4 does not match the seg shape 10x10x3 of OTMultiClass.nii.gz/,
    );
    // The masks are made from the seg alone before the images are read: they must not be left behind.
    expect(await outputState(out, 'shape06')).toEqual({ files: [], hidden: [] });

    await writeFile(p.files.seg, seg());
    const meta = await preprocessPatient(p, out, { imageSize: 16 });
    expect(await outputState(out, 'shape06')).toEqual({ files: ['images.npy', 'masks.npy', 'meta.json'], hidden: [] });
    const files = patientFiles(out, 'shape06');
    const [images, masks] = await Promise.all([readNpy(files.images), readNpy(files.masks)]);
    expect(images.shape).toEqual([meta.num_slices, 16, 16]);
    expect(masks.shape).toEqual([meta.num_slices, 16, 16]);
    expect(await readPatientMeta(files)).toEqual(meta);
  });

  it('an int16 FLAIR with scl_slope 3e38 fails naming the patient, the file and the overflow; nothing is written', async () => {
    // The known defect: every scaled value is past float32's range, and the run wrote images.npy full of +Inf.
    const huge = encodeNifti({ dims, datatype: 'int16', data: flairData, sclSlope: 3e38, gzip: true });
    const p = await layoutPatient('slope10', { 'Flair_x.nii.gz': huge, 'OTMultiClass.nii.gz': seg() });
    const out = path.join(tmp, 'out-slope');
    const e = await expectPatientError(preprocessPatient(p, out, { imageSize: 16 }), 'slope10', 'Flair_x.nii.gz', /scl_slope 3\.0000000\d*e\+38 and scl_inter 0 scale the stored values \[0, 36\] to \[0, 1\.08\d*e\+40\], not finite in float32/);
    expect(e.cause).toBeInstanceOf(Error);
    expect(await outputState(out, 'slope10')).toEqual({ files: [], hidden: [] });
    // A slope that keeps the values finite but within a hair of the limit still reads.
    await writeFile(p.files.flair, encodeNifti({ dims, datatype: 'int16', data: flairData, sclSlope: 9e36, gzip: true }));
    const meta = await preprocessPatient(p, out, { imageSize: 16 });
    const images = await readNpy(patientFiles(out, 'slope10').images);
    expect(images.data.every(Number.isFinite)).toBe(true);
    expect(meta.num_slices).toBe(images.shape[0]);
  });

  it('a re-run replaces the whole output folder, and a failed one removes it', async () => {
    const p = await layoutPatient('swap11', { 'Flair_x.nii.gz': flair(), 'OTMultiClass.nii.gz': seg() });
    const out = path.join(tmp, 'out-swap');
    await preprocessPatient(p, out, { imageSize: 16 });
    const stray = path.join(out, 'swap11', 'stale.txt');
    await writeFile(stray, 'from an older release');
    await preprocessPatient(p, out, { imageSize: 8 });
    expect(existsSync(stray)).toBe(false);
    expect((await readNpy(patientFiles(out, 'swap11').images)).shape.slice(1)).toEqual([8, 8]);
    await writeFile(p.files.seg, seg([10, 10, 3], 300));
    await rejection(preprocessPatient(p, out, { imageSize: 8 }));
    expect(existsSync(path.join(out, 'swap11'))).toBe(false);
    expect((await readdir(out)).filter((n) => n.startsWith('.'))).toEqual([]);
  });

  it('constant volume (std 0)', async () => {
    const constant = encodeNifti({ dims, datatype: 'int16', data: new Int16Array(count).fill(5), gzip: true });
    const p = await layoutPatient('flat07', { 'Flair_x.nii.gz': constant, 'OTMultiClass.nii.gz': seg() });
    await expectPatientError(preprocessPatient(p, path.join(tmp, 'out-err')), 'flat07', 'Flair_x.nii.gz', /constant volume.*z-score/);
  });

  it('a failed re-run leaves no meta.json vouching for old arrays', async () => {
    const p = await layoutPatient('rerun08', { 'Flair_x.nii.gz': flair(), 'OTMultiClass.nii.gz': seg() });
    const out = path.join(tmp, 'out-rerun');
    await preprocessPatient(p, out, { imageSize: 16 });
    expect(existsSync(path.join(out, 'rerun08', 'meta.json'))).toBe(true);
    await copyFile(path.join(BRATS, 'pat0001', 'License_CC_BY_NC_SA_3.0.txt'), p.files.flair);
    await expectPatientError(preprocessPatient(p, out, { imageSize: 16 }), 'rerun08', 'Flair_x.nii.gz', /not a NIfTI file/);
    expect(existsSync(path.join(out, 'rerun08', 'meta.json'))).toBe(false);
  });
});
