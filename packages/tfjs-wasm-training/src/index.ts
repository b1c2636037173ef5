/**
 * Picks and initialises the tfjs backend for training and inference.
 *
 * Order: `opts.force`, then `opts.prefer`; without either we try @tensorflow/tfjs-node-gpu, then
 * @tensorflow/tfjs-node (optional, not dependencies: a failed import falls through silently), then wasm with our
 * training kernels (./wasm-kernels.ts), then tfjs's pure-JS cpu backend. An explicitly requested backend that
 * cannot start is an error, not a silent fallback.
 *
 * In Node the wasm binaries are loaded from node_modules/@tensorflow/tfjs-backend-wasm/dist (SIMD build when the
 * runtime has wasm SIMD). tfjs runs wasm single-threaded under Node; `threads` sizes our own worker pool for the
 * convolution kernels instead (default: the CPU count, at most 8), and the device string reports it, e.g.
 * 'CPU wasm SIMD, 2 threads'. A later call with another `threads` resizes the pool.
 *
 * Nothing here reads the environment: an application maps its own settings onto the options.
 */
import { createRequire } from 'node:module';
import { availableParallelism } from 'node:os';
import { dirname, join, sep } from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { getThreadsCount, setThreadsCount, setWasmPaths } from '@tensorflow/tfjs-backend-wasm';
import { registerWasmTrainingKernels, setSimdKernels } from './wasm-kernels.js';
import { simdPool, startSimdThreads } from './simd-threads.js';

export type BackendChoice = 'tensorflow' | 'wasm' | 'cpu';

export interface InitBackendOptions {
  /** Backend to use unless `force` names one. Default: the first that works, fastest first (see above). */
  prefer?: BackendChoice;
  /**
   * Backend to use whatever `prefer` says: lets a deployment-wide setting (an environment variable, a flag)
   * override what a caller asked for. Default: none.
   */
  force?: BackendChoice;
  /**
   * wasm: threads for our convolution kernels (a worker pool on a shared memory; the rest of tfjs-wasm stays
   * single-threaded under Node). Default: the number of CPUs, at most 8; a later call without it keeps the pool.
   */
  threads?: number;
  /**
   * wasm: false runs the portable paths instead of our SIMD loops (conv gradients built on wasm's XNNPACK Conv2D,
   * wasm's own forward kernels, JS loops), for A/B comparisons. Default: true; a later call without it keeps the
   * current setting.
   */
  simdKernels?: boolean;
}

export interface BackendInfo {
  /** tfjs backend name: 'tensorflow', 'wasm' or 'cpu'. */
  backend: string;
  /** Human-readable device, e.g. 'GPU (tfjs-node-gpu)', 'CPU (tfjs-node)', 'CPU wasm SIMD, 1 thread'. */
  device: string;
}

const CHOICES: readonly BackendChoice[] = ['tensorflow', 'wasm', 'cpu'];

let current: (BackendInfo & { request: BackendChoice | 'auto' }) | null = null;
let pending: Promise<BackendInfo> | null = null;
let wasmPathsSet = false;

function checkChoice(option: 'prefer' | 'force', v: BackendChoice | undefined): void {
  if (v !== undefined && !CHOICES.includes(v)) {
    throw new Error(`initBackend: ${option} must be one of ${CHOICES.join(', ')} (got ${String(v)})`);
  }
}

function requested(opts: InitBackendOptions): BackendChoice | 'auto' {
  checkChoice('force', opts.force);
  checkChoice('prefer', opts.prefer);
  return opts.force ?? opts.prefer ?? 'auto';
}

/**
 * Chooses and initialises the backend (see the module comment). Idempotent: a second call with the same request
 * returns the same answer without re-initialising.
 */
export async function initBackend(opts: InitBackendOptions = {}): Promise<BackendInfo> {
  const request = requested(opts);
  if (opts.simdKernels !== undefined) setSimdKernels(opts.simdKernels);
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

/** Makes `name` the active backend; `cause` is what tfjs threw, when it threw (it mostly logs and returns false). */
async function activate(name: string): Promise<{ ok: boolean; cause?: unknown }> {
  try {
    if (!(await tf.setBackend(name))) return { ok: false };
    await tf.ready();
    return { ok: tf.getBackend() === name };
  } catch (cause) {
    return { ok: false, cause };
  }
}

async function activateOrThrow(name: string): Promise<void> {
  const r = await activate(name);
  if (!r.ok) throw new Error(`tfjs '${name}' backend failed to initialise`, { cause: r.cause });
}

async function choose(request: BackendChoice | 'auto', opts: InitBackendOptions): Promise<BackendInfo> {
  if (request === 'tensorflow' || request === 'auto') {
    const native = await tryNative();
    if ('backend' in native) return native;
    if (request === 'tensorflow') {
      throw new Error(
        `backend 'tensorflow' requested but neither @tensorflow/tfjs-node-gpu nor @tensorflow/tfjs-node could be loaded`,
        { cause: native.cause },
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
  await activateOrThrow('cpu');
  return { backend: 'cpu', device: 'CPU (tfjs cpu backend, plain JS)' };
}

/**
 * Dynamic import that fails quietly (the tfjs-node packages are optional and usually absent): resolves to the
 * import's error, or null when it loaded.
 */
async function importOptional(name: string): Promise<unknown> {
  try {
    const specifier: string = name; // a variable, so that neither tsc nor bundlers try to resolve it
    await import(specifier);
    return null;
  } catch (e) {
    return e;
  }
}

/** The native backend, or why none started (kept as the cause in case it was asked for explicitly). */
async function tryNative(): Promise<BackendInfo | { cause: unknown[] }> {
  const causes: unknown[] = [];
  for (const [pkg, device] of [
    ['@tensorflow/tfjs-node-gpu', 'GPU (tfjs-node-gpu)'],
    ['@tensorflow/tfjs-node', 'CPU (tfjs-node)'],
  ] as const) {
    const failed = await importOptional(pkg);
    if (failed) {
      causes.push(failed);
      continue;
    }
    const r = await activate('tensorflow');
    if (r.ok) return { backend: 'tensorflow', device };
    causes.push(r.cause ?? new Error(`${pkg} loaded but the 'tensorflow' backend did not start`));
  }
  return { cause: causes };
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
  await activateOrThrow('wasm');
  registerWasmTrainingKernels(); // no-op unless the registry was reset meanwhile
  return { backend: 'wasm', device: await wasmDevice(threads) };
}

function defaultThreads(): number {
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

export { setSimdThreadGate } from './simd-threads.js';
export {
  registerWasmTrainingKernels,
  setSimdKernels,
  unregisterWasmTrainingKernels,
  UnsupportedKernelError,
  WASM_TRAINING_KERNELS,
  wasmTrainingKernelsRegistered,
} from './wasm-kernels.js';
