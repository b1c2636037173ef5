import { createHash } from 'node:crypto';
import { readdir, readFile, rm, stat } from 'node:fs/promises';
import { basename, dirname, join, relative, resolve } from 'node:path';
import { SliceWiseError } from '../lib/errors.ts';
import { writeFileAtomic, writeJsonAtomic } from '../lib/atomic.ts';
import { synthesize, resolveSynthOptions, SYNTHETIC_LABEL_FILE, type SynthOptions } from '../synth/index.ts';
import { describeSource, type Source } from './sources.ts';
import { downloadFile } from './fetch.ts';
import { extractArchive, COMPLETE_MARKER } from './extract.ts';
import { downloadKaggleDataset } from './kaggle-api.ts';
import { assertSyntheticCount, expandHome } from './policy.ts';

export { parseSource, describeSource, redactUrl, ACCEPTED_SOURCE_FORMS, type Source } from './sources.ts';
export { downloadFile, type DownloadOptions, type DownloadResult } from './fetch.ts';
export { extractArchive, detectArchiveFormat, isComplete, COMPLETE_MARKER, type ArchiveFormat, type ExtractResult } from './extract.ts';
export { kaggleCredentials, downloadKaggleDataset, type KaggleCredentials, type KaggleDownloadOptions } from './kaggle-api.ts';

export type DatasetKind = 'brats' | 'kaggle';

export interface MaterializeOptions {
  kind: DatasetKind;
  signal?: AbortSignal;
  onProgress?: (msg: string, done?: number, total?: number) => void;
  /** Generator options for synthetic sources (`out` is always destDir; the source's count wins). */
  synth?: Partial<SynthOptions>;
}

export interface MaterializeResult {
  /** Directory holding the data: BraTS patient directories, or Kaggle `yes/` and `no/`. */
  dir: string;
  description: string;
  synthetic: boolean;
}

/** Contents of destDir/.complete written by materializeSource. */
interface MaterializeMarker {
  key: string;
  kind: DatasetKind;
  description: string;
  /** Data directory, relative to destDir. */
  dir: string;
  synthetic: boolean;
  completedAt: string;
}

/** Everything materializeSource itself may create under destDir (removed when the source changes). */
const OWNED = ['brats', 'kaggle', SYNTHETIC_LABEL_FILE, 'download', 'extracted'];

async function statOrUndefined(path: string) {
  try {
    return await stat(path);
  } catch {
    return undefined;
  }
}

function abortIfNeeded(signal?: AbortSignal): void {
  if (signal?.aborted) {
    const err = new Error('aborted');
    err.name = 'AbortError';
    throw err;
  }
}

async function listDir(dir: string) {
  try {
    return (await readdir(dir, { withFileTypes: true })).sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  } catch {
    return [];
  }
}

/**
 * Find the directory that holds the data inside an extracted or given tree (archives nest it, e.g.
 * BraTS2020_TrainingData/MICCAI_BraTS2020_TrainingData/BraTS20_Training_001/...; the Kaggle tumour set has
 * yes/ and no/). Breadth-first, shallowest match wins, depth <= 5. BraTS: the parent of the first directory
 * holding a `*_seg.nii[.gz]` (training data), else of one holding `*_flair.nii[.gz]`. Kaggle: the first
 * directory with both `yes` and `no` subdirectories. Undefined when nothing matches.
 */
async function locateDataRoot(root: string, kind: DatasetKind): Promise<string | undefined> {
  let queue: string[] = [root];
  let flairFallback: string | undefined;
  for (let depth = 0; depth <= 5 && queue.length; depth++) {
    const next: string[] = [];
    for (const dir of queue) {
      const entries = await listDir(dir);
      if (kind === 'kaggle') {
        const sub = new Set(entries.filter((e) => e.isDirectory()).map((e) => e.name.toLowerCase()));
        if (sub.has('yes') && sub.has('no')) return dir;
      } else {
        const files = entries.filter((e) => e.isFile()).map((e) => e.name);
        const parent = dir === root ? root : dirname(dir);
        if (files.some((f) => /_seg\.nii(\.gz)?$/i.test(f))) return parent;
        if (!flairFallback && files.some((f) => /_flair\.nii(\.gz)?$/i.test(f))) flairFallback = parent;
      }
      for (const e of entries) {
        if (e.isDirectory() && !e.name.startsWith('.') && e.name !== '__MACOSX') next.push(join(dir, e.name));
      }
    }
    queue = next;
  }
  return flairFallback;
}

/** A tree carries SYNTHETIC.txt (written by `slicewise synth`) at its root or just above the data. */
async function looksSynthetic(...dirs: string[]): Promise<boolean> {
  for (const d of new Set(dirs.flatMap((x) => [x, dirname(x)]))) {
    if ((await statOrUndefined(join(d, SYNTHETIC_LABEL_FILE)))?.isFile()) return true;
  }
  return false;
}

async function readMarker(destDir: string): Promise<MaterializeMarker | undefined> {
  try {
    const m = JSON.parse(await readFile(join(destDir, COMPLETE_MARKER), 'utf8')) as Partial<MaterializeMarker>;
    return typeof m.key === 'string' && typeof m.dir === 'string' ? (m as MaterializeMarker) : undefined;
  } catch {
    return undefined;
  }
}

function archiveName(url: string): string {
  let name = '';
  try {
    name = decodeURIComponent(basename(new URL(url).pathname));
  } catch {
    /* fall through */
  }
  name = name.replace(/[^A-Za-z0-9._-]/g, '_').replace(/^\.+/, '');
  return name || 'download';
}

/**
 * Make a data source available on disk and return the directory holding the data.
 *  - synthetic: synthesize() into destDir (count = patients for 'brats', images per class for 'kaggle';
 *    only the requested kind is generated); returns destDir/brats or destDir/kaggle.
 *  - path: a directory is used in place (no copy; 404 'not_found' when missing); an archive is extracted
 *    into destDir/extracted.
 *  - https: downloaded (resumable, sha256-checked when pinned) to destDir/download/<name>, extracted into
 *    destDir/extracted; the archive is deleted after a successful extraction.
 *  - kaggle: downloadKaggleDataset() into destDir (zip deleted after extraction).
 * For extracted data the returned dir is the data root found inside (see locateDataRoot), else the
 * extraction directory itself.
 *
 * Idempotent: destDir/.complete (written last) records the source; when it matches, the previous result is
 * returned without any work. When destDir holds a completed result of a different source, what this
 * function created there is removed first.
 */
export async function materializeSource(source: Source, destDir: string, opts: MaterializeOptions): Promise<MaterializeResult> {
  const { kind, signal } = opts;
  const progress = opts.onProgress ?? (() => {});
  const description = describeSource(source);
  const dest = resolve(destDir);

  let pathArchive: { path: string; size: number; mtimeMs: number } | undefined;
  if (source.kind === 'path') {
    const p = resolve(expandHome(source.path));
    const st = await statOrUndefined(p);
    if (!st) {
      throw new SliceWiseError(`data source not found: ${p} does not exist`, { status: 404, code: 'not_found', details: { path: p } });
    }
    if (st.isDirectory()) {
      const dir = (await locateDataRoot(p, kind)) ?? p;
      progress(`using ${dir} in place`);
      return { dir, description, synthetic: await looksSynthetic(p, dir) };
    }
    pathArchive = { path: p, size: st.size, mtimeMs: st.mtimeMs };
  }

  // The cache key: the full source (the description hides URL secrets; a hash of them is harmless), the
  // kind, and whatever else changes the result.
  let synth: SynthOptions | undefined;
  if (source.kind === 'synthetic') {
    // Again here, with this process's limits: the caller's check (the API's, the CLI's) is not this one's.
    assertSyntheticCount(source, kind);
    const base = { ...opts.synth, out: dest };
    synth =
      kind === 'brats'
        ? { ...base, patients: source.count ?? opts.synth?.patients, kaggleYes: 0, kaggleNo: 0 }
        : { ...base, patients: 0, kaggleYes: source.count ?? opts.synth?.kaggleYes, kaggleNo: source.count ?? opts.synth?.kaggleNo };
    synth = resolveSynthOptions(synth);
  }
  const key = createHash('sha256').update(JSON.stringify({ v: 1, kind, source, pathArchive, synth })).digest('hex');

  const marker = await readMarker(dest);
  if (marker) {
    const dir = resolve(dest, marker.dir);
    if (marker.key === key && marker.kind === kind && (await statOrUndefined(dir))?.isDirectory()) {
      progress(`reusing ${dir}`);
      return { dir, description, synthetic: marker.synthetic };
    }
    progress(`replacing the previous data in ${dest} (${marker.description})`);
    await rm(join(dest, COMPLETE_MARKER), { force: true });
    for (const name of OWNED) await rm(join(dest, name), { recursive: true, force: true });
  }
  abortIfNeeded(signal);

  let dir: string;
  let synthetic: boolean;
  if (source.kind === 'synthetic') {
    const s = synth!;
    progress(kind === 'brats' ? `generating ${s.patients} synthetic BraTS patients` : `generating ${s.kaggleYes} + ${s.kaggleNo} synthetic Kaggle images`);
    const r = await synthesize(s);
    dir = kind === 'brats' ? r.bratsDir : r.kaggleDir;
    synthetic = true;
  } else {
    let extracted: string;
    if (source.kind === 'path') {
      progress(`extracting ${pathArchive!.path}`);
      extracted = (await extractArchive(pathArchive!.path, join(dest, 'extracted'), { signal, onProgress: (d, t) => progress('extracting', d, t) })).dir;
    } else if (source.kind === 'https') {
      const file = join(dest, 'download', archiveName(source.url));
      // A partial or finished download left by a different URL under the same name must not be resumed.
      const sidecar = `${file}.source`;
      if ((await readFile(sidecar, 'utf8').catch(() => '')) !== key) {
        await rm(file, { force: true });
        await rm(`${file}.part`, { force: true });
        await rm(`${file}.part.meta`, { force: true });
        await writeFileAtomic(sidecar, key);
      }
      progress(`downloading ${description}`);
      await downloadFile(source.url, file, { sha256: source.sha256, signal, onProgress: (d, t) => progress(`downloading ${description}`, d, t) });
      abortIfNeeded(signal);
      progress(`extracting ${basename(file)}`);
      extracted = (await extractArchive(file, join(dest, 'extracted'), { signal, onProgress: (d, t) => progress('extracting', d, t) })).dir;
      await rm(file, { force: true });
      await rm(sidecar, { force: true });
    } else {
      extracted = (await downloadKaggleDataset(source.owner, source.dataset, dest, { signal, onProgress: progress })).dir;
    }
    dir = (await locateDataRoot(extracted, kind)) ?? extracted;
    synthetic = await looksSynthetic(extracted, dir);
  }

  abortIfNeeded(signal);
  const record: MaterializeMarker = {
    key,
    kind,
    description,
    dir: relative(dest, dir) || '.',
    synthetic,
    completedAt: new Date().toISOString(),
  };
  await writeJsonAtomic(join(dest, COMPLETE_MARKER), record);
  progress(`ready: ${dir}`);
  return { dir, description, synthetic };
}
