/**
 * Benchmark: preprocessPatient per full-size (240 x 240 x 155) patient against the floor of simply gunzipping the
 * same files (zlib.gunzipSync of the image and the seg, one after the other). Wall-clock medians of 5 runs after a
 * warm-up, runs of both interleaved; CPU time (all threads) too, which is steadier on a shared machine. Note that
 * preprocessPatient also writes ~20-30 MB of .npy per patient, which the floor does not.
 *
 * Cases: the real fixture pat0001 (FLAIR + seg, float32, read through a layout) and a generated BraTS-2020-like
 * case (int16 FLAIR, uint8 seg, official file names), written with test/helpers/nifti-writer.ts to a temp dir.
 *
 *   npx tsx bench/preprocess.ts        prints a table and writes bench/results/preprocess.json
 */
import { mkdir, mkdtemp, readFile, rm } from 'node:fs/promises';
import { realpathSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { gunzipSync } from 'node:zlib';
import { median, printTable, writeResult } from 'tfjs-wasm-training/bench/table';
import { preprocessPatient } from '../src/imaging/brats.js';
import { discoverPatients, type PatientFiles } from '../src/imaging/layout.js';
import { readNiftiRaw } from '../src/imaging/nifti.js';
import { writeNifti } from '../test/helpers/nifti-writer.js';
import { env } from '../src/env.ts';

const here = dirname(fileURLToPath(import.meta.url));
const RUNS = 5;

function fixturesRoot(): string {
  return env().fixtures ?? resolve(here, '../../shared/fixtures');
}

/** Small deterministic generator for the synthetic volume. */
function lcg(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 4294967296;
  };
}

/**
 * A BraTS-2020-like case: zero background, an ellipsoidal "brain" of int16 intensities with smooth variation and
 * noise, a tumour (labels 1 core, 2 oedema, 4 enhancing) spanning ~45 slices. Files as the Kaggle release names them.
 */
export async function writeSyntheticCase(root: string): Promise<void> {
  const [nx, ny, nz] = [240, 240, 155];
  const id = 'BraTS20_Training_001';
  const dir = join(root, 'BraTS2020_TrainingData', 'MICCAI_BraTS2020_TrainingData', id);
  await mkdir(dir, { recursive: true });
  const rnd = lcg(7);
  const flair = new Int16Array(nx * ny * nz);
  const seg = new Uint8Array(nx * ny * nz);
  const [cx, cy, cz] = [120, 120, 75];
  const [tx, ty, tz] = [95, 140, 80];
  for (let z = 0; z < nz; z++) {
    for (let y = 0; y < ny; y++) {
      for (let x = 0; x < nx; x++) {
        const i = x + nx * (y + ny * z);
        const e = ((x - cx) / 70) ** 2 + ((y - cy) / 85) ** 2 + ((z - cz) / 62) ** 2;
        if (e > 1) continue;
        const dt = Math.sqrt((x - tx) ** 2 + (y - ty) ** 2 + ((z - tz) * 1.1) ** 2);
        let v = 320 + 60 * Math.sin(x / 9) * Math.cos(y / 11) + 40 * Math.sin(z / 7) + (rnd() - 0.5) * 60;
        if (dt < 22) {
          seg[i] = dt < 8 ? 1 : dt < 12 ? 4 : 2;
          v += dt < 12 ? 350 : 250;
        }
        flair[i] = Math.round(v);
      }
    }
  }
  await writeNifti(join(dir, `${id}_flair.nii.gz`), { dims: [nx, ny, nz], datatype: 'int16', data: flair, gzip: true });
  await writeNifti(join(dir, `${id}_seg.nii.gz`), { dims: [nx, ny, nz], datatype: 'uint8', data: seg, gzip: true });
}

interface CaseResult {
  case: string;
  patient: string;
  files: Record<string, string>;
  compressed_bytes: number;
  kept_slices: number;
  preprocess_ms: number;
  read_ms: number;
  floor_ms: number;
  ratio: number;
  /** Process CPU time (user + system, all threads): steadier than wall time on a shared machine. */
  preprocess_cpu_ms: number;
  floor_cpu_ms: number;
  cpu_ratio: number;
  runs_preprocess_ms: number[];
  runs_floor_ms: number[];
}

async function benchCase(name: string, patient: PatientFiles, outDir: string): Promise<CaseResult> {
  const files = [patient.files.flair, patient.files.seg];
  const gz = await Promise.all(files.map((f) => readFile(f)));
  const cpuMs = (since: NodeJS.CpuUsage): number => {
    const d = process.cpuUsage(since);
    return (d.user + d.system) / 1000;
  };
  const floor = (): { ms: number; cpu: number } => {
    const c = process.cpuUsage();
    const t = performance.now();
    for (const b of gz) gunzipSync(b);
    return { ms: performance.now() - t, cpu: cpuMs(c) };
  };
  const pre = async (): Promise<{ ms: number; cpu: number; kept: number }> => {
    const c = process.cpuUsage();
    const t = performance.now();
    const meta = await preprocessPatient(patient, outDir);
    return { ms: performance.now() - t, cpu: cpuMs(c), kept: meta.num_slices };
  };
  const read = async (): Promise<number> => {
    const t = performance.now();
    await Promise.all(files.map((f) => readNiftiRaw(f)));
    return performance.now() - t;
  };
  // Warm-up (JIT, file cache), then interleave so that both see the same machine load.
  floor();
  await pre();
  await read();
  const floors: number[] = [];
  const floorsCpu: number[] = [];
  const pres: number[] = [];
  const presCpu: number[] = [];
  const reads: number[] = [];
  let kept = 0;
  for (let r = 0; r < RUNS; r++) {
    const f = floor();
    floors.push(f.ms);
    floorsCpu.push(f.cpu);
    const p = await pre();
    pres.push(p.ms);
    presCpu.push(p.cpu);
    kept = p.kept;
    reads.push(await read());
  }
  const preprocess_ms = median(pres);
  const floor_ms = median(floors);
  const preprocess_cpu_ms = median(presCpu);
  const floor_cpu_ms = median(floorsCpu);
  return {
    case: name,
    patient: patient.patientId,
    files: { flair: patient.files.flair, seg: patient.files.seg },
    compressed_bytes: gz.reduce((a, b) => a + b.length, 0),
    kept_slices: kept,
    preprocess_ms: round(preprocess_ms),
    read_ms: round(median(reads)),
    floor_ms: round(floor_ms),
    ratio: round(preprocess_ms / floor_ms, 2),
    preprocess_cpu_ms: round(preprocess_cpu_ms),
    floor_cpu_ms: round(floor_cpu_ms),
    cpu_ratio: round(preprocess_cpu_ms / floor_cpu_ms, 2),
    runs_preprocess_ms: pres.map((x) => round(x)),
    runs_floor_ms: floors.map((x) => round(x)),
  };
}

const round = (x: number, digits = 1): number => Math.round(x * 10 ** digits) / 10 ** digits;

export interface PreprocessBenchResult {
  bench: 'preprocess';
  cases: CaseResult[];
  [key: string]: unknown;
}

export async function runPreprocessBench(): Promise<PreprocessBenchResult> {
  const work = await mkdtemp(join(tmpdir(), 'slicewise-bench-'));
  try {
    const fixture = (await discoverPatients(join(fixturesRoot(), 'brats2015-deepmedic'), { flair: 'Flair_*.nii.gz', seg: 'OTMultiClass.nii.gz' })).find(
      (p) => p.patientId === 'pat0001',
    );
    if (!fixture) throw new Error(`fixture pat0001 not found under ${fixturesRoot()}`);
    const synthRoot = join(work, 'synthetic');
    await writeSyntheticCase(synthRoot);
    const [synthetic] = await discoverPatients(synthRoot);

    const cases = [
      await benchCase('fixture pat0001 (float32 FLAIR + float32 seg)', fixture, join(work, 'out')),
      await benchCase('synthetic BraTS20 (int16 FLAIR + uint8 seg)', synthetic, join(work, 'out')),
    ];
    return {
      bench: 'preprocess',
      date: new Date().toISOString(),
      node: process.version,
      runs: RUNS,
      statistic: 'median',
      floor: 'zlib.gunzipSync of the FLAIR and seg files, sequentially',
      read: 'readNiftiRaw of the FLAIR and seg files, in parallel (what preprocessPatient starts with)',
      cpu: 'process.cpuUsage (user + system, all threads) over the same runs',
      goal_ratio: 2,
      cases,
    };
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

export function printPreprocessTable(result: PreprocessBenchResult): void {
  const rows = [
    ['case', 'kept', 'preprocess ms', 'read ms', 'gunzip floor ms', 'ratio', 'cpu ms', 'floor cpu ms', 'cpu ratio'],
    ...result.cases.map((c) => [
      c.case,
      String(c.kept_slices),
      c.preprocess_ms.toFixed(1),
      c.read_ms.toFixed(1),
      c.floor_ms.toFixed(1),
      `${c.ratio.toFixed(2)}x`,
      c.preprocess_cpu_ms.toFixed(1),
      c.floor_cpu_ms.toFixed(1),
      `${c.cpu_ratio.toFixed(2)}x`,
    ]),
  ];
  printTable(rows);
}

async function main(): Promise<void> {
  const result = await runPreprocessBench();
  printPreprocessTable(result);
  await writeResult(resolve(here, 'results/preprocess.json'), result);
}

const invoked = process.argv[1] ? pathToFileURL(realpathSync(process.argv[1])).href : '';
if (invoked === import.meta.url) {
  main().catch((err) => {
    console.error(err);
    process.exitCode = 1;
  });
}
