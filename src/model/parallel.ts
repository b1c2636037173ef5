/**
 * Data-parallel training over worker threads.
 *
 * tfjs-wasm runs one thread per instance under Node, so a training step uses one core. A replica pool adds
 * `replicas - 1` worker threads (replica-thread.mjs -> replica-thread-main.ts), each with its own tfjs instance
 * (same backend as the caller's, and on 'cpu' the same fast kernels) and its own copy of the U-Net; the calling
 * thread is replica 0 and computes its share with its own model. Per (micro-)batch chunk:
 *
 *   1. the chunk is split into `replicas` contiguous shards, as equal as possible (shard 0 the largest);
 *   2. shards 1.. go to the workers (their arrays copied and transferred), then replica 0 computes shard 0 while
 *      they run: forward in training mode + backward (shard-grads.ts), each shard's loss divided by the FULL
 *      batch's denominators (samples with a mask, samples), exactly as the single-replica trainer does for its
 *      micro-batches; so the sum of the shard gradients is the batch gradient, up to float summation order;
 *   3. the workers' gradients (one packed Float32Array each, transferred back) are added to replica 0's, in
 *      replica order, in the calling thread. Clipping and the AdamW step then happen once, there (trainer.ts);
 *   4. before the next step the caller publishes the updated parameters (publishParams): all of them, packed into
 *      one SharedArrayBuffer that every worker reads (a version number tells a worker when to re-read it), so no
 *      parameter copy goes through postMessage at all.
 *
 * BatchNorm: in training mode every replica normalises with its own shard's batch statistics, like PyTorch DDP
 * without SyncBatchNorm: with a chunk of 8 on 2 replicas each BN layer sees 4 samples, not 8 (statistics are over
 * N x H x W, so at image sizes >= 32 that is still thousands of values per channel). Running statistics: every job
 * carries replica 0's running mean / variance as they were before the chunk; each replica applies its momentum
 * update from its shard, and replica 0 then sets its buffers to the sample-weighted average of the replicas'
 * updated values, computed as v0 + sum_r (n_r / n)(v_r - v0) so that replicas that agree give v0 bit for bit.
 * The running mean then equals the single-replica update with the chunk's mean exactly (the mean of equal-size
 * shard means is the chunk mean); the running variance gets the mean of the shards' unbiased variances, which
 * misses the (small) spread between shard means. One momentum update per chunk, as one per micro-batch in the
 * single-replica trainer. Buffers of frozen groups are never touched (their BatchNorm runs in eval mode).
 *
 * Dropout (the classification head): each replica's model has its own seed, deriveSeed(seed, 'replica', r), so
 * the replicas draw different masks; replica 0 is the caller's model with its own stream.
 */
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import * as tf from '@tensorflow/tfjs';
import { ENV_KNOBS } from '../env.ts';
import { deriveSeed } from '../lib/random.js';
import { copyShard, disposeShardTensors, shardGradients, shardTensors, sliceShard, type LossSpec, type ShardData, type ShardGradients } from './shard-grads.js';
import { groupOfName, parameterSpecs, resolveConfig, type ArchConfig, type PresetName, type UNetConfig, type UNetModel } from './unet.js';

const ENTRY = fileURLToPath(new URL('./replica-thread.mjs', import.meta.url));
const BACKENDS = ['tensorflow', 'wasm', 'cpu'] as const;
type Backend = (typeof BACKENDS)[number];

/** Where one tensor lives in a packed Float32Array. */
interface TensorSlot {
  name: string;
  shape: number[];
  size: number;
  offset: number;
}

/** Packed layout of a U-Net's parameters and BatchNorm buffers (the model's own order). */
interface ModelLayout {
  params: TensorSlot[];
  paramSize: number;
  buffers: TensorSlot[];
  bufferSize: number;
  /** Names and shapes in one string: two threads agree on the layout iff their signatures are equal. */
  signature: string;
}

export function modelLayout(config: UNetConfig): ModelLayout {
  const specs = parameterSpecs(config);
  const slots = (list: { name: string; shape: number[] }[]): { slots: TensorSlot[]; size: number } => {
    let offset = 0;
    const out = list.map((s) => {
      const size = s.shape.reduce((a, b) => a * b, 1);
      const slot = { name: s.name, shape: [...s.shape], size, offset };
      offset += size;
      return slot;
    });
    return { slots: out, size: offset };
  };
  const p = slots(specs.params);
  const b = slots(specs.buffers);
  const signature = [...p.slots, ...b.slots].map((s) => `${s.name}:${s.shape.join('x')}`).join(',');
  return { params: p.slots, paramSize: p.size, buffers: b.slots, bufferSize: b.size, signature };
}

/** Copies the variables' values into `out` at their slots. */
export function packVariables(slots: readonly TensorSlot[], vars: ReadonlyMap<string, tf.Variable>, out: Float32Array): Float32Array {
  for (const s of slots) out.set(vars.get(s.name)!.dataSync() as Float32Array, s.offset);
  return out;
}

/** Assigns the variables from their slots in `src` (copied first: `src` may be shared memory). */
export function unpackVariables(slots: readonly TensorSlot[], vars: ReadonlyMap<string, tf.Variable>, src: Float32Array): void {
  tf.tidy(() => {
    for (const s of slots) vars.get(s.name)!.assign(tf.tensor(src.slice(s.offset, s.offset + s.size), s.shape, 'float32'));
  });
}

/** A shard's loss spec plus the parameters to differentiate; gradients are packed in `params` order. */
export interface GradientSpec extends LossSpec {
  params: readonly string[];
}

// ---------------------------------------------------------------------------------------------------------------
// Messages (shared with replica-thread-main.ts).

export interface ReplicaWorkerData {
  index: number;
  arch: ArchConfig;
  inChannels: number;
  /** This replica's model seed (dropout stream; its initial weights are overwritten). */
  seed: number;
  backend: Backend;
  /** Kernel threads of this replica's backend (initBackend's `threads`); unset: the backend's default. */
  threads?: number;
  /** paramSize float32s: the published parameters. */
  params: SharedArrayBuffer;
}

export type ToReplica = {
  type: 'job';
  id: number;
  /** Version of the published parameters; the worker re-reads them when it differs from its own. */
  version: number;
  /** Set when the spec changed since this worker's previous job. */
  spec: GradientSpec | null;
  /** Replica 0's running statistics (all buffers, layout order) before the chunk. */
  buffers: Float32Array;
  shard: ShardData;
  segDen: number;
  clsDen: number;
};

export type FromReplica =
  | { type: 'ready'; backend: string; device: string; signature: string }
  | { type: 'result'; id: number; loss: number; grads: Float32Array; buffers: Float32Array; ms: number }
  | { type: 'error'; id: number | null; message: string; name: string; stack?: string };

interface ReplicaJob {
  shard: ShardData;
  spec: GradientSpec;
  /** All buffers (layout order) the replica starts from. */
  buffers: Float32Array;
  segDen: number;
  clsDen: number;
}

interface ReplicaResult {
  /** Samples of the shard. */
  n: number;
  loss: number;
  /** Gradients packed in spec.params order (zeros for a parameter the loss does not reach). */
  grads: Float32Array;
  /** The replica's buffers after its forward pass (layout order). */
  buffers: Float32Array;
  /** Wall time the worker spent on the job, from receiving it to posting the answer (for diagnostics). */
  ms: number;
}

// ---------------------------------------------------------------------------------------------------------------

interface ReplicaPoolOptions {
  /** Total replicas including the calling thread (>= 2): replicas - 1 worker threads are started. */
  replicas: number;
  arch: PresetName | ArchConfig;
  inChannels: number;
  /** Base seed; worker r's model is seeded with deriveSeed(seed, 'replica', r). */
  seed: number;
  /** Backend of the workers (default: the calling thread's tf.getBackend()). */
  backend?: Backend;
  /**
   * Kernel threads per worker replica, for a backend that runs kernels on several threads (wasm with our
   * threaded kernels): passed to initBackend and as SLICEWISE_WASM_THREADS. Unset: the backend's default.
   */
  threads?: number;
}

export interface ReplicaPool {
  /** Total replicas, counting the calling thread (replica 0). */
  readonly replicas: number;
  readonly layout: ModelLayout;
  /** Worker threads' ids (replicas 1..). */
  readonly threadIds: readonly number[];
  readonly backend: Backend;
  /** Writes the model's parameters to the shared buffer for the following jobs; call after every update. */
  publishParams(model: UNetModel): void;
  /**
   * Runs jobs[i] on worker i (replica i + 1); a null job leaves that worker idle (null result). The messages are
   * posted before this returns, so the workers compute while the caller does its own share. The jobs' arrays are
   * copied (views of a larger batch are fine) and the copies transferred.
   */
  run(jobs: readonly (ReplicaJob | null)[]): Promise<(ReplicaResult | null)[]>;
  /** Terminates the workers (pending jobs reject); resolves once every thread has exited. Idempotent. */
  close(): Promise<void>;
  readonly closed: boolean;
}

interface Pending {
  n: number;
  resolve(r: ReplicaResult): void;
  reject(e: Error): void;
}

class ReplicaThread {
  readonly worker: Worker;
  readonly pending = new Map<number, Pending>();
  failure: Error | null = null;
  specKey = '';
  readonly ready: Promise<FromReplica & { type: 'ready' }>;
  readonly exited: Promise<void>;

  constructor(data: ReplicaWorkerData, closing: () => boolean) {
    // The replica's backend and kernel threads, for everything in its thread that consults the environment.
    const env: NodeJS.ProcessEnv = { ...process.env, [ENV_KNOBS.tfBackend.name]: data.backend };
    if (data.threads) env[ENV_KNOBS.wasmThreads.name] = String(data.threads);
    this.worker = new Worker(ENTRY, { workerData: data, env });
    let readyResolve!: (m: FromReplica & { type: 'ready' }) => void;
    let readyReject!: (e: Error) => void;
    this.ready = new Promise((res, rej) => {
      readyResolve = res;
      readyReject = rej;
    });
    this.ready.catch(() => undefined);
    let exitedResolve!: () => void;
    this.exited = new Promise((res) => (exitedResolve = res));
    const fail = (e: Error): void => {
      this.failure ??= e;
      readyReject(this.failure);
      for (const p of this.pending.values()) p.reject(this.failure);
      this.pending.clear();
    };
    const label = `replica ${data.index}`;
    this.worker.on('message', (m: FromReplica) => {
      if (m.type === 'ready') readyResolve(m);
      else if (m.type === 'result') {
        const p = this.pending.get(m.id);
        this.pending.delete(m.id);
        p?.resolve({ n: p.n, loss: m.loss, grads: m.grads, buffers: m.buffers, ms: m.ms });
      } else if (m.type === 'error') {
        const e = new Error(`${label}: ${m.message}`);
        e.name = m.name;
        if (m.stack) e.stack = m.stack;
        if (m.id === null) fail(e);
        else {
          const p = this.pending.get(m.id);
          this.pending.delete(m.id);
          p?.reject(e);
        }
      }
    });
    this.worker.on('error', (e) => fail(new Error(`${label} thread failed: ${e.message}`, { cause: e })));
    this.worker.on('exit', (code) => {
      fail(new Error(closing() ? `${label}: the replica pool was closed` : `${label} thread exited with code ${code} (out of memory?)`));
      exitedResolve();
    });
  }

  post(m: ToReplica, n: number): Promise<ReplicaResult> {
    if (this.failure) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => {
      this.pending.set(m.id, { n, resolve, reject });
      const s = m.shard;
      const transfer: ArrayBuffer[] = [s.x.buffer, s.hasMask.buffer, s.labels.buffer, m.buffers.buffer] as ArrayBuffer[];
      if (s.mask) transfer.push(s.mask.buffer as ArrayBuffer);
      this.worker.postMessage(m, transfer);
    });
  }
}

/** Starts the worker threads and waits until each has its backend and model ready. */
export async function createReplicaPool(opts: ReplicaPoolOptions): Promise<ReplicaPool> {
  if (!Number.isInteger(opts.replicas) || opts.replicas < 2) throw new RangeError(`createReplicaPool: replicas must be an integer >= 2 (got ${opts.replicas})`);
  const config = resolveConfig(opts.arch, opts.inChannels);
  const layout = modelLayout(config);
  const backend = (opts.backend ?? tf.getBackend()) as Backend;
  if (!BACKENDS.includes(backend)) throw new Error(`createReplicaPool: backend "${String(backend)}" cannot run in a replica thread`);
  const shared = new SharedArrayBuffer(layout.paramSize * 4);
  const sharedView = new Float32Array(shared);
  let closed = false;
  let version = 0;
  let nextId = 1;
  const threads: ReplicaThread[] = [];
  const arch: ArchConfig = { base: config.base, depth: config.depth, headHidden: config.headHidden };
  const close = async (): Promise<void> => {
    closed = true;
    await Promise.all(threads.map(async (t) => {
      await t.worker.terminate();
      await t.exited;
    }));
  };
  try {
    for (let r = 1; r < opts.replicas; r++) {
      threads.push(
        new ReplicaThread(
          {
            index: r,
            arch,
            inChannels: config.inChannels,
            seed: deriveSeed(opts.seed, 'replica', String(r)),
            backend,
            ...(opts.threads ? { threads: Math.max(1, Math.floor(opts.threads)) } : {}),
            params: shared,
          },
          () => closed,
        ),
      );
    }
    const ready = await Promise.all(threads.map((t) => t.ready));
    for (const [i, m] of ready.entries()) {
      if (m.backend !== backend) throw new Error(`replica ${i + 1} runs on backend ${m.backend}, the caller on ${backend}`);
      if (m.signature !== layout.signature) throw new Error(`replica ${i + 1} built a different model layout`);
    }
  } catch (e) {
    await close();
    throw e;
  }

  return {
    replicas: opts.replicas,
    layout,
    threadIds: threads.map((t) => t.worker.threadId),
    backend,
    get closed() {
      return closed;
    },
    publishParams(model) {
      if (closed) throw new Error('replica pool is closed');
      if (model.config.base !== config.base || model.config.depth !== config.depth || model.config.headHidden !== config.headHidden || model.config.inChannels !== config.inChannels) {
        throw new Error('publishParams: the model does not have the pool\'s architecture');
      }
      // The workers are idle here (the caller awaits every job before it updates its model).
      packVariables(layout.params, model.params, sharedView);
      version += 1;
    },
    run(jobs) {
      if (closed) return Promise.reject(new Error('replica pool is closed'));
      if (version === 0) return Promise.reject(new Error('replica pool: publishParams before the first run'));
      if (jobs.length > threads.length) return Promise.reject(new RangeError(`replica pool: ${jobs.length} jobs for ${threads.length} worker threads`));
      return Promise.all(
        jobs.map((job, i) => {
          if (!job) return null;
          const t = threads[i]!;
          const key = JSON.stringify(job.spec);
          const spec = key === t.specKey ? null : job.spec;
          t.specKey = key;
          // The copies are transferred to the worker; the caller's arrays stay untouched.
          const shard = copyShard(job.shard);
          const buffers = job.buffers.slice();
          return t.post({ type: 'job', id: nextId++, version, spec, buffers, shard, segDen: job.segDen, clsDen: job.clsDen }, shard.n);
        }),
      );
    },
    close,
  };
}

/** Sizes of `parts` contiguous shards of n samples, as equal as possible, the larger ones first. */
export function splitEven(n: number, parts: number): number[] {
  const base = Math.floor(n / parts);
  const extra = n % parts;
  return Array.from({ length: parts }, (_, i) => base + (i < extra ? 1 : 0));
}

/** Batch-like arrays (a data.ts Batch fits). */
interface BatchArrays {
  x: Float32Array;
  mask: Float32Array | null;
  hasMask: Float32Array;
  clsLabel: Int32Array;
  height: number;
  width: number;
  channels: number;
}

/**
 * Loss and gradients of samples [from, to) of a batch over the pool's replicas: replica 0 (this thread, `model`)
 * takes the first shard, the workers the others; the gradients are summed here (see the module comment), and
 * `model`'s BatchNorm running statistics of the non-frozen groups become the replicas' sample-weighted average.
 * The parameters must have been published (pool.publishParams) since the model last changed.
 */
export async function dataParallelGradients(
  pool: ReplicaPool,
  model: UNetModel,
  batch: BatchArrays,
  from: number,
  to: number,
  spec: GradientSpec,
  segDen: number,
  clsDen: number,
): Promise<ShardGradients> {
  const { layout } = pool;
  const sizes = splitEven(to - from, pool.replicas);
  const before = packVariables(layout.buffers, model.buffers, new Float32Array(layout.bufferSize));
  const jobs: (ReplicaJob | null)[] = [];
  let off = from + sizes[0]!;
  for (let r = 1; r < pool.replicas; r++) {
    const n = sizes[r]!;
    jobs.push(n > 0 ? { shard: sliceShard(batch, off, off + n), spec, buffers: before, segDen, clsDen } : null);
    off += n;
  }
  const remote = pool.run(jobs);
  remote.catch(() => undefined); // awaited below; must not be reported as unhandled if the local share throws

  const params = new Map<string, tf.Variable>();
  for (const name of spec.params) {
    const v = model.params.get(name);
    if (!v) throw new Error(`dataParallelGradients: the model has no parameter ${name}`);
    params.set(name, v);
  }
  const t = shardTensors(sliceShard(batch, from, from + sizes[0]!));
  let local: ShardGradients;
  try {
    local = shardGradients(model, spec, params, t, segDen, clsDen);
  } finally {
    disposeShardTensors(t);
  }
  let results: ReplicaResult[];
  try {
    results = (await remote).filter((r): r is ReplicaResult => r !== null);
  } catch (e) {
    for (const g of local.grads.values()) g.dispose();
    throw e;
  }
  if (results.length === 0) return local;

  // Sum the gradients (replica order) ...
  const slotOf = new Map(layout.params.map((s) => [s.name, s]));
  const gradOffset = new Map<string, number>();
  let goff = 0;
  for (const name of spec.params) {
    gradOffset.set(name, goff);
    goff += slotOf.get(name)!.size;
  }
  const grads = new Map<string, tf.Tensor>();
  for (const [name, g] of local.grads) {
    const { size, shape } = slotOf.get(name)!;
    const o = gradOffset.get(name)!;
    const sum = tf.tidy(() => {
      let acc: tf.Tensor = g;
      for (const r of results) acc = tf.add(acc, tf.tensor(r.grads.subarray(o, o + size), shape, 'float32'));
      return acc;
    });
    g.dispose();
    grads.set(name, sum);
  }
  // ... and average the running statistics of the BatchNorm layers that ran in training mode.
  const total = to - from;
  const weights = results.map((r) => r.n / total);
  tf.tidy(() => {
    for (const s of layout.buffers) {
      if (spec.frozen.includes(groupOfName(s.name))) continue;
      const v = model.buffers.get(s.name)!;
      const v0 = v.dataSync() as Float32Array;
      const avg = new Float32Array(s.size);
      let changed = false;
      for (let i = 0; i < s.size; i++) {
        let a = v0[i]!;
        for (let r = 0; r < results.length; r++) {
          const d = results[r]!.buffers[s.offset + i]! - v0[i]!;
          if (d !== 0) {
            a += weights[r]! * d;
            changed = true;
          }
        }
        avg[i] = a;
      }
      if (changed) v.assign(tf.tensor(avg, s.shape, 'float32'));
    }
  });
  return { loss: local.loss + results.reduce((s, r) => s + r.loss, 0), grads };
}
