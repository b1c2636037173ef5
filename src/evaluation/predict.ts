/**
 * The trained model's forward pass over prepared slices, batch by batch, in eval mode (running BatchNorm
 * statistics, no dropout). Slices come as the preprocessing functions make them: N x S x S, or N x C x S x S.
 */
import * as tf from '@tensorflow/tfjs';
import { loadCheckpoint } from '../model/checkpoint.ts';
import type { UNetModel } from '../model/unet.ts';

export interface LoadedModel {
  model: UNetModel;
  /** sha256 of the checkpoint's weights (verified when loading). */
  weightsSha256: string;
  dir: string;
}

export async function loadModel(dir: string): Promise<LoadedModel> {
  const { model, weightsSha256 } = await loadCheckpoint(dir);
  return { model, weightsSha256, dir };
}

export interface SliceBatch {
  /** N x C x S x S (C = 1 may be omitted: N x S x S), float32, as volumeToSlices / the .npy files hold them. */
  images: Float32Array;
  n: number;
  size: number;
  channels: number;
}

export interface PredictOptions {
  /** Slices per forward pass. Default: 8. */
  batchSize?: number;
  /** Also return the tumour probability resized back to each slice's native size [rows, cols]. */
  nativeSize?: [number, number];
  /** Skip the decoder (classification only). Default: false. */
  classifyOnly?: boolean;
  signal?: AbortSignal;
}

export interface Predictions {
  /** p(tumour) per pixel, N x S x S (empty with classifyOnly). */
  seg: Float32Array;
  /** p(tumour) per pixel at nativeSize, N x rows x cols, when asked for. */
  native: Float32Array | null;
  /** p(tumour) of the classification head, per slice. */
  cls: Float32Array;
}

/** NHWC input for the model from N x C x S x S (channels-first, as the files hold them). */
export function toModelInput({ images, n, size, channels }: SliceBatch, start = 0, count = n): tf.Tensor4D {
  const per = channels * size * size;
  const part = images.subarray(start * per, (start + count) * per);
  if (channels === 1) return tf.tensor4d(part, [count, size, size, 1]);
  return tf.tidy(() => tf.tensor4d(part, [count, channels, size, size]).transpose([0, 2, 3, 1]) as tf.Tensor4D);
}

export async function predict(model: UNetModel, batch: SliceBatch, { batchSize = 8, nativeSize, classifyOnly = false, signal }: PredictOptions = {}): Promise<Predictions> {
  const { n, size } = batch;
  const area = size * size;
  const seg = new Float32Array(classifyOnly ? 0 : n * area);
  const native = nativeSize && !classifyOnly ? new Float32Array(n * nativeSize[0] * nativeSize[1]) : null;
  const cls = new Float32Array(n);
  for (let start = 0; start < n; start += batchSize) {
    if (signal?.aborted) throw signal.reason instanceof Error ? signal.reason : new Error('prediction aborted');
    const count = Math.min(batchSize, n - start);
    const outs = tf.tidy(() => {
      const x = toModelInput(batch, start, count);
      const opts = { training: false };
      if (classifyOnly) return { cls: tf.softmax(model.forwardCls(x, opts)).slice([0, 1], [count, 1]) };
      const { segLogits, clsLogits } = model.forward(x, opts);
      const probs = tf.sigmoid(segLogits);
      return {
        seg: probs,
        // Back to the slice's own grid: half-pixel centres, as an image library would resize.
        native: nativeSize ? tf.image.resizeBilinear(probs as tf.Tensor4D, nativeSize, false, true) : undefined,
        cls: tf.softmax(clsLogits).slice([0, 1], [count, 1]),
      };
    });
    cls.set(await outs.cls.data(), start);
    if (outs.seg) seg.set(await outs.seg.data(), start * area);
    if (outs.native && native) native.set(await outs.native.data(), start * nativeSize![0] * nativeSize![1]);
    for (const t of Object.values(outs)) t?.dispose();
    // Give the event loop (abort messages, progress) a turn between batches.
    await new Promise((r) => setImmediate(r));
  }
  return { seg, native, cls };
}
