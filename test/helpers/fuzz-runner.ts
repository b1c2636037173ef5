/**
 * The fuzz pass's child process (test/fuzz.test.ts forks it): runs cases of one target and reports each to the
 * parent over IPC, `start` before and `done` after, so that a crash, an abort or a hang of the process is pinned on
 * the case that caused it (the parent's watchdog kills a case that runs too long: synchronous code cannot be
 * interrupted in-process).
 *
 * Every case is reproducible from (target, seed, case number): its PRNG is mulberry32(deriveSeed(seed, target, n)),
 * and it says what it did (the mutations) in `desc`.
 *
 * Targets:
 * - nifti: parseNiftiRaw on mutated NIfTI-1/-2 bytes (.nii and .nii.gz), then volumeToSlices on what decodes.
 * - nifti-real: the whole real BraTS files, truncated or with flipped bits (few cases: each inflates ~35 MB).
 * - patient: a patient folder of mutated files through readPatientVolumes + volumeToSlices and preprocessPatient,
 *   checking the output folder is complete or empty.
 * - npy: decodeNpy on mutated .npy bytes; every 4th case also readNpy and openNpyRows on a file.
 * - image: kaggleImageToInput on mutated JPEG/PNG bytes (the real Kaggle fixtures and PNG re-encodings).
 * - harness: the harness's own check: cases that pass, hang in synchronous code, and crash the process in turn.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { deriveSeed, mulberry32 } from '../../src/lib/random.ts';

export type FuzzTarget = 'nifti' | 'nifti-real' | 'patient' | 'npy' | 'image' | 'harness';

/** What a case did: 'ok' (decoded, output checked), 'rejected' (a clear error), 'bad' (a defect). */
export interface CaseReport {
  i: number;
  ms: number;
  status: 'ok' | 'rejected' | 'bad';
  /** The error message (rejected / bad) with the case's own file name replaced by <file>. */
  message?: string;
  desc: string;
}

export type ChildMessage = { type: 'ready'; corpus: number } | { type: 'start'; i: number } | ({ type: 'done'; rssMb: number } & CaseReport);

/** One target: its corpus size, and a case from a seeded PRNG that logs what it did into `log`. */
export interface Target {
  corpus: number;
  run(rng: () => number, i: number, log: string[]): Promise<Omit<CaseReport, 'i' | 'ms' | 'desc'>>;
}

function harnessTarget(): Target {
  return {
    corpus: 0,
    async run(_rng, i) {
      if (i % 3 === 1) for (;;); // a synchronous hang: only the parent's watchdog can end it
      if (i % 3 === 2) setImmediate(() => {
        throw new Error(`harness: crash in case ${i}`); // uncaught: the process dies
      });
      await new Promise((r) => setTimeout(r, 50));
      return { status: 'ok' };
    },
  };
}

async function main(): Promise<void> {
  const [target, seedArg, fromArg, toArg, fixtures] = process.argv.slice(2) as [FuzzTarget, string, string, string, string];
  const seed = Number(seedArg);
  const tmp = await mkdtemp(join(tmpdir(), `slicewise-fuzz-${target}-`));
  const send = (m: ChildMessage) => new Promise<void>((res) => process.send!(m, () => res()));
  try {
    // The readers and their corpora load only for the reader targets.
    const t = target === 'harness' ? harnessTarget() : await (await import('./fuzz-targets.ts')).makeTarget(target, fixtures, tmp);
    await send({ type: 'ready', corpus: t.corpus });
    for (let i = Number(fromArg); i < Number(toArg); i++) {
      const rng = mulberry32(deriveSeed(seed, target, String(i)));
      const log: string[] = [];
      await send({ type: 'start', i });
      const t0 = performance.now();
      const r = await t.run(rng, i, log);
      const ms = performance.now() - t0;
      await send({ type: 'done', i, ms, desc: log.join('; '), rssMb: Math.round(process.memoryUsage.rss() / 2 ** 20), ...r });
    }
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
  process.disconnect();
}

if (process.send) await main();
