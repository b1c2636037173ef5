/** split_kaggle: stratified train/val/test of the processed Kaggle images -> splits/kaggle.json and kaggle_images rows. */
import { sql } from 'drizzle-orm';
import { kaggleImages } from '../db/schema.ts';
import { kaggleFiles, readKaggleMeta, runPaths, SPLIT_NAMES, writeKaggleSplit, type SplitName } from '../disk/layout.ts';
import { splitStratified } from '../splits/index.ts';
import { recordArtifact } from './artifacts.ts';
import { defineStep, requireChild, RunJobData } from './define.ts';
import type { KaggleResult } from './preprocess-kaggle.ts';
import type { SplitResult } from './split-brats.ts';

/** The value the conflicting INSERT tried to write. */
const excluded = (column: string) => sql.raw(`excluded.${column}`);

// Declared in full, as every step is (define.ts): the same shape as its sibling steps' declarations by design.
export const splitKaggle = defineStep({
  name: 'split_kaggle',
  queue: 'split',
  data: RunJobData,
  async run({ ctx, run, config, childResults }) {
    const pre = await requireChild<KaggleResult>({ childResults, step: 'split_kaggle' }, 'preprocess_kaggle');
    const meta = await readKaggleMeta(kaggleFiles(pre.outDir));
    const splits = splitStratified(meta.items, (i) => i.label, (i) => i.relPath, config.data.splits, config.seed);
    const splitOf = new Map<string, SplitName>();
    for (const s of SPLIT_NAMES) for (const it of splits[s]) splitOf.set(it.relPath, s);
    const file = runPaths(run.dataDir, run.id).split('kaggle');
    const indices = (s: SplitName) => splits[s].map((i) => i.index).sort((a, b) => a - b);
    await writeKaggleSplit(file, { seed: config.seed, ratios: config.data.splits, processed_dir: pre.outDir, train: indices('train'), val: indices('val'), test: indices('test') });
    // Upserts keyed by (run, file): a redelivered job rewrites the same rows.
    const rows = [
      ...meta.items.map((i) => ({ runId: run.id, relPath: i.relPath, label: i.label, status: 'processed' as const, reason: null, split: splitOf.get(i.relPath) ?? null })),
      ...meta.rejected.map((r) => ({
        runId: run.id,
        relPath: r.relPath,
        label: r.label ?? (r.relPath.toLowerCase().startsWith('yes') ? 1 : 0),
        status: 'rejected' as const,
        reason: r.reason,
        split: null,
      })),
    ];
    for (let i = 0; i < rows.length; i += 500) {
      await ctx.db
        .insert(kaggleImages)
        .values(rows.slice(i, i + 500))
        .onConflictDoUpdate({
          target: [kaggleImages.runId, kaggleImages.relPath],
          set: { status: excluded('status'), reason: excluded('reason'), split: excluded('split'), label: excluded('label') },
        });
    }
    await recordArtifact(ctx.db, { runId: run.id, step: 'split_kaggle', kind: 'split', path: file });
    const counts = { train: splits.train.length, val: splits.val.length, test: splits.test.length, rejected: meta.rejected.length };
    return { result: { kind: 'split_kaggle', file, train: counts.train, val: counts.val, test: counts.test } satisfies SplitResult, counts };
  },
});
