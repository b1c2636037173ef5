/**
 * The training loop of one stage (REFERENCE.md, "Training"), written by hand over the U-Net's variables:
 *
 *   stage        loss                                             selection metric
 *   seg_warmup   0.6 Dice + 0.4 BCE over samples with a mask      val Dice
 *                (segLoss: the config's stage.loss dice_weight, bce_weight, dice_smooth; also in joint)
 *   cls_head     cross-entropy with label smoothing               val accuracy
 *   joint        lambda_seg x seg loss (masked) + lambda_cls x CE (val Dice + val accuracy) / 2
 *
 * Per batch: augmentation (train only, seeded by seed/epoch/batch), forward in training mode with the groups
 * not in `trainable` frozen (their BatchNorm layers run on running statistics and are not updated), gradients
 * by tf.variableGrads over the trainable variables only, accumulated over micro-batches when the batch is larger
 * than `microBatch` (each micro-batch's loss is divided by the full batch's counts, so the sum of the micro
 * gradients is the batch gradient), clipping by global norm, one AdamW step. Per epoch: cosine learning rate
 * (set before the epoch, per group from its own base lr), validation, checkpoints (epoch-<n> with the optimizer
 * state for resume, the newest `keepLastN` kept; `best` when the metric improves), early stopping.
 *
 * Epochs are 1-based; epoch e runs at cosineLr(base, etaMin, e - 1, epochs). A resumed run (startEpoch = saved
 * epoch + 1, optimizerState and `resume` from the saved training state) continues exactly where the saved one
 * stopped, bar the order of floating-point sums.
 *
 * Data-parallel (`replicas` > 1, parallel.ts): every chunk of up to replicas x microBatch samples is split across
 * this thread's model and replicas - 1 worker threads (each with its own tfjs instance and model copy); each
 * replica computes its shard's gradients with the full batch's denominators, the gradients are summed here, and
 * clipping and the AdamW step happen once, here; the updated parameters are published to the workers before the
 * next batch. `microBatch` stays the largest batch one replica runs at once. BatchNorm normalises per shard (no
 * sync), running statistics are the replicas' sample-weighted average, dropout masks differ per replica (see
 * parallel.ts). The worker threads start at the first training batch and are closed on every way out of
 * trainStage (end, early stop, cancel, error).
 *
 * Tensors: every batch's tensors are disposed before the next one, so tf.memory().numTensors stays flat.
 */
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { STAGES, type StageName } from '../config/schema.ts';
import { SliceWiseError } from '../lib/errors.js';
import { deriveSeed, mulberry32 } from '../lib/random.js';
import { augmentBatch, type AugmentPreset, type AugmentSpec } from './augment.js';
import {
  latestEpochCheckpoint,
  loadCheckpoint,
  pruneEpochCheckpoints,
  readTrainingState,
  saveCheckpoint,
  type EpochRecord,
  type TrainingState,
} from './checkpoint.js';
import type { Batch } from './data.js';
import { crossEntropy, SEG_LOSS_DEFAULTS, segLoss, type SegLossWeights } from './losses.js';
import { ClsMetricAccumulator, combinedScore, SegMetricAccumulator, type ClsMetrics, type SegMetrics } from './metrics.js';
import { AdamW, clipByGlobalNorm, cosineLr, EarlyStopping, type AdamWState, type EarlyStoppingState } from './optim.js';
import { createReplicaPool, dataParallelGradients, type GradientSpec, type ReplicaPool } from './parallel.js';
import { disposeShardTensors, shardTensors, sliceShard, stageLoss, type LossSpec, type ShardTensors } from './shard-grads.js';
import { PARAM_GROUPS, type ParamGroup, type UNetModel } from './unet.js';

export interface TrainConfig {
  epochs: number;
  batchSize: number;
  /** Largest batch run at once; larger batches are accumulated over micro-batches (default: batchSize). */
  microBatch?: number;
  /** Base learning rate of every group without an entry in lrGroups. */
  lr: number;
  weightDecay: number;
  betas: [number, number];
  eps: number;
  /** Cosine schedule floor. */
  etaMin: number;
  /** Max global gradient norm (<= 0 disables clipping). */
  gradClip: number;
  earlyStopping: { enabled: boolean; patience: number; minDelta: number };
  augmentation: AugmentPreset | Partial<AugmentSpec>;
  labelSmoothing: number;
  lambdaSeg: number;
  lambdaCls: number;
  /** Terms of the segmentation loss (default SEG_LOSS_DEFAULTS: 0.6 x Dice + 0.4 x BCE, smooth 1). */
  segLoss?: SegLossWeights;
  /** Per-group base learning rates, e.g. stage 3: {encoder: 1e-4, decoder: 3e-4, head: 3e-4}. */
  lrGroups?: Partial<Record<ParamGroup, number>>;
  /** Seed of augmentation (default 42). */
  seed?: number;
  /** Batch size of validation (default: batchSize, capped at microBatch). */
  evalBatchSize?: number;
}

export interface StageData {
  /** A fresh, shuffled pass over the training set for `epoch`. */
  train(opts: { epoch: number; batchSize: number }): AsyncIterable<Batch>;
  /** The validation set in a fixed order. */
  val(opts: { batchSize: number }): AsyncIterable<Batch>;
}

interface ValMetrics {
  loss: number | null;
  dice: number | null;
  diceStd: number | null;
  iou: number | null;
  diceGlobal: number | null;
  iouGlobal: number | null;
  accuracy: number | null;
  precision: number | null;
  recall: number | null;
  specificity: number | null;
  f1: number | null;
  rocAuc: number | null;
  combined: number | null;
  samples: number;
}

export interface EpochInfo {
  epoch: number;
  trainLoss: number;
  valMetrics: ValMetrics;
  /** The stage's selection metric (null when validation had no usable samples). */
  metric: number | null;
  /** Learning rate of the epoch (the first group's; see lrs for all). */
  lr: number;
  lrs: Record<string, number>;
  seconds: number;
  isBest: boolean;
  /** Folders written this epoch. */
  checkpoints: { epoch: string | null; best: string | null };
  /** Mean global gradient norm before clipping. */
  gradNorm: number;
}

interface BatchInfo {
  epoch: number;
  batch: number;
  loss: number;
  samples: number;
  gradNorm: number;
}

interface ResumeState {
  bestMetric?: number | null;
  bestEpoch?: number | null;
  earlyStopping?: EarlyStoppingState | null;
  history?: EpochRecord[];
}

export interface TrainStageOptions {
  model: UNetModel;
  stage: StageName;
  data: StageData;
  config: TrainConfig;
  trainable: readonly ParamGroup[];
  /** First epoch to run (1-based; default 1). */
  startEpoch?: number;
  optimizerState?: AdamWState | null;
  resume?: ResumeState;
  onEpoch?(info: EpochInfo): Promise<void> | void;
  onBatch?(info: BatchInfo): Promise<void> | void;
  /** Polled between batches; true ends training before the next batch (the partial epoch is not saved). */
  shouldStop?(): boolean;
  /** Checkpoints go to <checkpointDir>/epoch-<n> and <checkpointDir>/best (none when omitted). */
  checkpointDir?: string;
  /** Epoch checkpoints kept (default 2). */
  keepLastN?: number;
  /**
   * Data-parallel replicas, counting this thread (default 1: no worker threads). With n > 1, n - 1 worker threads
   * run on the backend this thread uses (see the module comment and parallel.ts).
   */
  replicas?: number;
  /** Kernel threads of each worker replica's backend (wasm's threaded kernels); unset: the backend's default. */
  replicaThreads?: number;
}

export interface TrainStageResult {
  bestMetric: number | null;
  bestEpoch: number | null;
  /** Epochs completed by this call. */
  epochsRun: number;
  /** The last completed epoch (0 when none). */
  lastEpoch: number;
  history: EpochRecord[];
  stoppedEarly: boolean;
  cancelled: boolean;
}

/** Which outputs and groups a stage uses. */
function stagePlan(stage: StageName): { seg: boolean; cls: boolean; allowed: readonly ParamGroup[] } {
  switch (stage) {
    case 'seg_warmup':
      return { seg: true, cls: false, allowed: ['encoder', 'decoder'] };
    case 'cls_head':
      return { seg: false, cls: true, allowed: ['encoder', 'head'] };
    case 'joint':
      return { seg: true, cls: true, allowed: PARAM_GROUPS };
    default:
      throw new RangeError(`unknown stage "${String(stage)}" (known: ${STAGES.join(', ')})`);
  }
}

function checkConfig(c: TrainConfig): void {
  const bad = (what: string): never => {
    throw new SliceWiseError(`training config: ${what}`, { status: 400, code: 'bad_config' });
  };
  if (!Number.isInteger(c.epochs) || c.epochs < 1) bad(`epochs must be a positive integer (got ${c.epochs})`);
  if (!Number.isInteger(c.batchSize) || c.batchSize < 1) bad(`batchSize must be a positive integer (got ${c.batchSize})`);
  if (c.microBatch !== undefined && (!Number.isInteger(c.microBatch) || c.microBatch < 1)) bad(`microBatch must be a positive integer (got ${c.microBatch})`);
  if (!(c.lr >= 0)) bad(`lr must be >= 0 (got ${c.lr})`);
  if (!(c.etaMin >= 0)) bad(`etaMin must be >= 0 (got ${c.etaMin})`);
  if (!(c.labelSmoothing >= 0 && c.labelSmoothing < 1)) bad(`labelSmoothing must be in [0, 1) (got ${c.labelSmoothing})`);
}

/** Stage's selection metric from validation metrics. */
export function stageMetric(stage: StageName, m: ValMetrics): number | null {
  if (stage === 'seg_warmup') return m.dice;
  if (stage === 'cls_head') return m.accuracy;
  return m.combined;
}

/** Tensors for samples [from, to) of a batch. */
function sliceTensors(b: Batch, from: number, to: number): ShardTensors {
  return shardTensors(sliceShard(b, from, to));
}

function emptyValMetrics(): ValMetrics {
  return {
    loss: null,
    dice: null,
    diceStd: null,
    iou: null,
    diceGlobal: null,
    iouGlobal: null,
    accuracy: null,
    precision: null,
    recall: null,
    specificity: null,
    f1: null,
    rocAuc: null,
    combined: null,
    samples: 0,
  };
}

interface EvaluateOptions {
  seg: boolean;
  cls: boolean;
  /** For the loss: */
  labelSmoothing?: number;
  lambdaSeg?: number;
  lambdaCls?: number;
  segWeights?: SegLossWeights;
  /** Largest number of samples run at once (batches are split). */
  microBatch?: number;
}

interface EvaluateResult {
  metrics: ValMetrics;
  seg: SegMetrics | null;
  cls: ClsMetrics | null;
}

/**
 * Evaluate a model (eval mode: running BatchNorm statistics, no dropout) over batches. The loss reported is the
 * stage's loss (seg, CE, or joint) averaged like in training.
 */
async function evaluateModel(model: UNetModel, batches: AsyncIterable<Batch>, opts: EvaluateOptions): Promise<EvaluateResult> {
  const segAcc = new SegMetricAccumulator(0.5);
  const clsAcc = new ClsMetricAccumulator(0.5);
  const ls = opts.labelSmoothing ?? 0;
  const lambdaSeg = opts.seg && opts.cls ? (opts.lambdaSeg ?? 1) : 1;
  const lambdaCls = opts.seg && opts.cls ? (opts.lambdaCls ?? 1) : 1;
  let segLossSum = 0;
  let segCount = 0;
  let clsLossSum = 0;
  let clsCount = 0;
  let samples = 0;
  for await (const b of batches) {
    const step = Math.max(1, opts.microBatch ?? b.n);
    for (let from = 0; from < b.n; from += step) {
      const to = Math.min(b.n, from + step);
      const t = sliceTensors(b, from, to);
      try {
        const out = tf.tidy(() => {
          const fwd: ForwardOut = opts.seg && opts.cls ? model.forward(t.x, { training: false }) : opts.seg ? { segLogits: model.forwardSeg(t.x, { training: false }) } : { clsLogits: model.forwardCls(t.x, { training: false }) };
          const r: { segProb?: Float32Array; segLoss?: number; clsProb?: Float32Array; clsLoss?: number } = {};
          if (fwd.segLogits) {
            r.segProb = (tf.sigmoid(fwd.segLogits).dataSync() as Float32Array).slice();
            // Sum of per-sample seg losses over samples with a mask (denominator 1 gives the weighted sum).
            r.segLoss = segLoss(fwd.segLogits, t.mask, t.hasMask, 1, opts.segWeights).dataSync()[0]!;
          }
          if (fwd.clsLogits) {
            r.clsProb = (tf.softmax(fwd.clsLogits).slice([0, 1], [-1, 1]).dataSync() as Float32Array).slice();
            r.clsLoss = crossEntropy(fwd.clsLogits, t.labels, ls, 1).dataSync()[0]!;
          }
          return r;
        });
        const hasMask = b.hasMask.subarray(from, to);
        const masked = hasMask.reduce((s, v) => s + (v > 0 ? 1 : 0), 0);
        if (out.segProb && b.mask) {
          const area = b.height * b.width;
          segAcc.add(out.segProb, b.mask.subarray(from * area, to * area), to - from, hasMask);
        }
        if (out.segLoss !== undefined) {
          segLossSum += out.segLoss;
          segCount += masked;
        }
        if (out.clsProb) clsAcc.add(out.clsProb, b.clsLabel.subarray(from, to));
        if (out.clsLoss !== undefined) {
          clsLossSum += out.clsLoss;
          clsCount += to - from;
        }
        samples += to - from;
      } finally {
        disposeShardTensors(t);
      }
    }
  }
  const m = emptyValMetrics();
  m.samples = samples;
  const seg = opts.seg ? segAcc.result() : null;
  const cls = opts.cls && clsCount > 0 ? clsAcc.result() : null;
  if (seg) Object.assign(m, { dice: seg.dice, diceStd: seg.diceStd, iou: seg.iou, diceGlobal: seg.diceGlobal, iouGlobal: seg.iouGlobal } satisfies Partial<ValMetrics>);
  if (cls) Object.assign(m, { accuracy: cls.accuracy, precision: cls.precision, recall: cls.recall, specificity: cls.specificity, f1: cls.f1, rocAuc: cls.rocAuc } satisfies Partial<ValMetrics>);
  m.combined = combinedScore(m.dice, m.accuracy);
  const segMean = segCount > 0 ? segLossSum / segCount : null;
  const clsMean = clsCount > 0 ? clsLossSum / clsCount : null;
  if (opts.seg && opts.cls) m.loss = segMean === null && clsMean === null ? null : lambdaSeg * (segMean ?? 0) + lambdaCls * (clsMean ?? 0);
  else m.loss = opts.seg ? segMean : clsMean;
  return { metrics: m, seg, cls };
}

/** Adds `g` into acc[name] (taking ownership of `g`). */
function addGradient(acc: Map<string, tf.Tensor>, name: string, g: tf.Tensor): void {
  const prev = acc.get(name);
  if (!prev) acc.set(name, g);
  else {
    acc.set(name, tf.add(prev, g));
    prev.dispose();
    g.dispose();
  }
}

interface ForwardOut {
  segLogits?: tf.Tensor4D;
  clsLogits?: tf.Tensor2D;
}

/** Train one stage; see the module comment. */
export async function trainStage(opts: TrainStageOptions): Promise<TrainStageResult> {
  const { model, stage, data, config } = opts;
  checkConfig(config);
  const plan = stagePlan(stage);
  const trainable = [...new Set(opts.trainable)];
  if (trainable.length === 0) throw new SliceWiseError(`stage ${stage}: nothing to train`, { status: 400, code: 'bad_config' });
  for (const g of trainable) {
    if (!plan.allowed.includes(g)) {
      throw new SliceWiseError(`stage ${stage} cannot train the ${g} (its loss does not depend on it); trainable: ${plan.allowed.join(', ')}`, {
        status: 400,
        code: 'bad_config',
      });
    }
  }
  const frozen = PARAM_GROUPS.filter((g) => !trainable.includes(g));
  const seed = config.seed ?? 42;
  const micro = Math.min(config.microBatch ?? config.batchSize, config.batchSize);
  const keepLastN = Math.max(1, opts.keepLastN ?? 2);
  const startEpoch = opts.startEpoch ?? 1;
  const replicas = opts.replicas ?? 1;
  if (!Number.isInteger(replicas) || replicas < 1) {
    throw new SliceWiseError(`stage ${stage}: replicas must be a positive integer (got ${replicas})`, { status: 400, code: 'bad_config' });
  }

  const optimizer = new AdamW(
    trainable.map((g) => ({ name: g, params: model.group(g), lr: config.lrGroups?.[g] ?? config.lr })),
    { betas: config.betas, eps: config.eps, weightDecay: config.weightDecay },
  );
  const vars = optimizer.variables();
  const ourName = new Map<string, string>();
  for (const g of trainable) for (const [name, v] of model.group(g)) ourName.set(v.name, name);

  const es = new EarlyStopping({ patience: config.earlyStopping.patience, minDelta: config.earlyStopping.minDelta, mode: 'max' });
  let bestMetric: number | null = opts.resume?.bestMetric ?? null;
  let bestEpoch: number | null = opts.resume?.bestEpoch ?? null;
  const history: EpochRecord[] = [...(opts.resume?.history ?? [])];
  if (opts.resume?.earlyStopping) es.setState(opts.resume.earlyStopping);
  let epochsRun = 0;
  let lastEpoch = startEpoch - 1;
  let stoppedEarly = false;
  let cancelled = false;

  const segWeights = config.segLoss ?? SEG_LOSS_DEFAULTS;
  const lossSpec: LossSpec = { stage, frozen, labelSmoothing: config.labelSmoothing, lambdaSeg: config.lambdaSeg, lambdaCls: config.lambdaCls, segWeights };
  /** One micro-batch's loss (a scalar), divided by the full batch's denominators. */
  const lossOf = (t: ShardTensors, segDen: number, clsDen: number): tf.Scalar => stageLoss(model, lossSpec, t, segDen, clsDen);

  let pool: ReplicaPool | null = null;
  const gradSpec: GradientSpec = { ...lossSpec, params: optimizer.paramNames() };

  /** Sums one batch's gradients into `acc` (by our parameter names) and returns the batch's loss. */
  type Accumulate = (b: Batch, acc: Map<string, tf.Tensor>, segDen: number, clsDen: number) => Promise<number>;

  /** This thread alone: forward + backward over the micro-batches. */
  const localGradients: Accumulate = async (b, acc, segDen, clsDen) => {
    let loss = 0;
    for (let from = 0; from < b.n; from += micro) {
      const t = sliceTensors(b, from, Math.min(b.n, from + micro));
      try {
        const { value, grads } = tf.variableGrads(() => lossOf(t, segDen, clsDen), vars);
        loss += value.dataSync()[0]!;
        value.dispose();
        for (const [tfName, g] of Object.entries(grads)) addGradient(acc, ourName.get(tfName)!, g);
      } finally {
        disposeShardTensors(t);
      }
    }
    return loss;
  };

  /** Over the replica pool: chunks of replicas x micro samples, each split across the replicas. */
  const replicaGradients: Accumulate = async (b, acc, segDen, clsDen) => {
    pool ??= await createReplicaPool({
      replicas,
      arch: model.config,
      inChannels: model.config.inChannels,
      seed,
      ...(opts.replicaThreads ? { threads: opts.replicaThreads } : {}),
    });
    pool.publishParams(model);
    const chunk = micro * replicas;
    let loss = 0;
    for (let from = 0; from < b.n; from += chunk) {
      const r = await dataParallelGradients(pool, model, b, from, Math.min(b.n, from + chunk), gradSpec, segDen, clsDen);
      loss += r.loss;
      for (const [name, g] of r.grads) addGradient(acc, name, g);
    }
    return loss;
  };

  /**
   * One training step on a batch: the summed gradients, clipped, one AdamW step (none when the loss is not
   * finite). Returns the batch loss and the pre-clip norm; null when the batch has nothing to learn from.
   */
  const trainBatch = async (b: Batch, accumulate: Accumulate): Promise<{ loss: number; gradNorm: number } | null> => {
    const masked = b.hasMask.reduce((s, v) => s + (v > 0 ? 1 : 0), 0);
    if (stage === 'seg_warmup' && masked === 0) return null; // nothing to learn from
    const acc = new Map<string, tf.Tensor>();
    try {
      const loss = await accumulate(b, acc, Math.max(1, masked), b.n);
      if (!Number.isFinite(loss)) return { loss, gradNorm: NaN };
      const clipped = clipByGlobalNorm(acc, config.gradClip);
      try {
        optimizer.step(clipped.grads);
      } finally {
        if (clipped.grads !== acc) for (const g of clipped.grads.values()) g.dispose();
      }
      return { loss, gradNorm: clipped.norm };
    } finally {
      for (const g of acc.values()) g.dispose();
    }
  };

  try {
    if (opts.optimizerState) optimizer.setState(opts.optimizerState);
    // A run that had already stopped early is finished: resuming it must not train on.
    if (config.earlyStopping.enabled && es.stopped) {
      return { bestMetric, bestEpoch, epochsRun: 0, lastEpoch, history, stoppedEarly: true, cancelled: false };
    }
    for (let epoch = startEpoch; epoch <= config.epochs; epoch++) {
      if (opts.shouldStop?.()) {
        cancelled = true;
        break;
      }
      const t0 = performance.now();
      optimizer.scheduleLr((base) => cosineLr(base, config.etaMin, epoch - 1, config.epochs));
      const lrs = Object.fromEntries(optimizer.groups.map((g) => [g.name, g.lr]));
      let lossSum = 0;
      let lossBatches = 0;
      let normSum = 0;
      let batchIndex = 0;
      for await (const batch of data.train({ epoch, batchSize: config.batchSize })) {
        if (opts.shouldStop?.()) {
          cancelled = true;
          break;
        }
        const rng = mulberry32(deriveSeed(seed, 'augment', String(epoch), String(batchIndex)));
        augmentBatch(
          { x: batch.x, mask: batch.mask, n: batch.n, height: batch.height, width: batch.width, channels: batch.channels },
          config.augmentation,
          rng,
        );
        const r = await trainBatch(batch, replicas > 1 ? replicaGradients : localGradients);
        if (r) {
          if (!Number.isFinite(r.loss)) {
            throw new SliceWiseError(`stage ${stage}: training diverged (loss ${r.loss} at epoch ${epoch}, batch ${batchIndex + 1}); try a lower learning rate`, {
              status: 422,
              code: 'training_diverged',
              details: { stage, epoch, batch: batchIndex + 1 },
            });
          }
          lossSum += r.loss;
          normSum += r.gradNorm;
          lossBatches += 1;
          await opts.onBatch?.({ epoch, batch: batchIndex + 1, loss: r.loss, samples: batch.n, gradNorm: r.gradNorm });
        }
        batchIndex += 1;
      }
      if (cancelled) break;
      if (lossBatches === 0) {
        throw new SliceWiseError(`stage ${stage}: epoch ${epoch} had no usable training batch (empty training set${plan.seg && !plan.cls ? ' or no masks' : ''})`, {
          status: 422,
          code: 'no_training_data',
        });
      }
      const trainLoss = lossSum / lossBatches;

      const evalBatch = config.evalBatchSize ?? config.batchSize;
      const val = await evaluateModel(model, data.val({ batchSize: evalBatch }), {
        seg: plan.seg,
        cls: plan.cls,
        labelSmoothing: config.labelSmoothing,
        lambdaSeg: config.lambdaSeg,
        lambdaCls: config.lambdaCls,
        segWeights,
        microBatch: micro,
      });
      const metric = stageMetric(stage, val.metrics);
      // No usable validation metric: the newest epoch stands in as 'best' (bestMetric stays null).
      const isBest = metric === null ? bestMetric === null : bestMetric === null || metric > bestMetric;
      if (isBest) {
        bestMetric = metric;
        bestEpoch = epoch;
      }
      const stop = config.earlyStopping.enabled && metric !== null && es.step(metric);
      const seconds = (performance.now() - t0) / 1000;
      const record: EpochRecord = {
        epoch,
        trainLoss,
        lr: optimizer.groups[0]!.lr,
        seconds,
        metric,
        valMetrics: { ...val.metrics } as unknown as Record<string, number | null>,
      };
      history.push(record);

      const checkpoints: EpochInfo['checkpoints'] = { epoch: null, best: null };
      if (opts.checkpointDir) {
        const state: TrainingState = {
          stage,
          epoch,
          metrics: record.valMetrics,
          bestMetric,
          bestEpoch,
          earlyStopping: es.getState(),
          history,
          extra: { trainable, lrs, config: { ...config } as unknown as Record<string, unknown> },
        };
        const meta = { stage, epoch, metric, bestMetric, bestEpoch };
        checkpoints.epoch = join(opts.checkpointDir, `epoch-${epoch}`);
        await saveCheckpoint(checkpoints.epoch, model, { trainingState: state, optimizer: optimizer.getState(), metadata: meta });
        if (isBest) {
          checkpoints.best = join(opts.checkpointDir, 'best');
          await saveCheckpoint(checkpoints.best, model, { trainingState: state, metadata: meta });
        }
        await pruneEpochCheckpoints(opts.checkpointDir, keepLastN);
      }
      epochsRun += 1;
      lastEpoch = epoch;
      await opts.onEpoch?.({
        epoch,
        trainLoss,
        valMetrics: val.metrics,
        metric,
        lr: record.lr,
        lrs,
        seconds,
        isBest,
        checkpoints,
        gradNorm: normSum / lossBatches,
      });
      if (stop) {
        stoppedEarly = true;
        break;
      }
    }
  } finally {
    optimizer.dispose();
    // TS narrows `pool` to null here (it is assigned in a closure).
    await (pool as ReplicaPool | null)?.close();
  }
  return { bestMetric, bestEpoch, epochsRun, lastEpoch, history, stoppedEarly, cancelled };
}

interface PreparedResume {
  /** The checkpoint resumed from. */
  dir: string;
  startEpoch: number;
  optimizerState: AdamWState | null;
  resume: ResumeState;
}

/**
 * Resume from the newest complete epoch checkpoint under `checkpointDir`: loads its weights (and BatchNorm
 * statistics) into `model` and returns what trainStage needs to continue at the next epoch; null when there is
 * nothing to resume from.
 */
export async function prepareResume(checkpointDir: string, model: UNetModel): Promise<PreparedResume | null> {
  const latest = await latestEpochCheckpoint(checkpointDir);
  if (!latest) return null;
  const state = await readTrainingState(latest.dir);
  if (!state) return null;
  await loadCheckpoint(latest.dir, { model });
  return {
    dir: latest.dir,
    startEpoch: state.epoch + 1,
    optimizerState: state.optimizer,
    resume: { bestMetric: state.bestMetric ?? null, bestEpoch: state.bestEpoch ?? null, earlyStopping: state.earlyStopping ?? null, history: state.history ?? [] },
  };
}
