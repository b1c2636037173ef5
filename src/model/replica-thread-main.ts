/**
 * One data-parallel training replica in a worker thread (see parallel.ts): its own tfjs backend instance and its
 * own U-Net. Per job: re-read the published parameters when their version changed, take replica 0's BatchNorm
 * buffers, compute the shard's loss and gradients (shard-grads.ts, the trainer's own code), and answer with the
 * gradients packed in one Float32Array and the updated buffers (both transferred, not copied).
 */
import { parentPort, workerData } from 'node:worker_threads';
import type * as tf from '@tensorflow/tfjs';
import { installFastCpuKernels } from './cpu-kernels.ts';
import { initBackend } from './engine.ts';
import { modelLayout, packVariables, unpackVariables, type FromReplica, type GradientSpec, type ReplicaWorkerData, type ToReplica } from './parallel.ts';
import { disposeShardTensors, shardGradients, shardTensors } from './shard-grads.ts';
import { createUNet } from './unet.ts';

const port = parentPort!;
const data = workerData as ReplicaWorkerData;
const send = (m: FromReplica, transfer: ArrayBuffer[] = []): void => port.postMessage(m, transfer);
const errorMessage = (id: number | null, e: unknown): FromReplica => {
  const err = e instanceof Error ? e : new Error(String(e));
  return { type: 'error', id, message: err.message, name: err.name, ...(err.stack ? { stack: err.stack } : {}) };
};

try {
  const info = await initBackend({ prefer: data.backend, ...(data.threads ? { threads: data.threads } : {}) });
  if (info.backend === 'cpu') installFastCpuKernels(); // as the trainer's thread does: same kernels, same numbers
  const model = createUNet(data.arch, { inChannels: data.inChannels, seed: data.seed });
  const layout = modelLayout(model.config);
  const shared = new Float32Array(data.params);
  let version = -1;
  let spec: GradientSpec | null = null;
  let params = new Map<string, tf.Variable>();
  const paramSize = new Map(layout.params.map((s) => [s.name, s.size]));

  port.on('message', (m: ToReplica) => {
    if (m.type !== 'job') return;
    const t0 = performance.now();
    try {
      if (m.spec) {
        spec = m.spec;
        params = new Map(spec.params.map((name) => [name, model.params.get(name)!]));
      }
      if (!spec) throw new Error('job without a gradient spec');
      if (m.version !== version) {
        unpackVariables(layout.params, model.params, shared);
        version = m.version;
      }
      unpackVariables(layout.buffers, model.buffers, m.buffers);
      const t = shardTensors(m.shard);
      let grads: Float32Array;
      let loss: number;
      try {
        const r = shardGradients(model, spec, params, t, m.segDen, m.clsDen);
        loss = r.loss;
        let total = 0;
        for (const name of spec.params) total += paramSize.get(name)!;
        grads = new Float32Array(total);
        let off = 0;
        for (const name of spec.params) {
          const g = r.grads.get(name);
          if (g) {
            grads.set(g.dataSync() as Float32Array, off);
            g.dispose();
          }
          off += paramSize.get(name)!;
        }
      } finally {
        disposeShardTensors(t);
      }
      const buffers = packVariables(layout.buffers, model.buffers, new Float32Array(layout.bufferSize));
      send({ type: 'result', id: m.id, loss, grads, buffers, ms: performance.now() - t0 }, [grads.buffer as ArrayBuffer, buffers.buffer as ArrayBuffer]);
    } catch (e) {
      send(errorMessage(m.id, e));
    }
  });
  send({ type: 'ready', backend: info.backend, device: info.device, signature: layout.signature });
} catch (e) {
  send(errorMessage(null, e));
}
