/**
 * Faster convolution kernels (forward, input gradient, filter gradient) for the tfjs 'cpu' backend (tests and small CPU runs only; the production
 * backend is set up by the tfjs-wasm-training package, packages/tfjs-wasm-training, through src/model/engine.ts).
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

type KernelArgs = { inputs: tf.NamedTensorInfoMap; backend: unknown; attrs?: tf.NamedAttrMap };

interface ConvAttrs {
  strides: [number, number] | number;
  pad: 'valid' | 'same' | number;
  dataFormat: 'NHWC' | 'NCHW';
  dilations?: [number, number] | number;
  dimRoundingMode?: 'floor' | 'round' | 'ceil';
  /** Conv2DBackpropFilter: the filter's shape. */
  filterShape?: [number, number, number, number];
  /** Conv2DBackpropInput: the input's shape. */
  inputShape?: [number, number, number, number];
}

type Shape4 = [number, number, number, number];

/** The convolution's geometry (NHWC) and the backend's value arrays of the two named inputs. */
function convSetup(args: KernelArgs, xShape: Shape4, filterShape: Shape4, a: ConvAttrs, names: [string, string]) {
  const backend = args.backend as BackendWithData;
  const info = tf.backend_util.computeConv2DInfo(
    xShape,
    filterShape,
    a.strides,
    a.dilations ?? 1,
    a.pad,
    a.dimRoundingMode,
    false,
    tf.backend_util.convertConv2DDataFormat(a.dataFormat),
  );
  const values = names.map((n) => backend.data.get((args.inputs[n] as tf.TensorInfo).dataId).values) as [Float32Array, Float32Array];
  return { info, top: info.padInfo.top, left: info.padInfo.left, values, make: (shape: number[], v: Float32Array) => backend.makeTensorInfo(shape, 'float32', v) };
}

const attrsOf = (args: KernelArgs): ConvAttrs => (args.attrs ?? {}) as unknown as ConvAttrs;
const shapeOf = (args: KernelArgs, name: string): Shape4 => (args.inputs[name] as tf.TensorInfo).shape as Shape4;

// Hot path: the three kernels repeat one loop nest on purpose (a shared walker would cost a call per filter tap).

function conv2DBackpropFilterFast(args: KernelArgs): tf.TensorInfo {
  const a = attrsOf(args);
  if (a.dataFormat === 'NCHW') throw new Error('conv2DBackpropFilterFast: NCHW is not supported');
  const { info, top, left, values: [xv, dyv], make } = convSetup(args, shapeOf(args, 'x'), a.filterShape!, a, ['x', 'dy']);
  const { batchSize, inHeight, inWidth, inChannels, outHeight, outWidth, outChannels, strideHeight, strideWidth, filterHeight, filterWidth } = info;
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
  return make([filterHeight, filterWidth, inChannels, outChannels], dw);
}

function conv2DFast(args: KernelArgs): tf.TensorInfo {
  const a = attrsOf(args);
  const { info, top, left, values: [xv, wv], make } = convSetup(args, shapeOf(args, 'x'), shapeOf(args, 'filter'), a, ['x', 'filter']);
  if (info.dataFormat !== 'channelsLast' || info.dilationHeight !== 1 || info.dilationWidth !== 1) {
    return original.Conv2D!(args);
  }
  const { batchSize, inHeight, inWidth, inChannels, outHeight, outWidth, outChannels, strideHeight, strideWidth, filterHeight, filterWidth } = info;
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
  return make([batchSize, outHeight, outWidth, outChannels], y);
}

function conv2DBackpropInputFast(args: KernelArgs): tf.TensorInfo {
  const a = attrsOf(args);
  if (a.dataFormat === 'NCHW') return original.Conv2DBackpropInput!(args);
  const { info, top, left, values: [dyv, wv], make } = convSetup(args, a.inputShape!, shapeOf(args, 'filter'), a, ['dy', 'filter']);
  const { batchSize, inHeight, inWidth, inChannels, outHeight, outWidth, outChannels, strideHeight, strideWidth, filterHeight, filterWidth } = info;
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
  return make([batchSize, inHeight, inWidth, inChannels], dx);
}

type AnyKernel = (args: KernelArgs) => tf.TensorInfo;
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
