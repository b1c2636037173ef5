/**
 * What a run's sources may point at. Anyone who may call the API may name a source, so a `path:` source reads
 * only under the folders the operator allowed (the data dir, SLICEWISE_ALLOWED_ROOTS, and the paths typed on
 * this process's own command line), a URL reaches public addresses only (network.ts), and a run preprocesses
 * at most SLICEWISE_MAX_PATIENTS patients, and a `synthetic:N` asks for no more than the generator makes (and, for
 * Kaggle, than SLICEWISE_MAX_KAGGLE_IMAGES per class). The API and the CLI check at the door (a 400 naming the
 * field or flag); the download step checks again with its own process's settings, because what reaches a worker
 * is not to be trusted.
 */
import { realpath } from 'node:fs/promises';
import { homedir } from 'node:os';
import { basename, dirname, isAbsolute, join, relative, resolve, sep } from 'node:path';
import { SliceWiseError } from '../lib/errors.ts';
import { env } from '../env.ts';
import { SYNTH_LIMITS } from '../synth/limits.ts';
import { assertPublicLiteral } from './network.ts';
import { formatSource, parseSource, type Source } from './sources.ts';

/** Folders this process's operator named on its command line (see allowOperatorSources). */
const operatorRoots = new Set<string>();

export function expandHome(p: string): string {
  return p === '~' ? homedir() : p.startsWith('~/') ? join(homedir(), p.slice(2)) : p;
}

/**
 * The CLI's user is the operator: a `path:` source typed on `slicewise pipeline`'s command line is allowed for
 * this process (its API and its in-process workers), as if it were in SLICEWISE_ALLOWED_ROOTS. Other specs are
 * ignored. Workers in other processes decide with their own SLICEWISE_ALLOWED_ROOTS.
 */
export function allowOperatorSources(specs: readonly (string | undefined)[]): void {
  for (const spec of specs) {
    if (!spec) continue;
    let source: Source;
    try {
      source = parseSource(spec);
    } catch {
      continue; // createRun reports it with the accepted forms
    }
    if (source.kind === 'path') operatorRoots.add(resolve(expandHome(source.path)));
  }
}

/**
 * The canonical form of a path: symlinks resolved by realpath. A path that does not exist yet is its deepest
 * existing ancestor's realpath plus the rest, so `..` and links cannot lead out, and a caller cannot tell from
 * the answer whether a file outside the allowed folders exists.
 */
async function canonicalPath(p: string): Promise<string> {
  const abs = resolve(expandHome(p));
  let dir = abs;
  const rest: string[] = [];
  for (;;) {
    try {
      return join(await realpath(dir), ...rest);
    } catch {
      const parent = dirname(dir);
      if (parent === dir) return abs;
      rest.unshift(basename(dir));
      dir = parent;
    }
  }
}

function isInside(root: string, p: string): boolean {
  const rel = relative(root, p);
  return rel === '' || (!isAbsolute(rel) && rel !== '..' && !rel.startsWith(`..${sep}`));
}

/** The folders `path:` sources of runs in `dataDir` may read, canonical. */
async function allowedRoots(dataDir: string): Promise<string[]> {
  const roots = [dataDir, ...env().allowedRoots, ...operatorRoots];
  return [...new Set(await Promise.all(roots.map((r) => canonicalPath(r))))];
}

/**
 * Checks a `path:` source against the allowed roots and returns its canonical path (the one to read: checked and
 * used are the same). Throws SliceWiseError(400, 'path_not_allowed') naming `field` and the allowed folders.
 */
export async function resolveAllowedPath(path: string, { field, dataDir }: { field: string; dataDir: string }): Promise<string> {
  const canonical = await canonicalPath(path);
  const roots = await allowedRoots(dataDir);
  if (roots.some((r) => isInside(r, canonical))) return canonical;
  // The caller's own words only: the resolved target of a link is not theirs to learn.
  throw new SliceWiseError(
    `${field}: path:${path} is outside the folders path: sources may read (${roots.join(', ')}); ` +
      'the operator can add folders with SLICEWISE_ALLOWED_ROOTS',
    { status: 400, code: 'path_not_allowed', details: { field, allowedRoots: roots } },
  );
}

/** Refuses more than SLICEWISE_MAX_PATIENTS patients, naming what asked for them. */
export function assertPatientLimit(count: number, what: string, { field }: { field?: string } = {}): void {
  const limit = env().maxPatients;
  if (count <= limit) return;
  throw new SliceWiseError(`${field ? `${field}: ` : ''}${what}: ${count} patients, more than the limit of ${limit} per run (SLICEWISE_MAX_PATIENTS)`, {
    status: 400,
    code: 'too_many_patients',
    details: { ...(field ? { field } : {}), count, limit },
  });
}

/**
 * Refuses a `synthetic:N` that asks for more than may be generated: for BraTS, more patients than
 * SLICEWISE_MAX_PATIENTS or than the generator makes; for Kaggle, more images per class than
 * SLICEWISE_MAX_KAGGLE_IMAGES (itself at most what the generator makes). Checked before anything is generated:
 * N images cost disk and CPU whether or not a later step would refuse them. Other sources pass.
 */
export function assertSyntheticCount(source: Source, dataset: 'brats' | 'kaggle', { field }: { field?: string } = {}): void {
  if (source.kind !== 'synthetic' || source.count === undefined) return;
  const n = source.count;
  const what = `synthetic:${n}`;
  const prefix = field ? `${field}: ` : '';
  if (dataset === 'brats') {
    assertPatientLimit(n, what, { field });
    if (n <= SYNTH_LIMITS.patients) return;
    throw new SliceWiseError(`${prefix}${what}: ${n} patients, more than the synthetic generator makes (${SYNTH_LIMITS.patients})`, {
      status: 400,
      code: 'too_many_patients',
      details: { ...(field ? { field } : {}), count: n, limit: SYNTH_LIMITS.patients },
    });
  }
  const limit = env().maxKaggleImages;
  if (n <= limit) return;
  throw new SliceWiseError(`${prefix}${what}: ${n} images per class, more than the limit of ${limit} per class (SLICEWISE_MAX_KAGGLE_IMAGES)`, {
    status: 400,
    code: 'too_many_images',
    details: { ...(field ? { field } : {}), count: n, limit },
  });
}

/**
 * A run's source, checked for the run: the form (parseSource), a `path:` under the allowed roots, a URL host
 * that is not a private address literal (DNS is checked again at connect time), a synthetic count within the
 * limits (assertSyntheticCount). Returns the spec to store. Errors name `field` (e.g. 'sources.brats').
 */
export async function checkRunSource(spec: string, { field, dataset, dataDir }: { field: string; dataset: 'brats' | 'kaggle'; dataDir: string }): Promise<string> {
  let source: Source;
  try {
    source = parseSource(spec);
  } catch (err) {
    if (err instanceof SliceWiseError) throw new SliceWiseError(`${field}: ${err.message}`, { status: err.status, code: err.code, details: { field, ...err.details }, cause: err });
    throw err;
  }
  if (source.kind === 'path') await resolveAllowedPath(source.path, { field, dataDir });
  if (source.kind === 'https') {
    try {
      assertPublicLiteral(new URL(source.url));
    } catch (err) {
      if (err instanceof SliceWiseError) throw new SliceWiseError(`${field}: ${err.message}`, { status: err.status, code: err.code, details: { field, ...err.details }, cause: err });
      throw err;
    }
  }
  assertSyntheticCount(source, dataset, { field });
  return formatSource(source);
}
