import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Job } from 'bullmq';
import { and, eq, inArray, sql } from 'drizzle-orm';
import type { AppContext } from '../context.ts';
import { kaggleImages, patients } from '../db/schema.ts';
import { writeJsonAtomic } from '../lib/atomic.ts';
import { SliceWiseError } from '../lib/errors.ts';
import { runDir } from '../producers/run-flow.ts';
import { splitPatients, splitStratified, type SplitName } from '../splits/index.ts';
import type { PreprocessBratsResult } from './preprocess-brats.ts';
import type { KaggleResult } from './sandboxed/preprocess.ts';
import { runStep } from './step.ts';
import { recordArtifact } from './artifacts.ts';

const SPLITS: SplitName[] = ['train', 'val', 'test'];

async function childResult<T extends { kind: string }>(job: Job, kind: T['kind']): Promise<T> {
  const found = Object.values(await job.getChildrenValues()).find((v) => v?.kind === kind);
  if (!found) throw new SliceWiseError(`${job.name} found no ${kind} result among its children`, { code: 'flow_broken' });
  return found as T;
}

interface KaggleMeta {
  items: { index: number; relPath: string; label: number }[];
  rejected: { relPath: string; reason: string; label?: number }[];
}

export function splitProcessor(ctx: AppContext) {
  return async (job: Job, token?: string, signal?: AbortSignal) => {
    if (job.name === 'split_brats') {
      return runStep('split_brats', ctx, job, token, signal, async ({ run, config }) => {
        const pre = await childResult<PreprocessBratsResult>(job, 'preprocess_brats');
        const ids = pre.patients.map((p) => p.patientId);
        const splits = splitPatients(ids, config.data.splits, config.seed);
        const file = join(runDir(run.dataDir, run.id), 'splits', 'brats.json');
        const slices = Object.fromEntries(pre.patients.map((p) => [p.patientId, p.slices]));
        await writeJsonAtomic(file, {
          seed: config.seed,
          ratios: config.data.splits,
          processed_dir: pre.outDir,
          ...splits,
          slices: Object.fromEntries(SPLITS.map((s) => [s, splits[s].reduce((a, id) => a + (slices[id] ?? 0), 0)])),
        });
        for (const s of SPLITS) {
          if (splits[s].length) await ctx.db.update(patients).set({ split: s }).where(and(eq(patients.runId, run.id), inArray(patients.patientId, splits[s])));
        }
        await recordArtifact(ctx.db, { runId: run.id, step: 'split_brats', kind: 'split', path: file });
        const counts = Object.fromEntries(SPLITS.map((s) => [s, splits[s].length]));
        return { result: { kind: 'split_brats', file, ...counts }, counts };
      });
    }
    return runStep('split_kaggle', ctx, job, token, signal, async ({ run, config }) => {
      const pre = await childResult<KaggleResult>(job, 'preprocess_kaggle');
      const metaFile = join(pre.outDir, 'meta.json');
      let meta: KaggleMeta;
      try {
        meta = JSON.parse(await readFile(metaFile, 'utf8')) as KaggleMeta;
      } catch (err) {
        throw new SliceWiseError(`cannot read ${metaFile}: ${(err as Error).message}`, { code: 'missing_file' });
      }
      const splits = splitStratified(meta.items, (i) => i.label, (i) => i.relPath, config.data.splits, config.seed);
      const splitOf = new Map<string, SplitName>();
      for (const s of SPLITS) for (const it of splits[s]) splitOf.set(it.relPath, s);
      const file = join(runDir(run.dataDir, run.id), 'splits', 'kaggle.json');
      await writeJsonAtomic(file, {
        seed: config.seed,
        ratios: config.data.splits,
        processed_dir: pre.outDir,
        ...Object.fromEntries(SPLITS.map((s) => [s, splits[s].map((i) => i.index).sort((a, b) => a - b)])),
      });
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
            set: { status: sqlExcluded('status'), reason: sqlExcluded('reason'), split: sqlExcluded('split'), label: sqlExcluded('label') },
          });
      }
      await recordArtifact(ctx.db, { runId: run.id, step: 'split_kaggle', kind: 'split', path: file });
      const counts = { ...Object.fromEntries(SPLITS.map((s) => [s, splits[s].length])), rejected: meta.rejected.length };
      return { result: { kind: 'split_kaggle', file, ...counts }, counts };
    });
  };
}

/** The value the conflicting INSERT tried to write. */
function sqlExcluded(column: string) {
  return sql.raw(`excluded.${column}`);
}
