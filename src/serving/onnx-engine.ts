/**
 * The demo's default inference engine: the served checkpoint as ONNX graphs (onnx-graph.ts) run by ONNX Runtime
 * (onnxruntime-node, CPU). ORT's convolutions use the machine's AVX-512 / AVX2 kernels, which our wasm SIMD128
 * kernels cannot match: on this 2-core machine the small preset's forward pass at 256 x 256 takes 22 ms here (2
 * threads) against 100 ms on tfjs-wasm (2 threads); bench/demo.ts compares the served latency with PyTorch.
 *
 * One engine lives in one inference thread (inference-thread-main.ts). onnxruntime-node's session.run() is a
 * promise, but the binding computes synchronously on the calling JS thread (the promise only defers the call by a
 * setImmediate), so a session must never run on the server's event loop: there it would stall /healthz for the
 * whole pass.
 *
 * Threads, as measured with bench/demo.ts on this 2-core machine (2026-12-02, quiet-ish, load ~1.6): each inference
 * thread (one per core) has its sessions twice, with `threads` intra-op threads (default: a core each, so a request
 * alone on the server computes on every core) and with one, used while another inference thread computes, so that
 * concurrent requests run side by side on a core each instead of 4 threads taking turns on 2 cores. Spinning is off
 * (`session.intra_op.allow_spinning` = 0): ORT's pool threads otherwise busy-wait after each op, burning the core the
 * other inference thread needs. Against one intra-op thread always (SLICEWISE_DEMO_KERNEL_THREADS=1), this gave
 * the lower lone-request latency (p50 small 75 vs 104 ms, medium 270 vs 366 ms: 0.91x / 1.05x PyTorch + our
 * preprocessing, against 1.13x / 1.71x) and as much or more with 8 clients (16.6 vs 15.9 req/s small, 5.45 vs
 * 4.48 medium; both keep ~1.9 cores busy). One-thread-always has the higher 8-client / 1-client ratio (1.72x /
 * 1.64x against 1.37x / 1.46x) only because its lone request is slower: ORT's convolutions scale ~1.85x from one
 * thread to two, so a lone request that already has both cores leaves 8 clients little to gain. Batching
 * concurrent requests into one run was not taken: 8 clients already keep both cores busy, and a batch computes only
 * ~10 % faster per image (small, full graph, 1 thread: 42.5 ms per image at batch 1, 37.8 at 2, 39.5 at 4; 2 threads:
 * 21.8, 21.5, 20.1), not worth making a request wait for others.
 */
import type * as Ort from 'onnxruntime-node';
import { camMaps, resizeBilinearHalfPixel } from '../evaluation/gradcam.ts';
import type { PredictOptions, Predictions, SliceBatch } from '../evaluation/predict.ts';
import { SliceWiseError } from '../lib/errors.ts';
import type { UNetConfig, UNetModel } from '../model/unet.ts';
import { buildOnnxGraph, levelSizes, ONNX_NAMES, weightsOf, type OnnxPart } from './onnx-graph.ts';
import type { EngineInfo, ImageModelOptions, ImageOutputs, ServingEngine } from './analyze.ts';

/** The package's exports (a CommonJS module: what a dynamic import gives as `default`). */
type OrtModule = Omit<typeof Ort, 'default'>;

/** onnxruntime-node is missing or its native library cannot load here: no silent fallback to tfjs. */
export class OnnxRuntimeUnavailableError extends SliceWiseError {
  constructor(cause: unknown) {
    const why = cause instanceof Error ? cause.message.split('\n')[0] : String(cause);
    super(`the demo's inference engine onnxruntime-node cannot be loaded (${why}): reinstall it (npm ci), or serve with tfjs by setting SLICEWISE_DEMO_ENGINE=tfjs`, {
      status: 503,
      code: 'engine_unavailable',
      details: { package: 'onnxruntime-node', switch: 'SLICEWISE_DEMO_ENGINE' },
      cause,
    });
    this.name = 'OnnxRuntimeUnavailableError';
  }
}

let ortModule: Promise<OrtModule> | null = null;

/** onnxruntime-node, imported once (its native binding loads on import). Rejects with OnnxRuntimeUnavailableError. */
export function loadOnnxRuntime(): Promise<OrtModule> {
  ortModule ??= import('onnxruntime-node').then(
    // A CommonJS package: Node's ESM loader puts its exports under `default`; under some loaders (tsx in a worker
    // thread) the namespace is the exports themselves.
    (m) => ((m as { default?: OrtModule }).default?.InferenceSession ? (m as { default: OrtModule }).default : (m as unknown as OrtModule)),
    (err: unknown) => {
      ortModule = null;
      throw new OnnxRuntimeUnavailableError(err);
    },
  );
  return ortModule;
}

export interface OnnxEngineOptions {
  /** Image size to build the graphs for at once (others are built on first use). Default: none (all on first use). */
  imageSize?: number;
  /** Intra-op threads of a run while no other inference thread computes. Default: 1. */
  threads?: number;
  /**
   * Whether another inference thread is computing right now: then a run uses the one-thread sessions. Default:
   * never (always `threads`).
   */
  othersBusy?: () => boolean;
  /** For tests: let ORT spin (busy-wait) between ops, as it does by default. Default: false. */
  spinning?: boolean;
}

/** Grad-CAM's view of the classification head: dense(C -> H), ReLU, dense(H -> 2), weights [in, out]. */
interface Head {
  channels: number;
  hidden: number;
  fc1: Float32Array;
  fc2: Float32Array;
}

/**
 * Grad-CAM's channel weights (N x C) from the head's hidden pre-activations (N x H): the gradient of the chosen
 * class's logit with respect to the pooled features, written out for the head's two dense layers:
 * d logit_c / d pooled_k = sum_j fc1[k, j] * [hidden_j > 0] * fc2[j, c] (tfjs's ReLU gradient is 0 at 0, as here).
 * Equal to the autodiff camFromBottleneck does (its comment says why the pooled features suffice).
 */
export function headGradient(head: Head, hidden: Float32Array, classes: readonly number[]): Float32Array {
  const { channels: c, hidden: h, fc1, fc2 } = head;
  const out = new Float32Array(classes.length * c);
  const g = new Float32Array(h);
  classes.forEach((cls, s) => {
    for (let j = 0; j < h; j++) g[j] = hidden[s * h + j]! > 0 ? fc2[j * 2 + cls]! : 0;
    for (let k = 0; k < c; k++) {
      let sum = 0;
      for (let j = 0; j < h; j++) sum += fc1[k * h + j]! * g[j]!;
      out[s * c + k] = sum;
    }
  });
  return out;
}

type Sessions = Record<'encoder' | 'decoder' | 'full', Ort.InferenceSession>;

interface SizedSessions {
  /** With `threads` intra-op threads. */
  wide: Sessions;
  /** With one (the same sessions as `wide` when `threads` is 1). */
  narrow: Sessions;
}

const PARTS = ['encoder', 'decoder', 'full'] as const satisfies readonly OnnxPart[];

export class OnnxEngine implements ServingEngine {
  readonly config: UNetConfig;
  readonly info: EngineInfo;
  private readonly bySize = new Map<number, Promise<SizedSessions>>();
  private readonly head: Head;
  private readonly threads: number;

  private constructor(
    private readonly ort: OrtModule,
    private readonly weights: Map<string, Float32Array>,
    config: UNetConfig,
    private readonly opts: OnnxEngineOptions,
  ) {
    this.config = config;
    this.threads = Math.max(1, opts.threads ?? 1);
    const channels = config.base * 2 ** config.depth;
    this.head = { channels, hidden: config.headHidden, fc1: weights.get('head.fc1.weight')!, fc2: weights.get('head.fc2.weight')! };
    const version = ort.env.versions.node ?? ort.env.versions.common ?? 'unknown';
    const shared = this.threads > 1 && opts.othersBusy ? ` (1 while another inference thread computes)` : '';
    this.info = {
      engine: 'onnx',
      backend: 'onnxruntime',
      version,
      threads: this.threads,
      device: `CPU (onnxruntime-node ${version}, ${this.threads} intra-op thread${this.threads === 1 ? '' : 's'}${shared})`,
    };
  }

  /**
   * An engine for `model`'s current weights (copied out: the model may be disposed afterwards). Rejects with
   * OnnxRuntimeUnavailableError when onnxruntime-node cannot load.
   */
  static async create(model: UNetModel, opts: OnnxEngineOptions = {}): Promise<OnnxEngine> {
    const ort = await loadOnnxRuntime();
    const engine = new OnnxEngine(ort, weightsOf(model), model.config, opts);
    if (opts.imageSize !== undefined) await engine.sessions(opts.imageSize);
    return engine;
  }

  /** The sessions for one image size, built on first use (the graphs have fixed spatial sizes; the batch is free). */
  private sessions(size: number): Promise<SizedSessions> {
    let s = this.bySize.get(size);
    if (!s) {
      s = this.createSessions(size);
      this.bySize.set(size, s);
      s.catch(() => this.bySize.delete(size));
    }
    return s;
  }

  private async createSessions(size: number): Promise<SizedSessions> {
    levelSizes(this.config, size); // a size the depth cannot take fails here, with its own message
    const graphs = PARTS.map((part) => buildOnnxGraph(this.config, this.weights, part, { imageSize: size }));
    const make = async (threads: number): Promise<Sessions> => {
      const options: Ort.InferenceSession.SessionOptions = {
        intraOpNumThreads: threads,
        interOpNumThreads: 1,
        executionMode: 'sequential',
        graphOptimizationLevel: 'all',
        extra: { session: { intra_op: { allow_spinning: this.opts.spinning ? '1' : '0' } } },
      };
      const sessions = await Promise.all(graphs.map((g) => this.ort.InferenceSession.create(g, options)));
      return Object.fromEntries(PARTS.map((p, i) => [p, sessions[i]!])) as Sessions;
    };
    const wide = await make(this.threads);
    const narrow = this.threads > 1 && this.opts.othersBusy ? await make(1) : wide;
    return { wide, narrow };
  }

  /** The sessions for this run: one intra-op thread while another inference thread computes. */
  private async pick(size: number): Promise<Sessions> {
    const s = await this.sessions(size);
    return this.opts.othersBusy?.() ? s.narrow : s.wide;
  }

  private input(batch: SliceBatch, start: number, count: number): Ort.Tensor {
    const { images, size, channels } = batch;
    const per = channels * size * size;
    // N x C x S x S, channels first, as SliceBatch holds it: no transpose.
    return new this.ort.Tensor('float32', images.subarray(start * per, (start + count) * per), [count, channels, size, size]);
  }

  /**
   * runImageModel's contract on ORT: the encoder session (p(tumour), the head's hidden units, the skips), the
   * Grad-CAM from its bottleneck, then the decoder session on the skips only when `segment(p)` says so.
   */
  async runImage(batch: SliceBatch, { segment, gradcam, onCam }: ImageModelOptions): Promise<ImageOutputs> {
    if (batch.n !== 1) throw new RangeError(`runImage: one image, got ${batch.n}`);
    const enc = await (await this.pick(batch.size)).encoder.run({ [ONNX_NAMES.input]: this.input(batch, 0, 1) });
    const p = (enc[ONNX_NAMES.clsProb]!.data as Float32Array)[1]!;
    let cam: Float32Array | null = null;
    if (gradcam) {
      cam = this.cam(enc[ONNX_NAMES.bottleneck]!, enc[ONNX_NAMES.headHidden]!.data as Float32Array, [p >= 0.5 ? 1 : 0], batch.size);
      onCam?.(cam);
    }
    let seg: Float32Array | null = null;
    if (segment(p)) {
      // Picked again: whether another thread computes may have changed during the encoder.
      const decoder = (await this.pick(batch.size)).decoder;
      const feeds = Object.fromEntries(decoder.inputNames.map((name) => [name, enc[name]!]));
      seg = (await decoder.run(feeds))[ONNX_NAMES.segProb]!.data as Float32Array;
    }
    return { p, cam, seg };
  }

  private cam(bottleneck: Ort.Tensor, hidden: Float32Array, classes: number[], size: number): Float32Array {
    const [n, c, h, w] = bottleneck.dims as number[];
    return camMaps(bottleneck.data as Float32Array, 'nchw', [n!, h!, w!, c!], headGradient(this.head, hidden, classes), size);
  }

  /** evaluation/predict.ts's predict() on ORT: the full graph per batch; `native` resized with half-pixel centres. */
  async predict(batch: SliceBatch, { batchSize = 8, nativeSize, classifyOnly = false, signal }: PredictOptions = {}): Promise<Predictions> {
    const { n, size } = batch;
    const area = size * size;
    const seg = new Float32Array(classifyOnly ? 0 : n * area);
    const nativeArea = nativeSize ? nativeSize[0] * nativeSize[1] : 0;
    const native = nativeSize && !classifyOnly ? new Float32Array(n * nativeArea) : null;
    const cls = new Float32Array(n);
    for (let start = 0; start < n; start += batchSize) {
      if (signal?.aborted) throw signal.reason instanceof Error ? signal.reason : new Error('prediction aborted');
      const count = Math.min(batchSize, n - start);
      const sessions = await this.pick(size);
      const session = classifyOnly ? sessions.encoder : sessions.full;
      const out = await session.run({ [ONNX_NAMES.input]: this.input(batch, start, count) }, classifyOnly ? [ONNX_NAMES.clsProb] : [ONNX_NAMES.clsProb, ONNX_NAMES.segProb]);
      const probs = out[ONNX_NAMES.clsProb]!.data as Float32Array;
      for (let i = 0; i < count; i++) cls[start + i] = probs[i * 2 + 1]!;
      if (!classifyOnly) {
        const s = out[ONNX_NAMES.segProb]!.data as Float32Array;
        seg.set(s, start * area);
        if (native) {
          for (let i = 0; i < count; i++) {
            resizeBilinearHalfPixel(s.subarray(i * area, (i + 1) * area), size, size, native.subarray((start + i) * nativeArea, (start + i + 1) * nativeArea), nativeSize![0], nativeSize![1]);
          }
        }
      }
      // Give the event loop (messages, progress) a turn between batches.
      await new Promise((r) => setImmediate(r));
    }
    return { seg, native, cls };
  }

  async dispose(): Promise<void> {
    const all = await Promise.allSettled([...this.bySize.values()]);
    this.bySize.clear();
    const sessions = new Set<Ort.InferenceSession>();
    for (const r of all) if (r.status === 'fulfilled') for (const set of [r.value.wide, r.value.narrow]) for (const s of Object.values(set)) sessions.add(s);
    await Promise.all([...sessions].map((s) => s.release()));
  }
}
