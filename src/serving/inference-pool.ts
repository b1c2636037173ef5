/**
 * Worker threads that keep the served model warm: each loads the checkpoint once and takes one request at a
 * time; a request goes to the thread with the fewest in flight. With one thread per core, concurrent clients use
 * every core while the main thread only parses requests and writes answers.
 */
import { availableParallelism } from 'node:os';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import { SliceWiseError } from '../lib/errors.ts';
import type { BackendInfo } from '../model/engine.ts';
import { reviveError, type SerializedError } from '../workers/step-threads.ts';
import type { ImageAnalysis, ImageRequest, VolumeAnalysis, VolumeRequest } from './analyze.ts';

const ENTRY = fileURLToPath(new URL('./inference-thread.mjs', import.meta.url));

export interface InferenceThreadData {
  checkpoint: string;
  /** Kernel threads per inference thread (wasm). */
  threads: number;
}

export type InferenceRequest =
  | { op: 'image'; id: number; bytes: ArrayBuffer; name: string; request: ImageRequest }
  | { op: 'volume'; id: number; bytes: ArrayBuffer; name: string; request: VolumeRequest };

export type InferenceReply =
  | { type: 'ready'; backend: BackendInfo }
  | { type: 'failed'; error: SerializedError }
  | { type: 'done'; id: number; result: unknown }
  | { type: 'error'; id: number; error: SerializedError };

export type VolumeResult = Omit<VolumeAnalysis, 'volume'>;

export interface InferencePoolOptions {
  checkpoint: string;
  /** Inference threads. Default: one per core. */
  size?: number;
  /** Kernel threads per inference thread. Default: 1 (the pool already spreads requests over the cores). */
  kernelThreads?: number;
}

interface Slot {
  thread: Worker;
  inFlight: number;
  pending: Map<number, { resolve(v: unknown): void; reject(e: Error): void }>;
}

export class InferencePool {
  private readonly slots: Slot[] = [];
  private nextId = 1;
  private closed = false;
  /** Resolves once every thread has loaded the model; rejects with the first thread's loading error. */
  readonly ready: Promise<void>;
  /** The tfjs backend and device the threads run on (as the first thread to load reported it); null until ready. */
  backend: BackendInfo | null = null;

  constructor({ checkpoint, size = availableParallelism(), kernelThreads = 1 }: InferencePoolOptions) {
    const starts: Promise<void>[] = [];
    for (let i = 0; i < Math.max(1, size); i++) {
      const thread = new Worker(ENTRY, { workerData: { checkpoint, threads: kernelThreads } satisfies InferenceThreadData });
      const slot: Slot = { thread, inFlight: 0, pending: new Map() };
      starts.push(
        new Promise<void>((resolve, reject) => {
          thread.on('message', (m: InferenceReply) => {
            if (m.type === 'ready') {
              this.backend ??= m.backend;
              return resolve();
            }
            if (m.type === 'failed') return reject(reviveError(m.error));
            const p = slot.pending.get(m.id);
            if (!p) return;
            slot.pending.delete(m.id);
            slot.inFlight--;
            if (m.type === 'done') p.resolve(m.result);
            else p.reject(reviveError(m.error));
          });
          thread.on('error', (err) => reject(err));
          thread.on('exit', (code) => {
            reject(new Error(`an inference thread exited with code ${code} while loading the model`));
            for (const p of slot.pending.values()) p.reject(new Error(`the inference thread exited with code ${code} (out of memory?)`));
            slot.pending.clear();
            const at = this.slots.indexOf(slot);
            if (at >= 0) this.slots.splice(at, 1);
          });
        }),
      );
      this.slots.push(slot);
    }
    this.ready = Promise.all(starts).then(() => undefined);
    this.ready.catch(() => {});
  }

  get size(): number {
    return this.slots.length;
  }

  private send<T>(make: (id: number) => InferenceRequest, transfer: ArrayBuffer): Promise<T> {
    if (this.closed) return Promise.reject(new SliceWiseError('the model server is shutting down', { status: 503, code: 'shutting_down' }));
    const slot = this.slots.reduce<Slot | undefined>((best, s) => (!best || s.inFlight < best.inFlight ? s : best), undefined);
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
    const copy = bytes.slice().buffer as ArrayBuffer;
    return this.send((id) => ({ op: 'image', id, bytes: copy, name, request }), copy);
  }

  volume(bytes: Uint8Array, name: string, request: VolumeRequest): Promise<VolumeResult> {
    const copy = bytes.slice().buffer as ArrayBuffer;
    return this.send((id) => ({ op: 'volume', id, bytes: copy, name, request }), copy);
  }

  async close(): Promise<void> {
    this.closed = true;
    await Promise.all(this.slots.splice(0).map((s) => s.thread.terminate()));
  }
}
