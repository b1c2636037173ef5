/**
 * Worker threads that keep the served model warm: each loads the checkpoint once and takes one request at a
 * time; a request goes to the thread with the fewest in flight. With one thread per core, concurrent clients use
 * every core while the main thread only parses requests and writes answers.
 *
 * A thread that dies (a crash, the wasm heap exhausted) is replaced: its requests in flight are answered with a
 * 503 naming the cause, and a new thread loads the model in its place while the others keep serving.
 */
import { availableParallelism } from 'node:os';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import { SliceWiseError } from '../lib/errors.ts';
import { env } from '../env.ts';
import { reviveError, type SerializedError } from '../workers/step-threads.ts';
import type { EngineInfo, ImageAnalysis, ImageRequest, VolumeAnalysis, VolumeRequest } from './analyze.ts';

const ENTRY = fileURLToPath(new URL('./inference-thread.mjs', import.meta.url));
/** Replacements in a row that may fail to load before the pool stops replacing (a checkpoint deleted meanwhile, say). */
const MAX_FAILED_RESTARTS = 3;

export type EngineName = EngineInfo['engine'];

export interface InferenceThreadData {
  checkpoint: string;
  /** What runs the model (SLICEWISE_DEMO_ENGINE). */
  engine: EngineName;
  /** The image size to prepare the engine for while loading (ORT builds its graphs per size); undefined: on first use. */
  imageSize?: number;
  /** Compute threads per inference thread: ORT intra-op threads, or tfjs wasm kernel threads. */
  threads: number;
  /**
   * One Int32 per thread of the pool, 1 while that thread computes a request: a thread splits its convolutions over
   * its kernel threads only while no other is computing (see inference-thread-main).
   */
  busy: SharedArrayBuffer;
  /** This thread's entry in `busy` (a replacement takes over the dead thread's, which the pool clears). */
  busyIndex: number;
}

export type InferenceRequest =
  | { op: 'image'; id: number; bytes: ArrayBuffer; name: string; request: ImageRequest }
  | { op: 'volume'; id: number; bytes: ArrayBuffer; name: string; request: VolumeRequest };

export type InferenceReply =
  | { type: 'ready'; backend: EngineInfo }
  | { type: 'failed'; error: SerializedError }
  | { type: 'done'; id: number; result: unknown }
  | { type: 'error'; id: number; error: SerializedError };

export type VolumeResult = Omit<VolumeAnalysis, 'volume'>;

export interface InferencePoolOptions {
  checkpoint: string;
  /** Inference threads. Default: one per core. */
  size?: number;
  /**
   * Compute threads per inference thread (ORT intra-op threads, or tfjs kernel threads). Default: one per core: a
   * request alone on the server computes on every core, and while several threads compute, each runs on one thread
   * only (the shared busy count), so that concurrent requests do not fight over the cores.
   */
  kernelThreads?: number;
  /** What runs the model. Default: SLICEWISE_DEMO_ENGINE, else `onnx`. */
  engine?: EngineName;
  /** The model's input size, to build the engine's graphs while loading rather than on the first request. Default: none. */
  imageSize?: number;
  /** The thread's entry module. Default: ./inference-thread.mjs. For tests: an entry that wraps that one. */
  entry?: string;
}

interface Pending {
  resolve(v: unknown): void;
  reject(e: Error): void;
}

interface Slot {
  thread: Worker;
  busyIndex: number;
  /** Loaded the model and answers requests. */
  ready: boolean;
  inFlight: number;
  pending: Map<number, Pending>;
  /** The uncaught error that killed the thread, when one did ('error' comes before 'exit'). */
  crash?: Error;
}

/**
 * The bytes in an ArrayBuffer of their own, to transfer. Not bytes.slice(): on a Buffer that is a view of the same
 * memory, and transferring it would detach the caller's buffer (or Node's shared pool of small Buffers).
 */
function ownCopy(bytes: Uint8Array): ArrayBuffer {
  return new Uint8Array(bytes).buffer as ArrayBuffer;
}

export class InferencePool {
  private readonly slots: Slot[] = [];
  private nextId = 1;
  private closed = false;
  private failedRestarts = 0;
  private readonly busy: SharedArrayBuffer;
  private readonly threadData: Omit<InferenceThreadData, 'busyIndex'>;
  private readonly entry: string;
  /** Resolves once every thread has loaded the model; rejects with the first thread's loading error. */
  readonly ready: Promise<void>;
  /** The engine, backend and device the threads run on (as the first thread to load reported it); null until ready. */
  backend: EngineInfo | null = null;
  /** Threads that died while serving and were replaced (for /model/info and the tests). */
  restarts = 0;

  constructor({ checkpoint, size = availableParallelism(), kernelThreads = availableParallelism(), entry = ENTRY, engine = env().demoEngine, imageSize }: InferencePoolOptions) {
    const n = Math.max(1, size);
    this.busy = new SharedArrayBuffer(4 * n);
    this.threadData = { checkpoint, engine, imageSize, threads: Math.max(1, kernelThreads), busy: this.busy };
    this.entry = entry;
    const starts: Promise<void>[] = [];
    for (let i = 0; i < n; i++) starts.push(this.start(i));
    this.ready = Promise.all(starts).then(() => undefined);
    this.ready.catch(() => {});
  }

  /** Starts a thread; resolves when it has loaded the model, rejects when it could not. */
  private start(busyIndex: number): Promise<void> {
    const thread = new Worker(this.entry, { workerData: { ...this.threadData, busyIndex } satisfies InferenceThreadData });
    const slot: Slot = { thread, busyIndex, ready: false, inFlight: 0, pending: new Map() };
    this.slots.push(slot);
    return new Promise<void>((resolve, reject) => {
      thread.on('message', (m: InferenceReply) => {
        if (m.type === 'ready') {
          this.backend ??= m.backend;
          slot.ready = true;
          this.failedRestarts = 0;
          return resolve();
        }
        if (m.type === 'failed') {
          const err = reviveError(m.error);
          this.remove(slot);
          // Requests queued on a replacement that could not load: the same answer as without any thread.
          for (const p of slot.pending.values()) p.reject(new SliceWiseError(`no inference thread is running: ${err.message}`, { status: 503, code: 'model_unavailable' }));
          slot.pending.clear();
          void thread.terminate();
          return reject(err);
        }
        const p = slot.pending.get(m.id);
        if (!p) return;
        slot.pending.delete(m.id);
        slot.inFlight--;
        if (m.type === 'done') p.resolve(m.result);
        else p.reject(reviveError(m.error));
      });
      thread.on('error', (err) => {
        slot.crash = err;
      });
      thread.on('exit', (code) => {
        const wasServing = slot.ready && this.slots.includes(slot);
        this.remove(slot);
        // A thread that died computing never said it stopped: the others would stay on one kernel thread for good.
        Atomics.store(new Int32Array(this.busy), slot.busyIndex, 0);
        const cause = slot.crash ? `${slot.crash.name}: ${slot.crash.message}` : `exit code ${code}${code === 1 ? '' : ' (out of memory?)'}`;
        if (!slot.ready) reject(slot.crash ?? new Error(`an inference thread exited with ${cause} while loading the model`));
        for (const p of slot.pending.values()) {
          p.reject(
            new SliceWiseError(`the inference thread computing this request died (${cause}); ${this.closed ? 'the model server is shutting down' : 'it is being replaced: try again'}`, {
              status: 503,
              code: 'inference_thread_died',
              details: { cause },
            }),
          );
        }
        slot.pending.clear();
        if (wasServing && !this.closed) this.replace(slot.busyIndex);
      });
    });
  }

  /** A new thread in place of a dead one; gives up after a few that could not even load the model. */
  private replace(busyIndex: number): void {
    this.restarts++;
    this.start(busyIndex).catch(() => {
      if (++this.failedRestarts < MAX_FAILED_RESTARTS && !this.closed) this.replace(busyIndex);
    });
  }

  private remove(slot: Slot): void {
    const at = this.slots.indexOf(slot);
    if (at >= 0) this.slots.splice(at, 1);
  }

  /** Threads that have loaded the model (a replacement counts once it has). */
  get size(): number {
    return this.slots.filter((s) => s.ready).length;
  }

  /** Requests sent to the threads and not answered yet. */
  get inFlight(): number {
    return this.slots.reduce((n, s) => n + s.inFlight, 0);
  }

  private send<T>(make: (id: number) => InferenceRequest, transfer: ArrayBuffer): Promise<T> {
    if (this.closed) return Promise.reject(new SliceWiseError('the model server is shutting down', { status: 503, code: 'shutting_down' }));
    // Ready threads first; a thread still loading (a replacement) queues the request until it has the model.
    const live = this.slots.some((s) => s.ready) ? this.slots.filter((s) => s.ready) : this.slots;
    const slot = live.reduce<Slot | undefined>((best, s) => (!best || s.inFlight < best.inFlight ? s : best), undefined);
    if (!slot) return Promise.reject(new SliceWiseError('no inference thread is running', { status: 503, code: 'model_unavailable' }));
    const id = this.nextId++;
    return new Promise<T>((resolve, reject) => {
      slot.pending.set(id, { resolve: resolve as (v: unknown) => void, reject });
      slot.inFlight++;
      slot.thread.postMessage(make(id), [transfer]);
    });
  }

  /** A copy of the bytes goes to the thread (transferred, not copied again): the caller's buffer stays usable. */
  image(bytes: Uint8Array, name: string, request: ImageRequest): Promise<ImageAnalysis> {
    const copy = ownCopy(bytes);
    return this.send((id) => ({ op: 'image', id, bytes: copy, name, request }), copy);
  }

  volume(bytes: Uint8Array, name: string, request: VolumeRequest): Promise<VolumeResult> {
    const copy = ownCopy(bytes);
    return this.send((id) => ({ op: 'volume', id, bytes: copy, name, request }), copy);
  }

  /** Stops the threads at once: requests in flight are answered with a 503. */
  async close(): Promise<void> {
    this.closed = true;
    await Promise.all([...this.slots].map((s) => s.thread.terminate()));
  }

  /**
   * Stops the threads once no request is in flight and none came for `graceMs` (at most `timeoutMs` in all): for a
   * pool that a newer model's replaced, whose last callers may still be on their way to it.
   */
  async drain({ graceMs = 2000, timeoutMs = 120_000 } = {}): Promise<void> {
    const until = Date.now() + timeoutMs;
    let idleSince = Date.now();
    while (Date.now() < until && !this.closed) {
      if (this.inFlight > 0) idleSince = Date.now();
      else if (Date.now() - idleSince >= graceMs) break;
      await new Promise((r) => setTimeout(r, 50));
    }
    await this.close();
  }
}
