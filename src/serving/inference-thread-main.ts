/**
 * An inference thread: loads the served checkpoint once, then answers analysis requests from the main thread,
 * one at a time. Everything CPU-bound (decoding, slicing, the model, PNG encoding) happens here, so the server's
 * event loop stays free for other requests and /healthz.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { loadModel } from '../evaluation/predict.ts';
import { initBackend, setSimdThreadGate } from '../model/engine.ts';
import { serializeError } from '../workers/step-threads.ts';
import { analyzeImage, analyzeVolume } from './analyze.ts';
import type { InferenceReply, InferenceRequest, InferenceThreadData } from './inference-pool.ts';

const port = parentPort!;
const { checkpoint, threads, busy, busyIndex } = workerData as InferenceThreadData;
const computing = new Int32Array(busy);
// Each thread owns `threads` kernel threads. A request alone on the server splits its convolutions over them (all
// the cores for one request: its latency); while another thread computes too, each stays on its own thread, so
// that N concurrent requests run on N cores side by side instead of 2N threads taking turns on them. Checked per
// convolution: a request that started alone gives up its helpers as soon as a second one arrives.
setSimdThreadGate(() => {
  for (let i = 0; i < computing.length; i++) if (i !== busyIndex && Atomics.load(computing, i) !== 0) return false;
  return true;
});
const started = (async () => {
  const backend = await initBackend({ threads });
  return { backend, model: (await loadModel(checkpoint)).model };
})();
const ready = started.then((s) => s.model);
ready.catch(() => {}); // reported below, and again to each request that awaits it
// Reported once, at start: a checkpoint that cannot load is the pool's error, not each request's.
started.then(
  ({ backend }) => port.postMessage({ type: 'ready', backend } satisfies InferenceReply),
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
