/**
 * `slicewise predict`: a finished run's final model on images (JPEG, PNG) and NIfTI volumes, the files a user
 * has rather than a dataset. Images get a row in predictions.csv / predictions.json and a mask and a Grad-CAM PNG;
 * volumes get a segmentation NIfTI in the input's own geometry and a JSON with the per-slice results and the
 * tumour volume. The work runs in the demo's inference threads (src/serving), one per core; a bad file is
 * reported and skipped. Reads the run from the database (no Redis needed).
 */
import { open, readdir, readFile, stat } from 'node:fs/promises';
import { availableParallelism } from 'node:os';
import { basename, dirname, extname, join, relative, resolve, sep } from 'node:path';
import cliProgress from 'cli-progress';
import { openDb } from '../db/client.ts';
import { pgliteDir } from '../disk/layout.ts';
import { discoverPatients, parseLayout, type BratsLayout } from '../imaging/layout.ts';
import { niftiHeaderBytes } from '../imaging/nifti.ts';
import { writeLabelsLike } from '../imaging/nifti-write.ts';
import { writeFileAtomic, writeJsonAtomic } from '../lib/atomic.ts';
import { SliceWiseError } from '../lib/errors.ts';
import { getRunRow } from '../runs/store.ts';
import { InferencePool, type VolumeResult } from '../serving/inference-pool.ts';
import { resolveServedModel, type ServedModel } from '../serving/served-model.ts';
import { painter } from './follow.ts';

export interface PredictOptions {
  runId: string;
  /** An image, a NIfTI volume, or a folder of them (searched recursively); with bratsLayout, a folder of patients. */
  input: string;
  /** Output folder. */
  out: string;
  dataDir: string;
  /** A pixel is tumour above this probability. Default: the run's evaluation threshold (0.5). */
  threshold?: number;
  /** modality=pattern pairs (as `evaluate --brats-layout`, seg optional), or 'official' for BraTS file names. */
  bratsLayout?: string;
  /** Inference threads. Default: one per core (at most one per file). */
  threads?: number;
  say(line: string): void;
}

export interface PredictFailure {
  file: string;
  error: string;
}

export interface ImageRow {
  file: string;
  predicted_label: 'tumor' | 'no_tumor';
  predicted_class: 0 | 1;
  tumor_probability: number;
  confidence: number;
  tumor_pixels: number;
  tumor_fraction: number;
  mask_png: string;
  gradcam_png: string;
}

export interface VolumeRow {
  file: string;
  segmentation: string;
  json: string;
  shape: [number, number, number];
  tumor_voxels: number;
  tumor_volume_ml: number;
}

export interface PredictSummary {
  run_id: string;
  out: string;
  total: number;
  images: ImageRow[];
  volumes: VolumeRow[];
  failed: PredictFailure[];
}

const MIN_OBJECT_SIZE = 50;

type Kind = 'image' | 'volume';

interface Item {
  kind: Kind;
  /** Absolute path of the file to read (undefined: the item failed before reading, see `missing`). */
  path?: string;
  /** As reported: the path relative to --input (or the patient id). */
  display: string;
  /** Outputs are `${base}_mask.png`, `${base}_seg.nii.gz`, `${base}.json`, ... (absolute). */
  base: string;
  missing?: string;
}

const IMAGE_EXT = /\.(jpe?g|png)$/i;
const VOLUME_EXT = /\.nii(\.gz)?$/i;

function fail(message: string, code: string, status = 400): SliceWiseError {
  return new SliceWiseError(message, { status, code });
}

/** The file's name without .jpg/.jpeg/.png/.nii/.nii.gz. */
function stemOf(name: string): string {
  const m = VOLUME_EXT.exec(name) ?? IMAGE_EXT.exec(name);
  return m ? name.slice(0, m.index) : name.slice(0, name.length - extname(name).length) || name;
}

/** JPEG or PNG by its first bytes. */
function isImageMagic(head: Buffer): boolean {
  const jpeg = head.length >= 3 && head[0] === 0xff && head[1] === 0xd8 && head[2] === 0xff;
  const png = head.length >= 8 && head.subarray(0, 8).equals(Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]));
  return jpeg || png;
}

async function firstBytes(file: string, n: number): Promise<Buffer> {
  const fh = await open(file, 'r');
  try {
    const buf = Buffer.alloc(n);
    const { bytesRead } = await fh.read(buf, 0, n, 0);
    return buf.subarray(0, bytesRead);
  } finally {
    await fh.close();
  }
}

/** By extension (.jpg/.jpeg/.png, .nii/.nii.gz, any case), else by content: JPEG or PNG magic (and, for a file given alone, gzip or a NIfTI header). */
async function kindOf(file: string, alone: boolean): Promise<Kind | null> {
  if (IMAGE_EXT.test(file)) return 'image';
  if (VOLUME_EXT.test(file)) return 'volume';
  const head = await firstBytes(file, 8).catch(() => Buffer.alloc(0));
  if (isImageMagic(head)) return 'image';
  if (alone && head.length >= 4 && ((head[0] === 0x1f && head[1] === 0x8b) || [348, 540].includes(head.readInt32LE(0)) || [348, 540].includes(head.readInt32BE(0)))) return 'volume';
  return null;
}

/** Regular files under `root` (hidden entries, macOS litter and the `skip` folder left out, symlinks followed), sorted. */
async function walk(root: string, skip: string): Promise<string[]> {
  const out: string[] = [];
  const visit = async (dir: string, depth: number): Promise<void> => {
    if (depth > 32) return;
    const entries = await readdir(dir, { withFileTypes: true });
    for (const e of entries) {
      if (e.name.startsWith('.') || e.name === '__MACOSX') continue;
      const path = join(dir, e.name);
      const s = e.isSymbolicLink() ? await stat(path).catch(() => undefined) : e;
      if (!s) continue;
      if (s.isDirectory()) {
        if (path !== skip) await visit(path, depth + 1);
      } else if (s.isFile()) out.push(path);
    }
  };
  await visit(root, 0);
  return out.sort();
}

/**
 * Output bases, one per item, unique within their folder (case-insensitively): `a.jpg` and `a.png` side by side
 * become `a_jpg` and `a_png`; the top folder's `predictions` is taken by the summary files.
 */
function assignBases(items: { dir: string; name: string; item: Item }[], outRoot: string): void {
  const taken = new Set<string>([join(outRoot, 'predictions').toLowerCase()]);
  const stems = new Map<string, number>();
  for (const { dir, name } of items) {
    const key = join(dir, stemOf(name)).toLowerCase();
    stems.set(key, (stems.get(key) ?? 0) + 1);
  }
  for (const { dir, name, item } of items) {
    const stem = stemOf(name);
    const shared = (stems.get(join(dir, stem).toLowerCase()) ?? 0) > 1 || taken.has(join(dir, stem).toLowerCase());
    let base = join(dir, shared ? name.replace(/\./g, '_') : stem);
    for (let n = 2; taken.has(base.toLowerCase()); n++) base = join(dir, `${shared ? name.replace(/\./g, '_') : stem}_${n}`);
    taken.add(base.toLowerCase());
    item.base = base;
  }
}

/** Patients through a layout (or the official BraTS names): one volume each, of the modality the model reads. */
async function patientItems(root: string, spec: string, modality: string, outRoot: string): Promise<Item[]> {
  let layout: BratsLayout | undefined;
  if (spec.trim().toLowerCase() !== 'official') {
    // parseLayout wants a seg entry (training needs one); predicting does not: a placeholder no file name matches.
    const hasSeg = /(^|,)\s*seg\s*=/i.test(spec);
    layout = parseLayout(hasSeg ? spec : `${spec},seg=\0`);
    delete layout.seg;
    if (!(modality in layout)) {
      throw fail(`the model reads ${modality}, and --brats-layout "${spec}" has no ${modality} entry (e.g. ${modality}=Flair_*.nii.gz)`, 'bad_layout');
    }
    layout = { [modality]: layout[modality]! };
  }
  const patients = await discoverPatients(root, layout);
  const items = patients.map((p): Item => {
    const path = p.files[modality];
    return {
      kind: 'volume',
      path,
      display: p.patientId,
      base: '',
      missing: path ? undefined : `patient ${p.patientId}: no ${modality} file${p.expected?.[modality] ? ` (${p.expected[modality]})` : ''} in ${p.dir}`,
    };
  });
  assignBases(
    items.map((item) => ({ dir: outRoot, name: item.display, item })),
    outRoot,
  );
  return items;
}

async function collectItems(input: string, outRoot: string, bratsLayout: string | undefined, modality: string): Promise<{ items: Item[]; ignored: string[] }> {
  const s = await stat(input).catch(() => undefined);
  if (!s) throw fail(`--input ${input} does not exist`, 'input_not_found');
  if (bratsLayout) {
    if (!s.isDirectory()) throw fail(`--brats-layout needs a folder of patients, and --input ${input} is a file`, 'bad_input');
    return { items: await patientItems(input, bratsLayout, modality, outRoot), ignored: [] };
  }
  if (!s.isDirectory()) {
    const kind = await kindOf(input, true);
    if (!kind) throw fail(`--input ${input} is neither an image (.jpg, .jpeg, .png) nor a NIfTI volume (.nii, .nii.gz)`, 'bad_input');
    const item: Item = { kind, path: input, display: basename(input), base: '' };
    assignBases([{ dir: outRoot, name: basename(input), item }], outRoot);
    return { items: [item], ignored: [] };
  }
  const found: { dir: string; name: string; item: Item }[] = [];
  const ignored: string[] = [];
  // The output folder may be inside the input: what an earlier run wrote there is not input.
  for (const file of await walk(input, outRoot)) {
    const rel = relative(input, file);
    const kind = await kindOf(file, false);
    if (!kind) {
      ignored.push(rel);
      continue;
    }
    const item: Item = { kind, path: file, display: rel.split(sep).join('/'), base: '' };
    found.push({ dir: join(outRoot, dirname(rel)), name: basename(file), item });
  }
  assignBases(found, outRoot);
  return { items: found.map((f) => f.item), ignored };
}

/** One CSV field: quoted when it holds a comma, a quote or a line break (RFC 4180), quotes doubled. */
export function csvField(v: unknown): string {
  const s = v === null || v === undefined ? '' : String(v);
  return /[",\r\n]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

export function toCsv(columns: readonly string[], rows: readonly Record<string, unknown>[]): string {
  return [columns.map(csvField).join(','), ...rows.map((r) => columns.map((c) => csvField(r[c])).join(','))].join('\r\n') + '\r\n';
}

const IMAGE_COLUMNS = ['file', 'predicted_label', 'predicted_class', 'tumor_probability', 'confidence', 'tumor_pixels', 'tumor_fraction', 'mask_png', 'gradcam_png'] as const;

function reasonOf(err: unknown, item: Item): string {
  const e = err as SliceWiseError;
  const reason = typeof e?.details?.reason === 'string' ? e.details.reason : (e?.message ?? String(err));
  // Messages often start with the file name the thread was given (the display name): drop it, the report names the file.
  return reason.startsWith(`${item.display}: `) ? reason.slice(item.display.length + 2) : reason;
}

async function loadModel(dataDir: string, runId: string): Promise<ServedModel> {
  const db = await openDb({ pgliteDir: pgliteDir(dataDir) });
  try {
    if (!(await getRunRow(db.db, runId))) throw new SliceWiseError(`run ${runId} not found in ${db.where}`, { status: 404, code: 'run_not_found' });
    return await resolveServedModel(db.db, { fromRun: runId });
  } finally {
    await db.close();
  }
}

/** Runs `fn` over `items` with at most `limit` at once. */
async function eachLimited<T>(items: T[], limit: number, fn: (item: T, index: number) => Promise<void>): Promise<void> {
  let next = 0;
  const lanes = Array.from({ length: Math.min(limit, items.length) }, async () => {
    while (next < items.length) {
      const i = next++;
      await fn(items[i]!, i);
    }
  });
  await Promise.all(lanes);
}

export async function predictFiles(opts: PredictOptions): Promise<PredictSummary> {
  const { runId, say } = opts;
  const paint = painter(process.stderr);
  const dataDir = resolve(opts.dataDir);
  const input = resolve(opts.input);
  const out = resolve(opts.out);
  if (opts.threshold !== undefined && !(opts.threshold > 0 && opts.threshold < 1)) throw fail(`--threshold must be a number between 0 and 1 (exclusive), got ${opts.threshold}`, 'bad_threshold');

  const model = await loadModel(dataDir, runId);
  if (model.architecture.in_channels !== 1) {
    throw fail(`run ${runId}'s model reads ${model.architecture.in_channels} modalities (${model.modalities.join(', ')}) per slice; predict takes one image or volume per case, so it serves single-modality models only`, 'model_needs_modalities', 422);
  }
  const threshold = opts.threshold ?? model.threshold;
  const { items, ignored } = await collectItems(input, out, opts.bratsLayout, model.modalities[0]!);
  if (ignored.length) say(paint('yellow', `Ignored ${ignored.length} file(s) that are neither images nor NIfTI volumes: ${ignored.slice(0, 5).join(', ')}${ignored.length > 5 ? ', ...' : ''}`));
  if (items.length === 0) throw fail(`no images (.jpg, .jpeg, .png) or NIfTI volumes (.nii, .nii.gz) under ${input}`, 'no_inputs', 422);

  // One thread per file up to one per core; a few files get the spare cores as kernel threads.
  const cores = availableParallelism();
  const size = Math.max(1, Math.min(opts.threads ?? cores, items.length));
  const kernelThreads = Math.max(1, Math.floor(cores / size));
  say(`Predicting ${items.length} file(s) with run ${runId}'s final model (${model.checkpoint.dir}, ${model.image_size} x ${model.image_size}, threshold ${threshold}) on ${size} inference thread(s); outputs in ${out}`);
  const pool = new InferencePool({ checkpoint: model.checkpoint.dir, size, kernelThreads, imageSize: model.image_size });
  const images: (ImageRow | undefined)[] = [];
  const volumes: (VolumeRow | undefined)[] = [];
  const failed: (PredictFailure | undefined)[] = [];
  const rel = (file: string) => relative(out, file).split(sep).join('/');
  try {
    await pool.ready;
    const multi = process.stderr.isTTY
      ? new cliProgress.MultiBar({ format: '  predict [{bar}] {value}/{total} {file}', stream: process.stderr, hideCursor: true }, cliProgress.Presets.shades_classic)
      : undefined;
    const bar = multi?.create(items.length, 0, { file: '' });
    let done = 0;
    const report = (file: string, line: string, failedLine: boolean) => {
      done++;
      if (multi) {
        if (failedLine) multi.log(`${line}\n`);
        bar!.update(done, { file });
      } else say(`[${done}/${items.length}] ${line}`);
    };
    await eachLimited(items, pool.size + 1, async (item, i) => {
      try {
        if (item.missing || !item.path) throw new Error(item.missing ?? 'no file');
        const bytes = await readFile(item.path);
        if (item.kind === 'image') {
          const r = await pool.image(bytes, item.display, { imageSize: model.image_size, threshold, minObjectSize: MIN_OBJECT_SIZE, segment: 'always', gradcam: true });
          const mask = `${item.base}_mask.png`;
          const gradcam = `${item.base}_gradcam.png`;
          await writeFileAtomic(mask, r.segmentation!.mask_png);
          await writeFileAtomic(gradcam, r.gradcam_png!);
          const c = r.classification;
          images[i] = {
            file: item.display,
            predicted_label: c.predicted_label,
            predicted_class: c.predicted_class,
            tumor_probability: c.tumor_probability,
            confidence: c.confidence,
            tumor_pixels: r.segmentation!.tumor_pixels,
            tumor_fraction: r.segmentation!.tumor_fraction,
            mask_png: rel(mask),
            gradcam_png: rel(gradcam),
          };
          report(item.display, `${item.display}: ${c.predicted_label} (p = ${c.tumor_probability.toFixed(3)}), ${r.segmentation!.tumor_pixels} tumour pixels`, false);
        } else {
          // The header is read here, the voxels in the thread: the segmentation copies the input's header.
          const header = niftiHeaderBytes(bytes, item.display);
          const r: VolumeResult = await pool.volume(bytes, item.display, { imageSize: model.image_size, threshold, minObjectSize: MIN_OBJECT_SIZE });
          const seg = `${item.base}_seg.nii.gz`;
          const json = `${item.base}.json`;
          await writeLabelsLike(seg, header, r.labels);
          const voxelMl = (Math.abs(r.pixdim[0]) * Math.abs(r.pixdim[1]) * Math.abs(r.pixdim[2])) / 1000;
          await writeJsonAtomic(json, {
            file: item.display,
            source: item.path,
            run_id: runId,
            segmentation: rel(seg),
            shape: r.shape,
            pixdim: r.pixdim,
            axis_codes: r.axis_codes,
            threshold,
            min_object_size: MIN_OBJECT_SIZE,
            voxel_volume_ml: voxelMl,
            tumor_voxels: r.tumor_voxels,
            tumor_volume_ml: r.tumor_volume_ml,
            tumor_slices: r.slices.filter((s) => s.tumor_pixels > 0).length,
            slices: r.slices,
          });
          volumes[i] = { file: item.display, segmentation: rel(seg), json: rel(json), shape: r.shape, tumor_voxels: r.tumor_voxels, tumor_volume_ml: r.tumor_volume_ml };
          report(item.display, `${item.display}: ${r.tumor_voxels} tumour voxels (${r.tumor_volume_ml.toFixed(2)} ml) -> ${rel(seg)}`, false);
        }
      } catch (err) {
        failed[i] = { file: item.display, error: reasonOf(err, item) };
        report(item.display, paint('red', `${item.display}: FAILED: ${failed[i]!.error}`), true);
      }
    });
    multi?.stop();
  } finally {
    await pool.close();
  }

  const summary: PredictSummary = {
    run_id: runId,
    out,
    total: items.length,
    images: images.filter((r): r is ImageRow => !!r),
    volumes: volumes.filter((r): r is VolumeRow => !!r),
    failed: failed.filter((r): r is PredictFailure => !!r),
  };
  if (items.some((it) => it.kind === 'image')) await writeFileAtomic(join(out, 'predictions.csv'), toCsv(IMAGE_COLUMNS, summary.images as unknown as Record<string, unknown>[]));
  await writeJsonAtomic(join(out, 'predictions.json'), {
    run_id: runId,
    checkpoint: model.checkpoint,
    image_size: model.image_size,
    modality: model.modalities[0],
    threshold,
    min_object_size: MIN_OBJECT_SIZE,
    images: summary.images,
    volumes: summary.volumes,
    failed: summary.failed,
  });
  const ok = summary.images.length + summary.volumes.length;
  if (summary.failed.length) {
    say(paint('red', `${summary.failed.length} of ${items.length} file(s) failed:`));
    for (const f of summary.failed) say(paint('red', `  ${f.file}: ${f.error}`));
  }
  const wrote = items.some((it) => it.kind === 'image') ? 'predictions.csv and predictions.json' : 'predictions.json';
  say(paint(summary.failed.length ? 'yellow' : 'green', `Predicted ${ok} of ${items.length} file(s); wrote ${wrote} in ${out}`));
  return summary;
}
