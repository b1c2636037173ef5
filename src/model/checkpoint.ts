/**
 * Checkpoints in the tfjs weights format: a folder with
 *
 *   model.json           {format: 'slicewise-unet', formatVersion, config, weightsManifest: [{paths: ['weights.bin'],
 *                         weights: [{name, shape, dtype, group, kind}]}], sha256: {'weights.bin': ...}}
 *   weights.bin          every parameter then every BatchNorm buffer, float32 little-endian, in manifest order
 *   training_state.json  (optional, for resume) epoch, metrics, best metric, early-stopping state, history, and the
 *                         optimizer's hyper-parameters, groups and slot manifest
 *   optimizer.bin        (with training_state.json) AdamW m then v of every slot, float32, in slot order
 *
 * Every file is written atomically (write to a temporary name, rename); model.json is written last and carries the
 * sha256 of weights.bin, training_state.json those of weights.bin and optimizer.bin, so a reader never trusts a
 * half-replaced checkpoint: loading verifies the digests.
 *
 * loadCheckpoint can restrict loading to some parameter groups (e.g. stage 2 takes encoder + decoder from stage 1
 * and keeps its freshly initialised head). A group is loaded under exactly its own names: the original reloaded
 * the decoder under the wrong key and silently trained stage 3 from a random decoder; here a name or shape that
 * does not match is an error.
 */
import { createHash } from 'node:crypto';
import { readdir, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { writeFileAtomic } from '../lib/atomic.js';
import { fileAccessError, readDataFile } from '../lib/data-file.js';
import { DataFileError, SliceWiseError } from '../lib/errors.js';
import type { AdamWState, EarlyStoppingState } from './optim.js';
import { createUNet, groupOfName, PARAM_GROUPS, type ParamGroup, type UNetConfig, type UNetModel } from './unet.js';

const MODEL_FORMAT = 'slicewise-unet';
const FORMAT_VERSION = 1;

interface WeightEntry {
  name: string;
  shape: number[];
  dtype: 'float32';
  group: ParamGroup;
  kind: 'param' | 'buffer';
}

interface ModelJson {
  format: typeof MODEL_FORMAT;
  formatVersion: number;
  config: UNetConfig;
  weightsManifest: { paths: string[]; weights: WeightEntry[] }[];
  sha256: { 'weights.bin': string };
  /** Free-form: stage, epoch, metrics... */
  userDefinedMetadata?: Record<string, unknown>;
}

export interface EpochRecord {
  epoch: number;
  trainLoss: number;
  lr: number;
  seconds: number;
  metric: number | null;
  valMetrics: Record<string, number | null>;
}

/** What a resume needs besides the weights. */
export interface TrainingState {
  stage?: string;
  /** The last completed epoch (1-based). */
  epoch: number;
  metrics?: Record<string, number | null>;
  bestMetric?: number | null;
  bestEpoch?: number | null;
  earlyStopping?: EarlyStoppingState | null;
  history?: EpochRecord[];
  /** Anything else worth keeping (run config, seed...). */
  extra?: Record<string, unknown>;
}

interface OptimizerManifest {
  kind: 'adamw';
  betas: [number, number];
  eps: number;
  weightDecay: number;
  groups: AdamWState['groups'];
  slots: { name: string; shape: number[]; step: number }[];
  file: 'optimizer.bin';
  sha256: string;
}

interface TrainingStateJson extends TrainingState {
  format: 'slicewise-training-state';
  formatVersion: number;
  weightsSha256: string;
  optimizer: OptimizerManifest | null;
}

interface SaveResult {
  dir: string;
  /** sha256 (hex) per file written. */
  files: Record<string, string>;
}

const sha256 = (data: Uint8Array | string): string => createHash('sha256').update(data).digest('hex');

function floatBytes(arrays: Float32Array[]): Buffer {
  const total = arrays.reduce((s, a) => s + a.length, 0);
  const out = Buffer.alloc(total * 4);
  let off = 0;
  for (const a of arrays) {
    // Float32Array is little-endian on every platform Node runs on; copy the raw bytes.
    out.set(new Uint8Array(a.buffer, a.byteOffset, a.byteLength), off);
    off += a.byteLength;
  }
  return out;
}

function floatsAt(buf: Buffer, offset: number, count: number): Float32Array {
  const copy = new Float32Array(count);
  new Uint8Array(copy.buffer).set(buf.subarray(offset, offset + count * 4));
  return copy;
}

const size = (shape: number[]): number => shape.reduce((a, b) => a * b, 1);

/**
 * Save the model (and, for resume, the training state and optimizer state) to `dir`. Returns the sha256 of each
 * file written.
 */
export async function saveCheckpoint(
  dir: string,
  model: UNetModel,
  opts: { trainingState?: TrainingState; optimizer?: AdamWState; metadata?: Record<string, unknown> } = {},
): Promise<SaveResult> {
  const entries: WeightEntry[] = [];
  const arrays: Float32Array[] = [];
  for (const [kind, map] of [
    ['param', model.params],
    ['buffer', model.buffers],
  ] as const) {
    for (const [name, v] of map) {
      entries.push({ name, shape: [...v.shape], dtype: 'float32', group: groupOfName(name), kind });
      arrays.push(v.dataSync() as Float32Array);
    }
  }
  const weights = floatBytes(arrays);
  const files: Record<string, string> = {};
  files['weights.bin'] = sha256(weights);

  // Drop model.json first: until the new one lands, the folder does not claim to hold a checkpoint.
  await rm(join(dir, 'model.json'), { force: true });
  await writeFileAtomic(join(dir, 'weights.bin'), weights);

  if (opts.trainingState) {
    let optimizer: OptimizerManifest | null = null;
    if (opts.optimizer) {
      const o = opts.optimizer;
      const bin = floatBytes(o.slots.flatMap((s) => [s.m, s.v]));
      files['optimizer.bin'] = sha256(bin);
      await writeFileAtomic(join(dir, 'optimizer.bin'), bin);
      optimizer = {
        kind: 'adamw',
        betas: o.betas,
        eps: o.eps,
        weightDecay: o.weightDecay,
        groups: o.groups,
        slots: o.slots.map((s) => ({ name: s.name, shape: s.shape, step: s.step })),
        file: 'optimizer.bin',
        sha256: files['optimizer.bin'],
      };
    } else {
      await rm(join(dir, 'optimizer.bin'), { force: true });
    }
    const state: TrainingStateJson = {
      format: 'slicewise-training-state',
      formatVersion: FORMAT_VERSION,
      ...opts.trainingState,
      weightsSha256: files['weights.bin'],
      optimizer,
    };
    const text = JSON.stringify(state, null, 2) + '\n';
    files['training_state.json'] = sha256(text);
    await writeFileAtomic(join(dir, 'training_state.json'), text);
  } else {
    await rm(join(dir, 'training_state.json'), { force: true });
    await rm(join(dir, 'optimizer.bin'), { force: true });
  }

  const modelJson: ModelJson = {
    format: MODEL_FORMAT,
    formatVersion: FORMAT_VERSION,
    config: model.config,
    weightsManifest: [{ paths: ['weights.bin'], weights: entries }],
    sha256: { 'weights.bin': files['weights.bin'] },
  };
  if (opts.metadata) modelJson.userDefinedMetadata = opts.metadata;
  const text = JSON.stringify(modelJson, null, 2) + '\n';
  files['model.json'] = sha256(text);
  await writeFileAtomic(join(dir, 'model.json'), text);
  return { dir, files };
}

/** Parse and check model.json. */
export async function readModelJson(dir: string): Promise<ModelJson> {
  const file = join(dir, 'model.json');
  const text = (await readDataFile(file)).toString('utf8');
  let m: ModelJson;
  try {
    m = JSON.parse(text) as ModelJson;
  } catch (err) {
    throw new DataFileError(file, `invalid JSON: ${(err as Error).message}`, { cause: err });
  }
  if (m.format !== MODEL_FORMAT) throw new DataFileError(file, `not a ${MODEL_FORMAT} checkpoint (format ${JSON.stringify(m.format)})`);
  if (m.formatVersion > FORMAT_VERSION) throw new DataFileError(file, `format version ${m.formatVersion} is newer than this reader (${FORMAT_VERSION})`);
  const wm = m.weightsManifest;
  if (!Array.isArray(wm) || wm.length !== 1 || wm[0]!.paths.length !== 1) throw new DataFileError(file, 'expected one weights group with one file');
  return m;
}

interface LoadOptions {
  /** Groups to load (default all); the others keep their initial values. */
  groups?: readonly ParamGroup[];
  /** Load into this model instead of creating one (its architecture must match). */
  model?: UNetModel;
  /** Seed for the new model's initialisation of the groups not loaded (default 42). */
  seed?: number;
}

interface LoadResult {
  model: UNetModel;
  config: UNetConfig;
  /** Names of the parameters and buffers loaded. */
  loaded: string[];
  /** sha256 of weights.bin (verified). */
  weightsSha256: string;
  modelJson: ModelJson;
}

function sameArch(a: UNetConfig, b: UNetConfig): boolean {
  return a.base === b.base && a.depth === b.depth && a.headHidden === b.headHidden && a.inChannels === b.inChannels;
}

/** Load a checkpoint: into `opts.model`, or into a new model built from the saved config. */
export async function loadCheckpoint(dir: string, opts: LoadOptions = {}): Promise<LoadResult> {
  const modelJson = await readModelJson(dir);
  const { config } = modelJson;
  const groups = opts.groups ?? PARAM_GROUPS;
  for (const g of groups) if (!PARAM_GROUPS.includes(g)) throw new RangeError(`unknown parameter group "${g}"`);
  const weightsFile = join(dir, modelJson.weightsManifest[0]!.paths[0]!);
  const bytes = await readDataFile(weightsFile);
  const digest = sha256(bytes);
  if (digest !== modelJson.sha256?.['weights.bin']) {
    throw new DataFileError(weightsFile, `sha256 ${digest} does not match model.json (${modelJson.sha256?.['weights.bin']}): the checkpoint is incomplete or was modified`);
  }
  const entries = modelJson.weightsManifest[0]!.weights;
  const expected = entries.reduce((s, e) => s + size(e.shape) * 4, 0);
  if (bytes.length !== expected) throw new DataFileError(weightsFile, `${bytes.length} bytes, the manifest describes ${expected}`);

  if (opts.model && !sameArch(opts.model.config, config)) {
    throw new SliceWiseError(
      `checkpoint ${dir} has architecture ${JSON.stringify(config)}, the model ${JSON.stringify(opts.model.config)}`,
      { status: 422, code: 'checkpoint_mismatch' },
    );
  }
  const model = opts.model ?? createUNet({ base: config.base, depth: config.depth, headHidden: config.headHidden }, { inChannels: config.inChannels, seed: opts.seed });

  const loaded: string[] = [];
  const seen = new Set<string>();
  try {
    let offset = 0;
    const assignments: [string, tf.Variable, Float32Array][] = [];
    for (const e of entries) {
      const n = size(e.shape);
      const at = offset;
      offset += n * 4;
      if (e.dtype !== 'float32') throw new DataFileError(weightsFile, `${e.name}: unsupported dtype ${e.dtype}`);
      const group = groupOfName(e.name);
      if (!groups.includes(group)) continue;
      const v = (e.kind === 'buffer' ? model.buffers : model.params).get(e.name);
      if (!v) throw new SliceWiseError(`checkpoint ${dir}: ${e.name} has no counterpart in the model`, { status: 422, code: 'checkpoint_mismatch' });
      if (v.shape.join('x') !== e.shape.join('x')) {
        throw new SliceWiseError(`checkpoint ${dir}: ${e.name} has shape [${e.shape.join(', ')}], the model [${v.shape.join(', ')}]`, {
          status: 422,
          code: 'checkpoint_mismatch',
        });
      }
      assignments.push([e.name, v, floatsAt(bytes, at, n)]);
      seen.add(`${e.kind}:${e.name}`);
    }
    // Every parameter and buffer of the requested groups must come from the checkpoint.
    for (const [kind, map] of [
      ['param', model.params],
      ['buffer', model.buffers],
    ] as const) {
      for (const name of map.keys()) {
        if (groups.includes(groupOfName(name)) && !seen.has(`${kind}:${name}`)) {
          throw new SliceWiseError(`checkpoint ${dir} lacks ${name} (group ${groupOfName(name)})`, { status: 422, code: 'checkpoint_mismatch' });
        }
      }
    }
    for (const [name, v, data] of assignments) {
      tf.tidy(() => v.assign(tf.tensor(data, v.shape, 'float32')));
      loaded.push(name);
    }
  } catch (err) {
    if (!opts.model) model.dispose();
    throw err;
  }
  return { model, config, loaded, weightsSha256: digest, modelJson };
}

interface LoadedTrainingState extends TrainingState {
  optimizer: AdamWState | null;
  weightsSha256: string;
}

/** Read training_state.json (+ optimizer.bin) of a checkpoint; null when the checkpoint has none. */
export async function readTrainingState(dir: string): Promise<LoadedTrainingState | null> {
  const file = join(dir, 'training_state.json');
  let raw: Buffer;
  try {
    raw = await readFile(file);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw fileAccessError(file, err, 'read');
  }
  let s: TrainingStateJson;
  try {
    s = JSON.parse(raw.toString('utf8')) as TrainingStateJson;
  } catch (err) {
    throw new DataFileError(file, `invalid JSON: ${(err as Error).message}`, { cause: err });
  }
  if (s.format !== 'slicewise-training-state') throw new DataFileError(file, 'not a slicewise training state');
  const modelJson = await readModelJson(dir);
  if (modelJson.sha256['weights.bin'] !== s.weightsSha256) {
    throw new DataFileError(file, 'belongs to other weights than model.json describes (interrupted save?)');
  }
  let optimizer: AdamWState | null = null;
  if (s.optimizer) {
    const o = s.optimizer;
    const binFile = join(dir, o.file);
    const bin = await readDataFile(binFile);
    if (sha256(bin) !== o.sha256) throw new DataFileError(binFile, 'sha256 does not match training_state.json');
    const expected = o.slots.reduce((t, sl) => t + 2 * size(sl.shape) * 4, 0);
    if (bin.length !== expected) throw new DataFileError(binFile, `${bin.length} bytes, the manifest describes ${expected}`);
    let off = 0;
    const slots = o.slots.map((sl) => {
      const n = size(sl.shape);
      const m = floatsAt(bin, off, n);
      off += n * 4;
      const v = floatsAt(bin, off, n);
      off += n * 4;
      return { name: sl.name, shape: sl.shape, step: sl.step, m, v };
    });
    optimizer = { kind: 'adamw', betas: o.betas, eps: o.eps, weightDecay: o.weightDecay, groups: o.groups, slots };
  }
  const { format: _f, formatVersion: _v, optimizer: _o, ...rest } = s;
  return { ...rest, optimizer };
}

/** Epoch checkpoint folders (epoch-<n>) under `root`, oldest first. */
async function listEpochCheckpoints(root: string): Promise<{ epoch: number; dir: string }[]> {
  let names: string[];
  try {
    names = await readdir(root);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw err;
  }
  return names
    .map((n) => /^epoch-(\d+)$/.exec(n))
    .filter((m): m is RegExpExecArray => m !== null)
    .map((m) => ({ epoch: Number(m[1]), dir: join(root, m[0]) }))
    .sort((a, b) => a.epoch - b.epoch);
}

/** Remove all but the newest `keep` epoch checkpoints; returns the folders removed. */
export async function pruneEpochCheckpoints(root: string, keep: number): Promise<string[]> {
  const all = await listEpochCheckpoints(root);
  const drop = all.slice(0, Math.max(0, all.length - Math.max(1, keep)));
  for (const d of drop) await rm(d.dir, { recursive: true, force: true });
  return drop.map((d) => d.dir);
}

/** The newest complete epoch checkpoint under `root` (with a readable training state), or null. */
export async function latestEpochCheckpoint(root: string): Promise<{ epoch: number; dir: string } | null> {
  const all = await listEpochCheckpoints(root);
  for (let i = all.length - 1; i >= 0; i--) {
    try {
      if (await readTrainingState(all[i]!.dir)) return all[i]!;
    } catch {
      // incomplete or damaged: try an older one
    }
  }
  return null;
}
