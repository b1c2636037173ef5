/**
 * A small pool of worker threads for our SIMD kernels (./simd-kernels.ts).
 *
 * tfjs runs its wasm backend single-threaded under Node, on a memory that is not shared, so workers cannot touch
 * tensors in place. The pool owns a separate *shared* WebAssembly memory: a kernel copies its operands there, the
 * calling thread and the workers each run the same SIMD function on a slice of the rows, and the result is copied
 * back. For the convolutions (compute-bound) the copies cost a few percent of the work they split.
 *
 * Dispatch is synchronous (the kernel API is): per-worker slots in a SharedArrayBuffer, Atomics.notify to start,
 * Atomics.wait for completion. Workers are unref'd (they never keep the process alive).
 */
import { Worker } from 'node:worker_threads';
import { simdModuleBytesShared, type SimdKernels } from './simd-kernels.js';

/** Maximum size of the shared memory: 2 GiB (reserved, not committed). */
const MAX_PAGES = 32768;
const PAGE = 65536;
/**
 * Int32 slots per worker: [0] request seq, [1] done seq, [2] fn id, [3] argc, [4] error flag, [5] index of the
 * row-range arguments (r0, r1) in args, [6] rows, [7] rows per chunk, [8..] args. After the worker slots, one more
 * int32: the shared chunk counter. Threads take chunks of rows from the counter until none is left, so a thread
 * that the OS preempts (a shared machine) delays the step by one chunk at most, not by its whole share.
 */
const SLOT = 64;
const ARGS = 8;
const WAIT_MS = 120_000;

/** Function names workers can run, by id. */
const FUNCS = ['conv', 'convFilterGrad'] as const;
export type PoolFunc = (typeof FUNCS)[number];

const WORKER_SOURCE = `
const { parentPort, workerData } = require('node:worker_threads');
const { bytes, memory, control, slot, funcs } = workerData;
let inst;
try {
  inst = new WebAssembly.Instance(new WebAssembly.Module(bytes), { env: { memory } });
} catch (e) {
  parentPort.postMessage({ error: String(e && e.message || e) });
  throw e;
}
const ctl = new Int32Array(control);
const base = slot * ${SLOT};
const counter = workerData.counter;
// The control block starts zeroed: a request posted before this loop starts is seen (seq != 0) at once.
let last = 0;
parentPort.postMessage({ ready: true });
for (;;) {
  Atomics.wait(ctl, base, last);
  const seq = Atomics.load(ctl, base);
  if (seq === last) continue;
  last = seq;
  const fn = ctl[base + 2];
  if (fn < 0) break;
  const argc = ctl[base + 3];
  const args = [];
  for (let i = 0; i < argc; i++) args.push(ctl[base + ${ARGS} + i]);
  const ri = ctl[base + 5], rows = ctl[base + 6], chunk = ctl[base + 7];
  const f = inst.exports[funcs[fn]];
  try {
    for (;;) {
      const r0 = Atomics.add(ctl, counter, 1) * chunk;
      if (r0 >= rows) break;
      args[ri] = r0;
      args[ri + 1] = Math.min(rows, r0 + chunk);
      f(...args);
    }
    ctl[base + 4] = 0;
  } catch (e) {
    ctl[base + 4] = 1;
  }
  Atomics.store(ctl, base + 1, seq);
  Atomics.notify(ctl, base + 1);
}
`;

/** A worker stopped answering: the pool is unusable (callers fall back to the calling thread). */
export class SimdPoolBrokenError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'SimdPoolBrokenError';
  }
}

export interface SimdPool {
  /** False once a worker stopped answering. */
  readonly usable: boolean;
  /** Threads that run a job, the calling thread included. */
  readonly threads: number;
  /** Makes the shared memory at least `bytes` long; false when it cannot (2 GiB cap). */
  reserve(bytes: number): boolean;
  /** A float32 view of the whole shared memory (take it again after `reserve`). */
  f32(): Float32Array;
  /**
   * Runs `fn` over rows [0, rows) on every thread and waits: thread i calls it with args[i], in which
   * args[i][rowArg] and args[i][rowArg + 1] are set to each chunk's [r0, r1). Chunks are handed out dynamically.
   */
  run(fn: PoolFunc, args: number[][], rowArg: number, rows: number): void;
}

class Pool implements SimdPool {
  readonly threads: number;
  private readonly ctl: Int32Array;
  private broken = false;

  get usable(): boolean {
    return !this.broken;
  }

  constructor(
    private readonly memory: WebAssembly.Memory,
    private readonly kernels: SimdKernels,
    private readonly workers: Worker[],
    control: SharedArrayBuffer,
  ) {
    this.threads = workers.length + 1;
    this.ctl = new Int32Array(control);
    this.counter = workers.length * SLOT;
  }

  private readonly counter: number;

  reserve(bytes: number): boolean {
    const have = this.memory.buffer.byteLength;
    if (bytes <= have) return true;
    const pages = Math.ceil((bytes - have) / PAGE);
    if (have / PAGE + pages > MAX_PAGES) return false;
    try {
      this.memory.grow(pages);
      return true;
    } catch {
      return false;
    }
  }

  f32(): Float32Array {
    return new Float32Array(this.memory.buffer);
  }

  run(fn: PoolFunc, jobs: number[][], rowArg: number, rows: number): void {
    if (this.broken) throw new SimdPoolBrokenError('simd thread pool is broken (a worker stopped answering)');
    if (jobs.length !== this.threads) throw new Error(`simd pool: ${jobs.length} argument lists for ${this.threads} threads`);
    const id = FUNCS.indexOf(fn);
    if (id < 0) throw new Error(`simd pool: unknown function ${fn}`);
    if (!Number.isInteger(rows) || rows < 0 || !Number.isInteger(rowArg) || jobs.some((a) => rowArg < 0 || rowArg + 1 >= a.length)) {
      throw new Error(`simd pool: bad row range (rows ${rows}, rowArg ${rowArg})`);
    }
    const ctl = this.ctl;
    const counter = this.counter;
    const chunk = Math.max(1, Math.ceil(rows / (this.threads * 8)));
    Atomics.store(ctl, counter, 0);
    const seqs: number[] = [];
    for (let i = 1; i < jobs.length; i++) {
      const base = (i - 1) * SLOT;
      const args = jobs[i]!;
      if (args.length > SLOT - ARGS) throw new Error('simd pool: too many arguments');
      ctl[base + 2] = id;
      ctl[base + 3] = args.length;
      ctl[base + 4] = 0;
      ctl[base + 5] = rowArg;
      ctl[base + 6] = rows;
      ctl[base + 7] = chunk;
      args.forEach((a, k) => (ctl[base + ARGS + k] = a | 0));
      const seq = (Atomics.load(ctl, base) + 1) | 0;
      seqs[i] = seq;
      Atomics.store(ctl, base, seq);
      Atomics.notify(ctl, base);
    }
    let error: unknown = null;
    try {
      const f = this.kernels[fn] as (...a: number[]) => void;
      const args = [...jobs[0]!];
      for (;;) {
        const r0 = Atomics.add(ctl, counter, 1) * chunk;
        if (r0 >= rows) break;
        args[rowArg] = r0;
        args[rowArg + 1] = Math.min(rows, r0 + chunk);
        f(...args);
      }
    } catch (e) {
      error = e;
    }
    for (let i = 1; i < jobs.length; i++) {
      const base = (i - 1) * SLOT;
      for (;;) {
        const done = Atomics.load(ctl, base + 1);
        if (done === seqs[i]) break;
        if (Atomics.wait(ctl, base + 1, done, WAIT_MS) === 'timed-out' && Atomics.load(ctl, base + 1) !== seqs[i]) {
          this.broken = true;
          throw new SimdPoolBrokenError(`simd worker ${i} did not finish ${fn} within ${WAIT_MS / 1000} s`);
        }
      }
      if (ctl[base + 4]) error ??= new Error(`simd worker ${i} failed in ${fn}`);
    }
    if (error) throw error;
  }

  async stop(): Promise<void> {
    this.broken = true;
    this.workers.forEach((_, i) => {
      const base = i * SLOT;
      this.ctl[base + 2] = -1;
      Atomics.store(this.ctl, base, (Atomics.load(this.ctl, base) + 1) | 0);
      Atomics.notify(this.ctl, base);
    });
    await Promise.all(this.workers.map((w) => w.terminate().catch(() => 0)));
  }
}

let pool: Pool | null = null;
let gate: (() => boolean) | null = null;

/** The running pool, or null (single-threaded). */
export function simdPool(): SimdPool | null {
  return pool;
}

/**
 * A check the kernels make before each job they would split over the pool: false runs that job on the calling
 * thread alone. For a process whose threads each own a pool (a server's inference threads, one request each), so
 * that a thread splits its work only while the others are idle instead of every thread oversubscribing the
 * cores. null (the default) always splits.
 */
export function setSimdThreadGate(check: (() => boolean) | null): void {
  gate = check;
}

/** The gate's answer (true without a gate). */
export function simdThreadsAllowed(): boolean {
  return gate === null || gate();
}

/**
 * Starts (or resizes to) a pool of `threads` threads in all (threads - 1 workers); 1 or less stops it. Resolves
 * to the number of threads in use: 1 when workers, shared memory or wasm threads are unavailable.
 */
export async function startSimdThreads(threads: number): Promise<number> {
  const want = Math.max(1, Math.floor(threads));
  if (pool && pool.threads === want) return want;
  await stopSimdThreads();
  if (want === 1) return 1;
  let workers: Worker[] = [];
  try {
    const memory = new WebAssembly.Memory({ initial: 1, maximum: MAX_PAGES, shared: true });
    const bytes = simdModuleBytesShared(MAX_PAGES);
    const module = new WebAssembly.Module(bytes as BufferSource);
    const kernels = new WebAssembly.Instance(module, { env: { memory } }).exports as unknown as SimdKernels;
    const control = new SharedArrayBuffer(4 * (SLOT * (want - 1) + 16));
    const counter = SLOT * (want - 1);
    workers = Array.from(
      { length: want - 1 },
      (_, slot) =>
        new Worker(WORKER_SOURCE, { eval: true, workerData: { bytes, memory, control, slot, counter, funcs: [...FUNCS] } }),
    );
    await Promise.all(
      workers.map(
        (w) =>
          new Promise<void>((resolve, reject) => {
            const timer = setTimeout(() => reject(new Error('simd worker did not start')), 20_000);
            w.once('message', (m: { ready?: boolean; error?: string }) => {
              clearTimeout(timer);
              if (m.ready) resolve();
              else reject(new Error(m.error ?? 'simd worker failed to start'));
            });
            w.once('error', (e) => {
              clearTimeout(timer);
              reject(e);
            });
          }),
      ),
    );
    for (const w of workers) w.unref();
    pool = new Pool(memory, kernels, workers, control);
    return want;
  } catch {
    await Promise.all(workers.map((w) => w.terminate().catch(() => 0)));
    pool = null;
    return 1;
  }
}

export async function stopSimdThreads(): Promise<void> {
  const p = pool;
  pool = null;
  if (p) await p.stop();
}

