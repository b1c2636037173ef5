/**
 * The body the three training steps share: runs one stage (src/model/stage.ts) in a thread of its own, writes
 * each epoch's metrics as they come, and records the checkpoints as artifacts. Each stage starts from the best
 * checkpoint its child (the previous stage's job) returned.
 */
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { eq, sql } from 'drizzle-orm';
import { loadConfig } from '../config/load.ts';
import type { StageName, TrainingMode } from '../config/schema.ts';
import { metrics, runs } from '../db/schema.ts';
import { runPaths } from '../disk/layout.ts';
import { SliceWiseError } from '../lib/errors.ts';
import type { StageInput } from '../model/stage.ts';
import type { TrainStep } from '../runs/modes.ts';
import { getRunRow } from '../runs/store.ts';
import { recordArtifact } from './artifacts.ts';
import { childOfKind, type InProcessContext, type RunJobData, type StepOutcome } from './define.ts';
import { RunStoppedError } from './errors.ts';
import { trainInThread, TrainingStoppedError } from './train-runner.ts';

/** A killed training job resumes from its last epoch checkpoint, so a retry costs at most one epoch. */
export const TRAIN_RETRY = { attempts: 3, backoff: { type: 'fixed', delay: 5000 } } as const;

export interface TrainResult {
  kind: 'train';
  stage: StageName;
  bestMetric: number;
  bestEpoch: number;
  /** The best checkpoint's folder: the next stage starts from it. */
  checkpoint: string;
}

export async function trainStage(
  step: TrainStep,
  stage: StageName,
  { from }: { from?: TrainStep },
  { ctx, job, run, signal, progress, childResults, log }: InProcessContext<RunJobData>,
): Promise<StepOutcome<TrainResult>> {
  const config = loadConfig({ trainingMode: run.trainingMode as TrainingMode, stage, overrides: run.overrides ?? undefined });
  const dataRun = run.dataRunId ? await getRunRow(ctx.db, run.dataRunId) : run;
  if (!dataRun) throw new SliceWiseError(`run ${run.id} trains on run ${run.dataRunId}, which no longer exists`, { status: 409, code: 'no_data_run' });
  let initFrom: string | undefined;
  if (from) {
    const previous = childOfKind<TrainResult>(await childResults(), 'train');
    if (!previous) throw new SliceWiseError(`${step} needs the best checkpoint of ${from}, and its job returned none`, { status: 409, code: 'no_checkpoint' });
    initFrom = previous.checkpoint;
  }
  const input: StageInput = {
    stage,
    splitsDir: runPaths(dataRun.dataDir, dataRun.id).splits,
    checkpointDir: runPaths(run.dataDir, run.id).checkpoints(stage),
    initFrom,
    config,
  };
  const started = Date.now();
  let result;
  try {
    result = await trainInThread(input, {
      signal,
      onLog: log,
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
        // Bull Board shows the job's progress: give it the epoch's figures too.
        await job.updateProgress({ ...counts, train_loss: r.trainLoss, ...r.metrics, best_metric: r.best.metric }).catch(() => {});
        if (r.device) await ctx.db.update(runs).set({ device: r.device }).where(eq(runs.id, run.id));
      },
    });
  } catch (err) {
    if (err instanceof TrainingStoppedError) throw new RunStoppedError(run.id, 'cancelled', { cause: err });
    throw err;
  }
  for (const [kind, dir] of [
    ['checkpoint_best', result.bestDir],
    ['checkpoint_last', result.lastDir],
  ] as const) {
    for (const f of await readdir(dir)) await recordArtifact(ctx.db, { runId: run.id, step, kind, path: join(dir, f) });
  }
  log(
    `${step} of run ${run.id} done in ${((Date.now() - started) / 1000).toFixed(0)} s: ` +
      (Number.isFinite(result.bestMetric)
        ? `best ${result.metricName} ${result.bestMetric.toFixed(4)} at epoch ${result.bestEpoch}`
        : `no validation data gave a ${result.metricName}, so the last epoch (${result.bestEpoch}) is kept as the best`) +
      (result.resumedFrom ? ` (resumed after epoch ${result.resumedFrom})` : ''),
  );
  return {
    result: { kind: 'train', stage, bestMetric: result.bestMetric, bestEpoch: result.bestEpoch, checkpoint: result.bestDir },
    counts: {
      epochs_run: result.epochsRun,
      best_epoch: result.bestEpoch,
      ...(result.resumedFrom ? { resumed_from_epoch: result.resumedFrom } : {}),
      // No validation figure to choose by (e.g. no validation patients): the newest epoch stood in as the best.
      ...(Number.isFinite(result.bestMetric) ? {} : { no_validation_last_epoch_kept: 1 }),
    },
  };
}
