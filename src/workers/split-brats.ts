/** split_brats: patient-level train/val/test of the preprocessed patients -> splits/brats.json and patients.split. */
import { and, eq, inArray } from 'drizzle-orm';
import { patients } from '../db/schema.ts';
import { runPaths, SPLIT_NAMES, writeBratsSplit } from '../disk/layout.ts';
import { splitPatients } from '../splits/index.ts';
import { recordArtifact } from './artifacts.ts';
import { defineStep, requireChild, RunJobData } from './define.ts';
import type { PreprocessBratsResult } from './preprocess-brats.ts';

export interface SplitResult {
  kind: 'split_brats' | 'split_kaggle';
  file: string;
  train: number;
  val: number;
  test: number;
}

// Declared in full, as every step is (define.ts): the same shape as its sibling steps' declarations by design.
export const splitBrats = defineStep({
  name: 'split_brats',
  queue: 'split',
  data: RunJobData,
  async run({ ctx, run, config, childResults }) {
    const pre = await requireChild<PreprocessBratsResult>({ childResults, step: 'split_brats' }, 'preprocess_brats');
    const splits = splitPatients(pre.patients.map((p) => p.patientId), config.data.splits, config.seed);
    const slicesOf = new Map(pre.patients.map((p) => [p.patientId, p.slices]));
    const slices = (ids: string[]) => ids.reduce((a, id) => a + (slicesOf.get(id) ?? 0), 0);
    const file = runPaths(run.dataDir, run.id).split('brats');
    await writeBratsSplit(file, {
      seed: config.seed,
      ratios: config.data.splits,
      processed_dir: pre.outDir,
      ...splits,
      slices: { train: slices(splits.train), val: slices(splits.val), test: slices(splits.test) },
    });
    for (const s of SPLIT_NAMES) {
      if (splits[s].length) await ctx.db.update(patients).set({ split: s }).where(and(eq(patients.runId, run.id), inArray(patients.patientId, splits[s])));
    }
    await recordArtifact(ctx.db, { runId: run.id, step: 'split_brats', kind: 'split', path: file });
    const counts = { train: splits.train.length, val: splits.val.length, test: splits.test.length };
    return { result: { kind: 'split_brats', file, ...counts } satisfies SplitResult, counts };
  },
});
