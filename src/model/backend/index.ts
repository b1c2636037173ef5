/**
 * Picks and initialises the tfjs backend for training and inference.
 *
 * Order: the env var SLICEWISE_TF_BACKEND (tensorflow | wasm | cpu) wins, then `opts.prefer`; without either we
 * try @tensorflow/tfjs-node-gpu, then @tensorflow/tfjs-node (optional, not dependencies: a failed import falls
 * through silently), then wasm with our training kernels (./wasm-kernels.ts), then tfjs's pure-JS cpu backend.
 * An explicitly requested backend that cannot start is an error, not a silent fallback.
 *
 * In Node the wasm binaries are loaded from node_modules/@tensorflow/tfjs-backend-wasm/dist (SIMD build when the
 * runtime has wasm SIMD). tfjs runs wasm single-threaded under Node; `threads` sizes our own worker pool for the
 * convolution kernels instead (default SLICEWISE_WASM_THREADS, else the CPU count, at most 8), and the device
 * string reports it, e.g. 'CPU wasm SIMD, 2 threads'. A later call with another `threads` resizes the pool.
 */
import { createRequire } from 'node:module';
import { availableParallelism } from 'node:os';
import { dirname, join, sep } from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { getThreadsCount, setThreadsCount, setWasmPaths } from '@tensorflow/tfjs-backend-wasm';
import { registerWasmTrainingKernels } from './wasm-kernels.js';
import { simdPool, startSimdThreads } from './simd-threads.js';

export type BackendChoice = 'tensorflow' | 'wasm' | 'cpu';

export interface InitBackendOptions {
  /** Backend to use (SLICEWISE_TF_BACKEND overrides it). Default: the first that works, fastest first. */
  prefer?: BackendChoice;
  /**
   * wasm: threads for our convolution kernels (a worker pool on a shared memory; the rest of tfjs-wasm stays
   * single-threaded under Node). Default: SLICEWISE_WASM_THREADS, else the number of CPUs (at most 8).
   */
  threads?: number;
}

export interface BackendInfo {
  /** tfjs backend name: 'tensorflow', 'wasm' or 'cpu'. */
  backend: string;
  /** Human-readable device, e.g. 'GPU (tfjs-node-gpu)', 'CPU (tfjs-node)', 'CPU wasm SIMD, 1 thread'. */
  device: string;
}

export const BACKEND_ENV = 'SLICEWISE_TF_BACKEND';
const CHOICES: readonly BackendChoice[] = ['tensorflow', 'wasm', 'cpu'];

let current: (BackendInfo & { request: BackendChoice | 'auto' }) | null = null;
let pending: Promise<BackendInfo> | null = null;
let wasmPathsSet = false;

function requested(opts: InitBackendOptions): BackendChoice | 'auto' {
  const env = process.env[BACKEND_ENV]?.trim().toLowerCase();
  if (env) {
    if (!(CHOICES as readonly string[]).includes(env)) {
      throw new Error(`${BACKEND_ENV}=${process.env[BACKEND_ENV]} is not one of ${CHOICES.join(', ')}`);
    }
    return env as BackendChoice;
  }
  if (opts.prefer && !CHOICES.includes(opts.prefer)) {
    throw new Error(`initBackend: prefer must be one of ${CHOICES.join(', ')} (got ${String(opts.prefer)})`);
  }
  return opts.prefer ?? 'auto';
}

/**
 * Chooses and initialises the backend (see the module comment). Idempotent: a second call with the same request
 * returns the same answer without re-initialising.
 */
export async function initBackend(opts: InitBackendOptions = {}): Promise<BackendInfo> {
  const request = requested(opts);
  while (pending) await pending.catch(() => undefined);
  if (current && (request === 'auto' || request === current.request || request === current.backend)) {
    if (tf.getBackend() !== current.backend) await activate(current.backend);
    if (current.backend === 'wasm' && opts.threads != null && opts.threads !== (simdPool()?.threads ?? 1)) {
      current.device = await wasmDevice(opts.threads);
    }
    return { backend: current.backend, device: current.device };
  }
  const p = choose(request, opts);
  pending = p;
  try {
    const info = await p;
    current = { ...info, request };
    return info;
  } finally {
    pending = null;
  }
}

async function activate(name: string): Promise<boolean> {
  let ok = false;
  try {
    ok = await tf.setBackend(name);
  } catch {
    ok = false;
  }
  if (ok) await tf.ready();
  return ok && tf.getBackend() === name;
}

async function choose(request: BackendChoice | 'auto', opts: InitBackendOptions): Promise<BackendInfo> {
  if (request === 'tensorflow' || request === 'auto') {
    const native = await tryNative();
    if (native) return native;
    if (request === 'tensorflow') {
      throw new Error(
        `backend 'tensorflow' requested but neither @tensorflow/tfjs-node-gpu nor @tensorflow/tfjs-node could be loaded`,
      );
    }
  }
  if (request === 'wasm' || request === 'auto') {
    try {
      return await initWasm(opts.threads);
    } catch (e) {
      if (request === 'wasm') throw e;
    }
  }
  if (!(await activate('cpu'))) throw new Error("tfjs 'cpu' backend failed to initialise");
  return { backend: 'cpu', device: 'CPU (tfjs cpu backend, plain JS)' };
}

/** Dynamic import that fails quietly: the tfjs-node packages are optional and usually absent. */
async function importOptional(name: string): Promise<boolean> {
  try {
    const specifier: string = name; // a variable, so that neither tsc nor bundlers try to resolve it
    await import(specifier);
    return true;
  } catch {
    return false;
  }
}

async function tryNative(): Promise<BackendInfo | null> {
  for (const [pkg, device] of [
    ['@tensorflow/tfjs-node-gpu', 'GPU (tfjs-node-gpu)'],
    ['@tensorflow/tfjs-node', 'CPU (tfjs-node)'],
  ] as const) {
    if (!(await importOptional(pkg))) continue;
    if (await activate('tensorflow')) return { backend: 'tensorflow', device };
  }
  return null;
}

/** Directory of the .wasm binaries, with a trailing separator (tfjs prepends it to the file name). */
export function wasmBinaryDir(): string {
  const require = createRequire(import.meta.url);
  return join(dirname(require.resolve('@tensorflow/tfjs-backend-wasm/package.json')), 'dist') + sep;
}

async function initWasm(threads: number | undefined): Promise<BackendInfo> {
  registerWasmTrainingKernels();
  if (!wasmPathsSet) {
    // Before the first initialisation only: both settings are read when the wasm module is instantiated.
    setWasmPaths(wasmBinaryDir());
    if (threads != null && threads > 0) setThreadsCount(Math.floor(threads));
    wasmPathsSet = true;
  }
  if (!(await activate('wasm'))) throw new Error("tfjs 'wasm' backend failed to initialise");
  registerWasmTrainingKernels(); // no-op unless the registry was reset meanwhile
  return { backend: 'wasm', device: await wasmDevice(threads) };
}

function defaultThreads(): number {
  const env = Number(process.env.SLICEWISE_WASM_THREADS);
  if (Number.isInteger(env) && env > 0) return env;
  return Math.max(1, Math.min(8, availableParallelism()));
}

/** Starts our kernel threads and describes the device, e.g. 'CPU wasm SIMD, 2 threads'. */
async function wasmDevice(threads: number | undefined): Promise<string> {
  const simd = (await tf.env().getAsync('WASM_HAS_SIMD_SUPPORT')) === true;
  let n = 1;
  if (simd) n = await startSimdThreads(threads ?? defaultThreads());
  else {
    try {
      n = getThreadsCount();
    } catch {
      n = 1;
    }
  }
  return `CPU wasm ${simd ? 'SIMD' : 'no SIMD'}, ${n} thread${n === 1 ? '' : 's'}`;
}

export { registerWasmTrainingKernels, WASM_TRAINING_KERNELS } from './wasm-kernels.js';
