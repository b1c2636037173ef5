/**
 * Faster convolution kernels (forward, input gradient, filter gradient) for the tfjs 'cpu' backend (tests and small CPU runs only; the production
 * backend is set up in src/model/backend/).
 *
 * tfjs-backend-cpu 4.22 computes the filter gradient with TensorBuffer.get() per multiply-add, about 50x slower
 * than its own forward convolution: a single training step of the small U-Net on 8 x 32 x 32 takes minutes.
 * The replacements walk the same sums with flat typed-array indexing (NHWC, any stride / padding, dilation 1;
 * anything else falls back to the original kernel) and produce the same values up to float summation order.
 * Conv2D and Conv2DBackpropInput gain less (the originals already index flat arrays) but are still ~2x faster.
 */
import * as tf from '@tensorflow/tfjs';

interface BackendWithData {
  data: { get(id: unknown): { values: Float32Array } };
  makeTensorInfo(shape: number[], dtype: string, values: Float32Array): tf.TensorInfo;
}

function conv2DBackpropFilterFast(args: { inputs: tf.NamedTensorInfoMap; backend: unknown; attrs?: tf.NamedAttrMap }): tf.TensorInfo {
  const { inputs, attrs } = args;
  const backend = args.backend as BackendWithData;
  const x = inputs.x as tf.TensorInfo;
  const dy = inputs.dy as tf.TensorInfo;
  const a = (attrs ?? {}) as unknown as {
    strides: [number, number] | number;
    pad: 'valid' | 'same' | number;
    dataFormat: 'NHWC' | 'NCHW';
    dimRoundingMode?: 'floor' | 'round' | 'ceil';
    filterShape: [number, number, number, number];
  };
  if (a.dataFormat === 'NCHW') throw new Error('conv2DBackpropFilterFast: NCHW is not supported');
  const info = tf.backend_util.computeConv2DInfo(
    x.shape as [number, number, number, number],
    a.filterShape,
    a.strides,
    1,
    a.pad,
    a.dimRoundingMode,
    false,
    'channelsLast',
  );
  const { batchSize, inHeight, inWidth, inChannels, outHeight, outWidth, outChannels, strideHeight, strideWidth, filterHeight, filterWidth } = info;
  const top = info.padInfo.top;
  const left = info.padInfo.left;
  const xv = backend.data.get(x.dataId).values;
  const dyv = backend.data.get(dy.dataId).values;
  const dw = new Float32Array(filterHeight * filterWidth * inChannels * outChannels);
  for (let b = 0; b < batchSize; b++) {
    for (let yR = 0; yR < outHeight; yR++) {
      for (let yC = 0; yC < outWidth; yC++) {
        const dyOff = ((b * outHeight + yR) * outWidth + yC) * outChannels;
        for (let wR = 0; wR < filterHeight; wR++) {
          const xR = yR * strideHeight - top + wR;
          if (xR < 0 || xR >= inHeight) continue;
          for (let wC = 0; wC < filterWidth; wC++) {
            const xC = yC * strideWidth - left + wC;
            if (xC < 0 || xC >= inWidth) continue;
            const xOff = ((b * inHeight + xR) * inWidth + xC) * inChannels;
            const wOff = (wR * filterWidth + wC) * inChannels * outChannels;
            for (let d1 = 0; d1 < inChannels; d1++) {
              const xval = xv[xOff + d1]!;
              if (xval === 0) continue; // ReLU outputs are often zero
              const o = wOff + d1 * outChannels;
              for (let d2 = 0; d2 < outChannels; d2++) dw[o + d2] += xval * dyv[dyOff + d2]!;
            }
          }
        }
      }
    }
  }
  return backend.makeTensorInfo([filterHeight, filterWidth, inChannels, outChannels], 'float32', dw);
}

function conv2DFast(args: { inputs: tf.NamedTensorInfoMap; backend: unknown; attrs?: tf.NamedAttrMap }): tf.TensorInfo {
  const { inputs, attrs } = args;
  const backend = args.backend as BackendWithData;
  const x = inputs.x as tf.TensorInfo;
  const filter = inputs.filter as tf.TensorInfo;
  const a = (attrs ?? {}) as unknown as {
    strides: [number, number] | number;
    pad: 'valid' | 'same' | number;
    dataFormat: 'NHWC' | 'NCHW';
    dilations: [number, number] | number;
    dimRoundingMode?: 'floor' | 'round' | 'ceil';
  };
  const info = tf.backend_util.computeConv2DInfo(
    x.shape as [number, number, number, number],
    filter.shape as [number, number, number, number],
    a.strides,
    a.dilations,
    a.pad,
    a.dimRoundingMode,
    false,
    tf.backend_util.convertConv2DDataFormat(a.dataFormat),
  );
  if (info.dataFormat !== 'channelsLast' || info.dilationHeight !== 1 || info.dilationWidth !== 1) {
    return original.Conv2D!(args);
  }
  const { batchSize, inHeight, inWidth, inChannels, outHeight, outWidth, outChannels, strideHeight, strideWidth, filterHeight, filterWidth } = info;
  const top = info.padInfo.top;
  const left = info.padInfo.left;
  const xv = backend.data.get(x.dataId).values;
  const wv = backend.data.get(filter.dataId).values;
  const y = new Float32Array(batchSize * outHeight * outWidth * outChannels);
  for (let b = 0; b < batchSize; b++) {
    for (let yR = 0; yR < outHeight; yR++) {
      for (let yC = 0; yC < outWidth; yC++) {
        const yOff = ((b * outHeight + yR) * outWidth + yC) * outChannels;
        for (let wR = 0; wR < filterHeight; wR++) {
          const xR = yR * strideHeight - top + wR;
          if (xR < 0 || xR >= inHeight) continue;
          for (let wC = 0; wC < filterWidth; wC++) {
            const xC = yC * strideWidth - left + wC;
            if (xC < 0 || xC >= inWidth) continue;
            const xOff = ((b * inHeight + xR) * inWidth + xC) * inChannels;
            const wOff = (wR * filterWidth + wC) * inChannels * outChannels;
            for (let d1 = 0; d1 < inChannels; d1++) {
              const xval = xv[xOff + d1]!;
              if (xval === 0) continue;
              const o = wOff + d1 * outChannels;
              for (let d2 = 0; d2 < outChannels; d2++) y[yOff + d2] += xval * wv[o + d2]!;
            }
          }
        }
      }
    }
  }
  return backend.makeTensorInfo([batchSize, outHeight, outWidth, outChannels], 'float32', y);
}

function conv2DBackpropInputFast(args: { inputs: tf.NamedTensorInfoMap; backend: unknown; attrs?: tf.NamedAttrMap }): tf.TensorInfo {
  const { inputs, attrs } = args;
  const backend = args.backend as BackendWithData;
  const dy = inputs.dy as tf.TensorInfo;
  const filter = inputs.filter as tf.TensorInfo;
  const a = (attrs ?? {}) as unknown as {
    strides: [number, number] | number;
    pad: 'valid' | 'same' | number;
    dataFormat: 'NHWC' | 'NCHW';
    dimRoundingMode?: 'floor' | 'round' | 'ceil';
    inputShape: [number, number, number, number];
  };
  if (a.dataFormat === 'NCHW') return original.Conv2DBackpropInput!(args);
  const info = tf.backend_util.computeConv2DInfo(
    a.inputShape,
    filter.shape as [number, number, number, number],
    a.strides,
    1,
    a.pad,
    a.dimRoundingMode,
    false,
    'channelsLast',
  );
  const { batchSize, inHeight, inWidth, inChannels, outHeight, outWidth, outChannels, strideHeight, strideWidth, filterHeight, filterWidth } = info;
  const top = info.padInfo.top;
  const left = info.padInfo.left;
  const dyv = backend.data.get(dy.dataId).values;
  const wv = backend.data.get(filter.dataId).values;
  const dx = new Float32Array(batchSize * inHeight * inWidth * inChannels);
  for (let b = 0; b < batchSize; b++) {
    for (let yR = 0; yR < outHeight; yR++) {
      for (let yC = 0; yC < outWidth; yC++) {
        const dyOff = ((b * outHeight + yR) * outWidth + yC) * outChannels;
        for (let wR = 0; wR < filterHeight; wR++) {
          const xR = yR * strideHeight - top + wR;
          if (xR < 0 || xR >= inHeight) continue;
          for (let wC = 0; wC < filterWidth; wC++) {
            const xC = yC * strideWidth - left + wC;
            if (xC < 0 || xC >= inWidth) continue;
            const xOff = ((b * inHeight + xR) * inWidth + xC) * inChannels;
            const wOff = (wR * filterWidth + wC) * inChannels * outChannels;
            for (let d1 = 0; d1 < inChannels; d1++) {
              const o = wOff + d1 * outChannels;
              let acc = 0;
              for (let d2 = 0; d2 < outChannels; d2++) acc += dyv[dyOff + d2]! * wv[o + d2]!;
              dx[xOff + d1] += acc;
            }
          }
        }
      }
    }
  }
  return backend.makeTensorInfo([batchSize, inHeight, inWidth, inChannels], 'float32', dx);
}

type AnyKernel = (args: { inputs: tf.NamedTensorInfoMap; backend: unknown; attrs?: tf.NamedAttrMap }) => tf.TensorInfo;
const original: Record<string, AnyKernel | undefined> = {};
let installed = false;

/** Replace the cpu backend's Conv2D, Conv2DBackpropInput and Conv2DBackpropFilter with the fast versions (idempotent). */
export function installFastCpuKernels(): void {
  if (installed) return;
  const replacements: Record<string, AnyKernel> = {
    Conv2D: conv2DFast,
    Conv2DBackpropInput: conv2DBackpropInputFast,
    Conv2DBackpropFilter: conv2DBackpropFilterFast,
  };
  for (const [kernelName, kernelFunc] of Object.entries(replacements)) {
    const existing = tf.getKernel(kernelName, 'cpu');
    if (existing) {
      original[kernelName] = existing.kernelFunc as unknown as AnyKernel;
      tf.unregisterKernel(kernelName, 'cpu');
    }
    tf.registerKernel({ kernelName, backendName: 'cpu', kernelFunc: kernelFunc as unknown as tf.KernelFunc });
  }
  installed = true;
}
