/**
 * Preprocessing of BraTS volumes into 2-D axial slices (see REFERENCE.md, "BraTS preprocessing"), in two layers:
 *
 * - volumeToSlices, pure (no file IO): volumes as readNiftiRaw returns them (or parseNiftiRaw, for an upload) and an
 *   optional segmentation -> model-ready slices, masks and per-slice metadata. Training data (preprocessPatient)
 *   and inference (one uploaded volume, `keep: 'all'`, no segmentation) go through the same code, so a model sees
 *   at inference exactly what it was trained on. Its steps, selectSlices, sliceMasks and sliceImages, are exported
 *   for callers that hold the segmentation before the images, as preprocessPatient does.
 * - preprocessPatient: reads one patient's files, runs the steps and writes images.npy, masks.npy and meta.json.
 *
 * Rules:
 * - each modality is z-scored over its whole 3-D volume (background zeros included);
 * - the mask is label > 0 (whole tumour);
 * - axial slices are taken along the volume's third axis (k);
 * - with a segmentation, a slice with >= minTumorPixels tumour pixels is always kept, any other slice with
 *   probability keepProbability, drawn from a PRNG seeded by (seed, patient id) so that a re-run keeps the same
 *   slices; `keep: 'all'` (the default without a segmentation) keeps every slice;
 * - kept slices are resized to imageSize x imageSize: the image with a separable triangle (bilinear) filter whose
 *   support widens with the reduction factor when downscaling (anti-aliasing, like Pillow's and roughly like
 *   skimage's anti_aliasing), mirror-reflected at the borders as skimage's default mode='reflect'; the mask by
 *   nearest neighbour, then > 0.5.
 *
 * Orientation: output slice s is the volume's voxels [:, :, k] in nibabel's array order (numpy
 * `img.get_fdata()[:, :, k]`, as the original Python system sliced them): row r and column c of a slice come from
 * voxel (i = r, j = c, k), resized. NIfTI stores i fastest (voxel (i, j, k) at i + nx * (j + ny * k)), so a file's
 * row of i values becomes an output column. meta.json records this and the volume's axis codes ('LPS', 'RAS', ...).
 *
 * Outputs of preprocessPatient, under outDir/<patientId>/ (src/disk/layout.ts's patientFiles): images.npy
 * (float32, N x H x W for one modality, N x C x H x W for several), masks.npy (uint8 0/1, N x H x W) and meta.json,
 * written atomically, meta.json last: its presence marks a complete result.
 */
import { readdir } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { patientFiles, writePatientMeta, type PatientFilePaths, type PatientMeta, type SliceInfo, type SliceOrientation } from '../disk/layout.ts';
import { removeDirAtomic, replaceDirAtomic, writeNewFile } from '../lib/atomic.js';
import { DataFileError, PatientDataError, SliceWiseError } from '../lib/errors.js';
import type { PatientFiles } from './layout.js';
import { readNiftiRaw, type RawNiftiVolume } from './nifti.js';
import { allocNpy } from './npy.js';

/** Output size and slice sampling, shared by preprocessPatient and volumeToSlices. */
export interface SamplingOptions {
  /** Output slice size (square). Default 256. */
  imageSize?: number;
  /** A slice with at least this many tumour pixels is always kept. Default 100. */
  minTumorPixels?: number;
  /** Probability of keeping any other slice. Default 0.3. */
  keepProbability?: number;
  /** Seed of the slice sampling, combined with the patient id. Default 42. */
  seed?: number;
}

export interface PreprocessOptions extends SamplingOptions {
  /** Modalities stacked as channels, by canonical name. Default ['flair']. */
  modalities?: string[];
}

export interface SliceOptions extends SamplingOptions {
  /**
   * 'sampled' (the default with a segmentation): the training rule above; needs a segmentation and sampleKey.
   * 'all' (the default without one): every slice, in order, as inference wants.
   */
  keep?: 'sampled' | 'all';
  /** With 'sampled', seeds the draw together with `seed`: the patient id, so that a re-run keeps the same slices. */
  sampleKey?: string;
}

/** Per-slice metadata when there is no segmentation to count tumour pixels in. */
export type UnlabelledSliceInfo = Pick<SliceInfo, 'slice_idx'>;

/** The slices to cut from a volume, before any voxel is resampled (see selectSlices). */
export interface SliceSelection<S extends UnlabelledSliceInfo = SliceInfo> {
  /** [nx, ny, nz] of the volumes the slices come from; every volume sliced with this selection must have it. */
  shape: [number, number, number];
  /** Output slices are imageSize x imageSize. */
  imageSize: number;
  /** One entry per output slice, in output order (increasing slice_idx). */
  slices: S[];
}

interface SliceArrays {
  /**
   * float32 model input, each volume z-scored over all its voxels: imageShape is [N, S, S] for one volume and
   * [N, C, S, S] for several (channels in the order given). images[s][c][r][col] comes from voxel
   * (i = r, j = col, k = slices[s].slice_idx), resized.
   */
  images: Float32Array;
  imageShape: number[];
  /** [nx, ny, nz] of the input volumes. */
  originalShape: [number, number, number];
  orientation: SliceOrientation;
}

export interface LabelledSlices extends SliceArrays {
  /** uint8 0/1 (label > 0), [N, S, S], same pixel order as images. */
  masks: Uint8Array;
  slices: SliceInfo[];
}

export interface UnlabelledSlices extends SliceArrays {
  masks: null;
  slices: UnlabelledSliceInfo[];
}

export type VolumeSlices = LabelledSlices | UnlabelledSlices;

/** One volume, or several to stack as channels (all of one shape). */
export type VolumeInput = RawNiftiVolume | readonly RawNiftiVolume[];

/**
 * A volume unfit for slicing (NaN voxels, constant, a shape that does not match): 422, naming the input by its
 * index in the volumes given, or 'seg'. preprocessPatient turns it into a PatientDataError naming the file.
 */
export class SliceInputError extends SliceWiseError {
  readonly input: number | 'seg';
  readonly reason: string;

  constructor(input: number | 'seg', reason: string) {
    super(`${input === 'seg' ? 'segmentation' : `volume ${input}`}: ${reason}`, { status: 422, code: 'bad_volume', details: { input, reason } });
    this.name = 'SliceInputError';
    this.input = input;
    this.reason = reason;
  }
}

/** Fold a 32-bit value through the MurmurHash3 finaliser (good avalanche). */
function fmix32(h: number): number {
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h >>> 0;
}

/**
 * Deterministic uniform [0, 1) generator for one patient: FNV-1a of `${seed}:${patientId}` seeds a Weyl sequence
 * whose states are passed through a 32-bit finaliser.
 */
export function patientRng(seed: number, patientId: string): () => number {
  const key = `${seed}:${patientId}`;
  let h = 0x811c9dc5;
  for (let i = 0; i < key.length; i++) {
    h ^= key.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  let state = fmix32(h >>> 0);
  return () => {
    state = (state + 0x9e3779b9) >>> 0;
    return fmix32(state ^ (state >>> 15)) / 4294967296;
  };
}

/**
 * Resampling taps for one axis, a fixed number per output (`taps`, padded with zero weights): output o reads
 * idx[o * taps + k] with weight w[o * taps + k].
 */
interface AxisTaps {
  taps: number;
  idx: Int32Array;
  w: Float64Array;
}

function mirror(i: number, n: number): number {
  if (n === 1) return 0;
  const period = 2 * (n - 1);
  i %= period;
  if (i < 0) i += period;
  return i < n ? i : period - i;
}

/**
 * Triangle-filter taps mapping `inSize` samples to `outSize` (pixel centres aligned: source coordinate
 * (o + 0.5) * scale - 0.5). Upscaling gives plain bilinear interpolation; downscaling widens the triangle to the
 * reduction factor, averaging the input pixels an output pixel covers (anti-aliasing). Borders mirror
 * (d c b | a b c d | c b a). Weights of each output sum to 1.
 */
function axisTaps(inSize: number, outSize: number): AxisTaps {
  const scale = inSize / outSize;
  const support = Math.max(scale, 1);
  const lists: { idx: number[]; w: number[] }[] = [];
  let taps = 2;
  // Where each source index sits in the current output's tap list (-1: not yet): mirrored taps fold onto indices
  // already listed. A lookup table, not idx.indexOf: a strong reduction (a 32767-wide volume to a few pixels)
  // has thousands of taps per output, and a linear search made that quadratic (seconds, found by the fuzz pass).
  const slot = new Int32Array(inSize).fill(-1);
  for (let o = 0; o < outSize; o++) {
    const c = (o + 0.5) * scale - 0.5;
    const idx: number[] = [];
    const w: number[] = [];
    let sum = 0;
    for (let i = Math.floor(c - support) + 1; i <= Math.ceil(c + support) - 1; i++) {
      const wi = 1 - Math.abs(i - c) / support;
      if (wi <= 0) continue;
      const j = mirror(i, inSize);
      const k = slot[j]!;
      if (k < 0) {
        slot[j] = idx.length;
        idx.push(j);
        w.push(wi);
      } else {
        w[k] += wi;
      }
      sum += wi;
    }
    for (const j of idx) slot[j] = -1;
    for (let k = 0; k < w.length; k++) w[k] /= sum;
    lists.push({ idx, w });
    taps = Math.max(taps, idx.length);
  }
  const idx = new Int32Array(outSize * taps);
  const w = new Float64Array(outSize * taps);
  lists.forEach((l, o) => {
    for (let k = 0; k < taps; k++) {
      idx[o * taps + k] = k < l.idx.length ? l.idx[k] : l.idx[0];
      w[o * taps + k] = k < l.w.length ? l.w[k] : 0;
    }
  });
  return { taps, idx, w };
}

/** Nearest-neighbour source index per output index (same centre alignment as axisTaps). */
function nearestIndex(inSize: number, outSize: number): Int32Array {
  const scale = inSize / outSize;
  const out = new Int32Array(outSize);
  for (let o = 0; o < outSize; o++) out[o] = Math.min(inSize - 1, Math.floor((o + 0.5) * scale));
  return out;
}

/**
 * Resampling plan of one volume shape, computed once and reused for every slice and modality. x is the volume's
 * i axis (contiguous in the file, the output's rows), y its j axis (the output's columns).
 *
 * Skull-stripped BraTS volumes are zero outside the brain; outputs whose taps only read zeros are not computed:
 * for an input run [lo, hi] of possibly non-zero samples, outputs firstOut[lo] .. lastOut[hi] are the only ones
 * that can be non-zero.
 */
interface ResizePlan {
  nx: number;
  ny: number;
  size: number;
  ax: AxisTaps;
  ay: AxisTaps;
  /** firstOut[x]: the first output along x with a tap at an input >= x. */
  firstOut: Int32Array;
  /** lastOut[x]: the last output along x with a tap at an input <= x. */
  lastOut: Int32Array;
  nnx: Int32Array;
  nny: Int32Array;
  /** Horizontal-pass result, ny rows of size; zero outside [rowLo[y], rowHi[y]]. */
  tmp: Float32Array;
  rowLo: Int32Array;
  rowHi: Int32Array;
}

function resizePlan(nx: number, ny: number, size: number): ResizePlan {
  const ax = axisTaps(nx, size);
  const nnx = nearestIndex(nx, size);
  const firstOut = new Int32Array(nx).fill(size);
  const lastOut = new Int32Array(nx).fill(-1);
  const mins = new Int32Array(size);
  const maxs = new Int32Array(size);
  for (let o = 0; o < size; o++) {
    let min = nx;
    let max = -1;
    for (let k = 0; k < ax.taps; k++) {
      if (ax.w[o * ax.taps + k] === 0) continue;
      const i = ax.idx[o * ax.taps + k];
      if (i < min) min = i;
      if (i > max) max = i;
    }
    mins[o] = min;
    maxs[o] = max;
  }
  // firstOut[x] = the least o with maxs[o] >= x: going up through o, each x is claimed by the first o that reaches
  // it. lastOut[x] = the greatest o with mins[o] <= x, the same going down. O(nx + size), where filling each output's
  // whole range was O(nx x size).
  for (let o = 0, hi = -1; o < size; o++) for (; hi < maxs[o]; ) firstOut[++hi] = o;
  for (let o = size - 1, lo = nx; o >= 0; o--) for (; lo > mins[o]; ) lastOut[--lo] = o;
  return {
    nx,
    ny,
    size,
    ax,
    ay: ny === nx ? ax : axisTaps(ny, size),
    firstOut,
    lastOut,
    nnx,
    nny: ny === nx ? nnx : nearestIndex(ny, size),
    tmp: new Float32Array(ny * size),
    rowLo: new Int32Array(ny),
    rowHi: new Int32Array(ny),
  };
}

/**
 * Horizontal pass, along i: ny file rows of nx samples -> ny rows of `size` in plan.tmp. Rows go four at a time
 * (one load of each tap index and weight serves four rows), and only over the outputs that can be non-zero.
 */
function horizontal(plan: ResizePlan, src: Float32Array): void {
  const { nx, ny, size, tmp, rowLo, rowHi, firstOut, lastOut } = plan;
  const { taps, idx, w } = plan.ax;
  for (let y0 = 0; y0 < ny; y0 += 4) {
    const rows = Math.min(4, ny - y0);
    // Union of the rows' non-zero input stretches.
    let lo = nx;
    let hi = -1;
    for (let y = y0; y < y0 + rows; y++) {
      const row = y * nx;
      let l = 0;
      while (l < nx && src[row + l] === 0) l++;
      if (l === nx) continue;
      let h = nx - 1;
      while (src[row + h] === 0) h--;
      if (l < lo) lo = l;
      if (h > hi) hi = h;
    }
    const t = y0 * size;
    if (hi < 0) {
      tmp.fill(0, t, t + rows * size);
      for (let y = y0; y < y0 + rows; y++) {
        rowLo[y] = size;
        rowHi[y] = -1;
      }
      continue;
    }
    const a = firstOut[lo];
    const b = lastOut[hi];
    for (let y = y0; y < y0 + rows; y++) {
      rowLo[y] = a;
      rowHi[y] = b;
      const ty = y * size;
      if (a > 0) tmp.fill(0, ty, ty + a);
      if (b < size - 1) tmp.fill(0, ty + b + 1, ty + size);
    }
    if (taps === 2 && rows === 4) {
      const r0 = y0 * nx;
      const r1 = r0 + nx;
      const r2 = r1 + nx;
      const r3 = r2 + nx;
      for (let ox = a, j = 2 * a; ox <= b; ox++, j += 2) {
        const i = idx[j];
        const k = idx[j + 1];
        const wi = w[j];
        const wk = w[j + 1];
        tmp[t + ox] = wi * src[r0 + i] + wk * src[r0 + k];
        tmp[t + size + ox] = wi * src[r1 + i] + wk * src[r1 + k];
        tmp[t + 2 * size + ox] = wi * src[r2 + i] + wk * src[r2 + k];
        tmp[t + 3 * size + ox] = wi * src[r3 + i] + wk * src[r3 + k];
      }
    } else {
      for (let y = y0; y < y0 + rows; y++) {
        const row = y * nx;
        const ty = y * size;
        for (let ox = a; ox <= b; ox++) {
          let acc = 0;
          for (let j = ox * taps, end = j + taps; j < end; j++) acc += w[j] * src[row + idx[j]];
          tmp[ty + ox] = acc;
        }
      }
    }
  }
}

/**
 * Vertical pass from plan.tmp into out, z-scoring on the way: the taps sum to 1, so scaling them by 1/std and
 * adding -mean/std equals resizing the z-scored slice. Whole rows of tmp are combined (contiguous inner loop) into
 * one output column: output row oi, column oj is source (i, j), nibabel's order. The slice is first filled with
 * the z-score of 0, which every output outside the non-zero columns of the rows read keeps. (Writing down a column
 * strides by the row length; a blocked transpose through a buffer measured slower, and so did gathering per row.)
 */
function vertical(plan: ResizePlan, mean: number, invStd: number, out: Float32Array, outOffset: number): void {
  const { size, tmp, rowLo, rowHi } = plan;
  const { taps, idx, w } = plan.ay;
  const shift = -mean * invStd;
  out.fill(shift, outOffset, outOffset + size * size);
  for (let oj = 0; oj < size; oj++) {
    const j = oj * taps;
    let lo = size;
    let hi = -1;
    for (let k = 0; k < taps; k++) {
      if (w[j + k] === 0) continue;
      const r = idx[j + k];
      if (rowLo[r] < lo) lo = rowLo[r];
      if (rowHi[r] > hi) hi = rowHi[r];
    }
    if (lo > hi) continue;
    const col = outOffset + oj;
    const t0 = tmp.subarray(idx[j] * size, idx[j] * size + size);
    const t1 = tmp.subarray(idx[j + 1] * size, idx[j + 1] * size + size);
    const a = w[j] * invStd;
    const b = w[j + 1] * invStd;
    for (let x = lo, o = col + lo * size; x <= hi; x++, o += size) out[o] = a * t0[x] + b * t1[x] + shift;
    for (let k = 2; k < taps; k++) {
      const c = w[j + k] * invStd;
      if (c === 0) continue;
      const tk = tmp.subarray(idx[j + k] * size, idx[j + k] * size + size);
      for (let x = lo, o = col + lo * size; x <= hi; x++, o += size) out[o] += c * tk[x];
    }
  }
}

/**
 * Slice z of a volume as float32 with the file's scaling applied: a view when the stored data already is
 * unscaled float32, otherwise converted into `scratch` (TypedArray#set converts natively). Working slice by slice
 * keeps every hot loop on Float32Array and avoids a whole-volume float32 copy.
 */
function sliceF32(v: RawNiftiVolume, z: number, scratch: Float32Array): Float32Array {
  const plane = v.dims[0] * v.dims[1];
  const part = v.raw.subarray(z * plane, (z + 1) * plane);
  const scaled = v.slope !== 1 || v.inter !== 0;
  if (part instanceof Float32Array && !scaled) return part;
  if (!scaled) {
    scratch.set(part);
  } else {
    const { slope, inter } = v;
    for (let i = 0; i < plane; i++) scratch[i] = part[i] * slope + inter;
  }
  return scratch;
}

/**
 * Tumour (label > 0) pixels per slice and per row, straight from the stored labels: the label bytes are read as
 * 64-bit floats, and a word that is +0 (every byte zero: only zero labels) is skipped at once; the labels of other
 * words, -0 included (only the top bit set, which may be a tumour label of an unsigned type), are compared one by
 * one. Segmentations are mostly zeros, so this is several times faster than converting them, and twice as fast as
 * 32-bit words. Returns false (nothing done) when the layout does not allow it (scaling, rows that are not whole
 * words, unaligned data).
 */
function countTumourRaw(seg: RawNiftiVolume, perSlice: Int32Array, perRow: Int32Array): boolean {
  const { raw } = seg;
  const [nx, ny, nz] = seg.dims;
  const rowBytes = nx * raw.BYTES_PER_ELEMENT;
  if (seg.slope !== 1 || seg.inter !== 0 || rowBytes % 8 !== 0 || raw.byteOffset % 8 !== 0) return false;
  const rows = ny * nz;
  // Division, not >> 3: a volume over 2 GiB would wrap a 32-bit shift.
  const words = new Float64Array(raw.buffer, raw.byteOffset, (rows * rowBytes) / 8);
  const wordsPerRow = rowBytes / 8;
  const perWord = 8 / raw.BYTES_PER_ELEMENT;
  for (let r = 0, k = 0; r < rows; r++) {
    let count = 0;
    for (const end = k + wordsPerRow; k < end; k++) {
      const word = words[k];
      if (word === 0 && 1 / word > 0) continue;
      for (let e = k * perWord, last = e + perWord; e < last; e++) if (raw[e] > 0) count++;
    }
    perRow[r] = count;
    perSlice[(r / ny) | 0] += count;
  }
  return true;
}

/** Tumour (label > 0) pixels of one slice, per row into perRow at rowOffset; returns the slice total. */
function countSlice(labels: Float32Array, nx: number, ny: number, perRow: Int32Array, rowOffset: number): number {
  let total = 0;
  for (let y = 0, i = 0; y < ny; y++) {
    let count = 0;
    for (const end = i + nx; i < end; i++) if (labels[i] > 0) count++;
    perRow[rowOffset + y] = count;
    total += count;
  }
  return total;
}

/**
 * Nearest-neighbour resize of a label slice into a 0/1 mask (label > 0, which is also "> 0.5" of the binary
 * mask), row oi and column oj from source (i, j). `out` is zero-filled: columns whose source row j has no tumour
 * are left alone.
 */
function maskSlice(plan: ResizePlan, labels: Float32Array, perRow: Int32Array, rowOffset: number, out: Uint8Array, outOffset: number): void {
  const { nx, size, nnx, nny } = plan;
  for (let oj = 0; oj < size; oj++) {
    const j = nny[oj];
    if (perRow[rowOffset + j] === 0) continue;
    const row = j * nx;
    for (let oi = 0, o = outOffset + oj; oi < size; oi++, o += size) out[o] = labels[row + nnx[oi]] > 0 ? 1 : 0;
  }
}

/**
 * Mean and population standard deviation of the whole volume (scaling applied), in one pass over Float64
 * accumulators shifted by a pivot (a voxel's value) against cancellation.
 *
 * 8- and 16-bit volumes are read as 32-bit words straight from the stored data: a zero word (the background of
 * a skull-stripped scan, most of the volume) only adds to a count of zeros. Other volumes go slice by slice
 * through float32.
 */
function integerHistogram(raw: Int16Array | Uint16Array | Uint8Array | Int8Array): { hist: Float64Array; offset: number } {
  const offset = raw instanceof Int16Array ? 32768 : raw instanceof Int8Array ? 128 : 0;
  const bins = raw instanceof Int16Array || raw instanceof Uint16Array ? 65536 : 256;
  const counts = new Int32Array(bins);
  if (raw instanceof Int16Array) for (let i = 0; i < raw.length; i++) counts[raw[i]! + 32768]!++;
  else if (raw instanceof Uint16Array) for (let i = 0; i < raw.length; i++) counts[raw[i]!]!++;
  else if (raw instanceof Uint8Array) for (let i = 0; i < raw.length; i++) counts[raw[i]!]!++;
  else for (let i = 0; i < raw.length; i++) counts[raw[i]! + 128]!++;
  return { hist: Float64Array.from(counts), offset };
}

function volumeStats(v: RawNiftiVolume, scratch: Float32Array): { mean: number; std: number } {
  const { raw, slope, inter } = v;
  const n = raw.length;
  const bpe = raw.BYTES_PER_ELEMENT;
  let mean: number;
  let std: number;
  if (bpe <= 2 && !(raw instanceof Float32Array)) {
    // 8- and 16-bit integers: a histogram pass (one increment per voxel, monomorphic on each array type), then
    // the moments from the histogram. Exact, and several times faster than accumulating doubles per voxel.
    let sum = 0;
    let sq = 0;
    if (bpe === 2 && n < 65536) {
      // A volume with fewer voxels than a 16-bit histogram has bins (a tiny patient): summed directly, which for
      // integers this size is just as exact, without allocating and scanning 65,536 bins.
      for (let i = 0; i < n; i++) {
        const val = raw[i]!;
        sum += val;
        sq += val * val;
      }
    } else {
      const { hist, offset } = integerHistogram(raw as Int16Array | Uint16Array | Uint8Array | Int8Array);
      for (let b = 0; b < hist.length; b++) {
        const c = hist[b]!;
        if (c === 0) continue;
        const val = b - offset;
        sum += c * val;
        sq += c * val * val;
      }
    }
    const m = sum / n;
    mean = m * slope + inter;
    std = Math.sqrt(Math.max(0, sq / n - m * m)) * Math.abs(slope);
  } else {
    // One loop nest in one function called once per volume: hot loops in small functions called per slice get
    // on-stack-replaced on the first call and then deoptimize at the code after the loop, call after call.
    const pivot = raw[n >>> 1] * slope + inter;
    const plane = v.dims[0] * v.dims[1];
    const even = plane - (plane & 1);
    let s0 = 0, s1 = 0, q0 = 0, q1 = 0;
    for (let z = 0; z < v.dims[2]; z++) {
      const slice = sliceF32(v, z, scratch);
      for (let i = 0; i < even; i += 2) {
        const a = slice[i] - pivot;
        const b = slice[i + 1] - pivot;
        s0 += a;
        q0 += a * a;
        s1 += b;
        q1 += b * b;
      }
      for (let i = even; i < plane; i++) {
        const a = slice[i] - pivot;
        s0 += a;
        q0 += a * a;
      }
    }
    const sum = s0 + s1;
    const sq = q0 + q1;
    mean = pivot + sum / n;
    std = Math.sqrt(Math.max(0, (sq - (sum * sum) / n) / n));
  }
  return { mean, std };
}

/** The PatientDataError for a modality with no file, naming what was expected and any stray NIfTI files nearby. */
async function missingFile(patient: PatientFiles, modality: string): Promise<PatientDataError> {
  const pattern = patient.layout?.[modality];
  const expected = patient.expected?.[modality];
  let file: string;
  let reason: string;
  if (pattern) {
    file = join(patient.dir, pattern);
    reason = `no ${modality} file matching '${pattern}' in ${patient.dir}`;
  } else if (expected) {
    file = join(patient.dir, expected);
    reason = `no ${modality} file (expected ${expected})`;
  } else if (patient.layout) {
    file = join(patient.dir, `<${modality}>`);
    reason = `the dataset layout has no ${modality} entry (it maps ${Object.keys(patient.layout).join(', ')})`;
  } else {
    file = join(patient.dir, `<${modality}>`);
    reason = `no ${modality} file in ${patient.dir}`;
  }
  const known = new Set(Object.values(patient.files).map((f) => basename(f)));
  const strays = await readdir(patient.dir)
    .then((names) => names.filter((n) => /\.nii(\.gz)?$/i.test(n) && !known.has(n)).sort())
    .catch(() => [] as string[]);
  if (strays.length > 0) reason += `; other NIfTI files there: ${strays.slice(0, 5).join(', ')}${strays.length > 5 ? ', ...' : ''}`;
  return new PatientDataError(patient.patientId, file, reason);
}

function badOptions(msg: string): never {
  throw new SliceWiseError(`bad preprocessing options: ${msg}`, { status: 400, code: 'bad_options' });
}

function resolveSampling(opts: SamplingOptions): Required<SamplingOptions> {
  const o = {
    imageSize: opts.imageSize ?? 256,
    minTumorPixels: opts.minTumorPixels ?? 100,
    keepProbability: opts.keepProbability ?? 0.3,
    seed: opts.seed ?? 42,
  };
  if (!Number.isInteger(o.imageSize) || o.imageSize < 1 || o.imageSize > 4096) badOptions(`imageSize ${o.imageSize} must be an integer from 1 to 4096`);
  if (!(o.minTumorPixels >= 0)) badOptions(`minTumorPixels ${o.minTumorPixels} must be >= 0`);
  if (!(o.keepProbability >= 0 && o.keepProbability <= 1)) badOptions(`keepProbability ${o.keepProbability} must be within [0, 1]`);
  if (!Number.isFinite(o.seed)) badOptions(`seed ${o.seed} must be a finite number`);
  return o;
}

function resolveSliceOptions(opts: SliceOptions, withSegmentation: boolean): Required<SamplingOptions> & Pick<SliceOptions, 'keep' | 'sampleKey'> {
  const keep = opts.keep ?? (withSegmentation ? 'sampled' : 'all');
  if (keep !== 'sampled' && keep !== 'all') badOptions(`keep ${String(keep)} must be 'sampled' or 'all'`);
  if (keep === 'sampled' && !withSegmentation) badOptions("keep 'sampled' draws slices by their tumour pixels and needs a segmentation");
  if (keep === 'sampled' && !opts.sampleKey) badOptions("keep 'sampled' needs a sampleKey (the patient id) to seed the draw");
  return { ...resolveSampling(opts), keep, sampleKey: opts.sampleKey };
}

function resolveModalities(modalities: string[] | undefined): string[] {
  const m = modalities ?? ['flair'];
  if (m.length === 0) badOptions('modalities is empty');
  if (new Set(m).size !== m.length) badOptions(`modalities ${m.join(',')} has duplicates`);
  if (m.includes('seg')) badOptions('seg is the label volume, not an input modality');
  return m;
}

const shapeText = (dims: readonly number[]): string => dims.join('x');
const sameShape = (a: readonly number[], b: readonly number[]): boolean => a[0] === b[0] && a[1] === b[1] && a[2] === b[2];

/** Per-row tumour counts that selectSlices computed, for sliceMasks on the same segmentation. */
const countedRows = new WeakMap<object, { seg: RawNiftiVolume; perSlice: Int32Array; perRow: Int32Array }>();

/**
 * Step 1: which slices of a segmented volume to keep (options.keep, see the module comment), with their tumour
 * pixel counts on the original slice. Reads only the segmentation.
 */
export function selectSlices(seg: RawNiftiVolume, opts: SliceOptions = {}): SliceSelection<SliceInfo> {
  const o = resolveSliceOptions(opts, true);
  const [nx, ny, nz] = seg.dims;
  const tumour = new Int32Array(nz);
  const perRow = new Int32Array(ny * nz);
  if (!countTumourRaw(seg, tumour, perRow)) {
    const scratch = new Float32Array(nx * ny);
    for (let z = 0; z < nz; z++) tumour[z] = countSlice(sliceF32(seg, z, scratch), nx, ny, perRow, z * ny);
  }
  const slices: SliceInfo[] = [];
  // One draw per slice, whether or not it is needed, so each slice's fate depends only on its index.
  const rng = o.keep === 'sampled' ? patientRng(o.seed, o.sampleKey!) : null;
  for (let z = 0; z < nz; z++) {
    const keep = rng ? rng() < o.keepProbability || tumour[z] >= o.minTumorPixels : true;
    if (keep) slices.push({ slice_idx: z, has_tumor: tumour[z] > 0, tumor_pixels: tumour[z] });
  }
  const selection: SliceSelection<SliceInfo> = { shape: [nx, ny, nz], imageSize: o.imageSize, slices };
  countedRows.set(selection, { seg, perSlice: tumour, perRow });
  return selection;
}

/**
 * Largest array the slicing makes (images: N x C x S x S float32; masks: N x S x S bytes). The output's size
 * follows the slice count and the image size, not the input's: a 1 x 1 x 32767 volume of 32 KB would otherwise ask
 * for 8 GiB of 256 x 256 slices. A BraTS case at 256 x 256 is 40 MB per modality.
 */
export const MAX_SLICE_OUTPUT_BYTES = 2 ** 30;

/** The reason an output of `n` slices x `channels` of S x S at `bytesPerValue` is refused, or null when it fits. */
function oversizeReason(n: number, channels: number, size: number, bytesPerValue: number, what: string): string | null {
  const bytes = n * channels * size * size * bytesPerValue;
  if (bytes <= MAX_SLICE_OUTPUT_BYTES) return null;
  const gib = (b: number) => `${(b / 2 ** 30).toFixed(1)} GiB`;
  return `${n} slices${channels > 1 ? ` x ${channels} channels` : ''} of ${size} x ${size} make ${gib(bytes)} of ${what}, more than the ${gib(MAX_SLICE_OUTPUT_BYTES)} one volume's slices may take`;
}

function checkSelection(selection: SliceSelection<UnlabelledSliceInfo>): void {
  const nz = selection.shape[2];
  for (const s of selection.slices) {
    if (!Number.isInteger(s.slice_idx) || s.slice_idx < 0 || s.slice_idx >= nz) {
      badOptions(`slice_idx ${s.slice_idx} is outside the volume's ${nz} slices`);
    }
  }
}

/** A typed array of `length`: `into` (checked, zeroed when asked) or a new one. */
function outputArray<T extends Float32Array | Uint8Array>(into: T | undefined, length: number, make: (n: number) => T, what: string, zero: boolean): T {
  if (!into) return make(length);
  if (into.length !== length) {
    throw new SliceWiseError(`${what}: the output array holds ${into.length} values, the slices need ${length}`, { code: 'bad_output' });
  }
  if (zero) into.fill(0);
  return into;
}

/**
 * Step 2: the selected slices of the segmentation as 0/1 masks (label > 0), N x S x S, nearest-neighbour resized.
 * `into` (e.g. allocNpy's data view, to skip a copy) receives them when given.
 */
export function sliceMasks(seg: RawNiftiVolume, selection: SliceSelection<UnlabelledSliceInfo>, into?: Uint8Array): Uint8Array {
  if (!sameShape(seg.dims, selection.shape)) {
    throw new SliceInputError('seg', `shape ${shapeText(seg.dims)} does not match the slices' volume shape ${shapeText(selection.shape)}`);
  }
  checkSelection(selection);
  const [nx, ny] = seg.dims;
  const size = selection.imageSize;
  const area = size * size;
  const tooBig = into ? null : oversizeReason(selection.slices.length, 1, size, 1, 'masks');
  if (tooBig) throw new SliceInputError('seg', tooBig);
  const out = outputArray(into, selection.slices.length * area, (n) => new Uint8Array(n), 'sliceMasks', true);
  const plan = resizePlan(nx, ny, size);
  const scratch = new Float32Array(nx * ny);
  const counted = countedRows.get(selection);
  const known = counted?.seg === seg;
  const perRow = known ? counted.perRow : new Int32Array(ny * seg.dims[2]);
  for (let s = 0; s < selection.slices.length; s++) {
    const z = selection.slices[s].slice_idx;
    if (known && counted.perSlice[z] === 0) continue;
    const labels = sliceF32(seg, z, scratch);
    if (!known && countSlice(labels, nx, ny, perRow, z * ny) === 0) continue;
    maskSlice(plan, labels, perRow, z * ny, out, s * area);
  }
  return out;
}

/**
 * Step 3: the selected slices of one or more volumes, each z-scored over the whole volume, resized to S x S:
 * N x S x S for one volume, N x C x S x S for several. `into` receives them when given. Throws SliceInputError
 * for a volume of another shape, with NaN or infinite voxels, or constant (its z-score is undefined).
 */
export function sliceImages(volumes: readonly RawNiftiVolume[], selection: SliceSelection<UnlabelledSliceInfo>, into?: Float32Array): Float32Array {
  if (volumes.length === 0) badOptions('no volumes to slice');
  checkSelection(selection);
  const [nx, ny] = selection.shape;
  volumes.forEach((v, c) => {
    if (!sameShape(v.dims, selection.shape)) {
      throw new SliceInputError(c, `image shape ${shapeText(v.dims)} does not match the slices' volume shape ${shapeText(selection.shape)}`);
    }
  });
  const scratch = new Float32Array(nx * ny);
  const stats = volumes.map((v, c) => {
    const { mean, std } = volumeStats(v, scratch);
    if (!Number.isFinite(mean) || !Number.isFinite(std)) throw new SliceInputError(c, 'the volume contains NaN or infinite voxel values');
    if (std === 0) throw new SliceInputError(c, `constant volume (every voxel is ${mean}): the z-score is undefined`);
    return { mean, invStd: 1 / std };
  });
  const size = selection.imageSize;
  const area = size * size;
  const channels = volumes.length;
  const tooBig = into ? null : oversizeReason(selection.slices.length, channels, size, 4, 'float32 images');
  if (tooBig) throw new SliceInputError(0, tooBig);
  const out = outputArray(into, selection.slices.length * channels * area, (n) => new Float32Array(n), 'sliceImages', false);
  const plan = resizePlan(nx, ny, size);
  selection.slices.forEach(({ slice_idx: z }, s) => {
    for (let c = 0; c < channels; c++) {
      const at = (s * channels + c) * area;
      horizontal(plan, sliceF32(volumes[c], z, scratch));
      vertical(plan, stats[c].mean, stats[c].invStd, out, at);
      // The statistics are finite, but float32 is narrower than the doubles they were computed in (a scaling near
      // float32's limit): what the model gets must be finite, checked on the output itself.
      for (let i = at, end = at + area; i < end; i++) {
        if (!Number.isFinite(out[i])) {
          throw new SliceInputError(c, `z-scored slice ${z} has a non-finite value (${out[i]}): the voxel values or their scaling overflow float32`);
        }
      }
    }
  });
  return out;
}

/** How the slices' axes map onto a volume, as meta.json records it. */
export function sliceOrientation(volume: Pick<RawNiftiVolume, 'axisCodes'>): SliceOrientation {
  return { array_axes: ['k', 'i', 'j'], axis_codes: volume.axisCodes ?? null };
}

function imageShapeOf(n: number, channels: number, size: number): number[] {
  return channels === 1 ? [n, size, size] : [n, channels, size, size];
}

/**
 * Volumes (one, or several stacked as channels; all of one shape) and an optional segmentation -> model-ready
 * slices: the three steps above in one call. Without a segmentation every slice is kept and masks is null. Pure:
 * no file IO, the same input gives the same output.
 */
export function volumeToSlices(volumes: VolumeInput, seg: RawNiftiVolume, opts?: SliceOptions): LabelledSlices;
export function volumeToSlices(volumes: VolumeInput, seg?: null, opts?: SliceOptions): UnlabelledSlices;
export function volumeToSlices(volumes: VolumeInput, seg?: RawNiftiVolume | null, opts?: SliceOptions): VolumeSlices;
export function volumeToSlices(volumes: VolumeInput, seg?: RawNiftiVolume | null, opts: SliceOptions = {}): VolumeSlices {
  const vols: readonly RawNiftiVolume[] = Array.isArray(volumes) ? volumes : [volumes as RawNiftiVolume];
  if (vols.length === 0) badOptions('no volumes to slice');
  const first = vols[0];
  const common = (selection: SliceSelection<UnlabelledSliceInfo>) => ({
    images: sliceImages(vols, selection),
    imageShape: imageShapeOf(selection.slices.length, vols.length, selection.imageSize),
    originalShape: [...first.dims] as [number, number, number],
    orientation: sliceOrientation(first),
  });
  if (seg) {
    const selection = selectSlices(seg, opts);
    const arrays = common(selection);
    return { ...arrays, masks: sliceMasks(seg, selection), slices: selection.slices };
  }
  const o = resolveSliceOptions(opts, false);
  const selection: SliceSelection<UnlabelledSliceInfo> = {
    shape: [...first.dims],
    imageSize: o.imageSize,
    slices: Array.from({ length: first.dims[2] }, (_, z) => ({ slice_idx: z })),
  };
  return { ...common(selection), masks: null, slices: selection.slices };
}

async function readFor(patientId: string, file: string): Promise<RawNiftiVolume> {
  try {
    return await readNiftiRaw(file);
  } catch (err) {
    if (err instanceof DataFileError) {
      throw new PatientDataError(patientId, err.file, (err.details?.reason as string | undefined) ?? err.message, { cause: err });
    }
    throw new PatientDataError(patientId, file, (err as Error).message, { cause: err });
  }
}

/**
 * A patient's volumes as volumeToSlices takes them: the modalities in the order given and, with `seg: true` (or
 * when the patient has one), the segmentation. Errors name the patient and the file; shapes are checked.
 */
export async function readPatientVolumes(
  patient: PatientFiles,
  modalities: string[],
  { seg: needSeg = false }: { seg?: boolean } = {},
): Promise<{ volumes: RawNiftiVolume[]; seg: RawNiftiVolume | null }> {
  const id = patient.patientId;
  const wanted = resolveModalities(modalities);
  for (const m of needSeg ? [...wanted, 'seg'] : wanted) {
    if (!patient.files[m]) throw await missingFile(patient, m);
  }
  const [volumes, seg] = await Promise.all([
    Promise.all(wanted.map((m) => readFor(id, patient.files[m]))),
    patient.files.seg ? readFor(id, patient.files.seg) : Promise.resolve(null),
  ]);
  const shape = (seg ?? volumes[0]).dims;
  volumes.forEach((v, c) => {
    if (!sameShape(v.dims, shape)) throw new PatientDataError(id, patient.files[wanted[c]], `shape ${shapeText(v.dims)} does not match ${shapeText(shape)} of the patient's other volumes`);
  });
  return { volumes, seg };
}

/** Preprocess one patient into outDir/<patientId>/{images.npy, masks.npy, meta.json}; see the module comment. */
export async function preprocessPatient(patient: PatientFiles, outDir: string, opts: PreprocessOptions = {}): Promise<PatientMeta> {
  const sampling = resolveSampling(opts);
  const modalities = resolveModalities(opts.modalities);
  const id = patient.patientId;
  if (!id || id === '.' || id === '..' || /[\\/]/.test(id)) {
    throw new SliceWiseError(`bad patient id "${id}": it names the output directory and cannot contain a path separator`, { status: 400, code: 'bad_patient_id' });
  }
  const paths = patientFiles(outDir, id);
  try {
    for (const m of [...modalities, 'seg']) {
      if (!patient.files[m]) throw await missingFile(patient, m);
    }
    let meta: PatientMeta | undefined;
    // Everything is written into a hidden temporary folder that replaces the patient's folder only once it is
    // complete (meta.json, which marks completion, last): a failure at any point, a shape mismatch found after the
    // masks were made or a worker killed mid-write, leaves no partial output under the patient's name.
    await replaceDirAtomic(paths.dir, async (tmpDir) => {
      meta = await preprocessInto(patient, patientFiles(outDir, basename(tmpDir)), sampling, modalities);
    });
    return meta!;
  } catch (err) {
    // Nor may an earlier attempt's output stay: it would look like this input's result.
    await removeDirAtomic(paths.dir).catch(() => undefined);
    throw err;
  }
}

/** The body of preprocessPatient: reads, checks and slices one patient, writing its files to `paths`. */
async function preprocessInto(patient: PatientFiles, paths: PatientFilePaths, sampling: Required<SamplingOptions>, modalities: string[]): Promise<PatientMeta> {
  const id = patient.patientId;
  // Decompression runs on the thread pool: start every read at once. The labels alone decide which slices are
  // kept, so the masks are made (and written, to the temporary folder) while the images are still inflating.
  const segFile = patient.files.seg;
  const segRead = readFor(id, segFile);
  const imageReads = Promise.all(modalities.map((m) => readFor(id, patient.files[m])));
  imageReads.catch(() => undefined); // awaited below; do not let an early seg failure leave it unhandled
  const seg = await segRead;
  const selection = selectSlices(seg, { ...sampling, keep: 'sampled', sampleKey: id });
  const n = selection.slices.length;
  const size = sampling.imageSize;
  const tooBig = oversizeReason(n, modalities.length, size, 4, 'float32 images');
  if (tooBig) throw new PatientDataError(id, segFile, tooBig);

  const masks = allocNpy('uint8', [n, size, size]);
  sliceMasks(seg, selection, masks.data);
  const maskWrite = writeNewFile(paths.masks, masks.file);
  maskWrite.catch(() => undefined); // awaited below
  try {
    return await imagesAndMeta();
  } catch (err) {
    // Let the masks' write settle first: the caller deletes the temporary folder on failure, and a write still in
    // flight would leave a file in a folder being removed.
    await maskWrite.catch(() => undefined);
    throw err;
  }

  async function imagesAndMeta(): Promise<PatientMeta> {
    const images = await imageReads;
    images.forEach((v, c) => {
      if (!sameShape(v.dims, seg.dims)) {
        const reason = `image shape ${shapeText(v.dims)} does not match the seg shape ${shapeText(seg.dims)} of ${basename(segFile)}`;
        throw new PatientDataError(id, patient.files[modalities[c]], reason);
      }
    });
    const out = allocNpy('float32', imageShapeOf(n, images.length, size));
    try {
      sliceImages(images, selection, out.data);
    } catch (err) {
      if (err instanceof SliceInputError && typeof err.input === 'number') {
        throw new PatientDataError(id, patient.files[modalities[err.input]], err.reason, { cause: err });
      }
      throw err;
    }
    // Both settled before a failure is thrown, for the same reason as above.
    const failed = (await Promise.allSettled([writeNewFile(paths.images, out.file), maskWrite])).find((r) => r.status === 'rejected');
    if (failed) throw failed.reason;

    const source_files: Record<string, string> = {};
    for (const m of [...modalities, 'seg']) source_files[m] = patient.files[m];
    const meta: PatientMeta = {
      patient_id: id,
      source_files,
      original_shape: [...seg.dims],
      pixdim: [...images[0].pixdim],
      modality: [...modalities],
      normalize_method: 'zscore',
      image_size: size,
      num_slices: n,
      orientation: sliceOrientation(images[0]),
      slices: selection.slices,
    };
    await writePatientMeta(paths, meta, { intoFreshFolder: true });
    return meta;
  }
}
