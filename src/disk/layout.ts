/**
 * The data dir's layout: every path under it is built here, and every JSON file a run writes there has its
 * type, its writer and its (validating) reader here. Steps, the model and the API ask this module where things
 * are; none of them joins path segments of its own. No queue, HTTP or database code: the model's threads and the
 * sandboxed preprocessing read it too.
 *
 *   <dataDir>/raw/{brats,kaggle}/<source key>/          downloads, shared between runs (--skip-download)
 *   <dataDir>/runs/<run>/processed/brats/<patient>/     images.npy, masks.npy, meta.json
 *   <dataDir>/runs/<run>/processed/kaggle/              images.npy, labels.npy, meta.json
 *   <dataDir>/runs/<run>/splits/{brats,kaggle}.json
 *   <dataDir>/runs/<run>/results/                        multitask_evaluation.json, phase_comparison.json
 *   <dataDir>/runs/<run>/visualizations/multitask_gradcam/  Grad-CAM PNGs
 *   <dataDir>/runs/<run>/pipeline_results.json
 *   <dataDir>/checkpoints/<run>/<stage>/{epoch-N,best}/  tfjs checkpoints
 *   <dataDir>/pglite/, <dataDir>/redis/                  the embedded database and the private Redis
 */
import { join } from 'node:path';
import { z } from 'zod';
import { writeJsonAtomic, writeNewFile } from '../lib/atomic.ts';
import { readDataFile } from '../lib/data-file.ts';
import { DataFileError } from '../lib/errors.ts';
import type { SplitName } from '../splits/index.ts';

export type Dataset = 'brats' | 'kaggle';
export type { SplitName };
export const SPLIT_NAMES: readonly SplitName[] = ['train', 'val', 'test'];

// ------------------------------------------------------------------------------------------------------------
// Paths
// ------------------------------------------------------------------------------------------------------------

/** Files of one preprocessed BraTS patient (or of the Kaggle set: labels instead of masks). */
export interface PatientFilePaths {
  dir: string;
  images: string;
  masks: string;
  meta: string;
}

export interface KaggleFilePaths {
  dir: string;
  images: string;
  labels: string;
  meta: string;
}

export function pgliteDir(dataDir: string): string {
  return join(dataDir, 'pglite');
}

export function redisDir(dataDir: string): string {
  return join(dataDir, 'redis');
}

/** Raw data is shared between runs, keyed by its source (see download's rawKey). */
export function rawDir(dataDir: string, dataset: Dataset, sourceKey: string): string {
  return join(dataDir, 'raw', dataset, sourceKey.replace(/[^A-Za-z0-9_.-]/g, '_'));
}

/** Where a preprocessed patient's files go, under a processed/brats folder. */
export function patientFiles(processedBratsDir: string, patientId: string): PatientFilePaths {
  const dir = join(processedBratsDir, patientId);
  return { dir, images: join(dir, 'images.npy'), masks: join(dir, 'masks.npy'), meta: join(dir, 'meta.json') };
}

export function kaggleFiles(processedKaggleDir: string): KaggleFilePaths {
  return { dir: processedKaggleDir, images: join(processedKaggleDir, 'images.npy'), labels: join(processedKaggleDir, 'labels.npy'), meta: join(processedKaggleDir, 'meta.json') };
}

export function splitFile(splitsDir: string, dataset: Dataset): string {
  return join(splitsDir, `${dataset}.json`);
}

/** A run's folders and files. Runs that train on another run's data read that run's RunPaths for their inputs. */
export class RunPaths {
  readonly root: string;
  readonly processedBrats: string;
  readonly processedKaggle: string;
  readonly splits: string;
  readonly results: string;
  readonly multitaskEvaluation: string;
  readonly phaseComparison: string;
  readonly gradcam: string;
  readonly pipelineResults: string;
  private readonly checkpointsRoot: string;

  constructor(
    readonly dataDir: string,
    readonly runId: string,
  ) {
    this.root = join(dataDir, 'runs', runId);
    this.processedBrats = join(this.root, 'processed', 'brats');
    this.processedKaggle = join(this.root, 'processed', 'kaggle');
    this.splits = join(this.root, 'splits');
    this.results = join(this.root, 'results');
    this.multitaskEvaluation = join(this.results, 'multitask_evaluation.json');
    this.phaseComparison = join(this.results, 'phase_comparison.json');
    this.gradcam = join(this.root, 'visualizations', 'multitask_gradcam');
    this.pipelineResults = join(this.root, 'pipeline_results.json');
    this.checkpointsRoot = join(dataDir, 'checkpoints', runId);
  }

  patient(patientId: string): PatientFilePaths {
    return patientFiles(this.processedBrats, patientId);
  }

  kaggle(): KaggleFilePaths {
    return kaggleFiles(this.processedKaggle);
  }

  split(dataset: Dataset): string {
    return splitFile(this.splits, dataset);
  }

  /** A training stage's checkpoints: epoch-<n>/ and best/ below it. */
  checkpoints(stage: string): string {
    return join(this.checkpointsRoot, stage);
  }
}

export function runPaths(dataDir: string, runId: string): RunPaths {
  return new RunPaths(dataDir, runId);
}

// ------------------------------------------------------------------------------------------------------------
// JSON files: types, writers, readers
// ------------------------------------------------------------------------------------------------------------

async function readJson(file: string): Promise<unknown> {
  const text = (await readDataFile(file)).toString('utf8');
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new DataFileError(file, `invalid JSON: ${(err as Error).message}`, { cause: err });
  }
}

async function readTyped<T>(file: string, schema: z.ZodType<T>): Promise<T> {
  const res = schema.safeParse(await readJson(file));
  if (!res.success) {
    const issues = res.error.issues.map((i) => `${i.path.join('.') || '(root)'}: ${i.message}`).join('; ');
    throw new DataFileError(file, `unexpected content: ${issues}`);
  }
  return res.data;
}

/** True when the error says the file is not there (as opposed to unreadable or malformed). */
export function isMissingFile(err: unknown): boolean {
  return err instanceof DataFileError && (err.details?.reason as string | undefined) === 'file not found';
}

// --- A preprocessed BraTS patient: meta.json ----------------------------------------------------------------

const SliceInfoSchema = z.object({
  /** Index of the slice along the volume's third axis (k). */
  slice_idx: z.number().int().min(0),
  has_tumor: z.boolean(),
  /** Tumour (label > 0) pixels in the original slice, before resizing. */
  tumor_pixels: z.number().int().min(0),
});
export type SliceInfo = z.infer<typeof SliceInfoSchema>;

/**
 * How images.npy's axes map onto the source volume: slice s is volume[:, :, slices[s].slice_idx], array axis 1
 * is the volume's i axis and axis 2 its j axis (nibabel's and the original's order), resized to image_size.
 */
const OrientationSchema = z.object({
  array_axes: z.tuple([z.literal('k'), z.literal('i'), z.literal('j')]),
  /** The source volume's voxel-to-world axis codes (e.g. 'RAS', 'LPS'), from its qform/sform; null when it has none. */
  axis_codes: z.string().nullable(),
});
export type SliceOrientation = z.infer<typeof OrientationSchema>;

const PatientMetaSchema = z
  .object({
    patient_id: z.string().min(1),
    source_files: z.record(z.string(), z.string()),
    original_shape: z.array(z.number().int()),
    pixdim: z.array(z.number()),
    modality: z.array(z.string()),
    normalize_method: z.literal('zscore'),
    image_size: z.number().int().min(1),
    num_slices: z.number().int().min(0),
    orientation: OrientationSchema,
    /** One entry per output slice, in the order of images.npy / masks.npy. */
    slices: z.array(SliceInfoSchema),
  })
  .refine((m) => m.slices.length === m.num_slices, { message: 'num_slices does not match the slices listed', path: ['num_slices'] });
export type PatientMeta = z.infer<typeof PatientMetaSchema>;

/**
 * Written last, after the arrays it describes: a reader that finds meta.json finds complete arrays.
 * `intoFreshFolder`: `paths` are in a folder replaceDirAtomic is filling (see writeNewFile).
 */
export function writePatientMeta(paths: PatientFilePaths, meta: PatientMeta, { intoFreshFolder = false }: { intoFreshFolder?: boolean } = {}): Promise<void> {
  return intoFreshFolder ? writeNewFile(paths.meta, JSON.stringify(meta, null, 2) + '\n') : writeJsonAtomic(paths.meta, meta);
}

export function readPatientMeta(paths: PatientFilePaths): Promise<PatientMeta> {
  return readTyped(paths.meta, PatientMetaSchema);
}

// --- The preprocessed Kaggle set: meta.json -----------------------------------------------------------------

const KaggleMetaSchema = z.object({
  image_size: z.number().int().min(1),
  /** Processed images, in the row order of images.npy and labels.npy. */
  items: z.array(z.object({ index: z.number().int().min(0), relPath: z.string(), label: z.union([z.literal(0), z.literal(1)]), brain_fraction: z.number() })),
  /** Images the brain mask rejected, with the reason; they are in no array. */
  rejected: z.array(z.object({ relPath: z.string(), reason: z.string(), label: z.union([z.literal(0), z.literal(1)]).optional() })),
});
export type KaggleMeta = z.infer<typeof KaggleMetaSchema>;

export function writeKaggleMeta(paths: KaggleFilePaths, meta: KaggleMeta): Promise<void> {
  return writeJsonAtomic(paths.meta, meta);
}

export function readKaggleMeta(paths: KaggleFilePaths): Promise<KaggleMeta> {
  return readTyped(paths.meta, KaggleMetaSchema);
}

// --- splits/{brats,kaggle}.json -----------------------------------------------------------------------------

const Ratios = z.object({ train: z.number(), val: z.number(), test: z.number() });
const splitSchema = <T extends z.ZodType>(item: T) =>
  z.object({
    seed: z.number().int().optional(),
    ratios: Ratios.optional(),
    /** The processed folder the ids or row indices refer to. */
    processed_dir: z.string().min(1),
    train: z.array(item),
    val: z.array(item),
    test: z.array(item),
  });
const BratsSplitSchema = splitSchema(z.string().min(1)).extend({
  /** Slices per split, for people reading the file. */
  slices: z.object({ train: z.number(), val: z.number(), test: z.number() }).optional(),
});
const KaggleSplitSchema = splitSchema(z.number().int().min(0));
/** Patient ids per split. */
export type BratsSplit = z.infer<typeof BratsSplitSchema>;
/** Row indices of processed/kaggle's arrays per split. */
export type KaggleSplit = z.infer<typeof KaggleSplitSchema>;

export function writeBratsSplit(file: string, split: BratsSplit): Promise<void> {
  return writeJsonAtomic(file, split);
}

export function writeKaggleSplit(file: string, split: KaggleSplit): Promise<void> {
  return writeJsonAtomic(file, split);
}

function readBratsSplit(file: string): Promise<BratsSplit> {
  return readTyped(file, BratsSplitSchema);
}

function readKaggleSplit(file: string): Promise<KaggleSplit> {
  return readTyped(file, KaggleSplitSchema);
}

/** Both split files of a splits folder; either may be absent (null). */
export async function readSplits(splitsDir: string): Promise<{ brats: BratsSplit | null; kaggle: KaggleSplit | null }> {
  const optional = async <T>(read: () => Promise<T>): Promise<T | null> => {
    try {
      return await read();
    } catch (err) {
      if (isMissingFile(err)) return null;
      throw err;
    }
  };
  return {
    brats: await optional(() => readBratsSplit(splitFile(splitsDir, 'brats'))),
    kaggle: await optional(() => readKaggleSplit(splitFile(splitsDir, 'kaggle'))),
  };
}

// --- pipeline_results.json ----------------------------------------------------------------------------------

export type ResultStepStatus = 'success' | 'failed' | 'timeout' | 'cancelled' | 'skipped' | 'pending' | 'running';

/** The original controller's results file (REFERENCE.md), written by finalize and by `slicewise pipeline`. */
export interface PipelineResults {
  run_id: string;
  start_time: string | null;
  end_time: string | null;
  mode: string;
  training_mode: string;
  success: boolean;
  status: string;
  error?: string;
  total_duration_seconds: number | null;
  steps: Record<string, { status: ResultStepStatus; duration_seconds: number | null; command: string; attempts: number; counts: Record<string, number>; error?: string }>;
}

export function writePipelineResults(file: string, results: PipelineResults): Promise<void> {
  return writeJsonAtomic(file, results);
}
