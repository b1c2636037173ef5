import { dirname, join } from 'node:path';
import { readdir } from 'node:fs/promises';
import type { Job } from 'bullmq';
import { and, eq, sql } from 'drizzle-orm';
import type { AppContext } from '../context.ts';
import { loadConfig } from '../config/load.ts';
import type { StageName } from '../config/schema.ts';
import { artifacts, metrics, runs } from '../db/schema.ts';
import { SliceWiseError } from '../lib/errors.ts';
import type { StageInput } from '../model/stage.ts';
import { runDir } from '../producers/run-flow.ts';
import { TRAIN_STEPS, type TrainStep } from '../queues/names.ts';
import { getRunRow } from '../runs/store.ts';
import { recordArtifact } from './artifacts.ts';
import { runStep, RunStoppedError } from './step.ts';
import { trainInThread, TrainingStoppedError } from './train-runner.ts';

export const STAGE_OF: Record<TrainStep, StageName> = {
  train_stage1_seg_warmup: 'seg_warmup',
  train_stage2_cls_head: 'cls_head',
  train_stage3_joint: 'joint',
};

export function checkpointDir(dataDir: string, runId: string, stage: StageName): string {
  return join(dataDir, 'checkpoints', runId, stage);
}

/** The next stage starts from what the previous one recorded as its best checkpoint, not from a path guess. */
async function previousBest(ctx: AppContext, runId: string, step: TrainStep): Promise<string | undefined> {
  const i = TRAIN_STEPS.indexOf(step);
  if (i === 0) return undefined;
  const prev = TRAIN_STEPS[i - 1]!;
  const [row] = await ctx.db
    .select()
    .from(artifacts)
    .where(and(eq(artifacts.runId, runId), eq(artifacts.step, prev), eq(artifacts.kind, 'checkpoint_best'), sql`${artifacts.path} like '%model.json'`));
  if (!row) throw new SliceWiseError(`${step} needs the best checkpoint of ${prev}, and run ${runId} recorded none`, { status: 409, code: 'no_checkpoint' });
  return dirname(row.path);
}

export interface TrainResult {
  kind: 'train';
  stage: StageName;
  bestMetric: number;
  bestEpoch: number;
  checkpoint: string;
}

export function trainProcessor(ctx: AppContext) {
  return async (job: Job, token?: string, signal?: AbortSignal): Promise<TrainResult> => {
    const step = job.name as TrainStep;
    const stage = STAGE_OF[step];
    if (!stage) throw new Error(`the train queue has no processor for job name '${job.name}'`);
    return runStep(step, ctx, job, token, signal, async ({ run, progress }) => {
      const config = loadConfig({ trainingMode: run.trainingMode as never, stage, overrides: run.overrides ?? undefined });
      const dataRun = run.dataRunId ? await getRunRow(ctx.db, run.dataRunId) : run;
      if (!dataRun) throw new SliceWiseError(`run ${run.id} trains on run ${run.dataRunId}, which no longer exists`, { status: 409, code: 'no_data_run' });
      const input: StageInput = {
        stage,
        dataRunDir: runDir(dataRun.dataDir, dataRun.id),
        checkpointDir: checkpointDir(run.dataDir, run.id, stage),
        initFrom: await previousBest(ctx, run.id, step),
        config,
      };
      const started = Date.now();
      let result;
      try {
        result = await trainInThread(input, {
          signal,
          onLog: (m) => ctx.logger.info({ runId: run.id, step }, m),
          onEpoch: async (r) => {
            const rows = Object.entries({ train_loss: r.trainLoss, lr: r.lr, seconds: r.seconds, ...r.metrics })
              .filter(([, v]) => Number.isFinite(v))
              .map(([name, value]) => ({ runId: run.id, step, epoch: r.epoch, name, value }));
            // Upserts: an epoch replayed after a resume overwrites its own rows.
            if (rows.length)
              await ctx.db
                .insert(metrics)
                .values(rows)
                .onConflictDoUpdate({ target: [metrics.runId, metrics.step, metrics.epoch, metrics.name], set: { value: sql`excluded.value`, recordedAt: new Date() } });
            const counts = { epoch: r.epoch, epochs: r.epochs, done: r.epoch, total: r.epochs, eta_seconds: Math.round(r.etaSeconds), ...(r.best.epoch != null ? { best_epoch: r.best.epoch } : {}) };
            await progress(counts);
            await job.updateProgress({ ...counts, train_loss: r.trainLoss, ...r.metrics, best_metric: r.best.metric });
            if (r.device) await ctx.db.update(runs).set({ device: r.device }).where(eq(runs.id, run.id));
          },
        });
      } catch (err) {
        if (err instanceof TrainingStoppedError) throw new RunStoppedError(run.id, 'cancelled');
        throw err;
      }
      for (const [kind, dir] of [
        ['checkpoint_best', result.bestDir],
        ['checkpoint_last', result.lastDir],
      ] as const) {
        for (const f of await readdir(dir)) await recordArtifact(ctx.db, { runId: run.id, step, kind, path: join(dir, f) });
      }
      ctx.logger.info(
        { runId: run.id, step, bestMetric: result.bestMetric, bestEpoch: result.bestEpoch, seconds: (Date.now() - started) / 1000 },
        `${step} of run ${run.id} done: best ${result.metricName} ${result.bestMetric.toFixed(4)} at epoch ${result.bestEpoch}${result.resumedFrom ? ` (resumed after epoch ${result.resumedFrom})` : ''}`,
      );
      return {
        result: { kind: 'train', stage, bestMetric: result.bestMetric, bestEpoch: result.bestEpoch, checkpoint: result.bestDir },
        counts: { epochs_run: result.epochsRun, best_epoch: result.bestEpoch, ...(result.resumedFrom ? { resumed_from_epoch: result.resumedFrom } : {}) },
      };
    });
  };
}
