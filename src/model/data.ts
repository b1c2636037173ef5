/**
 * Training data from the pipeline's outputs, streamed in batches with bounded memory.
 *
 * Inputs (paths and meta.json from src/disk/layout.ts; the split files that list them are read there too):
 * - BraTS: a processed/brats folder's patientFiles: images.npy (float32 N x H x W, or N x C x H x W), masks.npy
 *   (uint8 N x H x W), meta.json (num_slices); a slice's class label is 1 when its mask has >= clsTumorPixels pixels.
 * - Kaggle: kaggleFiles: images.npy (float32 N x H x W, read row by row), labels.npy (uint8 N); no masks.
 *
 * Memory: BraTS patients are decoded whole (readNpy) into an LRU cache of at most `maxCachedPatients` (8)
 * patients; Kaggle images are read one at a time at their offset in images.npy (only labels.npy is held). Nothing
 * ever holds the whole dataset.
 *
 * Order, with shuffle: the patient list is shuffled (seeded by seed + epoch), cut into windows of
 * `maxCachedPatients` patients, and the slices of each window are shuffled together, so every batch mixes slices
 * of several patients while each patient is decoded once per pass. Kaggle indices are shuffled globally.
 * Without shuffle (validation / test): BraTS patients in the given order, slices in file order, then Kaggle
 * indices in the given order; every sample exactly once.
 *
 * Mixing (both sources, shuffle on): sample k of the epoch is BraTS when floor((k + 1) p) > floor(k p), p the
 * BraTS share, so every prefix of the epoch holds the proportion to within one sample. With `mix` (e.g. the
 * original's 0.3 / 0.7, which it configured and ignored) p = mix.brats / (mix.brats + mix.kaggle), each source
 * cycles (reshuffled on each pass) as needed, and the epoch has `epochSize` samples (default: the two sources'
 * sizes added). Without `mix`, p is the natural share and every sample is drawn exactly once per epoch.
 */
import { kaggleFiles, patientFiles, readPatientMeta } from '../disk/layout.ts';
import { openNpyRows, readNpy, type NpyRows } from '../imaging/npy.js';
import { DataFileError, SliceWiseError } from '../lib/errors.js';
import { deriveSeed, mulberry32, shuffled } from '../lib/random.js';

type SourceName = 'brats' | 'kaggle';

export interface Batch {
  /** N x H x W x C images. */
  x: Float32Array;
  /** N x H x W x 1 masks, 0/1 (zeros for samples without a mask); null when no sample of the batch has one. */
  mask: Float32Array | null;
  /** [N] 1 when the sample has a mask (BraTS), 0 otherwise (Kaggle). */
  hasMask: Float32Array;
  /** [N] class labels (1 = tumour). */
  clsLabel: Int32Array;
  n: number;
  height: number;
  width: number;
  channels: number;
  source: SourceName[];
  /** `${patientId}:${sliceIndex}` or `kaggle:${rowIndex}`. */
  ids: string[];
}

export interface BatchOptions {
  brats?: { dir: string; patients: readonly string[] };
  kaggle?: { dir: string; indices: readonly number[] };
  /** Source proportions (need not sum to 1); only used when both sources are given and shuffle is on. */
  mix?: { brats: number; kaggle: number };
  batchSize: number;
  shuffle: boolean;
  seed: number;
  epoch: number;
  /** A BraTS slice is 'tumour' for classification when its mask has at least this many pixels (default 10). */
  clsTumorPixels?: number;
  /** LRU size of decoded BraTS patients (default 8). */
  maxCachedPatients?: number;
  /** Samples per epoch when mixing with `mix` (default: BraTS slices + Kaggle images). */
  epochSize?: number;
  /** Drop a last, smaller batch (default false). */
  dropLast?: boolean;
  /** Filled in while iterating (for tests and logs). */
  stats?: LoaderStats;
}

interface LoaderStats {
  /** Number of times a patient's arrays were decoded. */
  patientLoads: number;
  /** Largest number of decoded patients held at once. */
  maxResidentPatients: number;
  /** Kaggle images read. */
  kaggleReads: number;
  /** Samples yielded per source. */
  samples: Record<SourceName, number>;
}

export function newLoaderStats(): LoaderStats {
  return { patientLoads: 0, maxResidentPatients: 0, kaggleReads: 0, samples: { brats: 0, kaggle: 0 } };
}

// ----------------------------------------------------------------------------------------------------------
// BraTS patients (LRU of decoded arrays)
// ----------------------------------------------------------------------------------------------------------

interface PatientArrays {
  images: Float32Array;
  masks: Uint8Array;
  slices: number;
  channels: number;
  height: number;
  width: number;
}

async function patientSliceCount(dir: string, id: string): Promise<number> {
  return (await readPatientMeta(patientFiles(dir, id))).num_slices;
}

async function loadPatient(dir: string, id: string): Promise<PatientArrays> {
  const { images: imgFile, masks: maskFile } = patientFiles(dir, id);
  const [img, mask] = await Promise.all([readNpy(imgFile), readNpy(maskFile)]);
  if (!(img.data instanceof Float32Array)) throw new DataFileError(imgFile, `expected float32 images, found ${img.dtype}`);
  if (!(mask.data instanceof Uint8Array)) throw new DataFileError(maskFile, `expected uint8 masks, found ${mask.dtype}`);
  let slices: number, channels: number, height: number, width: number;
  if (img.shape.length === 3) [slices, height, width] = img.shape as [number, number, number];
  else if (img.shape.length === 4) [slices, channels, height, width] = img.shape as [number, number, number, number];
  else throw new DataFileError(imgFile, `expected N x H x W or N x C x H x W, found shape (${img.shape.join(', ')})`);
  channels ??= 1;
  const ms = mask.shape;
  const maskOk = (ms.length === 3 && ms[0] === slices && ms[1] === height && ms[2] === width) || (ms.length === 4 && ms[0] === slices && ms[1] === 1 && ms[2] === height && ms[3] === width);
  if (!maskOk) throw new DataFileError(maskFile, `mask shape (${ms.join(', ')}) does not match images (${img.shape.join(', ')})`);
  return { images: img.data, masks: mask.data, slices, channels, height, width };
}

class PatientCache {
  private readonly map = new Map<string, Promise<PatientArrays>>();
  constructor(
    private readonly dir: string,
    private readonly capacity: number,
    private readonly stats: LoaderStats,
  ) {}

  get(id: string): Promise<PatientArrays> {
    const hit = this.map.get(id);
    if (hit) {
      this.map.delete(id); // move to most-recent
      this.map.set(id, hit);
      return hit;
    }
    while (this.map.size >= this.capacity) this.map.delete(this.map.keys().next().value!);
    const p = loadPatient(this.dir, id);
    this.map.set(id, p);
    p.catch(() => this.map.delete(id));
    this.stats.patientLoads += 1;
    this.stats.maxResidentPatients = Math.max(this.stats.maxResidentPatients, this.map.size);
    return p;
  }
}

// ----------------------------------------------------------------------------------------------------------
// Sample order
// ----------------------------------------------------------------------------------------------------------

type Ref = { source: 'brats'; patient: string; slice: number } | { source: 'kaggle'; index: number };

/** One pass over the BraTS slices: patient windows, shuffled within each window (or in order). */
function* bratsPass(patients: readonly string[], counts: Map<string, number>, shuffle: boolean, window: number, rng: () => number): Generator<Ref> {
  const order = shuffle ? shuffled(patients, rng) : patients;
  for (let w = 0; w < order.length; w += window) {
    const refs: Ref[] = [];
    for (const patient of order.slice(w, w + window)) {
      const n = counts.get(patient) ?? 0;
      for (let slice = 0; slice < n; slice++) refs.push({ source: 'brats', patient, slice });
    }
    yield* shuffle ? shuffled(refs, rng) : refs;
  }
}

function* kagglePass(indices: readonly number[], shuffle: boolean, rng: () => number): Generator<Ref> {
  for (const index of shuffle ? shuffled(indices, rng) : indices) yield { source: 'kaggle', index };
}

/** Endless passes (reshuffled each time); a generator that yields nothing ends the stream. */
function* cycle(pass: (k: number) => Generator<Ref>): Generator<Ref> {
  for (let k = 0; ; k++) {
    let any = false;
    for (const r of pass(k)) {
      any = true;
      yield r;
    }
    if (!any) return;
  }
}

// ----------------------------------------------------------------------------------------------------------
// Batches
// ----------------------------------------------------------------------------------------------------------

/** Stream an epoch's batches; see the module comment for order, mixing and memory. */
export async function* createBatches(opts: BatchOptions): AsyncGenerator<Batch> {
  const { batchSize, shuffle, seed, epoch } = opts;
  if (!Number.isInteger(batchSize) || batchSize < 1) throw new RangeError(`batchSize must be a positive integer, got ${batchSize}`);
  const clsTumorPixels = opts.clsTumorPixels ?? 10;
  const capacity = Math.max(1, opts.maxCachedPatients ?? 8);
  const stats = opts.stats ?? newLoaderStats();

  const counts = new Map<string, number>();
  let nBrats = 0;
  if (opts.brats) {
    for (const id of opts.brats.patients) {
      const n = await patientSliceCount(opts.brats.dir, id);
      counts.set(id, n);
      nBrats += n;
    }
  }
  const cache = opts.brats ? new PatientCache(opts.brats.dir, capacity, stats) : null;

  let kaggle: NpyRows | null = null;
  let labels: Uint8Array | null = null;
  if (opts.kaggle && opts.kaggle.indices.length > 0) {
    const files = kaggleFiles(opts.kaggle.dir);
    kaggle = await openNpyRows(files.images);
    const labelFile = files.labels;
    const l = await readNpy(labelFile).catch(async (err) => {
      await kaggle?.close();
      throw err;
    });
    if (!(l.data instanceof Uint8Array) || l.shape.length !== 1 || l.shape[0] !== kaggle.rows) {
      await kaggle.close();
      throw new DataFileError(labelFile, `expected uint8 labels of length ${kaggle.rows}, found ${l.dtype} (${l.shape.join(', ')})`);
    }
    labels = l.data;
    for (const i of opts.kaggle.indices) {
      if (i >= kaggle.rows) {
        await kaggle.close();
        throw new SliceWiseError(`kaggle index ${i} is out of range: ${kaggle.file} has ${kaggle.rows} images`, {
          status: 422,
          code: 'bad_split',
        });
      }
    }
  }
  const nKaggle = kaggle ? opts.kaggle!.indices.length : 0;

  // The sample stream of this epoch.
  const bratsRng = mulberry32(deriveSeed(seed, 'brats-order', String(epoch)));
  const kaggleRng = mulberry32(deriveSeed(seed, 'kaggle-order', String(epoch)));
  const bratsOnce = (): Generator<Ref> => bratsPass(opts.brats?.patients ?? [], counts, shuffle, capacity, bratsRng);
  const kaggleOnce = (): Generator<Ref> => kagglePass(opts.kaggle?.indices ?? [], shuffle, kaggleRng);
  let stream: Generator<Ref>;
  if (!shuffle || nBrats === 0 || nKaggle === 0) {
    stream = (function* () {
      yield* bratsOnce();
      yield* kaggleOnce();
    })();
  } else {
    const mixed = opts.mix !== undefined;
    if (mixed && !(opts.mix!.brats >= 0 && opts.mix!.kaggle >= 0 && opts.mix!.brats + opts.mix!.kaggle > 0)) {
      throw new RangeError(`mix proportions must be >= 0 and not both 0, got ${JSON.stringify(opts.mix)}`);
    }
    const num = mixed ? opts.mix!.brats : nBrats;
    const den = mixed ? opts.mix!.brats + opts.mix!.kaggle : nBrats + nKaggle;
    const total = mixed ? (opts.epochSize ?? nBrats + nKaggle) : nBrats + nKaggle;
    const b = mixed ? cycle(() => bratsOnce()) : bratsOnce();
    const k = mixed ? cycle(() => kaggleOnce()) : kaggleOnce();
    stream = (function* () {
      for (let i = 0; i < total; i++) {
        const fromBrats = Math.floor(((i + 1) * num) / den) > Math.floor((i * num) / den);
        const next = (fromBrats ? b : k).next();
        if (next.done) return;
        yield next.value;
      }
    })();
  }

  let shape: { height: number; width: number; channels: number } | null = null;
  const setShape = (h: number, w: number, c: number, what: string): void => {
    if (!shape) shape = { height: h, width: w, channels: c };
    else if (shape.height !== h || shape.width !== w || shape.channels !== c) {
      throw new SliceWiseError(
        `${what} has ${c} x ${h} x ${w} images but the batch has ${shape.channels} x ${shape.height} x ${shape.width}: all sources must share one image size`,
        { status: 422, code: 'shape_mismatch' },
      );
    }
  };

  try {
    let pending: Ref[] = [];
    const emit = async (refs: Ref[]): Promise<Batch> => {
      const n = refs.length;
      // Resolve the first sample's shape before allocating.
      const arrays: (PatientArrays | null)[] = [];
      for (const r of refs) {
        if (r.source === 'brats') {
          const p = await cache!.get(r.patient);
          if (r.slice >= p.slices) {
            throw new DataFileError(patientFiles(opts.brats!.dir, r.patient).images, `meta.json lists more slices than the arrays hold (${p.slices})`);
          }
          setShape(p.height, p.width, p.channels, `patient ${r.patient}`);
          arrays.push(p);
        } else {
          const [, h, w] = kaggle!.shape;
          setShape(h, w, 1, 'the Kaggle set');
          arrays.push(null);
        }
      }
      const { height, width, channels } = shape!;
      const area = height * width;
      const x = new Float32Array(n * area * channels);
      const mask = new Float32Array(n * area);
      const hasMask = new Float32Array(n);
      const clsLabel = new Int32Array(n);
      const source: SourceName[] = [];
      const ids: string[] = [];
      let anyMask = false;
      for (let i = 0; i < n; i++) {
        const r = refs[i]!;
        if (r.source === 'brats') {
          const p = arrays[i]!;
          const base = r.slice * area * p.channels;
          if (p.channels === 1) x.set(p.images.subarray(base, base + area), i * area);
          else {
            for (let c = 0; c < p.channels; c++) {
              for (let k = 0; k < area; k++) x[(i * area + k) * p.channels + c] = p.images[base + c * area + k]!;
            }
          }
          let pixels = 0;
          const mb = r.slice * area;
          for (let k = 0; k < area; k++) {
            if (p.masks[mb + k]! > 0) {
              mask[i * area + k] = 1;
              pixels++;
            }
          }
          hasMask[i] = 1;
          anyMask = true;
          clsLabel[i] = pixels >= clsTumorPixels ? 1 : 0;
          source.push('brats');
          ids.push(`${r.patient}:${r.slice}`);
          stats.samples.brats += 1;
        } else {
          await kaggle!.readRow(r.index, x, i * area);
          clsLabel[i] = labels![r.index]! > 0 ? 1 : 0;
          source.push('kaggle');
          ids.push(`kaggle:${r.index}`);
          stats.kaggleReads += 1;
          stats.samples.kaggle += 1;
        }
      }
      return { x, mask: anyMask ? mask : null, hasMask, clsLabel, n, height, width, channels, source, ids };
    };
    for (const ref of stream) {
      pending.push(ref);
      if (pending.length === batchSize) {
        const refs = pending;
        pending = [];
        yield await emit(refs);
      }
    }
    if (pending.length > 0 && !opts.dropLast) yield await emit(pending);
  } finally {
    await kaggle?.close();
  }
}
