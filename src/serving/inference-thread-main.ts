/**
 * An inference thread: loads the served checkpoint once, then answers analysis requests from the main thread,
 * one at a time. Everything CPU-bound (decoding, slicing, the model, PNG encoding) happens here, so the server's
 * event loop stays free for other requests and /healthz.
 */
import { parentPort, workerData } from 'node:worker_threads';
import * as tf from '@tensorflow/tfjs';
import { loadModel } from '../evaluation/predict.ts';
import { initBackend, setSimdThreadGate } from '../model/engine.ts';
import { serializeError } from '../workers/step-threads.ts';
import { analyzeImage, analyzeVolume, tfjsEngine, type EngineInfo, type ServingEngine } from './analyze.ts';
import type { InferenceReply, InferenceRequest, InferenceThreadData } from './inference-pool.ts';
import { OnnxEngine } from './onnx-engine.ts';

const port = parentPort!;
const { checkpoint, threads, busy, busyIndex, engine: engineName, imageSize } = workerData as InferenceThreadData;
const computing = new Int32Array(busy);
// Each thread owns `threads` compute threads (ORT intra-op threads, or tfjs's wasm kernel threads). A request alone
// on the server computes on all of them (all the cores for one request: its latency); while another thread
// computes too, each stays on one, so that N concurrent requests run on N cores side by side instead of 2N threads
// taking turns on them. tfjs checks this per convolution (its thread gate); ORT per session run (the engine keeps
// one-thread sessions for it), so a request that started alone gives up its helpers at its next run.
const othersBusy = (): boolean => {
  for (let i = 0; i < computing.length; i++) if (i !== busyIndex && Atomics.load(computing, i) !== 0) return true;
  return false;
};

async function start(): Promise<{ engine: ServingEngine; info: EngineInfo }> {
  if (engineName === 'tfjs') {
    setSimdThreadGate(() => !othersBusy());
    const backend = await initBackend({ threads });
    const { model } = await loadModel(checkpoint);
    return { engine: tfjsEngine(model), info: { engine: 'tfjs', backend: backend.backend, device: backend.device, version: tf.version_core, threads } };
  }
  // tfjs only reads the checkpoint here (its verified loader), on the plain cpu backend: no wasm kernel threads are
  // started for it. PROD silences tfjs's "install tfjs-node" banner, which this thread's cpu backend would print.
  tf.env().set('PROD', true);
  await tf.setBackend('cpu');
  const { model } = await loadModel(checkpoint);
  try {
    const onnx = await OnnxEngine.create(model, { imageSize, threads, othersBusy });
    return { engine: onnx, info: onnx.info };
  } finally {
    model.dispose(); // the engine holds its own copy of the weights
  }
}

const started = start();
const ready = started.then((s) => s.engine);
ready.catch(() => {}); // reported below, and again to each request that awaits it
// Reported once, at start: a checkpoint that cannot load is the pool's error, not each request's.
started.then(
  ({ info }) => port.postMessage({ type: 'ready', backend: info } satisfies InferenceReply),
  (err) => port.postMessage({ type: 'failed', error: serializeError(err) } satisfies InferenceReply),
);

/** The PNGs of an answer: their buffers are transferred to the main thread rather than copied. */
function transferables(result: unknown): ArrayBuffer[] {
  const out = new Set<ArrayBuffer>();
  const visit = (v: unknown, depth: number): void => {
    if (depth > 3 || v === null || typeof v !== 'object') return;
    if (ArrayBuffer.isView(v)) {
      // A Buffer from sharp may be a view on a larger pooled or shared buffer: only a whole, plain one moves.
      if (v.buffer instanceof ArrayBuffer && v.byteOffset === 0 && v.byteLength === v.buffer.byteLength) out.add(v.buffer);
      return;
    }
    for (const x of Array.isArray(v) ? v : Object.values(v)) visit(x, depth + 1);
  };
  visit(result, 0);
  return [...out];
}

function reply(m: InferenceReply, transfer: ArrayBuffer[] = []): void {
  try {
    port.postMessage(m, transfer);
  } catch {
    port.postMessage(m); // a buffer that cannot move (an addon's external memory) is copied instead
  }
}

let chain: Promise<void> = Promise.resolve();
port.on('message', (m: InferenceRequest) => {
  chain = chain.then(async () => {
    Atomics.store(computing, busyIndex, 1);
    let answer: InferenceReply;
    try {
      const model = await ready;
      const bytes = new Uint8Array(m.bytes);
      const result =
        m.op === 'image'
          ? await analyzeImage(model, bytes, m.name, m.request)
          : await analyzeVolume(model, bytes, m.name, m.request);
      // The volume's raw voxels are not needed by the caller: it has the upload.
      if ('volume' in result) (result as { volume?: unknown }).volume = undefined;
      answer = { type: 'done', id: m.id, result };
    } catch (err) {
      answer = { type: 'error', id: m.id, error: serializeError(err) };
    } finally {
      Atomics.store(computing, busyIndex, 0);
    }
    reply(answer, answer.type === 'done' ? transferables(answer.result) : []);
  });
});
