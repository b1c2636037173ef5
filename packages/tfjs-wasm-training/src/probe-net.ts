/**
 * A small U-Net-like network written with raw tf ops, used to test and benchmark the training kernels on the
 * op mix of a typical segmentation U-Net without depending on any model code: double [3x3 conv (no bias, 'same'),
 * BatchNorm from tf.moments (training mode), ReLU] blocks, 2x2 max-pool, bilinear x2 upsampling + concat skip,
 * a 1x1 conv with bias to one logit, and a classification head (global average pool -> dense -> ReLU ->
 * dropout (a fixed keep mask) -> dense(2)). Loss: BCE-with-logits on the mask + softmax cross-entropy on the class.
 *
 * Parameters are plain Float32Arrays so that the very same values can be put on two backends and the gradients
 * compared.
 */
import * as tf from '@tensorflow/tfjs';

export interface ProbeNetConfig {
  base: number;
  depth: number;
  inChannels: number;
  headHidden: number;
  /**
   * BatchNorm implementation: 'moments' (default; op by op, as a model written with tf ops computes it, so tfjs
   * records ~8 full-size tensors per layer on the tape and ~8 more gradients) or 'customGrad' (the same math with a hand-written
   * backward: ~2 + ~2), which is what makes batch 8 at 256x256 fit the 4 GB wasm heap.
   */
  bn?: 'moments' | 'customGrad';
}

export const PROBE_SMALL: ProbeNetConfig = { base: 16, depth: 2, inChannels: 1, headHidden: 16 };

export interface ProbeParamSpec {
  name: string;
  shape: number[];
  fanIn: number;
  init: 'uniform' | 'ones' | 'zeros';
}

export function probeParamSpecs(cfg: ProbeNetConfig): ProbeParamSpec[] {
  const specs: ProbeParamSpec[] = [];
  const ch = (level: number): number => cfg.base * 2 ** level;
  const double = (prefix: string, cin: number, cout: number): void => {
    specs.push({ name: `${prefix}.conv1`, shape: [3, 3, cin, cout], fanIn: 9 * cin, init: 'uniform' });
    specs.push({ name: `${prefix}.bn1.gamma`, shape: [cout], fanIn: 0, init: 'ones' });
    specs.push({ name: `${prefix}.bn1.beta`, shape: [cout], fanIn: 0, init: 'zeros' });
    specs.push({ name: `${prefix}.conv2`, shape: [3, 3, cout, cout], fanIn: 9 * cout, init: 'uniform' });
    specs.push({ name: `${prefix}.bn2.gamma`, shape: [cout], fanIn: 0, init: 'ones' });
    specs.push({ name: `${prefix}.bn2.beta`, shape: [cout], fanIn: 0, init: 'zeros' });
  };
  double('enc0', cfg.inChannels, cfg.base);
  for (let i = 1; i <= cfg.depth; i++) double(`enc${i}`, ch(i - 1), ch(i));
  for (let i = 0; i < cfg.depth; i++) double(`dec${i}`, ch(cfg.depth - i) + ch(cfg.depth - i - 1), ch(cfg.depth - i - 1));
  specs.push({ name: 'out.w', shape: [1, 1, cfg.base, 1], fanIn: cfg.base, init: 'uniform' });
  specs.push({ name: 'out.b', shape: [1], fanIn: cfg.base, init: 'uniform' });
  const bott = ch(cfg.depth);
  specs.push({ name: 'fc1.w', shape: [bott, cfg.headHidden], fanIn: bott, init: 'uniform' });
  specs.push({ name: 'fc1.b', shape: [cfg.headHidden], fanIn: bott, init: 'uniform' });
  specs.push({ name: 'fc2.w', shape: [cfg.headHidden, 2], fanIn: cfg.headHidden, init: 'uniform' });
  specs.push({ name: 'fc2.b', shape: [2], fanIn: cfg.headHidden, init: 'uniform' });
  return specs;
}

/** Deterministic uniform [0, 1) generator. */
export function lcg(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 4294967296;
  };
}

/** Random values in [-1, 1) (or `scale` times that). */
export function randomValues(n: number, seed: number, scale = 1): Float32Array {
  const r = lcg(seed);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = (r() * 2 - 1) * scale;
  return out;
}

/** PyTorch-like init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)); BatchNorm gamma 1 (slightly perturbed), beta 0 (idem). */
export function initProbeParams(cfg: ProbeNetConfig, seed = 1): Map<string, { shape: number[]; values: Float32Array }> {
  const out = new Map<string, { shape: number[]; values: Float32Array }>();
  probeParamSpecs(cfg).forEach((s, i) => {
    const n = s.shape.reduce((a, b) => a * b, 1);
    let values: Float32Array;
    if (s.init === 'uniform') values = randomValues(n, seed * 1000 + i, 1 / Math.sqrt(s.fanIn));
    else {
      // Perturbed so that gamma / beta gradients are not symmetric across channels.
      values = randomValues(n, seed * 1000 + i, 0.1);
      if (s.init === 'ones') for (let j = 0; j < n; j++) values[j] += 1;
    }
    out.set(s.name, { shape: s.shape, values });
  });
  return out;
}

export interface ProbeBatch {
  x: tf.Tensor4D;
  mask: tf.Tensor4D;
  cls: tf.Tensor2D;
  /** Dropout keep mask already scaled by 1 / (1 - p). */
  keep: tf.Tensor2D;
}

export function makeProbeBatch(cfg: ProbeNetConfig, n: number, h: number, w: number, seed = 7): ProbeBatch {
  const r = lcg(seed);
  const x = new Float32Array(n * h * w * cfg.inChannels).map(() => r() * 2 - 1);
  const mask = new Float32Array(n * h * w).map(() => (r() < 0.3 ? 1 : 0));
  const cls = new Float32Array(n * 2);
  for (let i = 0; i < n; i++) cls[i * 2 + (i % 2)] = 1;
  const keep = new Float32Array(n * cfg.headHidden).map(() => (r() < 0.5 ? 2 : 0));
  return {
    x: tf.tensor4d(x, [n, h, w, cfg.inChannels]),
    mask: tf.tensor4d(mask, [n, h, w, 1]),
    cls: tf.tensor2d(cls, [n, 2]),
    keep: tf.tensor2d(keep, [n, cfg.headHidden]),
  };
}

const EPS = 1e-5;

/**
 * Training-mode BatchNorm over [N, H, W] with a hand-written gradient: with xhat = (x - mean) * rstd,
 * dbeta = sum(dy), dgamma = sum(dy * xhat), dx = gamma * rstd * (dy - dbeta / M - xhat * dgamma / M), M = N*H*W.
 */
const customBatchNorm = tf.customGrad((...args: Array<tf.Tensor | tf.GradSaveFunc>) => {
  const [x, gamma, beta, save] = args as [tf.Tensor4D, tf.Tensor1D, tf.Tensor1D, tf.GradSaveFunc];
  const { mean, variance } = tf.moments(x, [0, 1, 2]);
  const rstd = tf.rsqrt(variance.add(EPS));
  const xhat = x.sub(mean).mul(rstd);
  save([xhat, rstd, gamma]);
  return {
    value: xhat.mul(gamma).add(beta) as tf.Tensor4D,
    gradFunc: (dy: tf.Tensor | tf.Tensor[], saved: tf.Tensor[]) => {
      const g = dy as tf.Tensor4D;
      const [xh, r, gm] = saved as [tf.Tensor4D, tf.Tensor1D, tf.Tensor1D];
      const m = xh.shape[0] * xh.shape[1] * xh.shape[2];
      const dbeta = tf.sum(g, [0, 1, 2]);
      const dgamma = tf.sum(g.mul(xh), [0, 1, 2]);
      const dx = g.sub(dbeta.div(m)).sub(xh.mul(dgamma.div(m))).mul(r.mul(gm));
      return [dx, dgamma, dbeta];
    },
  };
});

/** The scalar training loss of the probe net; `p` maps parameter names to tensors (e.g. variables). */
export function probeLoss(cfg: ProbeNetConfig, p: Map<string, tf.Tensor>, b: ProbeBatch): tf.Scalar {
  const get = (name: string): tf.Tensor => {
    const t = p.get(name);
    if (!t) throw new Error(`probe net: missing parameter ${name}`);
    return t;
  };
  const bn = (x: tf.Tensor4D, prefix: string): tf.Tensor4D => {
    if (cfg.bn === 'customGrad') return customBatchNorm(x, get(`${prefix}.gamma`), get(`${prefix}.beta`)) as tf.Tensor4D;
    const { mean, variance } = tf.moments(x, [0, 1, 2]);
    return x.sub(mean).mul(tf.rsqrt(variance.add(EPS))).mul(get(`${prefix}.gamma`)).add(get(`${prefix}.beta`));
  };
  const double = (x: tf.Tensor4D, prefix: string): tf.Tensor4D => {
    let y = tf.conv2d(x, get(`${prefix}.conv1`) as tf.Tensor4D, 1, 'same');
    y = tf.relu(bn(y, `${prefix}.bn1`));
    y = tf.conv2d(y, get(`${prefix}.conv2`) as tf.Tensor4D, 1, 'same');
    return tf.relu(bn(y, `${prefix}.bn2`));
  };
  const skips: tf.Tensor4D[] = [double(b.x, 'enc0')];
  for (let i = 1; i <= cfg.depth; i++) skips.push(double(tf.maxPool(skips[i - 1]!, 2, 2, 'valid'), `enc${i}`));
  let y = skips[cfg.depth]!;
  for (let i = 0; i < cfg.depth; i++) {
    const skip = skips[cfg.depth - i - 1]!;
    const up = tf.image.resizeBilinear(y, [skip.shape[1], skip.shape[2]], false, false);
    y = double(tf.concat([up, skip], 3), `dec${i}`);
  }
  const seg = tf.conv2d(y, get('out.w') as tf.Tensor4D, 1, 'valid').add(get('out.b'));
  // BCE with logits: mean(max(z, 0) - z * t + log(1 + exp(-|z|)))
  const bce = tf.mean(tf.relu(seg).sub(seg.mul(b.mask)).add(tf.log1p(tf.exp(tf.neg(tf.abs(seg))))));
  const pooled = tf.mean(skips[cfg.depth]!, [1, 2]) as tf.Tensor2D;
  const h = tf.relu(tf.matMul(pooled, get('fc1.w') as tf.Tensor2D).add(get('fc1.b'))).mul(b.keep) as tf.Tensor2D;
  const logits = tf.matMul(h, get('fc2.w') as tf.Tensor2D).add(get('fc2.b'));
  const ce = tf.mean(tf.neg(tf.sum(b.cls.mul(tf.logSoftmax(logits)), 1)));
  return bce.add(ce) as tf.Scalar;
}

/** FLOPs of the convolutions of one training step (forward, dx for all but the first conv, dW), 2 per MAC. */
export function probeConvFlops(cfg: ProbeNetConfig, n: number, h: number, w: number): { forward: number; backward: number } {
  const ch = (level: number): number => cfg.base * 2 ** level;
  let forward = 0;
  let first = 0;
  const conv = (hh: number, ww: number, k: number, cin: number, cout: number): void => {
    const f = 2 * n * hh * ww * k * k * cin * cout;
    if (forward === 0) first = f;
    forward += f;
  };
  const sizes: Array<[number, number]> = [[h, w]];
  for (let i = 1; i <= cfg.depth; i++) {
    const [ph, pw] = sizes[i - 1]!;
    sizes.push([Math.floor(ph / 2), Math.floor(pw / 2)]);
  }
  conv(h, w, 3, cfg.inChannels, ch(0));
  conv(h, w, 3, ch(0), ch(0));
  for (let i = 1; i <= cfg.depth; i++) {
    const [hh, ww] = sizes[i]!;
    conv(hh, ww, 3, ch(i - 1), ch(i));
    conv(hh, ww, 3, ch(i), ch(i));
  }
  for (let i = 0; i < cfg.depth; i++) {
    const [hh, ww] = sizes[cfg.depth - i - 1]!;
    const skip = ch(cfg.depth - i - 1);
    conv(hh, ww, 3, ch(cfg.depth - i) + skip, skip);
    conv(hh, ww, 3, skip, skip);
  }
  conv(h, w, 1, cfg.base, 1);
  return { forward, backward: 2 * forward - first };
}
