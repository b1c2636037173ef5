/**
 * One training stage from the pipeline's files to checkpoints: reads the splits and slices a data run wrote,
 * builds or loads the model, resumes from the last epoch checkpoint when there is one, and trains. Knows
 * nothing of queues; the train worker runs it in a thread and records what it reports.
 */
import { existsSync } from 'node:fs';
import { cpus } from 'node:os';
import { join } from 'node:path';
import type { Config, StageName } from '../config/schema.ts';
import { readSplits, splitFile } from '../disk/layout.ts';
import { env } from '../env.ts';
import { SliceWiseError } from '../lib/errors.ts';
import { loadCheckpoint } from './checkpoint.ts';
import { installFastCpuKernels } from './cpu-kernels.ts';
import { createBatches, type BatchOptions } from './data.ts';
import { initBackend } from './engine.ts';
import { prepareResume, stageMetric, trainStage, type EpochInfo, type StageData, type TrainConfig } from './trainer.ts';
import { createUNet, type ParamGroup, type PresetName } from './unet.ts';

export interface StageInput {
  stage: StageName;
  /** The data run's splits folder (brats.json, kaggle.json); the processed folders are the ones they name. */
  splitsDir: string;
  /** Where this stage's checkpoints go (epoch-<n>/, best/). */
  checkpointDir: string;
  /** The previous stage's best checkpoint, when there is a previous stage. */
  initFrom?: string;
  /** Merged config: base -> mode -> stage -> overrides. */
  config: Config;
}

export interface EpochReport {
  epoch: number;
  epochs: number;
  trainLoss: number;
  /** val_dice, val_accuracy, ... (only the finite ones). */
  metrics: Record<string, number>;
  lr: number;
  seconds: number;
  etaSeconds: number;
  best: { metric: number | null; epoch: number | null };
  device?: string;
}

export interface StageResult {
  bestMetric: number;
  bestEpoch: number;
  metricName: string;
  epochsRun: number;
  resumedFrom?: number;
  bestDir: string;
  lastDir: string;
  device: string;
  /** True when shouldStop ended training: the caller treats the stage as cancelled. */
  stopped: boolean;
}

interface StageHooks {
  onEpoch(report: EpochReport): Promise<void>;
  shouldStop(): boolean;
  log(message: string): void;
}

const METRIC_NAME: Record<StageName, string> = { seg_warmup: 'val_dice', cls_head: 'val_accuracy', joint: 'val_combined' };

/**
 * Micro-batch for a backend: the wasm heap stops at 4 GB, and the small preset at 256 x 256 needs ~3.7 GB for a
 * batch of 8 (measured). Memory scales with pixels and, roughly, with the base width squared.
 */
function autoMicroBatch(backend: string, preset: PresetName, imageSize: number, batchSize: number): number {
  if (backend === 'tensorflow') return batchSize;
  const widthFactor = { small: 1, medium: 4, large: 16 }[preset];
  const fits = Math.floor((6 * (256 * 256)) / (imageSize * imageSize) / widthFactor);
  return Math.max(1, Math.min(batchSize, fits));
}

/**
 * Data-parallel training replicas (trainer.ts, parallel.ts) for a backend: `configured` (SLICEWISE_TRAIN_REPLICAS,
 * parsed by src/env.ts) wins; else 1 on 'tensorflow' (tfjs-node uses every core, or the GPU, by itself) and
 * min(cores, 2) on wasm and cpu, which run one thread per instance. Two replicas use two wasm heaps: the
 * micro-batch (autoMicroBatch) is per replica.
 */
export function autoReplicas(backend: string, configured: number | undefined = env().trainReplicas, cores = cpus().length): number {
  if (configured !== undefined) return configured;
  if (backend === 'tensorflow') return 1;
  return Math.max(1, Math.min(cores, 2));
}

/** The groups a stage trains when its config does not say. */
const DEFAULT_TRAINABLE: Record<StageName, ParamGroup[]> = { seg_warmup: ['encoder', 'decoder'], cls_head: ['head'], joint: ['encoder', 'decoder', 'head'] };

/** The config's stage section (validated by src/config/schema.ts) as the trainer takes it. */
function stageSettings(c: Config, stage: StageName) {
  const { trainable, mix, lr, loss } = c.stage;
  return {
    trainable: trainable ?? DEFAULT_TRAINABLE[stage],
    mix,
    lrGroups: lr,
    labelSmoothing: loss.label_smoothing,
    lambdaSeg: loss.lambda_seg,
    lambdaCls: loss.lambda_cls,
    segLoss: { diceWeight: loss.dice_weight, bceWeight: loss.bce_weight, diceSmooth: loss.dice_smooth },
  };
}

export async function runStage(input: StageInput, hooks: StageHooks): Promise<StageResult> {
  const { stage, config } = input;
  let info = await initBackend();
  // Replica threads on 'cpu' install these too: every replica then computes with the same kernels.
  if (info.backend === 'cpu') installFastCpuKernels();
  const replicas = autoReplicas(info.backend);
  // Replicas share the cores with wasm's own kernel threads: give each replica its share of the cores (unless
  // SLICEWISE_WASM_THREADS says otherwise; the worker replicas inherit it).
  let replicaThreads: number | undefined;
  if (replicas > 1 && info.backend === 'wasm' && !env().wasmThreads) {
    replicaThreads = Math.max(1, Math.floor(cpus().length / replicas));
    info = await initBackend({ threads: replicaThreads });
  }
  const device = `${info.backend}: ${info.device}${replicas > 1 ? ` x ${replicas} replicas` : ''}`;
  hooks.log(`${stage}: training on ${device}`);

  const splits = await readSplits(input.splitsDir);
  if (!splits.brats) throw new SliceWiseError(`${splitFile(input.splitsDir, 'brats')} is missing: the data run has no BraTS split`, { status: 409, code: 'no_data_run' });
  const useKaggle = stage !== 'seg_warmup' && splits.kaggle;
  if (stage !== 'seg_warmup' && !splits.kaggle) hooks.log(`${stage}: no Kaggle split in the data run; training on BraTS slices alone`);
  const set = (part: 'train' | 'val'): Pick<BatchOptions, 'brats' | 'kaggle'> => ({
    brats: { dir: splits.brats!.processed_dir, patients: splits.brats![part] },
    ...(useKaggle ? { kaggle: { dir: splits.kaggle!.processed_dir, indices: splits.kaggle![part] } } : {}),
  });
  const st = stageSettings(config, stage);
  const common = { seed: config.seed, clsTumorPixels: config.data.cls_tumor_pixels };
  const data: StageData = {
    train: ({ epoch, batchSize }) => createBatches({ ...set('train'), ...common, ...(useKaggle && st.mix ? { mix: st.mix } : {}), batchSize, shuffle: true, epoch }),
    val: ({ batchSize }) => createBatches({ ...set('val'), ...common, batchSize, shuffle: false, epoch: 0 }),
  };

  const preset = config.model.preset;
  const model = createUNet(preset, { inChannels: config.data.modalities.length, seed: config.seed });
  try {
    const resume = await prepareResume(input.checkpointDir, model);
    if (resume) {
      hooks.log(`${stage}: resuming at epoch ${resume.startEpoch} from ${resume.dir}`);
    } else if (input.initFrom) {
      // Stage 2 takes encoder and decoder from stage 1 (a fresh head); stage 3 takes everything from stage 2.
      const groups: ParamGroup[] = stage === 'cls_head' ? ['encoder', 'decoder'] : ['encoder', 'decoder', 'head'];
      await loadCheckpoint(input.initFrom, { model, groups });
      hooks.log(`${stage}: initialised ${groups.join(', ')} from ${input.initFrom}`);
    }
    const t = config.training;
    const trainConfig: TrainConfig = {
      epochs: t.epochs,
      batchSize: t.batch_size,
      microBatch: autoMicroBatch(info.backend, preset, config.data.image_size, t.batch_size),
      lr: t.optimizer.lr,
      weightDecay: t.optimizer.weight_decay,
      betas: t.optimizer.betas,
      eps: t.optimizer.eps,
      etaMin: t.scheduler.name === 'cosine' ? t.scheduler.eta_min : t.optimizer.lr,
      gradClip: t.grad_clip ?? 0,
      earlyStopping: { enabled: t.early_stopping.enabled, patience: t.early_stopping.patience, minDelta: t.early_stopping.min_delta },
      augmentation: t.augmentation,
      labelSmoothing: st.labelSmoothing,
      lambdaSeg: st.lambdaSeg,
      lambdaCls: st.lambdaCls,
      segLoss: st.segLoss,
      ...(st.lrGroups ? { lrGroups: st.lrGroups } : {}),
      seed: config.seed,
    };
    const epochSeconds: number[] = [];
    let best: { metric: number | null; epoch: number | null } = { metric: resume?.resume.bestMetric ?? null, epoch: resume?.resume.bestEpoch ?? null };
    const result = await trainStage({
      model,
      stage,
      data,
      config: trainConfig,
      trainable: st.trainable,
      startEpoch: resume?.startEpoch ?? 1,
      optimizerState: resume?.optimizerState ?? null,
      ...(resume ? { resume: resume.resume } : {}),
      checkpointDir: input.checkpointDir,
      keepLastN: config.training.keep_last_n,
      shouldStop: hooks.shouldStop,
      replicas,
      ...(replicaThreads ? { replicaThreads } : {}),
      onEpoch: async (e: EpochInfo) => {
        epochSeconds.push(e.seconds);
        if (e.isBest) best = { metric: e.metric, epoch: e.epoch };
        const v = e.valMetrics;
        const named: Record<string, number | null> = {
          val_loss: v.loss,
          val_dice: v.dice,
          val_iou: v.iou,
          val_accuracy: v.accuracy,
          val_precision: v.precision,
          val_recall: v.recall,
          val_f1: v.f1,
          val_auc: v.rocAuc,
          val_combined: v.combined,
          val_metric: stageMetric(stage, v),
          grad_norm: e.gradNorm,
        };
        const metrics = Object.fromEntries(Object.entries(named).filter((kv): kv is [string, number] => typeof kv[1] === 'number' && Number.isFinite(kv[1])));
        const mean = epochSeconds.reduce((a, b) => a + b, 0) / epochSeconds.length;
        await hooks.onEpoch({ epoch: e.epoch, epochs: t.epochs, trainLoss: e.trainLoss, metrics, lr: e.lr, seconds: e.seconds, etaSeconds: mean * (t.epochs - e.epoch), best, device });
      },
    });
    const lastDir = join(input.checkpointDir, `epoch-${result.lastEpoch}`);
    let bestDir = join(input.checkpointDir, 'best');
    if (!existsSync(join(bestDir, 'model.json'))) {
      // No validation samples (e.g. two patients: one train, one test): the last epoch stands in for the best.
      hooks.log(`${stage}: validation gave no ${METRIC_NAME[stage]}; using the last epoch as the best checkpoint`);
      bestDir = lastDir;
    }
    return {
      bestMetric: result.bestMetric ?? Number.NaN,
      bestEpoch: result.bestEpoch ?? result.lastEpoch,
      metricName: METRIC_NAME[stage],
      epochsRun: result.epochsRun,
      ...(resume ? { resumedFrom: resume.startEpoch - 1 } : {}),
      bestDir,
      lastDir,
      device,
      stopped: result.cancelled,
    };
  } finally {
    model.dispose();
  }
}
