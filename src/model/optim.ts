/**
 * Optimisation: AdamW (PyTorch's formula, decoupled weight decay, per-group learning rates), the cosine learning
 * rate schedule, clipping by global norm and early stopping. No tfjs optimizer is used: the updates are plain tf
 * ops on the variables, so the state can be saved, restored and compared exactly.
 *
 * PyTorch's AdamW step, per parameter p with gradient g (step t counted per parameter):
 *   p <- p (1 - lr wd)
 *   m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
 *   p <- p - (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps)
 */
import * as tf from '@tensorflow/tfjs';

interface AdamWHyper {
  betas: [number, number];
  eps: number;
  weightDecay: number;
}

interface OptimGroupSpec {
  name: string;
  /** Parameters by name. */
  params: Map<string, tf.Variable> | Iterable<[string, tf.Variable]>;
  /** The group's base learning rate (the schedule starts from it). */
  lr: number;
  /** Overrides the optimizer's weight decay for this group. */
  weightDecay?: number;
}

interface OptimGroupState {
  name: string;
  /** Base learning rate. */
  initialLr: number;
  /** Learning rate of the next step. */
  lr: number;
  weightDecay: number;
  params: string[];
}

interface AdamWSlotState {
  name: string;
  shape: number[];
  step: number;
  m: Float32Array;
  v: Float32Array;
}

/** Plain data: JSON-safe except the Float32Arrays (checkpoint.ts stores those in optimizer.bin). */
export interface AdamWState {
  kind: 'adamw';
  betas: [number, number];
  eps: number;
  weightDecay: number;
  groups: OptimGroupState[];
  slots: AdamWSlotState[];
}

interface Slot {
  param: tf.Variable;
  m: tf.Variable;
  v: tf.Variable;
  step: number;
  group: OptimGroupState;
}

function zeroVariable(like: tf.Tensor): tf.Variable {
  const zeros = tf.zerosLike(like);
  const v = tf.variable(zeros, false);
  zeros.dispose(); // the variable holds its own reference to the data
  return v;
}

const DEFAULT_HYPER: AdamWHyper = { betas: [0.9, 0.999], eps: 1e-6, weightDecay: 1e-4 };

export class AdamW {
  readonly betas: [number, number];
  readonly eps: number;
  readonly weightDecay: number;
  readonly groups: OptimGroupState[] = [];
  private readonly slots = new Map<string, Slot>();
  private disposed = false;

  constructor(groups: OptimGroupSpec[], hyper: Partial<AdamWHyper> = {}) {
    this.betas = hyper.betas ?? DEFAULT_HYPER.betas;
    this.eps = hyper.eps ?? DEFAULT_HYPER.eps;
    this.weightDecay = hyper.weightDecay ?? DEFAULT_HYPER.weightDecay;
    const [b1, b2] = this.betas;
    if (!(b1 >= 0 && b1 < 1 && b2 >= 0 && b2 < 1)) throw new RangeError(`AdamW: betas must be in [0, 1), got ${this.betas.join(', ')}`);
    if (!(this.eps > 0)) throw new RangeError(`AdamW: eps must be > 0, got ${this.eps}`);
    for (const g of groups) {
      if (!(g.lr >= 0)) throw new RangeError(`AdamW: group ${g.name}: lr must be >= 0, got ${g.lr}`);
      const state: OptimGroupState = { name: g.name, initialLr: g.lr, lr: g.lr, weightDecay: g.weightDecay ?? this.weightDecay, params: [] };
      for (const [name, param] of g.params) {
        if (this.slots.has(name)) throw new Error(`AdamW: parameter ${name} is in two groups`);
        state.params.push(name);
        this.slots.set(name, { param, m: zeroVariable(param), v: zeroVariable(param), step: 0, group: state });
      }
      this.groups.push(state);
    }
  }

  /** Names of the parameters this optimizer updates. */
  paramNames(): string[] {
    return [...this.slots.keys()];
  }

  /** The variables this optimizer updates, in a fixed order. */
  variables(): tf.Variable[] {
    return [...this.slots.values()].map((s) => s.param);
  }

  setGroupLr(group: string, lr: number): void {
    const g = this.groups.find((x) => x.name === group);
    if (!g) throw new Error(`AdamW: no group ${group}`);
    g.lr = lr;
  }

  /** Set every group's lr from its initial lr through `f` (e.g. a schedule). */
  scheduleLr(f: (initialLr: number) => number): void {
    for (const g of this.groups) g.lr = f(g.initialLr);
  }

  /**
   * One update. `grads` maps parameter names to gradients; a parameter without a gradient is left untouched
   * (and its step count does not advance), as in PyTorch. The gradients are not disposed.
   */
  step(grads: Map<string, tf.Tensor>): void {
    if (this.disposed) throw new Error('AdamW: disposed');
    const [b1, b2] = this.betas;
    for (const [name, g] of grads) {
      const s = this.slots.get(name);
      if (!s) throw new Error(`AdamW: gradient for unknown parameter ${name}`);
      s.step += 1;
      const t = s.step;
      const lr = s.group.lr;
      const wd = s.group.weightDecay;
      const bc1 = 1 - b1 ** t;
      const bc2Sqrt = Math.sqrt(1 - b2 ** t);
      tf.tidy(() => {
        const m = tf.add(tf.mul(s.m, b1), tf.mul(g, 1 - b1));
        const v = tf.add(tf.mul(s.v, b2), tf.mul(tf.square(g), 1 - b2));
        const decayed = wd !== 0 && lr !== 0 ? tf.mul(s.param, 1 - lr * wd) : s.param;
        const denom = tf.add(tf.div(tf.sqrt(v), bc2Sqrt), this.eps);
        const next = tf.sub(decayed, tf.mul(tf.div(m, denom), lr / bc1));
        s.m.assign(m);
        s.v.assign(v);
        s.param.assign(next);
      });
    }
  }

  /** A copy of the state (reads the tensors synchronously). */
  getState(): AdamWState {
    return {
      kind: 'adamw',
      betas: [...this.betas],
      eps: this.eps,
      weightDecay: this.weightDecay,
      groups: this.groups.map((g) => ({ ...g, params: [...g.params] })),
      slots: [...this.slots].map(([name, s]) => ({
        name,
        shape: [...s.param.shape],
        step: s.step,
        m: (s.m.dataSync() as Float32Array).slice(),
        v: (s.v.dataSync() as Float32Array).slice(),
      })),
    };
  }

  /**
   * Restore a state saved by getState(). Slots are matched by parameter name; every parameter of this optimizer
   * must be present with the same shape. Group learning rates (current and initial) are restored for groups
   * with the same name.
   */
  setState(state: AdamWState): void {
    if (state.kind !== 'adamw') throw new Error(`AdamW: cannot load optimizer state of kind ${String(state.kind)}`);
    const byName = new Map(state.slots.map((s) => [s.name, s]));
    for (const [name, s] of this.slots) {
      const saved = byName.get(name);
      if (!saved) throw new Error(`AdamW: saved state has no slot for ${name}`);
      if (saved.shape.join('x') !== s.param.shape.join('x')) {
        throw new Error(`AdamW: slot ${name} has shape [${saved.shape.join(', ')}], the parameter [${s.param.shape.join(', ')}]`);
      }
      s.step = saved.step;
      tf.tidy(() => {
        s.m.assign(tf.tensor(saved.m, s.param.shape, 'float32'));
        s.v.assign(tf.tensor(saved.v, s.param.shape, 'float32'));
      });
    }
    for (const g of this.groups) {
      const saved = state.groups.find((x) => x.name === g.name);
      if (saved) {
        g.lr = saved.lr;
        g.initialLr = saved.initialLr;
        g.weightDecay = saved.weightDecay;
      }
    }
  }

  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    for (const s of this.slots.values()) {
      s.m.dispose();
      s.v.dispose();
    }
  }
}

/**
 * Cosine annealing (PyTorch's CosineAnnealingLR closed form): lr at epoch index t (0-based, the first epoch runs
 * at the base lr) = etaMin + (baseLr - etaMin) (1 + cos(pi t / T)) / 2; t >= T gives etaMin.
 */
export function cosineLr(baseLr: number, etaMin: number, t: number, T: number): number {
  if (T <= 0) return baseLr;
  const c = Math.min(Math.max(t, 0), T);
  return etaMin + ((baseLr - etaMin) * (1 + Math.cos((Math.PI * c) / T))) / 2;
}

/** sqrt(sum of squared gradient entries), read synchronously. */
export function globalNorm(grads: Iterable<tf.Tensor>): number {
  const list = [...grads];
  if (list.length === 0) return 0;
  return tf.tidy(() => tf.sqrt(tf.addN(list.map((g) => tf.sum(tf.square(g))))).dataSync()[0]!);
}

interface ClipResult {
  /** The clipped gradients: new tensors when scaled, else the very tensors passed in. */
  grads: Map<string, tf.Tensor>;
  /** The global norm before clipping. */
  norm: number;
  /** The factor applied (1 when not clipped). */
  scale: number;
}

/**
 * PyTorch's clip_grad_norm_: total = global norm; coef = maxNorm / (total + 1e-6); if coef < 1, every gradient is
 * multiplied by coef. maxNorm <= 0 or non-finite disables clipping (the norm is still reported).
 */
export function clipByGlobalNorm(grads: Map<string, tf.Tensor>, maxNorm: number): ClipResult {
  const norm = globalNorm(grads.values());
  if (!(maxNorm > 0) || !Number.isFinite(maxNorm)) return { grads, norm, scale: 1 };
  const coef = maxNorm / (norm + 1e-6);
  if (!(coef < 1)) return { grads, norm, scale: 1 };
  const out = new Map<string, tf.Tensor>();
  for (const [name, g] of grads) out.set(name, tf.tidy(() => tf.mul(g, coef)));
  return { grads: out, norm, scale: coef };
}

interface EarlyStoppingOptions {
  patience: number;
  minDelta?: number;
  mode?: 'max' | 'min';
}

export interface EarlyStoppingState {
  best: number | null;
  counter: number;
  stopped: boolean;
}

/**
 * Stops after `patience` consecutive epochs without an improvement larger than minDelta over the best value
 * (mode 'max': value > best + minDelta; 'min': value < best - minDelta).
 */
export class EarlyStopping {
  readonly patience: number;
  readonly minDelta: number;
  readonly mode: 'max' | 'min';
  best: number | null = null;
  counter = 0;
  stopped = false;

  constructor(opts: EarlyStoppingOptions) {
    this.patience = opts.patience;
    this.minDelta = opts.minDelta ?? 0;
    this.mode = opts.mode ?? 'max';
  }

  improves(value: number): boolean {
    if (!Number.isFinite(value)) return false;
    if (this.best === null) return true;
    return this.mode === 'max' ? value > this.best + this.minDelta : value < this.best - this.minDelta;
  }

  /** Record an epoch's value; true when training should stop. */
  step(value: number): boolean {
    if (this.improves(value)) {
      this.best = value;
      this.counter = 0;
    } else {
      this.counter += 1;
      if (this.counter >= this.patience) this.stopped = true;
    }
    return this.stopped;
  }

  getState(): EarlyStoppingState {
    return { best: this.best, counter: this.counter, stopped: this.stopped };
  }

  setState(s: EarlyStoppingState): void {
    this.best = s.best;
    this.counter = s.counter;
    this.stopped = s.stopped;
  }
}
