/**
 * SliceWise's door to its training engine, the tfjs-wasm-training package (packages/tfjs-wasm-training). The
 * package reads no environment: the deployment's knobs (src/env.ts) are merged into its options here, so that
 * every SliceWise thread that starts a backend (a stage, a replica) obeys them alike.
 */
import { initBackend as initEngineBackend, type BackendInfo, type InitBackendOptions } from 'tfjs-wasm-training';
import { env } from '../env.ts';

export type { BackendChoice, BackendInfo } from 'tfjs-wasm-training';
export { setSimdThreadGate } from 'tfjs-wasm-training';

export interface EngineOptions {
  /** Backend to use; SLICEWISE_TF_BACKEND wins over it. Default: the first that works, fastest first. */
  prefer?: InitBackendOptions['prefer'];
  /** wasm: threads of the convolution kernels. Default: SLICEWISE_WASM_THREADS, else the CPUs (at most 8). */
  threads?: number;
}

/**
 * The engine's initBackend with the environment applied: SLICEWISE_TF_BACKEND forces the backend,
 * SLICEWISE_WASM_THREADS is the default thread count, SLICEWISE_WASM_NO_SIMD_KERNELS=1 turns the SIMD kernels off.
 * Async even where env() throws: callers get a malformed variable as a rejection, like any other failure here.
 */
export async function initBackend(opts: EngineOptions = {}): Promise<BackendInfo> {
  const e = env();
  return initEngineBackend({
    prefer: opts.prefer,
    force: e.tfBackend,
    threads: opts.threads ?? e.wasmThreads,
    simdKernels: !e.wasmNoSimdKernels,
  });
}
