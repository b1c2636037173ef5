/**
 * Set-up shared by the training tests (test/model-train.test.ts, test/model-parallel.test.ts): a small config
 * that trains the tiny U-Net on synthetic data in a few seconds, the stage data of a synthetic set, and stage 1
 * (seg_warmup) with its usual trainable groups, run to the end or stopped after an epoch.
 */
import { createBatches, type Batch } from '../../src/model/data.ts';
import type { SyntheticLayout } from '../../src/model/synthetic.ts';
import { prepareResume, trainStage, type StageData, type TrainConfig, type TrainStageOptions, type TrainStageResult } from '../../src/model/trainer.ts';
import type { UNetModel } from '../../src/model/unet.ts';

/** AdamW at lr 1e-2 with clipping, no early stopping, minimal augmentation; `over` changes or adds settings. */
export function tinyTrainConfig(over: Partial<TrainConfig> = {}): TrainConfig {
  return {
    epochs: 3,
    batchSize: 8,
    lr: 1e-2,
    weightDecay: 1e-4,
    betas: [0.9, 0.999],
    eps: 1e-6,
    etaMin: 1e-6,
    gradClip: 1,
    earlyStopping: { enabled: false, patience: 5, minDelta: 0.001 },
    augmentation: 'minimal',
    labelSmoothing: 0.1,
    lambdaSeg: 1,
    lambdaCls: 0.5,
    seed: 5,
    ...over,
  };
}

/**
 * The synthetic set's train / val BraTS patients (and, with `kaggle`, its Kaggle rows), unmixed; with `failAt`,
 * the training pass throws at that batch (1-based).
 */
export function syntheticStageData(syn: SyntheticLayout, opts: { kaggle?: boolean; failAt?: number } = {}): StageData {
  const sources = (part: 'train' | 'val') => ({
    brats: { dir: syn.bratsDir, patients: syn.bratsSplit[part] },
    ...(opts.kaggle ? { kaggle: { dir: syn.kaggleDir, indices: syn.kaggleSplit[part] } } : {}),
  });
  return {
    train: ({ epoch, batchSize }) =>
      (async function* (): AsyncGenerator<Batch> {
        let i = 0;
        for await (const b of createBatches({ ...sources('train'), batchSize, shuffle: true, seed: 1, epoch })) {
          if (++i === opts.failAt) throw new Error('disk on fire');
          yield b;
        }
      })(),
    val: ({ batchSize }) => createBatches({ ...sources('val'), batchSize, shuffle: false, seed: 1, epoch: 0 }),
  };
}

/** Stage 1 (encoder + decoder) of `model`; `extra` adds options (checkpoints, resume, replicas, hooks). */
export function trainSegWarmup(
  model: UNetModel,
  data: StageData,
  config: TrainConfig,
  extra: Omit<Partial<TrainStageOptions>, 'model' | 'stage' | 'data' | 'config'> = {},
): Promise<TrainStageResult> {
  return trainStage({ model, stage: 'seg_warmup', data, config, trainable: ['encoder', 'decoder'], ...extra });
}

/** trainSegWarmup asked to stop once epoch `stopAfter` is done (as a cancelled job is): it returns cancelled. */
export function trainSegWarmupUntil(
  model: UNetModel,
  data: StageData,
  config: TrainConfig,
  stopAfter: number,
  extra: Omit<Partial<TrainStageOptions>, 'model' | 'stage' | 'data' | 'config' | 'onEpoch' | 'shouldStop'> = {},
): Promise<TrainStageResult> {
  let stop = false;
  return trainSegWarmup(model, data, config, { ...extra, onEpoch: (e) => void (stop ||= e.epoch === stopAfter), shouldStop: () => stop });
}

/**
 * Resumes stage 1 in `model` from the newest epoch checkpoint under `checkpointDir` (prepareResume, then
 * trainSegWarmup from the next epoch with the saved optimizer state); returns what prepareResume found too.
 */
export async function resumeSegWarmup(
  model: UNetModel,
  data: StageData,
  config: TrainConfig,
  checkpointDir: string,
  extra: Omit<Partial<TrainStageOptions>, 'model' | 'stage' | 'data' | 'config' | 'checkpointDir' | 'startEpoch' | 'optimizerState' | 'resume'> = {},
) {
  const prep = await prepareResume(checkpointDir, model);
  if (!prep) throw new Error(`nothing to resume under ${checkpointDir}`);
  const result = await trainSegWarmup(model, data, config, { ...extra, checkpointDir, startEpoch: prep.startEpoch, optimizerState: prep.optimizerState, resume: prep.resume });
  return { prep, result };
}
