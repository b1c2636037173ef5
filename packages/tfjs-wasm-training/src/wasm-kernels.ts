/**
 * Training kernels for the tfjs wasm backend.
 *
 * tfjs-backend-wasm 4.22 cannot train a conv net: it has no 'Conv2DBackpropFilter' kernel, its
 * 'Conv2DBackpropInput' is a slow scalar loop, and several kernels that a U-Net's backward pass leans on are slow.
 * `registerWasmTrainingKernels()` registers, for backend 'wasm' (see REPLACEMENTS below for the list and reasons):
 *
 * - Conv2D / Conv2DBackpropInput / Conv2DBackpropFilter (stride 1, NHWC, any kernel size and padding): our own
 *   WebAssembly SIMD loops (./simd-kernels.ts, assembled at run time by ./wasm-asm.ts), which run on the tfjs
 *   heap in place, at ~20 GFLOP/s per thread here (the 128-bit-SIMD-without-FMA ceiling), and split across a
 *   worker pool (./simd-threads.ts) when one is running. dx is the forward conv of dy with the filter rotated by
 *   180 degrees and its channels swapped; dW accumulates, for each row of dy, every (kh, kw, 4 in, 8 out) tile in
 *   registers. When the SIMD module cannot be compiled, dx / dW fall back to wasm's XNNPACK Conv2D (dW as one conv
 *   with the batch as the channel axis) and forward convs stay with wasm's own.
 * - Sum, Mean (leading / middle axes: BatchNorm statistics and broadcast gradients), Multiply / Add / Sub / RealDiv
 *   with a per-channel or scalar operand, MaxPoolGrad (correct for overlapping windows too), Concat, SplitV, Slice,
 *   Tile, and Identity / same-dtype Cast (which share data instead of copying).
 * - The gradients of Sum and Mean (global in tfjs): same values as tfjs-core's, without materialising tf.ones.
 *
 * Convolution gradients support exactly what a U-Net needs: NHWC, stride 1, dilation 1, any kernel size, any
 * padding whose backward padding is non-negative ('same', 'valid', explicit). Anything else throws an
 * UnsupportedKernelError naming the kernel and the attribute: we fail loudly rather than compute something else.
 * The other replacements hand what they do not cover (dtypes, shapes) to wasm's original kernel, which is kept.
 */
import {
  backend_util,
  broadcastTo,
  div,
  getGradient,
  getKernel,
  registerGradient,
  registerKernel,
  reshape,
  slice_util,
  unregisterKernel,
  util,
} from '@tensorflow/tfjs';
import type { GradConfig, KernelConfig, KernelFunc, NamedAttrMap, Tensor, TensorInfo } from '@tensorflow/tfjs';
import type { BackendWasm } from '@tensorflow/tfjs-backend-wasm';
import { simdKernelsFor, type SimdKernels } from './simd-kernels.js';
import { SimdPoolBrokenError, simdPool, simdThreadsAllowed, type SimdPool } from './simd-threads.js';

const BACKEND = 'wasm';
/** Marks our kernel functions (survives a second copy of this module, e.g. under a test runner). */
const OURS = Symbol.for('tfjs-wasm-training.kernel');

type KernelArgs = Parameters<KernelFunc>[0];
type OurKernelFunc = KernelFunc & { [OURS]?: { original: KernelConfig | undefined } };

type Padding = 'valid' | 'same' | number | [[number, number], [number, number], [number, number], [number, number]];

/** An error raised by one of our kernels for an input it does not support. */
export class UnsupportedKernelError extends Error {
  constructor(kernel: string, attribute: string, detail: string) {
    super(`${kernel} (tfjs-wasm-training kernel): unsupported ${attribute}: ${detail}`);
    this.name = 'UnsupportedKernelError';
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Heap helpers. Allocating may grow the wasm memory, which detaches every typed-array view taken before: take views
// (f32) only after the last allocation of a step.

function alloc(backend: BackendWasm, shape: number[], dtype: 'float32' | 'int32' = 'float32'): TensorInfo {
  const t = backend.makeOutput(shape, dtype);
  if (util.sizeFromShape(shape) > 0 && backend.getMemoryOffset(t.dataId) === 0) {
    // tfjs does not check malloc's result: without this, the kernel would write over address 0 and on.
    backend.disposeData(t.dataId);
    throw new Error(
      `wasm heap exhausted allocating [${shape.join(', ')}] (${util.sizeFromShape(shape) * 4} bytes): ` +
        `the wasm backend is limited to 4 GB; use a smaller batch or image size`,
    );
  }
  return t;
}

function f32(backend: BackendWasm, t: TensorInfo): Float32Array {
  return backend.typedArrayFromHeap(t) as Float32Array;
}

/** Byte offset of a tensor's data in the wasm heap. */
function ptr(backend: BackendWasm, t: TensorInfo): number {
  return backend.getMemoryOffset(t.dataId);
}

function free(backend: BackendWasm, t: TensorInfo | null | undefined): void {
  if (t) backend.disposeData(t.dataId);
}

function pair(v: number | [number, number] | number[] | undefined, fallback: number): [number, number] {
  if (v == null) return [fallback, fallback];
  if (typeof v === 'number') return [v, v];
  return [v[0] ?? fallback, v[1] ?? fallback];
}

function checkConvAttrs(kernel: string, attrs: NamedAttrMap): void {
  const strides = pair(attrs.strides as number | [number, number], 1);
  if (strides[0] !== 1 || strides[1] !== 1) {
    throw new UnsupportedKernelError(kernel, 'strides', `[${strides.join(', ')}]; only stride 1 is implemented`);
  }
  const dilations = pair(attrs.dilations as number | [number, number] | undefined, 1);
  if (dilations[0] !== 1 || dilations[1] !== 1) {
    throw new UnsupportedKernelError(kernel, 'dilations', `[${dilations.join(', ')}]; only dilation 1 is implemented`);
  }
  const fmt = (attrs.dataFormat as string | undefined) ?? 'NHWC';
  if (fmt !== 'NHWC' && fmt !== 'channelsLast') {
    throw new UnsupportedKernelError(kernel, 'dataFormat', `'${fmt}'; only NHWC is implemented`);
  }
}

function convInfoOf(
  xShape: number[],
  filterShape: number[],
  attrs: NamedAttrMap,
): backend_util.Conv2DInfo {
  return backend_util.computeConv2DInfo(
    xShape as [number, number, number, number],
    filterShape as [number, number, number, number],
    1,
    1,
    attrs.pad as Padding,
    attrs.dimRoundingMode as 'floor' | 'round' | 'ceil' | undefined,
    false,
    'channelsLast',
  );
}

// ---------------------------------------------------------------------------------------------------------------
// Layout helpers (JS loops on the wasm heap).

/** [N, P, K] -> [K, P, N]. */
function transposeNPKtoKPN(src: Float32Array, dst: Float32Array, N: number, P: number, K: number): void {
  const PN = P * N;
  for (let p = 0; p < P; p++) {
    for (let n = 0; n < N; n++) {
      let s = (n * P + p) * K;
      let d = p * N + n;
      for (let k = 0; k < K; k++) {
        dst[d] = src[s++];
        d += PN;
      }
    }
  }
}

/** [N, P, K] -> [P, N, K]. */
function transposeNPKtoPNK(src: Float32Array, dst: Float32Array, N: number, P: number, K: number): void {
  if (N === 1) {
    dst.set(src.subarray(0, P * K));
    return;
  }
  const NK = N * K;
  for (let n = 0; n < N; n++) {
    let s = n * P * K;
    for (let p = 0; p < P; p++) {
      let d = p * NK + n * K;
      const end = s + K;
      while (s < end) dst[d++] = src[s++];
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Conv2D gradients.

/** wasm's own Conv2D kernel function (XNNPACK), even when ours is registered in its place. */
function wasmConv2D(): KernelFunc {
  const k = getKernel('Conv2D', BACKEND) as KernelConfig | undefined;
  if (!k) throw new Error("wasm backend has no 'Conv2D' kernel registered");
  const mark = (k.kernelFunc as OurKernelFunc)[OURS];
  if (!mark) return k.kernelFunc;
  if (!mark.original) throw new Error("wasm backend has no original 'Conv2D' kernel");
  return mark.original.kernelFunc;
}

function runConv(
  backend: BackendWasm,
  x: TensorInfo,
  filter: TensorInfo,
  pads: [number, number, number, number],
): TensorInfo {
  const [top, bottom, left, right] = pads;
  return wasmConv2D()({
    inputs: { x, filter },
    backend,
    attrs: {
      strides: [1, 1],
      pad: [[0, 0], [top, bottom], [left, right], [0, 0]],
      dilations: [1, 1],
      dataFormat: 'NHWC',
    } as unknown as NamedAttrMap,
  }) as TensorInfo;
}

/** Convolutions below this many FLOPs stay on the calling thread (dispatch and copies would dominate). */
let threadMinFlops = 20e6;

/** The thread pool, when it is running and `flops` of work is worth splitting. */
function poolFor(flops: number): SimdPool | null {
  const p = simdPool();
  return p && p.usable && p.threads > 1 && flops >= threadMinFlops && simdThreadsAllowed() ? p : null;
}

/** Runs a threaded variant; null (run single-threaded instead) when the pool broke down meanwhile. */
function tryPool<T>(f: () => T | null): T | null {
  try {
    return f();
  } catch (e) {
    if (e instanceof SimdPoolBrokenError) return null;
    throw e;
  }
}

const align16 = (n: number): number => Math.ceil(n / 16) * 16;

/** Geometry of a stride-1 conv with explicit pads, and the conv kernel's arguments after the three pointers. */
function convGeometry(x: TensorInfo, filter: TensorInfo, pads: [number, number, number, number]) {
  const [N, H, W, C] = x.shape as [number, number, number, number];
  const [KH, KW, , Op] = filter.shape as [number, number, number, number];
  const [t, b, l, r] = pads;
  const oH = H + t + b - KH + 1;
  const oW = W + l + r - KW + 1;
  // Columns whose whole kw range is inside the input: [l, W - KW + l + 1), then a multiple of 4 of them.
  const xa = Math.min(l, oW);
  const xe = Math.max(xa, Math.min(oW, W - KW + l + 1));
  const xb = xa + Math.floor((xe - xa) / 4) * 4;
  return { N, H, W, C, KH, KW, Op, oH, oW, rows: N * oH, tail: [H, W, C, oH, oW, Op, KH, KW, t, l, xa, xb] };
}

/**
 * convSimd on the thread pool: the input and the filter are copied into the pool's shared memory, the output rows
 * are shared out between the threads, and the output is copied back. Null when the shared memory cannot hold the
 * operands (the caller then runs on the calling thread).
 */
function convThreaded(
  backend: BackendWasm,
  pool: SimdPool,
  x: TensorInfo,
  filter: TensorInfo,
  O: number,
  pads: [number, number, number, number],
): TensorInfo | null {
  const g = convGeometry(x, filter, pads);
  const xOff = 0;
  const wOff = align16(xOff + 4 * util.sizeFromShape(x.shape));
  const yOff = align16(wOff + 4 * util.sizeFromShape(filter.shape));
  if (!pool.reserve(yOff + 4 * g.rows * g.oW * g.Op)) return null;
  let sh = pool.f32();
  sh.set(f32(backend, x), xOff / 4);
  sh.set(f32(backend, filter), wOff / 4);
  const args = [xOff, wOff, yOff, 0, 0, ...g.tail];
  pool.run('conv', Array.from({ length: pool.threads }, () => args), 3, g.rows);
  const y = alloc(backend, [g.N, g.oH, g.oW, O]);
  const out = f32(backend, y);
  sh = pool.f32();
  const y0 = yOff / 4;
  if (g.Op === O) out.set(sh.subarray(y0, y0 + g.rows * g.oW * O));
  else {
    const P = g.rows * g.oW;
    for (let p = 0; p < P; p++) for (let o = 0; o < O; o++) out[p * O + o] = sh[y0 + p * g.Op + o]!;
  }
  return y;
}

/**
 * Stride-1 conv with our SIMD loop: x [N, H, W, C], filter [KH, KW, C, Op] (Op a multiple of 8, the output channels
 * beyond O being zero or ignored), explicit pads [top, bottom, left, right] >= 0. Returns [N, oH, oW, O].
 */
function convSimd(
  backend: BackendWasm,
  simd: SimdKernels,
  x: TensorInfo,
  filter: TensorInfo,
  O: number,
  pads: [number, number, number, number],
): TensorInfo {
  const g = convGeometry(x, filter, pads);
  const pool = poolFor(2 * g.rows * g.oW * g.KH * g.KW * g.C * O);
  if (pool) {
    const y = tryPool(() => convThreaded(backend, pool, x, filter, O, pads));
    if (y) return y;
  }
  const yOp = alloc(backend, [g.N, g.oH, g.oW, g.Op]);
  let y: TensorInfo | null = null;
  try {
    simd.conv(ptr(backend, x), ptr(backend, filter), ptr(backend, yOp), 0, g.rows, ...(g.tail as Tail12));
    if (g.Op === O) {
      y = yOp;
      return yOp;
    }
    y = alloc(backend, [g.N, g.oH, g.oW, O]);
    simd.copyRows(ptr(backend, yOp), ptr(backend, y), g.rows * g.oW, O, g.Op, O);
    return y;
  } finally {
    if (y !== yOp) free(backend, yOp);
  }
}

type Tail12 = [number, number, number, number, number, number, number, number, number, number, number, number];

/** Forward Conv2D (NHWC, stride 1, dilation 1, float32) with our SIMD loop; anything else goes to wasm's own. */
function conv2DKernel(args: KernelArgs, original: KernelFunc | undefined): TensorInfo | TensorInfo[] {
  const backend = args.backend as BackendWasm;
  const attrs = args.attrs ?? {};
  const { x, filter } = args.inputs as { x: TensorInfo; filter: TensorInfo };
  const strides = pair(attrs.strides as number | [number, number], 1);
  const dilations = pair(attrs.dilations as number | [number, number] | undefined, 1);
  const fmt = (attrs.dataFormat as string | undefined) ?? 'NHWC';
  const simd = simdKernels(backend);
  const plain =
    strides[0] === 1 && strides[1] === 1 && dilations[0] === 1 && dilations[1] === 1 && (fmt === 'NHWC' || fmt === 'channelsLast');
  if (!simd || !plain || x.dtype !== 'float32' || filter.dtype !== 'float32' || x.shape.length !== 4) return original!(args);
  const info = convInfoOf(x.shape, filter.shape, attrs);
  const { top, bottom, left, right } = info.padInfo;
  if (top < 0 || bottom < 0 || left < 0 || right < 0 || info.outHeight <= 0 || info.outWidth <= 0 || util.sizeFromShape(x.shape) === 0) {
    return original!(args);
  }
  const [KH, KW, C, O] = filter.shape as [number, number, number, number];
  const Op = Math.ceil(O / 8) * 8;
  if (Op === O) return convSimd(backend, simd, x, filter, O, [top, bottom, left, right]);
  const wPad = alloc(backend, [KH, KW, C, Op]);
  try {
    f32(backend, wPad).fill(0);
    simd.copyRows(ptr(backend, filter), ptr(backend, wPad), KH * KW * C, O, O, Op);
    return convSimd(backend, simd, x, wPad, O, [top, bottom, left, right]);
  } finally {
    free(backend, wPad);
  }
}

function conv2DBackpropInput(args: KernelArgs): TensorInfo {
  const KERNEL = 'Conv2DBackpropInput';
  const backend = args.backend as BackendWasm;
  const attrs = args.attrs ?? {};
  const { dy, filter } = args.inputs as { dy: TensorInfo; filter: TensorInfo };
  checkConvAttrs(KERNEL, attrs);
  const inputShape = attrs.inputShape as number[];
  const info = convInfoOf(inputShape, filter.shape, attrs);
  const [KH, KW, C, O] = filter.shape as [number, number, number, number];
  if (info.outHeight !== dy.shape[1] || info.outWidth !== dy.shape[2] || O !== dy.shape[3]) {
    throw new Error(`${KERNEL}: dy shape [${dy.shape.join(', ')}] does not match the forward conv`);
  }
  // Forward: y[o] = sum_k x[o - padTop + k] w[k]. Backward: dx[i] = sum_k' dy[i - (KH - 1 - padTop) + k'] w[KH-1-k'].
  const { top, left } = info.padInfo;
  const pads: [number, number, number, number] = [
    KH - 1 - top,
    info.inHeight - info.outHeight + top,
    KW - 1 - left,
    info.inWidth - info.outWidth + left,
  ];
  if (pads.some((p) => p < 0)) {
    throw new UnsupportedKernelError(KERNEL, 'pad', `${JSON.stringify(attrs.pad)} (backward padding would be negative)`);
  }
  // With our SIMD conv the rotated filter's output channels are padded to a multiple of 8.
  const simd = simdKernels(backend);
  const Cp = simd ? Math.ceil(C / 8) * 8 : C;
  const wt = alloc(backend, [KH, KW, O, Cp]);
  try {
    const src = f32(backend, filter);
    const dst = f32(backend, wt);
    if (Cp !== C) dst.fill(0);
    // wt[kh, kw, o, c] = w[KH-1-kh, KW-1-kw, c, o]
    for (let kh = 0; kh < KH; kh++) {
      for (let kw = 0; kw < KW; kw++) {
        const sBase = ((KH - 1 - kh) * KW + (KW - 1 - kw)) * C * O;
        const dBase = (kh * KW + kw) * O * Cp;
        for (let o = 0; o < O; o++) {
          for (let c = 0; c < C; c++) dst[dBase + o * Cp + c] = src[sBase + c * O + o];
        }
      }
    }
    return simd ? convSimd(backend, simd, dy, wt, C, pads) : runConv(backend, dy, wt, pads);
  } finally {
    free(backend, wt);
  }
}

/** A Conv2DBackpropFilter call: its operands and the forward conv's geometry, checked against each other. */
interface FilterGradCall {
  backend: BackendWasm;
  attrs: NamedAttrMap;
  x: TensorInfo;
  dy: TensorInfo;
  filterShape: [number, number, number, number];
  info: backend_util.Conv2DInfo;
}

function conv2DBackpropFilter(args: KernelArgs): TensorInfo {
  const KERNEL = 'Conv2DBackpropFilter';
  const backend = args.backend as BackendWasm;
  const attrs = args.attrs ?? {};
  checkConvAttrs(KERNEL, attrs);
  const { x, dy } = args.inputs as { x: TensorInfo; dy: TensorInfo };
  const filterShape = attrs.filterShape as [number, number, number, number];
  const info = convInfoOf(x.shape, filterShape, attrs);
  const [N, oH, oW, O] = [x.shape[0], info.outHeight, info.outWidth, filterShape[3]];
  if (dy.shape[0] !== N || dy.shape[1] !== oH || dy.shape[2] !== oW || dy.shape[3] !== O) {
    throw new Error(`${KERNEL}: dy shape [${dy.shape.join(', ')}] does not match the forward conv`);
  }
  const call: FilterGradCall = { backend, attrs, x, dy, filterShape, info };
  const simd = simdKernels(backend);
  return simd ? conv2DBackpropFilterSimd(call, simd) : conv2DBackpropFilterXnn(call);
}

/** dW with our SIMD loop (./simd-kernels.ts), channels zero-padded to multiples of 4 (input) and 8 (output). */
function conv2DBackpropFilterSimd({ backend, x, dy, filterShape, info }: FilterGradCall, simd: SimdKernels): TensorInfo {
  const [KH, KW, C, O] = filterShape;
  const [N, H, W] = x.shape as [number, number, number, number];
  const [oH, oW] = [info.outHeight, info.outWidth];
  const Cp = Math.ceil(C / 4) * 4;
  const Op = Math.ceil(O / 8) * 8;
  const pool = poolFor(2 * N * oH * oW * KH * KW * C * O);
  if (pool) {
    const dW = tryPool(() => convFilterGradThreaded(backend, pool, x, dy, filterShape, info));
    if (dW) return dW;
  }
  const xPad = Cp !== C ? alloc(backend, [N, H, W, Cp]) : null;
  const dyPad = Op !== O ? alloc(backend, [N, oH, oW, Op]) : null;
  const acc = alloc(backend, [KH, KW, Cp, Op]);
  const padded = Cp !== C || Op !== O;
  const out = padded ? alloc(backend, filterShape) : acc;
  try {
    if (xPad) {
      f32(backend, xPad).fill(0);
      simd.copyRows(ptr(backend, x), ptr(backend, xPad), N * H * W, C, C, Cp);
    }
    if (dyPad) {
      f32(backend, dyPad).fill(0);
      simd.copyRows(ptr(backend, dy), ptr(backend, dyPad), N * oH * oW, O, O, Op);
    }
    f32(backend, acc).fill(0);
    simd.convFilterGrad(
      backend.getMemoryOffset((xPad ?? x).dataId),
      backend.getMemoryOffset((dyPad ?? dy).dataId),
      backend.getMemoryOffset(acc.dataId),
      0, N * oH, H, W, oH, oW, Cp, Op, KH, KW, info.padInfo.top, info.padInfo.left,
    );
    if (padded) {
      const a = f32(backend, acc);
      const d = f32(backend, out);
      for (let k = 0; k < KH * KW; k++) {
        for (let c = 0; c < C; c++) {
          const s = (k * Cp + c) * Op;
          const t = (k * C + c) * O;
          for (let o = 0; o < O; o++) d[t + o] = a[s + o];
        }
      }
    }
    return out;
  } finally {
    free(backend, xPad);
    free(backend, dyPad);
    if (padded) free(backend, acc);
  }
}

/** Off: every kernel takes its portable path, as if the SIMD module could not be compiled (for A/B runs). */
let simdEnabled = true;

/**
 * Turns our SIMD loops on (the default) or off; off, the kernels take the paths they take when the SIMD module
 * cannot be compiled (conv gradients on wasm's XNNPACK Conv2D, wasm's own forward kernels, JS loops). Takes
 * effect at the next kernel call. Returns the previous setting.
 */
export function setSimdKernels(enabled: boolean): boolean {
  const prev = simdEnabled;
  simdEnabled = enabled;
  return prev;
}

function simdKernels(backend: BackendWasm): SimdKernels | null {
  if (!simdEnabled) return null;
  const memory = (backend.wasm as unknown as { asm?: { memory?: WebAssembly.Memory } }).asm?.memory;
  return memory instanceof WebAssembly.Memory ? simdKernelsFor(memory) : null;
}

/** Copies [M, K] rows into [M, Kp] (Kp >= K) at `off` in `dst`, zeroing the extra channels. */
function copyPadded(src: Float32Array, dst: Float32Array, off: number, M: number, K: number, Kp: number): void {
  if (K === Kp) {
    dst.set(src.subarray(0, M * K), off);
    return;
  }
  dst.fill(0, off, off + M * Kp);
  for (let m = 0; m < M; m++) for (let k = 0; k < K; k++) dst[off + m * Kp + k] = src[m * K + k]!;
}

/**
 * dW on the thread pool: x and dy are copied into the shared memory, the dy rows are split between the threads,
 * each accumulating into its own dW buffer, and the buffers are summed. Null when the shared memory is too small.
 */
function convFilterGradThreaded(
  backend: BackendWasm,
  pool: SimdPool,
  x: TensorInfo,
  dy: TensorInfo,
  filterShape: [number, number, number, number],
  info: backend_util.Conv2DInfo,
): TensorInfo | null {
  const [KH, KW, C, O] = filterShape;
  const [N, H, W] = x.shape as [number, number, number, number];
  const [oH, oW] = [info.outHeight, info.outWidth];
  const Cp = Math.ceil(C / 4) * 4;
  const Op = Math.ceil(O / 8) * 8;
  const T = pool.threads;
  const accSize = KH * KW * Cp * Op;
  const xOff = 0;
  const dyOff = align16(xOff + 4 * N * H * W * Cp);
  const accOff = align16(dyOff + 4 * N * oH * oW * Op);
  if (!pool.reserve(accOff + 4 * accSize * T)) return null;
  const sh = pool.f32();
  copyPadded(f32(backend, x), sh, xOff / 4, N * H * W, C, Cp);
  copyPadded(f32(backend, dy), sh, dyOff / 4, N * oH * oW, O, Op);
  sh.fill(0, accOff / 4, accOff / 4 + accSize * T);
  // One dW accumulator per thread (a thread adds every chunk it takes into its own).
  const jobs = Array.from({ length: T }, (_, i) => [
    xOff, dyOff, accOff + 4 * accSize * i, 0, 0, H, W, oH, oW, Cp, Op, KH, KW, info.padInfo.top, info.padInfo.left,
  ]);
  pool.run('convFilterGrad', jobs, 3, N * oH);
  const dW = alloc(backend, filterShape);
  const d = f32(backend, dW);
  const a = pool.f32();
  for (let k = 0; k < KH * KW; k++) {
    for (let c = 0; c < C; c++) {
      for (let o = 0; o < O; o++) {
        let v = 0;
        for (let j = 0; j < jobs.length; j++) v += a[accOff / 4 + j * accSize + (k * Cp + c) * Op + o]!;
        d[(k * C + c) * O + o] = v;
      }
    }
  }
  return dW;
}

/** dW as one XNNPACK conv with the batch as the channel axis (fallback when our SIMD module cannot run). */
function conv2DBackpropFilterXnn({ backend, attrs, x, dy, filterShape, info }: FilterGradCall): TensorInfo {
  const [KH, KW, C, O] = filterShape;
  const [N, H, W] = x.shape as [number, number, number, number];
  const [oH, oW] = [info.outHeight, info.outWidth];
  const { top, left } = info.padInfo;
  // Variant A (fewer input than output channels): input xT [C, H, W, N] padded, filter dyT [oH, oW, N, O],
  // output [C, KH, KW, O] = dW with the channel axis first.
  // Variant B: input dyT [O, oH, oW, N] padded, filter xT [H, W, N, C], output [O, KH, KW, C] = dW rotated 180
  // degrees with the channel axis first. The fully transposed operand is the one with fewer channels.
  const variantA = C < O;
  const pads: [number, number, number, number] = variantA
    ? [top, KH - 1 - H - top + oH, left, KW - 1 - W - left + oW]
    : [KH - 1 - top, H - oH + top, KW - 1 - left, W - oW + left];
  if (pads.some((p) => p < 0)) {
    throw new UnsupportedKernelError('Conv2DBackpropFilter', 'pad', `${JSON.stringify(attrs.pad)} (backward padding would be negative)`);
  }
  const inT = variantA ? alloc(backend, [C, H, W, N]) : alloc(backend, [O, oH, oW, N]);
  const filT = variantA ? alloc(backend, [oH, oW, N, O]) : alloc(backend, [H, W, N, C]);
  let out: TensorInfo | null = null;
  try {
    {
      const xs = f32(backend, x);
      const dys = f32(backend, dy);
      if (variantA) {
        transposeNPKtoKPN(xs, f32(backend, inT), N, H * W, C);
        transposeNPKtoPNK(dys, f32(backend, filT), N, oH * oW, O);
      } else {
        transposeNPKtoKPN(dys, f32(backend, inT), N, oH * oW, O);
        transposeNPKtoPNK(xs, f32(backend, filT), N, H * W, C);
      }
    }
    out = runConv(backend, inT, filT, pads);
    const dW = alloc(backend, [KH, KW, C, O]);
    const o4 = f32(backend, out);
    const d = f32(backend, dW);
    if (variantA) {
      // o4[c, kh, kw, o] -> dW[kh, kw, c, o]
      for (let c = 0; c < C; c++) {
        for (let k = 0; k < KH * KW; k++) {
          const s = (c * KH * KW + k) * O;
          const t = (k * C + c) * O;
          for (let o = 0; o < O; o++) d[t + o] = o4[s + o];
        }
      }
    } else {
      // o4[o, KH-1-kh, KW-1-kw, c] -> dW[kh, kw, c, o]
      for (let o = 0; o < O; o++) {
        for (let kh = 0; kh < KH; kh++) {
          for (let kw = 0; kw < KW; kw++) {
            const s = ((o * KH + (KH - 1 - kh)) * KW + (KW - 1 - kw)) * C;
            const t = (kh * KW + kw) * C * O + o;
            for (let c = 0; c < C; c++) d[t + c * O] = o4[s + c];
          }
        }
      }
    }
    return dW;
  } finally {
    free(backend, inT);
    free(backend, filT);
    free(backend, out);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Data movement and reductions. wasm's versions either copy the whole input first (Slice, SplitV read the input
// back with readSync), transpose before reducing (Sum, Mean over leading axes), make one JS call per tiny row
// (Concat on the channel axis), or copy where no copy is needed (Identity, same-dtype Cast). Ours work in place on
// the heap. Strings (and anything else unusual) go to the original kernel.

type Heap = Float32Array | Int32Array | Uint8Array;

function heap(backend: BackendWasm, t: TensorInfo): Heap {
  return backend.typedArrayFromHeap(t) as Heap;
}

/** dst[d .. d + len) = src[s .. s + len): typed-array set for long runs, a loop for short ones. */
function copyRun(src: Heap, s: number, dst: Heap, d: number, len: number): void {
  if (len >= 48) {
    dst.set(src.subarray(s, s + len), d);
    return;
  }
  for (let i = 0; i < len; i++) dst[d + i] = src[s + i]!;
}

function plainDtype(t: TensorInfo): boolean {
  return t.dtype === 'float32' || t.dtype === 'int32' || t.dtype === 'bool';
}

/** The same data under a new tensor: tensors are immutable, so sharing is safe (what Reshape does). */
function share(backend: BackendWasm, x: TensorInfo, shape = x.shape): TensorInfo {
  backend.incRef(x.dataId);
  return { dataId: x.dataId, shape: [...shape], dtype: x.dtype };
}

function identityKernel(args: KernelArgs, original: KernelFunc | undefined): TensorInfo | TensorInfo[] {
  const { x } = args.inputs as { x: TensorInfo };
  if (x.dtype === 'string' && original) return original(args);
  return share(args.backend as BackendWasm, x);
}

function castKernel(args: KernelArgs, original: KernelFunc | undefined): TensorInfo | TensorInfo[] {
  const { x } = args.inputs as { x: TensorInfo };
  if (x.dtype === (args.attrs?.dtype as string) && x.dtype !== 'string') return share(args.backend as BackendWasm, x);
  if (!original) throw new Error("wasm backend has no original 'Cast' kernel");
  return original(args);
}

/** Copies the box [begin, begin + size) of x (row-major, shape xShape) into dst (contiguous). */
function sliceInto(src: Heap, xShape: number[], begin: number[], size: number[], dst: Heap, dstOffset = 0): void {
  const rank = xShape.length;
  if (rank === 0) {
    dst[dstOffset] = src[0]!;
    return;
  }
  // Merge trailing dimensions that are taken whole into one contiguous run.
  let inner = rank - 1;
  let run = size[inner]!;
  while (inner > 0 && size[inner] === xShape[inner] && begin[inner] === 0) {
    inner--;
    run *= size[inner]!;
  }
  const strides = new Array<number>(rank);
  strides[rank - 1] = 1;
  for (let i = rank - 2; i >= 0; i--) strides[i] = strides[i + 1]! * xShape[i + 1]!;
  let base = 0;
  for (let i = 0; i < rank; i++) base += begin[i]! * strides[i]!;
  if (inner === 0) {
    copyRun(src, base, dst, dstOffset, run);
    return;
  }
  // Odometer over dimensions [0, inner).
  const idx = new Array<number>(inner).fill(0);
  let d = dstOffset;
  for (;;) {
    let s = base;
    for (let i = 0; i < inner; i++) s += idx[i]! * strides[i]!;
    copyRun(src, s, dst, d, run);
    d += run;
    let i = inner - 1;
    while (i >= 0) {
      if (++idx[i]! < size[i]!) break;
      idx[i] = 0;
      i--;
    }
    if (i < 0) return;
  }
}

function sliceKernel(args: KernelArgs, original: KernelFunc | undefined): TensorInfo | TensorInfo[] {
  const backend = args.backend as BackendWasm;
  const { x } = args.inputs as { x: TensorInfo };
  if (!plainDtype(x)) return original!(args);
  const [begin, size] = slice_util.parseSliceParams(x, args.attrs!.begin as number[], args.attrs!.size as number[]);
  const out = backend.makeOutput(size!, x.dtype);
  if (util.sizeFromShape(size!) > 0) sliceInto(heap(backend, x), x.shape, begin!, size!, heap(backend, out));
  return out;
}

/** [outer, total * inner] <-> pieces [outer, sizes[i] * inner]: gather (concat) or scatter (split). */
function blockCopy(whole: Heap, pieces: Heap[], outer: number, widths: number[], gather: boolean): void {
  const total = widths.reduce((a, b) => a + b, 0);
  if (outer === 1) {
    let off = 0;
    pieces.forEach((p, i) => {
      if (gather) copyRun(p, 0, whole, off, widths[i]!);
      else copyRun(whole, off, p, 0, widths[i]!);
      off += widths[i]!;
    });
    return;
  }
  let off = 0;
  pieces.forEach((p, i) => {
    const w = widths[i]!;
    if (w >= 48) {
      for (let o = 0; o < outer; o++) {
        if (gather) whole.set(p.subarray(o * w, o * w + w), o * total + off);
        else p.set(whole.subarray(o * total + off, o * total + off + w), o * w);
      }
    } else if (gather) {
      for (let o = 0, s = 0, d = off; o < outer; o++, d += total) for (let k = 0; k < w; k++) whole[d + k] = p[s++]!;
    } else {
      for (let o = 0, d = 0, s = off; o < outer; o++, s += total) for (let k = 0; k < w; k++) p[d++] = whole[s + k]!;
    }
    off += w;
  });
}

/**
 * blockCopy between tensors: `whole` [outer, sum(widths)], piece i [outer, widths[i]]. With the SIMD row copy
 * where it applies (it moves 4-byte words: float32 and int32 alike, not bool), else with blockCopy's JS loops.
 */
function blockCopyTensors(
  backend: BackendWasm,
  whole: TensorInfo,
  pieces: TensorInfo[],
  outer: number,
  widths: number[],
  gather: boolean,
): void {
  const simd = simdKernels(backend);
  if (!simd || whole.dtype === 'bool') {
    blockCopy(heap(backend, whole), pieces.map((t) => heap(backend, t)), outer, widths, gather);
    return;
  }
  const total = widths.reduce((a, b) => a + b, 0);
  const base = ptr(backend, whole);
  let off = 0;
  pieces.forEach((p, i) => {
    const w = widths[i]!;
    if (w > 0) {
      if (gather) simd.copyRows(ptr(backend, p), base + 4 * off, outer, w, w, total);
      else simd.copyRows(base + 4 * off, ptr(backend, p), outer, w, total, w);
    }
    off += w;
  });
}

function concatKernel(args: KernelArgs, original: KernelFunc | undefined): TensorInfo | TensorInfo[] {
  const backend = args.backend as BackendWasm;
  const all = args.inputs as unknown as TensorInfo[];
  if (!all.length || !all.every(plainDtype) || !all.every((t) => t.dtype === all[0]!.dtype)) return original!(args);
  const axis = util.parseAxisParam(args.attrs!.axis as number, all[0]!.shape)[0]!;
  backend_util.assertParamsConsistent(all.map((t) => t.shape), axis);
  const outShape = backend_util.computeOutShape(all.map((t) => t.shape), axis);
  const inputs = all.filter((t) => util.sizeFromShape(t.shape) > 0);
  const out = backend.makeOutput(outShape, all[0]!.dtype);
  if (!inputs.length) return out;
  const outer = util.sizeFromShape(outShape.slice(0, axis));
  const widths = inputs.map((t) => util.sizeFromShape(t.shape.slice(axis)));
  blockCopyTensors(backend, out, inputs, outer, widths, true);
  return out;
}

function splitVKernel(args: KernelArgs, original: KernelFunc | undefined): TensorInfo | TensorInfo[] {
  const backend = args.backend as BackendWasm;
  const { x } = args.inputs as { x: TensorInfo };
  if (!plainDtype(x)) return original!(args);
  const axis = util.parseAxisParam(args.attrs!.axis as number, x.shape)[0]!;
  const sizes = backend_util.prepareSplitSize(x, args.attrs!.numOrSizeSplits as number[] | number, axis) as number[];
  const outs = sizes.map((s) => {
    const shape = [...x.shape];
    shape[axis] = s;
    return backend.makeOutput(shape, x.dtype);
  });
  if (util.sizeFromShape(x.shape) === 0) return outs;
  const outer = util.sizeFromShape(x.shape.slice(0, axis));
  const inner = util.sizeFromShape(x.shape.slice(axis + 1));
  const widths = sizes.map((s) => s * inner);
  blockCopyTensors(backend, x, outs, outer, widths, false);
  return outs;
}

function tileKernel(args: KernelArgs, original: KernelFunc | undefined): TensorInfo | TensorInfo[] {
  const backend = args.backend as BackendWasm;
  const { x } = args.inputs as { x: TensorInfo };
  if (!plainDtype(x)) return original!(args);
  const reps = args.attrs!.reps as number[];
  const rank = x.shape.length;
  if (reps.length !== rank) return original!(args);
  const outShape = x.shape.map((d, i) => d * reps[i]!);
  const out = backend.makeOutput(outShape, x.dtype);
  if (util.sizeFromShape(outShape) === 0) return out;
  const src = heap(backend, x);
  const dst = heap(backend, out);
  if (rank === 0) {
    dst[0] = src[0]!;
    return out;
  }
  // outBlock[i]: elements of one index along dimension i - 1 in the output (product of outShape[i..]).
  const outBlock = new Array<number>(rank + 1);
  outBlock[rank] = 1;
  for (let i = rank - 1; i >= 0; i--) outBlock[i] = outBlock[i + 1]! * outShape[i]!;
  const inBlock = new Array<number>(rank + 1);
  inBlock[rank] = 1;
  for (let i = rank - 1; i >= 0; i--) inBlock[i] = inBlock[i + 1]! * x.shape[i]!;
  // Fill the block of dimension `dim` at output offset `o` from input offset `s`: first the input's own
  // extent along `dim`, then repeat that span reps[dim] - 1 times (copyWithin).
  const fill = (dim: number, s: number, o: number): void => {
    const n = x.shape[dim]!;
    if (dim === rank - 1) {
      if (n === 1) dst.fill(src[s]!, o, o + reps[dim]!);
      else {
        copyRun(src, s, dst, o, n);
        for (let r = 1; r < reps[dim]!; r++) dst.copyWithin(o + r * n, o, o + n);
      }
      return;
    }
    for (let i = 0; i < n; i++) fill(dim + 1, s + i * inBlock[dim + 1]!, o + i * outBlock[dim + 1]!);
    const span = n * outBlock[dim + 1]!;
    for (let r = 1; r < reps[dim]!; r++) dst.copyWithin(o + r * span, o, o + span);
  };
  fill(0, 0, 0);
  return out;
}

/** Sum or mean over contiguous axes as [A, R, B] -> [A, B], accumulating in float64 (like tfjs's cpu backend). */
function reduceKernel(kind: 'sum' | 'mean') {
  return (args: KernelArgs, original: KernelFunc | undefined): TensorInfo | TensorInfo[] => {
    const backend = args.backend as BackendWasm;
    const { x } = args.inputs as { x: TensorInfo };
    const keepDims = !!args.attrs?.keepDims;
    const axes = [...new Set(util.parseAxisParam(args.attrs!.axis as number | number[], x.shape))].sort((a, b) => a - b);
    const contiguous = axes.every((a, i) => i === 0 || a === axes[i - 1]! + 1);
    if (x.dtype !== 'float32' || !axes.length || !contiguous || util.sizeFromShape(x.shape) === 0) {
      return original!(args);
    }
    const first = axes[0]!;
    const last = axes[axes.length - 1]!;
    const A = util.sizeFromShape(x.shape.slice(0, first));
    const R = util.sizeFromShape(x.shape.slice(first, last + 1));
    const B = util.sizeFromShape(x.shape.slice(last + 1));
    const outShape = keepDims
      ? x.shape.map((d, i) => (i >= first && i <= last ? 1 : d))
      : x.shape.filter((_, i) => i < first || i > last);
    const out = alloc(backend, outShape);
    const simd = simdKernels(backend);
    if (simd && (B % 4 === 0 || (B === 1 && R % 4 === 0))) {
      reduceSimd(backend, simd, x, out, A, B === 1 ? R / 4 : R, B === 1 ? 4 : B, B === 1, kind === 'mean' ? 1 / R : 1);
      return out;
    }
    const src = f32(backend, x);
    const dst = f32(backend, out);
    const scale = kind === 'mean' ? 1 / R : 1;
    if (B === 1) {
      for (let a = 0; a < A; a++) {
        let acc = 0;
        const end = (a + 1) * R;
        for (let i = a * R; i < end; i++) acc += src[i]!;
        dst[a] = kind === 'mean' ? acc / R : acc;
      }
      return out;
    }
    const acc = new Float64Array(B);
    for (let a = 0; a < A; a++) {
      acc.fill(0);
      let i = a * R * B;
      for (let r = 0; r < R; r++) for (let b = 0; b < B; b++) acc[b] += src[i++]!;
      for (let b = 0; b < B; b++) dst[a * B + b] = kind === 'mean' ? acc[b]! / R : acc[b]! * scale;
    }
    return out;
  };
}

const BINARY_OPS = { Multiply: 'mul', Add: 'add', Sub: 'sub', RealDiv: 'div' } as const;

/**
 * Binary ops where one operand has the full output shape and the other is a per-channel vector (shape [C] or
 * [1, ..., 1, C], C % 4 == 0) or a scalar: one SIMD pass. wasm's own handles these through a generic broadcasting
 * loop (about twice the time of the same-shape case); every other case goes to it.
 */
function binaryKernel(kernelName: keyof typeof BINARY_OPS) {
  const op = BINARY_OPS[kernelName];
  return (args: KernelArgs, original: KernelFunc | undefined): TensorInfo | TensorInfo[] => {
    const backend = args.backend as BackendWasm;
    const { a, b } = args.inputs as { a: TensorInfo; b: TensorInfo };
    const simd = simdKernels(backend);
    if (!simd || a.dtype !== 'float32' || b.dtype !== 'float32') return original!(args);
    const outShape = backend_util.assertAndGetBroadcastShape(a.shape, b.shape);
    const total = util.sizeFromShape(outShape);
    const C = outShape.length ? outShape[outShape.length - 1]! : 1;
    const aFull = util.sizeFromShape(a.shape) === total && util.arraysEqual(a.shape, outShape);
    const bFull = util.sizeFromShape(b.shape) === total && util.arraysEqual(b.shape, outShape);
    if (aFull === bFull || total === 0) return original!(args);
    const big = aFull ? a : b;
    const small = aFull ? b : a;
    const smallSize = util.sizeFromShape(small.shape);
    const perChannel = smallSize === C && small.shape.length > 0 && small.shape[small.shape.length - 1] === C && C % 4 === 0;
    const scalar = smallSize === 1 && total % 4 === 0;
    if (!perChannel && !scalar) return original!(args);
    const reversed = !aFull; // small op big
    const fn = op === 'mul' || op === 'add' ? op : reversed ? (op === 'sub' ? 'rsub' : 'rdiv') : op;
    const out = alloc(backend, outShape);
    let splat: TensorInfo | null = null;
    try {
      if (scalar) {
        splat = alloc(backend, [4]);
        f32(backend, splat).fill(f32(backend, small)[0]!);
      }
      const sp = ptr(backend, splat ?? small);
      const [M, width] = scalar ? [total / 4, 4] : [total / C, C];
      simd[`bcast_${fn}`](ptr(backend, big), sp, ptr(backend, out), M, width);
      return out;
    } finally {
      free(backend, splat);
    }
  };
}

/** Rows per f32 partial sum; partials are added in float64, so the error stays that of a 1024-term f32 sum. */
const SUM_BLOCK_ROWS = 1024;

/** out[a, b] = scale * sum_r x[a, r, b] (or, with `lanes`, out[a] = scale * sum over all R * B elements). */
function reduceSimd(
  backend: BackendWasm,
  simd: SimdKernels,
  x: TensorInfo,
  out: TensorInfo,
  A: number,
  R: number,
  B: number,
  lanes: boolean,
  scale: number,
): void {
  const partial = alloc(backend, [B]);
  try {
    const acc = new Float64Array(B);
    const xp = ptr(backend, x);
    const pp = ptr(backend, partial);
    for (let a = 0; a < A; a++) {
      acc.fill(0);
      for (let r0 = 0; r0 < R; r0 += SUM_BLOCK_ROWS) {
        const rows = Math.min(SUM_BLOCK_ROWS, R - r0);
        simd.colSum(xp + 4 * (a * R + r0) * B, pp, rows, B);
        const p = f32(backend, partial);
        for (let b = 0; b < B; b++) acc[b] += p[b]!;
      }
      const dst = f32(backend, out);
      if (lanes) {
        let t = 0;
        for (let b = 0; b < B; b++) t += acc[b]!;
        dst[a] = t * scale;
      } else {
        for (let b = 0; b < B; b++) dst[a * B + b] = acc[b]! * scale;
      }
    }
  } finally {
    free(backend, partial);
  }
}

/**
 * MaxPoolGrad, correct for any window / stride / padding (wasm's own is wrong for overlapping windows): each
 * window's gradient goes to the first maximum of the window in row-major order, as in tfjs's cpu backend.
 */
function maxPoolGradKernel(args: KernelArgs, original: KernelFunc | undefined): TensorInfo | TensorInfo[] {
  const backend = args.backend as BackendWasm;
  const { dy, input } = args.inputs as { dy: TensorInfo; input: TensorInfo };
  if (input.dtype !== 'float32' || dy.dtype !== 'float32') return original!(args);
  const attrs = args.attrs!;
  const info = backend_util.computePool2DInfo(
    input.shape as [number, number, number, number],
    attrs.filterSize as [number, number] | number,
    attrs.strides as [number, number] | number,
    1,
    attrs.pad as Padding,
    attrs.dimRoundingMode as 'floor' | 'round' | 'ceil' | undefined,
  );
  const { batchSize: N, inHeight: H, inWidth: W, inChannels: C, outHeight: oH, outWidth: oW } = info;
  const { strideHeight: sh, strideWidth: sw, filterHeight: fh, filterWidth: fw } = info;
  const { top, left } = info.padInfo;
  const dx = alloc(backend, input.shape);
  const { output } = args.inputs as { output?: TensorInfo };
  const simd = simdKernels(backend);
  const plain2x2 = fh === 2 && fw === 2 && sh === 2 && sw === 2 && top === 0 && left === 0 && oH === H >> 1 && oW === W >> 1;
  if (simd && plain2x2 && C % 4 === 0 && output && output.dtype === 'float32') {
    // Non-overlapping windows: the pooled output tells which input was the maximum.
    f32(backend, dx).fill(0);
    simd.maxPoolGrad2x2(ptr(backend, input), ptr(backend, output), ptr(backend, dy), ptr(backend, dx), N, H, W, C, oH, oW);
    return dx;
  }
  const x = f32(backend, input);
  const g = f32(backend, dy);
  const d = f32(backend, dx);
  d.fill(0);
  const best = new Float32Array(C);
  const where = new Int32Array(C);
  for (let n = 0; n < N; n++) {
    for (let r = 0; r < oH; r++) {
      const r0 = r * sh - top;
      const rLo = Math.max(0, r0);
      const rHi = Math.min(H, r0 + fh);
      for (let c = 0; c < oW; c++) {
        const c0 = c * sw - left;
        const cLo = Math.max(0, c0);
        const cHi = Math.min(W, c0 + fw);
        best.fill(-Infinity);
        where.fill(-1);
        for (let i = rLo; i < rHi; i++) {
          for (let j = cLo; j < cHi; j++) {
            const base = ((n * H + i) * W + j) * C;
            for (let k = 0; k < C; k++) {
              const v = x[base + k]!;
              if (v > best[k]!) {
                best[k] = v;
                where[k] = base + k;
              }
            }
          }
        }
        const gBase = ((n * oH + r) * oW + c) * C;
        for (let k = 0; k < C; k++) if (where[k]! >= 0) d[where[k]!] += g[gBase + k]!;
      }
    }
  }
  return dx;
}

// ---------------------------------------------------------------------------------------------------------------
// Registration.

interface Replacement {
  kernelName: string;
  kernelFunc: (args: KernelArgs, original: KernelFunc | undefined) => TensorInfo | TensorInfo[];
  why: string;
}

const REPLACEMENTS: Replacement[] = [
  {
    kernelName: 'Conv2DBackpropInput',
    kernelFunc: (a) => conv2DBackpropInput(a),
    why: "wasm's own is a slow scalar loop; ours is one conv of dy with the rotated filter (our SIMD loop, else XNNPACK's)",
  },
  {
    kernelName: 'Conv2DBackpropFilter',
    kernelFunc: (a) => conv2DBackpropFilter(a),
    why: 'missing in tfjs-backend-wasm; ours is a hand-written wasm SIMD loop on the heap (XNNPACK conv fallback)',
  },
  {
    kernelName: 'Conv2D',
    kernelFunc: conv2DKernel,
    why: 'stride-1 NHWC convs run by our SIMD loop (faster than XNNPACK here, esp. for few channels); others go to wasm',
  },
  ...(['Multiply', 'Add', 'Sub', 'RealDiv'] as const).map((k) => ({
    kernelName: k,
    kernelFunc: binaryKernel(k),
    why: "per-channel / scalar broadcasts (BatchNorm forward and backward) in one SIMD pass; wasm's broadcast loop is ~2x slower",
  })),
  { kernelName: 'Identity', kernelFunc: identityKernel, why: "wasm's copies the data; ours shares it (tensors are immutable)" },
  { kernelName: 'Cast', kernelFunc: castKernel, why: 'same-dtype casts (e.g. in tf.moments and ReLU grads) share the data instead of copying' },
  { kernelName: 'Sum', kernelFunc: reduceKernel('sum'), why: "wasm's transposes before reducing leading axes (BatchNorm / broadcast grads)" },
  { kernelName: 'Mean', kernelFunc: reduceKernel('mean'), why: "wasm's transposes before reducing leading axes (tf.moments)" },
  { kernelName: 'Slice', kernelFunc: sliceKernel, why: "wasm's reads the whole input back (readSync) before slicing" },
  { kernelName: 'SplitV', kernelFunc: splitVKernel, why: "wasm's slices each piece from a full copy of the input (concat grad)" },
  { kernelName: 'Concat', kernelFunc: concatKernel, why: "wasm's makes one typed-array call per tiny channel row (skip concat)" },
  { kernelName: 'Tile', kernelFunc: tileKernel, why: "wasm's element-wise C++ loop is slow (BatchNorm grad via tf.batchNorm)" },
  { kernelName: 'MaxPoolGrad', kernelFunc: maxPoolGradKernel, why: "wasm's is wrong for overlapping windows" },
  { kernelName: 'ResizeBilinearGrad', kernelFunc: resizeBilinearGradKernel, why: "upsampling grad: one SIMD pass, ~4x faster than wasm's" },
];

/**
 * ResizeBilinearGrad (halfPixelCenters false, the model's case; C % 4 == 0) with our SIMD loop; the source
 * rows / columns and fractions are computed in float64 exactly as tfjs's cpu backend does. Other cases: wasm's own.
 */
function resizeBilinearGradKernel(args: KernelArgs, original: KernelFunc | undefined): TensorInfo | TensorInfo[] {
  const backend = args.backend as BackendWasm;
  const { images, dy } = args.inputs as { images: TensorInfo; dy: TensorInfo };
  const attrs = args.attrs ?? {};
  const simd = simdKernels(backend);
  const [N, xH, xW, C] = images.shape as [number, number, number, number];
  if (!simd || attrs.halfPixelCenters || dy.dtype !== 'float32' || C % 4 !== 0 || images.shape.length !== 4) {
    return original!(args);
  }
  const alignCorners = !!attrs.alignCorners;
  const [, yH, yW] = dy.shape as [number, number, number, number];
  const hScale = (alignCorners && yH > 1 ? xH - 1 : xH) / (alignCorners && yH > 1 ? yH - 1 : yH);
  const wScale = (alignCorners && yW > 1 ? xW - 1 : xW) / (alignCorners && yW > 1 ? yW - 1 : yW);
  const dx = alloc(backend, images.shape);
  const tbl = alloc(backend, [3 * (yH + yW)]);
  try {
    const t = f32(backend, tbl);
    const ti = new Int32Array(t.buffer, t.byteOffset, t.length);
    for (let r = 0; r < yH; r++) {
      const v = r * hScale;
      const top = Math.floor(v);
      ti[3 * r] = top * xW * C * 4;
      ti[3 * r + 1] = Math.min(Math.ceil(v), xH - 1) * xW * C * 4;
      t[3 * r + 2] = v - top;
    }
    for (let c = 0; c < yW; c++) {
      const v = c * wScale;
      const left = Math.floor(v);
      const e = 3 * (yH + c);
      ti[e] = left * C * 4;
      ti[e + 1] = Math.min(Math.ceil(v), xW - 1) * C * 4;
      t[e + 2] = v - left;
    }
    f32(backend, dx).fill(0);
    const tp = ptr(backend, tbl);
    simd.resizeBilinearGrad(ptr(backend, dy), ptr(backend, dx), tp, tp + 12 * yH, N, yH, yW, xH * xW * C * 4, C);
    return dx;
  } finally {
    free(backend, tbl);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Gradients of Sum and Mean. tfjs-core's are mul(reshape(dy), ones(x.shape)) (and / reduceSize for Mean): tf.ones
// fills a full-size array in JS and uploads it to the backend, for every BatchNorm statistic (~170 ms of a 1.9 s
// step at 128x128 on wasm). Ours broadcast dy (divided by reduceSize first for Mean) with the Tile kernel: the very
// same float32 values (x * 1 and x / R are exact per element either way), on every backend, without the ones.
// Gradients are global in tfjs (not per backend), hence "on every backend".

const GRAD_MARK = Symbol.for('tfjs-wasm-training.gradient');
type OurGradConfig = GradConfig & { [GRAD_MARK]?: { original: GradConfig | undefined } };

function reduceGrad(kernelName: 'Sum' | 'Mean'): GradConfig {
  return {
    kernelName,
    inputsToSave: ['x'],
    gradFunc: (dy, saved, attrs) => {
      const [x] = saved as [Tensor];
      const axes = util.parseAxisParam(attrs.axis as number | number[], x.shape);
      const expanded = x.shape.slice();
      for (const a of axes) expanded[a] = 1;
      const reduceSize = axes.reduce((p, a) => p * x.shape[a]!, 1);
      return {
        x: () => {
          let g = reshape(dy as Tensor, expanded);
          if (kernelName === 'Mean') g = div(g, reduceSize);
          return broadcastTo(g, x.shape);
        },
      };
    },
  };
}

const GRADIENTS: GradConfig[] = [reduceGrad('Sum'), reduceGrad('Mean')];

function registerGradients(): void {
  for (const g of GRADIENTS) {
    const existing = getGradient(g.kernelName) as OurGradConfig | undefined;
    if (existing?.[GRAD_MARK]) continue;
    const ours: OurGradConfig = { ...g, [GRAD_MARK]: { original: existing } };
    registerGradient(ours);
  }
}

function unregisterGradients(): void {
  for (const g of GRADIENTS) {
    const existing = getGradient(g.kernelName) as OurGradConfig | undefined;
    const mark = existing?.[GRAD_MARK];
    if (mark?.original) registerGradient(mark.original);
  }
}

/** Names of the kernels `registerWasmTrainingKernels` registers for 'wasm', with the reason. */
export const WASM_TRAINING_KERNELS: ReadonlyArray<{ kernelName: string; why: string }> = REPLACEMENTS.map(
  ({ kernelName, why }) => ({ kernelName, why }),
);

/**
 * Registers our training kernels for backend 'wasm' (idempotent). Call it before or after the wasm backend is
 * initialised: replaced kernels keep their original setup function, so wasm's own setup still runs for them.
 * `only` restricts the set (for A/B measurements). Returns the names of the kernels registered by this call
 * (empty when they were already registered).
 */
export function registerWasmTrainingKernels(opts: { only?: readonly string[] } = {}): string[] {
  const done: string[] = [];
  if (!opts.only) registerGradients();
  for (const r of REPLACEMENTS) {
    if (opts.only && !opts.only.includes(r.kernelName)) continue;
    const existing = getKernel(r.kernelName, BACKEND) as KernelConfig | undefined;
    if (existing && (existing.kernelFunc as OurKernelFunc)[OURS]) continue;
    const original = existing ? { ...existing } : undefined;
    const originalFunc = original?.kernelFunc;
    const fn: OurKernelFunc = (args) => r.kernelFunc(args, originalFunc);
    fn[OURS] = { original };
    if (existing) unregisterKernel(r.kernelName, BACKEND);
    const config: KernelConfig = { kernelName: r.kernelName, backendName: BACKEND, kernelFunc: fn };
    if (original?.setupFunc) config.setupFunc = original.setupFunc;
    if (original?.disposeFunc) config.disposeFunc = original.disposeFunc;
    registerKernel(config);
    done.push(r.kernelName);
  }
  return done;
}

/** Puts wasm's original kernels back (for A/B comparisons); a kernel that had none is unregistered. */
export function unregisterWasmTrainingKernels(): void {
  unregisterGradients();
  for (const r of REPLACEMENTS) {
    const existing = getKernel(r.kernelName, BACKEND) as KernelConfig | undefined;
    const mark = existing ? (existing.kernelFunc as OurKernelFunc)[OURS] : undefined;
    if (!mark) continue;
    unregisterKernel(r.kernelName, BACKEND);
    if (mark.original) registerKernel(mark.original);
  }
}

/** Whether our kernels are currently registered for 'wasm'. */
export function wasmTrainingKernelsRegistered(): boolean {
  return REPLACEMENTS.every((r) => {
    const k = getKernel(r.kernelName, BACKEND) as KernelConfig | undefined;
    return !!k && !!(k.kernelFunc as OurKernelFunc)[OURS];
  });
}

/** Internal knobs for the tests and the benchmark. */
export const _internal = {
  /** Convolutions below this many FLOPs run on the calling thread (default 20e6); returns the previous value. */
  setThreadMinFlops(flops: number): number {
    const prev = threadMinFlops;
    threadMinFlops = flops;
    return prev;
  },
};
