/**
 * Finding BraTS patients on disk.
 *
 * Without a layout, the official file names of BraTS 2020, 2021 and 2023 are recognised anywhere under the root
 * (the Kaggle copy of BraTS 2020 nests them in BraTS2020_TrainingData/MICCAI_BraTS2020_TrainingData/<case>/).
 * With a layout (modality -> file-name glob), every directory holding a file that matches one of its patterns is
 * a patient named after the directory.
 */
import { readdir, realpath, stat } from 'node:fs/promises';
import { basename, join, resolve } from 'node:path';
import { SliceWiseError } from '../lib/errors.js';

/** Modality -> file-name glob (`*` any run of characters, `?` one character), e.g. {flair: 'Flair_*.nii.gz', seg: 'OTMultiClass.nii.gz'}. */
export type BratsLayout = Record<string, string>;

export interface PatientFiles {
  patientId: string;
  /** The patient's directory (absolute). */
  dir: string;
  /** Modality -> absolute path, for the modalities actually found. */
  files: Record<string, string>;
  /**
   * Official BraTS naming: the exact file name expected per modality (all modalities of the release), so that
   * the preprocessing step can say precisely which file is missing.
   */
  expected?: Record<string, string>;
  /** Layout naming: the layout the patient was found with (modality -> glob), for the same purpose. */
  layout?: BratsLayout;
}

const KEY_RE = /^[A-Za-z][A-Za-z0-9_-]*$/;

function badLayout(message: string): SliceWiseError {
  return new SliceWiseError(message, { status: 400, code: 'bad_layout' });
}

/** Parse "flair=Flair_*.nii.gz,seg=OTMultiClass.nii.gz". Keys are lower-cased; a `seg` entry is required. */
export function parseLayout(spec: string): BratsLayout {
  const layout: BratsLayout = {};
  const entries = spec.split(',').map((e) => e.trim());
  if (spec.trim() === '') throw badLayout('empty layout: expected entries like "flair=Flair_*.nii.gz,seg=OTMultiClass.nii.gz"');
  for (const entry of entries) {
    if (entry === '') throw badLayout(`bad layout "${spec}": empty entry (two commas in a row, or a trailing comma)`);
    const eq = entry.indexOf('=');
    if (eq < 0) throw badLayout(`bad layout entry "${entry}": expected modality=pattern, e.g. flair=Flair_*.nii.gz`);
    const key = entry.slice(0, eq).trim().toLowerCase();
    const pattern = entry.slice(eq + 1).trim();
    if (!KEY_RE.test(key)) throw badLayout(`bad layout entry "${entry}": modality name "${key}" must be letters, digits, '_' or '-'`);
    if (pattern === '') throw badLayout(`bad layout entry "${entry}": empty file pattern`);
    if (/[\\/]/.test(pattern)) throw badLayout(`bad layout entry "${entry}": the pattern is matched against file names and cannot contain a path separator`);
    if (key in layout) throw badLayout(`bad layout entry "${entry}": modality "${key}" given twice`);
    layout[key] = pattern;
  }
  if (!('seg' in layout)) throw badLayout(`bad layout "${spec}": no seg entry (the segmentation file pattern, e.g. seg=OTMultiClass.nii.gz)`);
  return layout;
}

/** Glob (`*`, `?`) to an anchored, case-insensitive RegExp over a file name. */
function globToRegExp(glob: string): RegExp {
  let re = '';
  for (const ch of glob) {
    if (ch === '*') re += '.*';
    else if (ch === '?') re += '.';
    else re += ch.replace(/[.+^${}()|[\]\\]/g, '\\$&');
  }
  return new RegExp(`^${re}$`, 'i');
}

function formatLayout(layout: BratsLayout): string {
  return Object.entries(layout)
    .map(([k, v]) => `${k}=${v}`)
    .join(',');
}

interface FoundFile {
  path: string;
  dir: string;
  name: string;
}

/** All regular files under `root`, skipping hidden entries and macOS archive litter; follows symlinks once. */
async function walk(root: string): Promise<FoundFile[]> {
  const out: FoundFile[] = [];
  const seen = new Set<string>();
  const visit = async (dir: string): Promise<void> => {
    const real = await realpath(dir);
    if (seen.has(real)) return;
    seen.add(real);
    const entries = await readdir(dir, { withFileTypes: true }).catch((err: Error) => {
      throw new SliceWiseError(`cannot read directory ${dir}: ${err.message}`, { status: 422, code: 'unreadable_dir', details: { dir } });
    });
    for (const e of entries) {
      if (e.name.startsWith('.') || e.name === '__MACOSX') continue;
      const path = join(dir, e.name);
      let isDir = e.isDirectory();
      let isFile = e.isFile();
      if (e.isSymbolicLink()) {
        const s = await stat(path).catch(() => undefined);
        if (!s) continue; // dangling link
        isDir = s.isDirectory();
        isFile = s.isFile();
      }
      if (isDir) await visit(path);
      else if (isFile) out.push({ path, dir, name: e.name });
    }
  };
  await visit(root);
  out.sort((a, b) => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0));
  return out;
}

interface NamingScheme {
  re: RegExp;
  /** Modality as spelled in the file name -> canonical modality. */
  canonical: Record<string, string>;
  /** Expected file name for a canonical modality. */
  fileName: (id: string, modality: string, ext: string) => string;
}

const SCHEMES: NamingScheme[] = [
  // BraTS 2020: BraTS20_Training_001_flair.nii.gz (the validation set has no labels and is not picked up)
  {
    re: /^(BraTS20_Training_\d+)_(flair|t1|t1ce|t2|seg)(\.nii(?:\.gz)?)$/i,
    canonical: { flair: 'flair', t1: 't1', t1ce: 't1ce', t2: 't2', seg: 'seg' },
    fileName: (id, m, ext) => `${id}_${m}${ext}`,
  },
  // BraTS 2021: BraTS2021_00000_flair.nii.gz
  {
    re: /^(BraTS2021_\d+)_(flair|t1|t1ce|t2|seg)(\.nii(?:\.gz)?)$/i,
    canonical: { flair: 'flair', t1: 't1', t1ce: 't1ce', t2: 't2', seg: 'seg' },
    fileName: (id, m, ext) => `${id}_${m}${ext}`,
  },
  // BraTS 2023 (and later): BraTS-GLI-00000-000-t2f.nii.gz
  {
    re: /^(BraTS-[A-Za-z]+-\d+-\d+)-(t1n|t1c|t2w|t2f|seg)(\.nii(?:\.gz)?)$/i,
    canonical: { t2f: 'flair', t1n: 't1', t1c: 't1ce', t2w: 't2', seg: 'seg' },
    fileName: (id, m, ext) => {
      const code = { flair: 't2f', t1: 't1n', t1ce: 't1c', t2: 't2w', seg: 'seg' }[m] ?? m;
      return `${id}-${code}${ext}`;
    },
  },
];

const OFFICIAL_DESCRIPTION =
  'official BraTS file names (BraTS20_Training_001_flair.nii.gz, BraTS2021_00000_flair.nii.gz, BraTS-GLI-00000-000-t2f.nii.gz)';

function duplicate(patientId: string, modality: string, a: string, b: string): SliceWiseError {
  return new SliceWiseError(`patient ${patientId}: two ${modality} files found: ${a} and ${b}; remove one`, {
    status: 422,
    code: 'duplicate_patient',
    details: { patientId, modality, files: [a, b] },
  });
}

function byOfficialNames(files: FoundFile[]): PatientFiles[] {
  const patients = new Map<string, PatientFiles & { expected: Record<string, string> }>();
  for (const f of files) {
    for (const scheme of SCHEMES) {
      const m = scheme.re.exec(f.name);
      if (!m) continue;
      const id = m[1];
      const modality = scheme.canonical[m[2].toLowerCase()];
      const ext = m[3].toLowerCase();
      let p = patients.get(id);
      if (!p) {
        const expected: Record<string, string> = {};
        for (const c of Object.values(scheme.canonical)) expected[c] = scheme.fileName(id, c, ext);
        p = { patientId: id, dir: f.dir, files: {}, expected };
        patients.set(id, p);
      }
      const prev = p.files[modality];
      if (prev) throw duplicate(id, modality, prev, f.path);
      p.files[modality] = f.path;
      break;
    }
  }
  return [...patients.values()];
}

function byLayout(files: FoundFile[], layout: BratsLayout): PatientFiles[] {
  const matchers = Object.entries(layout).map(([modality, glob]) => ({ modality, glob, re: globToRegExp(glob) }));
  const byDir = new Map<string, PatientFiles>();
  for (const f of files) {
    for (const { modality, glob, re } of matchers) {
      if (!re.test(f.name)) continue;
      let p = byDir.get(f.dir);
      if (!p) {
        p = { patientId: basename(f.dir), dir: f.dir, files: {}, layout: { ...layout } };
        byDir.set(f.dir, p);
      }
      const prev = p.files[modality];
      if (prev) {
        throw new SliceWiseError(
          `layout pattern ${modality}='${glob}' matches more than one file in ${f.dir}: ${basename(prev)} and ${f.name}; make the pattern more specific`,
          { status: 422, code: 'ambiguous_layout', details: { dir: f.dir, modality, pattern: glob, files: [prev, f.path] } },
        );
      }
      p.files[modality] = f.path;
    }
  }
  const byId = new Map<string, PatientFiles>();
  for (const p of byDir.values()) {
    const prev = byId.get(p.patientId);
    if (prev) {
      throw new SliceWiseError(`two patient directories are both named ${p.patientId}: ${prev.dir} and ${p.dir}; patient ids must be unique`, {
        status: 422,
        code: 'duplicate_patient',
        details: { patientId: p.patientId, dirs: [prev.dir, p.dir] },
      });
    }
    byId.set(p.patientId, p);
  }
  return [...byId.values()];
}

/**
 * Find the patients under `root`, sorted by patient id. A patient with some modality missing is still returned
 * (its `files` lacks that key) so that preprocessing can fail on it with a precise message.
 */
export async function discoverPatients(root: string, layout?: BratsLayout): Promise<PatientFiles[]> {
  const absRoot = resolve(root);
  const tried = layout ? `layout ${formatLayout(layout)}` : OFFICIAL_DESCRIPTION;
  const rootStat = await stat(absRoot).catch(() => undefined);
  if (!rootStat || !rootStat.isDirectory()) {
    throw new SliceWiseError(`no patients: dataset root ${absRoot} ${rootStat ? 'is not a directory' : 'does not exist'}`, {
      status: 422,
      code: 'no_patients',
      details: { root: absRoot, tried },
    });
  }
  const files = await walk(absRoot);
  const patients = layout ? byLayout(files, layout) : byOfficialNames(files);
  if (patients.length === 0) {
    throw new SliceWiseError(`no patients found under ${absRoot} (${files.length} files) with ${tried}`, {
      status: 422,
      code: 'no_patients',
      details: { root: absRoot, tried, files: files.length },
    });
  }
  patients.sort((a, b) => (a.patientId < b.patientId ? -1 : a.patientId > b.patientId ? 1 : 0));
  return patients;
}

