/**
 * The multi-task U-Net of the original (REFERENCE.md, "Model"), written with raw tf ops over named tf.Variables
 * (no tfjs-layers) so that the training loop controls gradients, frozen groups and BatchNorm statistics.
 *
 * Encoder: a double conv block [3x3 conv (no bias, 'same'), BatchNorm, ReLU] x 2 at `base` channels, then `depth`
 * blocks of 2x2 max-pool + double conv, channels doubling. Decoder: bilinear x2 upsampling
 * (tf.image.resizeBilinear, alignCorners false), concatenation of the skip, double conv down to the skip's
 * channel count; a 1x1 conv (with bias) to one logit. Classification head on the bottleneck: global average pool
 * -> dense(headHidden) -> ReLU -> dropout 0.5 (training only) -> dense(2).
 *
 * Tensors are NHWC. Conv weights are [kh, kw, in, out] (tf layout), dense weights [in, out].
 *
 * BatchNorm follows PyTorch: training mode normalises with the batch statistics (biased variance) and updates the
 * running mean / variance with momentum 0.1 (the running variance from the unbiased batch variance); eval mode
 * uses the running statistics. eps 1e-5. A group listed in `frozen` runs its BatchNorm layers in eval mode whatever
 * `training` says, so a frozen part neither changes its running statistics nor depends on the batch composition.
 *
 * Initialisation matches PyTorch's defaults: conv and linear weights kaiming-uniform with a = sqrt(5), i.e.
 * U(-1/sqrt(fan_in), 1/sqrt(fan_in)), biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)), BatchNorm weight 1, bias 0,
 * running mean 0, running variance 1. Every parameter draws from its own PRNG seeded by (seed, parameter name), so
 * a parameter's initial value does not depend on the others.
 *
 * Parameter names (PyTorch-like): encoder.<i>.conv1.weight, encoder.<i>.bn1.weight / .bias (buffers
 * .running_mean / .running_var), ... conv2 / bn2; decoder.<i>.* likewise; decoder.out.weight / .bias;
 * head.fc1.weight / .bias, head.fc2.weight / .bias. Encoder block 0 is the input block, block i (1..depth) follows
 * the i-th pooling; decoder block i (0..depth-1) upsamples from the deepest remaining level.
 */
import * as tf from '@tensorflow/tfjs';
import { deriveSeed, mulberry32 } from '../lib/random.js';

export type ParamGroup = 'encoder' | 'decoder' | 'head';
export const PARAM_GROUPS: readonly ParamGroup[] = ['encoder', 'decoder', 'head'];

export type PresetName = 'small' | 'medium' | 'large';

export interface ArchConfig {
  base: number;
  depth: number;
  headHidden: number;
}

export const PRESETS: Record<PresetName, ArchConfig> = {
  small: { base: 16, depth: 2, headHidden: 16 },
  medium: { base: 32, depth: 4, headHidden: 64 },
  large: { base: 64, depth: 5, headHidden: 512 },
};

export interface UNetConfig extends ArchConfig {
  inChannels: number;
  /** Set when the architecture came from a preset. */
  preset?: PresetName;
}

interface CreateUNetOptions {
  /** Input channels (default 1). */
  inChannels?: number;
  /** Seed of the weight initialisation and of the dropout masks (default 42). */
  seed?: number;
}

interface ForwardOptions {
  /** Training mode: batch statistics in BatchNorm (and running-stat updates), dropout in the head. */
  training: boolean;
  /** Groups whose BatchNorm layers run in eval mode (running stats, no update) even when training. */
  frozen?: readonly ParamGroup[];
}

interface ForwardResult {
  /** N x H x W x 1 logits. */
  segLogits: tf.Tensor4D;
  /** N x 2 logits (index 1 = tumour). */
  clsLogits: tf.Tensor2D;
}

interface EncodeResult {
  /** Encoder outputs from full resolution down, skips[depth] being the bottleneck. */
  skips: tf.Tensor4D[];
  bottleneck: tf.Tensor4D;
}

export interface UNetModel {
  readonly config: UNetConfig;
  /** Trainable parameters by name, in a fixed order (encoder, decoder, head). */
  readonly params: Map<string, tf.Variable>;
  /** BatchNorm running statistics (not trainable) by name. */
  readonly buffers: Map<string, tf.Variable>;
  /** Group of a parameter or buffer name. */
  groupOf(name: string): ParamGroup;
  /** The parameters of one group, by name. */
  group(name: ParamGroup): Map<string, tf.Variable>;
  /** The buffers of one group, by name. */
  groupBuffers(name: ParamGroup): Map<string, tf.Variable>;
  /** Both outputs. Call inside tf.tidy (or dispose the results): intermediate tensors are not disposed here. */
  forward(x: tf.Tensor4D, opts: ForwardOptions): ForwardResult;
  /** Segmentation only (skips the classification head). */
  forwardSeg(x: tf.Tensor4D, opts: ForwardOptions): tf.Tensor4D;
  /** Classification only (skips the decoder). */
  forwardCls(x: tf.Tensor4D, opts: ForwardOptions): tf.Tensor2D;
  /** The encoder alone (e.g. for Grad-CAM on the bottleneck). */
  encode(x: tf.Tensor4D, opts: ForwardOptions): EncodeResult;
  /** The classification head applied to bottleneck features. */
  classify(bottleneck: tf.Tensor4D, opts: ForwardOptions): tf.Tensor2D;
  /**
   * The decoder on encode()'s skips, to segmentation logits: with encode and classify, a forward pass whose
   * bottleneck the caller keeps (inference reuses it for Grad-CAM). forward() is encode + decode + classify.
   */
  decode(skips: tf.Tensor4D[], opts: ForwardOptions): tf.Tensor4D;
  /** Number of trainable parameters (all groups, or one). */
  countParams(group?: ParamGroup): number;
  dispose(): void;
}

/** BatchNorm's epsilon (PyTorch's default); the ONNX export (serving/onnx-graph.ts) uses the same. */
export const BN_EPS = 1e-5;
const BN_MOMENTUM = 0.1;
const DROPOUT = 0.5;

/** Resolve a preset name or explicit architecture to a full config. */
export function resolveConfig(arch: PresetName | ArchConfig, inChannels = 1): UNetConfig {
  const a = typeof arch === 'string' ? PRESETS[arch] : arch;
  if (!a) throw new RangeError(`unknown U-Net preset "${String(arch)}" (known: ${Object.keys(PRESETS).join(', ')})`);
  for (const [k, v] of Object.entries({ base: a.base, depth: a.depth, headHidden: a.headHidden, inChannels })) {
    if (!Number.isInteger(v) || v < (k === 'depth' ? 0 : 1)) throw new RangeError(`U-Net config: ${k} must be a positive integer (got ${v})`);
  }
  const config: UNetConfig = { base: a.base, depth: a.depth, headHidden: a.headHidden, inChannels };
  if (typeof arch === 'string') config.preset = arch;
  return config;
}

interface ParamSpec {
  name: string;
  shape: number[];
  init: 'kaiming' | 'bias' | 'ones' | 'zeros';
  /** fan_in for the kaiming / bias bounds. */
  fanIn: number;
}

/** The parameter and buffer specs of an architecture, in the canonical order. */
export function parameterSpecs(config: UNetConfig): { params: ParamSpec[]; buffers: ParamSpec[] } {
  const params: ParamSpec[] = [];
  const buffers: ParamSpec[] = [];
  const conv = (prefix: string, cin: number, cout: number): void => {
    params.push({ name: `${prefix}.weight`, shape: [3, 3, cin, cout], init: 'kaiming', fanIn: 9 * cin });
  };
  const bn = (prefix: string, c: number): void => {
    params.push({ name: `${prefix}.weight`, shape: [c], init: 'ones', fanIn: 0 });
    params.push({ name: `${prefix}.bias`, shape: [c], init: 'zeros', fanIn: 0 });
    buffers.push({ name: `${prefix}.running_mean`, shape: [c], init: 'zeros', fanIn: 0 });
    buffers.push({ name: `${prefix}.running_var`, shape: [c], init: 'ones', fanIn: 0 });
  };
  const double = (prefix: string, cin: number, cout: number): void => {
    conv(`${prefix}.conv1`, cin, cout);
    bn(`${prefix}.bn1`, cout);
    conv(`${prefix}.conv2`, cout, cout);
    bn(`${prefix}.bn2`, cout);
  };
  const { base, depth, headHidden, inChannels } = config;
  const ch = (level: number): number => base * 2 ** level;
  double('encoder.0', inChannels, base);
  for (let i = 1; i <= depth; i++) double(`encoder.${i}`, ch(i - 1), ch(i));
  for (let i = 0; i < depth; i++) {
    const deep = ch(depth - i);
    const skip = ch(depth - i - 1);
    double(`decoder.${i}`, deep + skip, skip);
  }
  params.push({ name: 'decoder.out.weight', shape: [1, 1, base, 1], init: 'kaiming', fanIn: base });
  params.push({ name: 'decoder.out.bias', shape: [1], init: 'bias', fanIn: base });
  const bottleneck = ch(depth);
  params.push({ name: 'head.fc1.weight', shape: [bottleneck, headHidden], init: 'kaiming', fanIn: bottleneck });
  params.push({ name: 'head.fc1.bias', shape: [headHidden], init: 'bias', fanIn: bottleneck });
  params.push({ name: 'head.fc2.weight', shape: [headHidden, 2], init: 'kaiming', fanIn: headHidden });
  params.push({ name: 'head.fc2.bias', shape: [2], init: 'bias', fanIn: headHidden });
  return { params, buffers };
}

/** Exact trainable-parameter count of an architecture, without building it. */
export function countParameters(config: UNetConfig): number {
  return parameterSpecs(config).params.reduce((s, p) => s + p.shape.reduce((a, b) => a * b, 1), 0);
}

export function groupOfName(name: string): ParamGroup {
  const g = name.slice(0, name.indexOf('.'));
  if (g === 'encoder' || g === 'decoder' || g === 'head') return g;
  throw new RangeError(`not a U-Net parameter name: ${name}`);
}

function initialValues(spec: ParamSpec, seed: number): Float32Array {
  const n = spec.shape.reduce((a, b) => a * b, 1);
  const out = new Float32Array(n);
  if (spec.init === 'ones') out.fill(1);
  else if (spec.init === 'kaiming' || spec.init === 'bias') {
    // kaiming_uniform_(a=sqrt(5)): gain sqrt(2 / (1 + 5)), bound gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in);
    // PyTorch's default bias init uses the same bound.
    const bound = 1 / Math.sqrt(spec.fanIn);
    const rng = mulberry32(deriveSeed(seed, spec.name));
    for (let i = 0; i < n; i++) out[i] = (rng() * 2 - 1) * bound;
  }
  return out;
}

/** Build a U-Net from a preset name or an explicit {base, depth, headHidden}. */
export function createUNet(arch: PresetName | ArchConfig, opts: CreateUNetOptions = {}): UNetModel {
  const config = resolveConfig(arch, opts.inChannels ?? 1);
  const seed = opts.seed ?? 42;
  const specs = parameterSpecs(config);
  const params = new Map<string, tf.Variable>();
  const buffers = new Map<string, tf.Variable>();
  const makeVar = (s: ParamSpec, trainable: boolean): tf.Variable => {
    const initial = tf.tensor(initialValues(s, seed), s.shape, 'float32');
    const v = tf.variable(initial, trainable); // no name: tf variable names are global, and several models coexist
    initial.dispose(); // the variable holds its own reference to the data
    return v;
  };
  for (const s of specs.params) params.set(s.name, makeVar(s, true));
  for (const s of specs.buffers) buffers.set(s.name, makeVar(s, false));
  const dropoutRng = mulberry32(deriveSeed(seed, 'dropout'));
  let disposed = false;

  const p = (name: string): tf.Variable => {
    const v = params.get(name);
    if (!v) throw new Error(`U-Net: missing parameter ${name}`);
    return v;
  };
  const b = (name: string): tf.Variable => {
    const v = buffers.get(name);
    if (!v) throw new Error(`U-Net: missing buffer ${name}`);
    return v;
  };

  const batchNorm = (x: tf.Tensor4D, prefix: string, train: boolean): tf.Tensor4D => {
    const gamma = p(`${prefix}.weight`);
    const beta = p(`${prefix}.bias`);
    const runMean = b(`${prefix}.running_mean`);
    const runVar = b(`${prefix}.running_var`);
    // y = (x - mean) / sqrt(var + eps) * gamma + beta, folded into y = x * scale + shift: two full-size broadcast
    // ops instead of four (the per-channel arithmetic is on C-vectors).
    if (!train) {
      const scale = tf.rsqrt(runVar.add(BN_EPS)).mul(gamma);
      return x.mul(scale).add(beta.sub(runMean.mul(scale))) as tf.Tensor4D;
    }
    const { mean, variance } = tf.moments(x, [0, 1, 2]);
    const [n, h, w] = x.shape;
    const count = n * h * w;
    const unbiased = count > 1 ? variance.mul(count / (count - 1)) : variance;
    runMean.assign(runMean.mul(1 - BN_MOMENTUM).add(mean.mul(BN_MOMENTUM)));
    runVar.assign(runVar.mul(1 - BN_MOMENTUM).add(unbiased.mul(BN_MOMENTUM)));
    const scale = tf.rsqrt(variance.add(BN_EPS)).mul(gamma);
    return x.mul(scale).add(beta.sub(mean.mul(scale))) as tf.Tensor4D;
  };

  const doubleConv = (x: tf.Tensor4D, prefix: string, train: boolean): tf.Tensor4D => {
    let y = tf.conv2d(x, p(`${prefix}.conv1.weight`) as tf.Tensor4D, 1, 'same');
    y = tf.relu(batchNorm(y, `${prefix}.bn1`, train));
    y = tf.conv2d(y, p(`${prefix}.conv2.weight`) as tf.Tensor4D, 1, 'same');
    return tf.relu(batchNorm(y, `${prefix}.bn2`, train));
  };

  const trainsBn = (group: ParamGroup, o: ForwardOptions): boolean => o.training && !(o.frozen ?? []).includes(group);

  const check = (x: tf.Tensor4D): void => {
    if (disposed) throw new Error('U-Net: model was disposed');
    if (x.rank !== 4 || x.shape[3] !== config.inChannels) {
      throw new RangeError(`U-Net: expected an N x H x W x ${config.inChannels} input, got [${x.shape.join(', ')}]`);
    }
  };

  const encode = (x: tf.Tensor4D, o: ForwardOptions): EncodeResult => {
    check(x);
    const train = trainsBn('encoder', o);
    const skips: tf.Tensor4D[] = [doubleConv(x, 'encoder.0', train)];
    for (let i = 1; i <= config.depth; i++) {
      const pooled = tf.maxPool(skips[i - 1]!, 2, 2, 'valid');
      skips.push(doubleConv(pooled, `encoder.${i}`, train));
    }
    return { skips, bottleneck: skips[config.depth]! };
  };

  const decode = (skips: tf.Tensor4D[], o: ForwardOptions): tf.Tensor4D => {
    const train = trainsBn('decoder', o);
    let y = skips[config.depth]!;
    for (let i = 0; i < config.depth; i++) {
      const skip = skips[config.depth - i - 1]!;
      // Resize to the skip's exact size: x2 for even sizes, and odd sizes (floored by the pooling) still line up.
      const up = tf.image.resizeBilinear(y, [skip.shape[1], skip.shape[2]], false, false);
      y = doubleConv(tf.concat([up, skip], 3), `decoder.${i}`, train);
    }
    return tf.conv2d(y, p('decoder.out.weight') as tf.Tensor4D, 1, 'valid').add(p('decoder.out.bias')) as tf.Tensor4D;
  };

  const classify = (bottleneck: tf.Tensor4D, o: ForwardOptions): tf.Tensor2D => {
    const pooled = tf.mean(bottleneck, [1, 2]) as tf.Tensor2D;
    let h = tf.relu(tf.matMul(pooled, p('head.fc1.weight') as tf.Tensor2D).add(p('head.fc1.bias'))) as tf.Tensor2D;
    if (o.training && !(o.frozen ?? []).includes('head')) {
      const keep = tf.greaterEqual(tf.randomUniform(h.shape, 0, 1, 'float32', Math.floor(dropoutRng() * 2 ** 31)), DROPOUT);
      h = h.mul(tf.cast(keep, 'float32')).mul(1 / (1 - DROPOUT)) as tf.Tensor2D;
    }
    return tf.matMul(h, p('head.fc2.weight') as tf.Tensor2D).add(p('head.fc2.bias')) as tf.Tensor2D;
  };

  const groupMap = (source: Map<string, tf.Variable>, g: ParamGroup): Map<string, tf.Variable> =>
    new Map([...source].filter(([name]) => groupOfName(name) === g));

  return {
    config,
    params,
    buffers,
    groupOf: groupOfName,
    group: (g) => groupMap(params, g),
    groupBuffers: (g) => groupMap(buffers, g),
    encode,
    classify,
    decode,
    forward(x, o) {
      const { skips, bottleneck } = encode(x, o);
      return { segLogits: decode(skips, o), clsLogits: classify(bottleneck, o) };
    },
    forwardSeg(x, o) {
      return decode(encode(x, o).skips, o);
    },
    forwardCls(x, o) {
      return classify(encode(x, o).bottleneck, o);
    },
    countParams(g) {
      let n = 0;
      for (const [name, v] of params) if (!g || groupOfName(name) === g) n += v.size;
      return n;
    },
    dispose() {
      if (disposed) return;
      disposed = true;
      for (const v of params.values()) v.dispose();
      for (const v of buffers.values()) v.dispose();
    },
  };
}
