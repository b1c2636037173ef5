/**
 * An inference thread: loads the served checkpoint once, then answers analysis requests from the main thread,
 * one at a time. Everything CPU-bound (decoding, slicing, the model, PNG encoding) happens here, so the server's
 * event loop stays free for other requests and /healthz.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { loadModel } from '../evaluation/predict.ts';
import { initBackend } from '../model/engine.ts';
import { serializeError } from '../workers/step-threads.ts';
import { analyzeImage, analyzeVolume } from './analyze.ts';
import type { InferenceReply, InferenceRequest, InferenceThreadData } from './inference-pool.ts';

const port = parentPort!;
const { checkpoint, threads } = workerData as InferenceThreadData;
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

let chain: Promise<void> = Promise.resolve();
port.on('message', (m: InferenceRequest) => {
  chain = chain.then(async () => {
    try {
      const model = await ready;
      const bytes = new Uint8Array(m.bytes);
      const result =
        m.op === 'image'
          ? await analyzeImage(model, bytes, m.name, m.request)
          : await analyzeVolume(model, bytes, m.name, m.request);
      // The volume's raw voxels are not needed by the caller: it has the upload.
      if ('volume' in result) (result as { volume?: unknown }).volume = undefined;
      port.postMessage({ type: 'done', id: m.id, result } satisfies InferenceReply);
    } catch (err) {
      port.postMessage({ type: 'error', id: m.id, error: serializeError(err) } satisfies InferenceReply);
    }
  });
});
