/**
 * What the demo API and `slicewise predict` do with one upload: an image (JPEG or PNG) or a volume (NIfTI)
 * through the training path's own preprocessing and the model, to the answers the original's demo gave. No HTTP,
 * queue or database code; the inference threads (inference-pool.ts) call these, with the engine that runs the model:
 * ONNX Runtime (onnx-engine.ts, the default) or tfjs (tfjsEngine below, SLICEWISE_DEMO_ENGINE=tfjs). Either gets
 * the same preprocessed input and answers the same outputs; everything else here is shared.
 */
import * as tf from '@tensorflow/tfjs';
import sharp from 'sharp';
import { volumeToSlices } from '../imaging/brats.ts';
import { kaggleImageToInput, labelComponents } from '../imaging/kaggle.ts';
import { parseNiftiRaw, type RawNiftiVolume } from '../imaging/nifti.ts';
import { brainOf, camFromBottleneck, overlayPng } from '../evaluation/gradcam.ts';
import { predict, toModelInput, type PredictOptions, type Predictions, type SliceBatch } from '../evaluation/predict.ts';
import { SliceWiseError } from '../lib/errors.ts';
import type { UNetConfig, UNetModel } from '../model/unet.ts';

export interface AnalyzeOptions {
  /** Model input size (the run's image size). */
  imageSize: number;
  /** A pixel is tumour above this probability. Default: 0.5. */
  threshold?: number;
  /** Connected tumour regions smaller than this many pixels are dropped (the original's min_object_size). Default: 50. */
  minObjectSize?: number;
}

export interface Classification {
  predicted_class: 0 | 1;
  predicted_label: 'tumor' | 'no_tumor';
  confidence: number;
  tumor_probability: number;
  probabilities: { no_tumor: number; tumor: number };
}

export interface ImageSegmentation {
  threshold: number;
  min_object_size: number;
  tumor_pixels: number;
  tumor_fraction: number;
  /** The 0/1 mask as a PNG (white = tumour), at the model's size. */
  mask_png: Buffer;
  /** The mask in red over the preprocessed image, at the model's size. */
  overlay_png: Buffer;
}

export interface ImageAnalysis {
  classification: Classification;
  segmentation: ImageSegmentation | null;
  /** Grad-CAM of the predicted class over the image. */
  gradcam_png: Buffer | null;
  image_size: number;
}

export interface ImageRequest extends AnalyzeOptions {
  /** 'always', 'never', or 'if-tumor': only when p(tumour) >= segmentFrom (the original's multitask rule). */
  segment: 'always' | 'never' | 'if-tumor';
  /** Default: 0.3. */
  segmentFrom?: number;
  gradcam: boolean;
}

export function classification(p: number): Classification {
  const cls = p >= 0.5 ? 1 : 0;
  return {
    predicted_class: cls,
    predicted_label: cls ? 'tumor' : 'no_tumor',
    confidence: cls ? p : 1 - p,
    tumor_probability: p,
    probabilities: { no_tumor: 1 - p, tumor: p },
  };
}

/** Drops 8-connected regions of a 0/1 mask smaller than `minSize` pixels, in place; returns the pixels left. */
export function removeSmallObjects(mask: Uint8Array, width: number, height: number, minSize: number): number {
  const { labels, sizes } = labelComponents(mask, width, height);
  let kept = 0;
  for (let i = 0; i < mask.length; i++) {
    if (!mask[i]) continue;
    if (sizes[labels[i]!]! < minSize) mask[i] = 0;
    else kept++;
  }
  return kept;
}

/** Greyscale of a z-scored slice, stretched over the brain's range (0 outside it). */
function greyOf(image: Float32Array, brain: Uint8Array): Uint8Array {
  let lo = Infinity;
  let hi = -Infinity;
  for (let i = 0; i < image.length; i++) {
    if (!brain[i]) continue;
    lo = Math.min(lo, image[i]!);
    hi = Math.max(hi, image[i]!);
  }
  const span = hi > lo ? hi - lo : 1;
  const grey = new Uint8Array(image.length);
  for (let i = 0; i < image.length; i++) grey[i] = brain[i] ? Math.round(Math.max(0, Math.min(1, (image[i]! - lo) / span)) * 255) : 0;
  return grey;
}

/** The mask in red at alpha 0.4 over the greyscale image, as a PNG. */
export function maskOverlayPng(grey: Uint8Array, mask: Uint8Array, width: number, height: number, alpha = 0.4): Promise<Buffer> {
  const rgb = Buffer.alloc(width * height * 3);
  for (let i = 0; i < grey.length; i++) {
    const g = grey[i]!;
    rgb[i * 3] = mask[i] ? Math.round((1 - alpha) * g + alpha * 255) : g;
    rgb[i * 3 + 1] = mask[i] ? Math.round((1 - alpha) * g) : g;
    rgb[i * 3 + 2] = mask[i] ? Math.round((1 - alpha) * g) : g;
  }
  return sharp(rgb, { raw: { width, height, channels: 3 } }).png().toBuffer();
}

function maskPng(mask: Uint8Array, width: number, height: number): Promise<Buffer> {
  return sharp(Buffer.from(mask.map((v) => (v ? 255 : 0))), { raw: { width, height, channels: 1 } }).png().toBuffer();
}

/** What /model/info says about the engine. */
export interface EngineInfo {
  /** SLICEWISE_DEMO_ENGINE's value. */
  engine: 'onnx' | 'tfjs';
  /** `onnxruntime`, or the tfjs backend (`wasm`, `tensorflow`, `cpu`). */
  backend: string;
  /** The library and its version, the threads, in words (the demo page shows it). */
  device: string;
  /** The library's version. */
  version: string;
  /** Threads one request computes on while it is alone. */
  threads: number;
}

/** The model, run by one engine: what analyzeImage and analyzeVolume need of it. */
export interface ServingEngine {
  readonly config: UNetConfig;
  /** One image, computing only what the answer needs (runImageModel's contract). */
  runImage(batch: SliceBatch, opts: ImageModelOptions): Promise<ImageOutputs>;
  /** Slices in batches (evaluation/predict.ts's predict contract). */
  predict(batch: SliceBatch, opts?: PredictOptions): Promise<Predictions>;
}

/** The tfjs engine: the training code's own forward pass on a loaded model. */
export function tfjsEngine(model: UNetModel): ServingEngine {
  return {
    config: model.config,
    runImage: (batch, opts) => runImageModel(model, batch, opts),
    predict: (batch, opts) => predict(model, batch, opts),
  };
}

function checkModel(model: ServingEngine): void {
  if (model.config.inChannels !== 1) {
    throw new SliceWiseError(`this model reads ${model.config.inChannels} modalities per slice; the demo takes one image or one volume, so it serves single-modality models only`, {
      status: 422,
      code: 'model_needs_modalities',
    });
  }
}

export interface ImageOutputs {
  /** p(tumour) of the classification head. */
  p: number;
  /** p(tumour) per pixel, S x S; null when `segment` said no. */
  seg: Float32Array | null;
  /** The Grad-CAM of the predicted class, S x S in [0, 1] (see gradCam); null without `gradcam`. */
  cam: Float32Array | null;
}

export interface ImageModelOptions {
  /** Run the decoder for this p(tumour)? */
  segment: (p: number) => boolean;
  gradcam: boolean;
  /** Called with the Grad-CAM as soon as it is known, before the decoder runs (to encode its PNG meanwhile). */
  onCam?: (cam: Float32Array) => void;
}

/**
 * One image through the model, in eval mode, computing only what the answer needs: the encoder and the
 * classification head always; the decoder only when `segment(p)` says so (p(tumour) is read first, so a
 * /predict_multitask on an image below the segmentation cut-off skips the decoder, the larger half of the work);
 * the Grad-CAM of the predicted class (p >= 0.5 is class 1) from this same pass's bottleneck, so the encoder
 * runs once (gradCam, which runs it again, gives the same map).
 */
export async function runImageModel(model: UNetModel, batch: SliceBatch, { segment, gradcam, onCam }: ImageModelOptions): Promise<ImageOutputs> {
  if (batch.n !== 1) throw new RangeError(`runImageModel: one image, got ${batch.n}`);
  const opts = { training: false };
  const { skips, prob } = tf.tidy(() => {
    const { skips, bottleneck } = model.encode(toModelInput(batch), opts);
    return { skips, prob: tf.softmax(model.classify(bottleneck, opts)).slice([0, 1], [1, 1]) };
  });
  try {
    const p = (await prob.data())[0]!;
    let cam: Float32Array | null = null;
    if (gradcam) {
      cam = camFromBottleneck(model, skips[skips.length - 1]!, [classification(p).predicted_class], batch.size);
      onCam?.(cam);
    }
    let seg: Float32Array | null = null;
    if (segment(p)) {
      const segT = tf.tidy(() => tf.sigmoid(model.decode(skips, opts)));
      try {
        seg = (await segT.data()) as Float32Array;
      } finally {
        segT.dispose();
      }
    }
    return { p, cam, seg };
  } finally {
    tf.dispose([prob, ...skips]);
  }
}

/** One JPEG or PNG: the Kaggle path's brain mask and z-score, then the model. */
export async function analyzeImage(model: ServingEngine, bytes: Uint8Array, name: string, req: ImageRequest): Promise<ImageAnalysis> {
  checkModel(model);
  const { imageSize: size, threshold = 0.5, minObjectSize = 50, segmentFrom = 0.3 } = req;
  const input = await kaggleImageToInput(bytes, { imageSize: size });
  if (!input.ok) throw new SliceWiseError(`${name}: ${input.reason}`, { status: 422, code: 'bad_image', details: { file: name, reason: input.reason } });
  const batch: SliceBatch = { images: input.image, n: 1, size, channels: 1 };
  const wants = (p: number) => req.segment === 'always' || (req.segment === 'if-tumor' && p >= segmentFrom);
  // The PNGs are encoded on libuv's threads (sharp): the Grad-CAM's while the decoder runs, the mask's and the
  // overlay's together.
  let camPng: Promise<Buffer> | null = null;
  const onCam = (cam: Float32Array) => {
    camPng = overlayPng(input.image, cam, brainOf(input.image, 'kaggle'), size);
    camPng.catch(() => {}); // awaited below; not an unhandled rejection if the decoder throws first
  };
  const out = await model.runImage(batch, { segment: wants, gradcam: req.gradcam, onCam });
  const segmentation = out.seg ? segmentationOf(out.seg, input.image, input.brainMask, size, threshold, minObjectSize) : null;
  const [gradcam_png, seg] = await Promise.all([camPng as Promise<Buffer> | null, segmentation]);
  return { classification: classification(out.p), segmentation: seg, gradcam_png, image_size: size };
}

async function segmentationOf(probs: Float32Array, image: Float32Array, brain: Uint8Array, size: number, threshold: number, minObjectSize: number): Promise<ImageSegmentation> {
  const mask = new Uint8Array(size * size);
  for (let i = 0; i < mask.length; i++) mask[i] = probs[i]! > threshold ? 1 : 0;
  const pixels = removeSmallObjects(mask, size, size, minObjectSize);
  const [mask_png, overlay_png] = await Promise.all([maskPng(mask, size, size), maskOverlayPng(greyOf(image, brain), mask, size, size)]);
  return { threshold, min_object_size: minObjectSize, tumor_pixels: pixels, tumor_fraction: pixels / (size * size), mask_png, overlay_png };
}

export interface SliceResult {
  slice_idx: number;
  tumor_probability: number;
  /** Tumour pixels of the slice on the volume's own grid, after min_object_size. */
  tumor_pixels: number;
}

export interface VolumeAnalysis {
  shape: [number, number, number];
  /** mm, from the header. */
  pixdim: [number, number, number];
  axis_codes: string | null;
  slices: SliceResult[];
  tumor_voxels: number;
  tumor_volume_ml: number;
  /** 0/1 per voxel on the volume's grid, in NIfTI order (i fastest), for a segmentation file in its geometry. */
  labels: Uint8Array;
  volume: RawNiftiVolume;
  /** With `sliceOverlays`: per slice, the mask in red over the slice on its own grid (rows i, columns j), as a PNG. */
  slice_overlays_png?: Buffer[];
}

export interface VolumeRequest extends AnalyzeOptions {
  /** Also return slice_overlays_png (for a viewer). Default: false. */
  sliceOverlays?: boolean;
}

/**
 * The grey levels of a volume for display: the 0.5th and 99.5th percentiles of its values (from an even sample of
 * at most ~1M voxels), so that a few bright voxels do not darken every slice.
 */
function displayRange(volume: RawNiftiVolume): [number, number] {
  const { raw, slope, inter } = volume;
  const stride = Math.max(1, Math.floor(raw.length / 1_000_000));
  const sample = new Float32Array(Math.ceil(raw.length / stride));
  for (let i = 0, s = 0; i < raw.length; i += stride, s++) sample[s] = raw[i]! * slope + inter;
  sample.sort();
  const lo = sample[Math.floor(sample.length * 0.005)] ?? 0;
  const hi = sample[Math.min(sample.length - 1, Math.floor(sample.length * 0.995))] ?? 1;
  return [lo, hi > lo ? hi : lo + 1];
}

/** Slice k of the volume as 8-bit grey in the slice layout of analyzeVolume's planes (plane[i * ny + j]). */
function sliceGrey(volume: RawNiftiVolume, k: number, [lo, hi]: [number, number]): Uint8Array {
  const [nx, ny] = volume.dims;
  const { raw, slope, inter } = volume;
  const grey = new Uint8Array(nx * ny);
  const scale = 255 / (hi - lo);
  for (let j = 0; j < ny; j++) {
    const row = nx * (j + ny * k);
    for (let i = 0; i < nx; i++) grey[i * ny + j] = Math.max(0, Math.min(255, Math.round((raw[row + i]! * slope + inter - lo) * scale)));
  }
  return grey;
}

/**
 * One NIfTI volume: every axial slice through the BraTS path's own slicing and the model, the probabilities
 * resized back to the slice's grid, thresholded and cleaned of small objects per slice; the tumour volume in ml
 * from the voxel size.
 */
export async function analyzeVolume(model: ServingEngine, bytes: Uint8Array, name: string, { imageSize, threshold = 0.5, minObjectSize = 50, sliceOverlays = false }: VolumeRequest): Promise<VolumeAnalysis> {
  checkModel(model);
  const volume = await parseNiftiRaw(bytes, name);
  const [nx, ny, nz] = volume.dims;
  const slices = volumeToSlices(volume, null, { imageSize });
  const preds = await model.predict({ images: slices.images, n: nz, size: imageSize, channels: 1 }, { nativeSize: [nx, ny] });
  const labels = new Uint8Array(nx * ny * nz);
  const plane = new Uint8Array(nx * ny);
  const perSlice: SliceResult[] = [];
  const range = sliceOverlays ? displayRange(volume) : null;
  const overlays: Promise<Buffer>[] = [];
  let total = 0;
  for (let k = 0; k < nz; k++) {
    const probs = preds.native!.subarray(k * nx * ny, (k + 1) * nx * ny);
    // The slice's rows are i and its columns j (see volumeToSlices): plane[i * ny + j].
    for (let q = 0; q < plane.length; q++) plane[q] = probs[q]! > threshold ? 1 : 0;
    const pixels = removeSmallObjects(plane, ny, nx, minObjectSize);
    for (let i = 0; i < nx; i++) for (let j = 0; j < ny; j++) if (plane[i * ny + j]) labels[i + nx * (j + ny * k)] = 1;
    perSlice.push({ slice_idx: k, tumor_probability: preds.cls[k]!, tumor_pixels: pixels });
    total += pixels;
    // maskOverlayPng reads the plane before it returns, so the next slice may reuse it.
    if (range) overlays.push(maskOverlayPng(sliceGrey(volume, k, range), plane, ny, nx));
  }
  const voxelMl = (Math.abs(volume.pixdim[0]) * Math.abs(volume.pixdim[1]) * Math.abs(volume.pixdim[2])) / 1000;
  return {
    shape: [nx, ny, nz],
    pixdim: [...volume.pixdim],
    axis_codes: volume.axisCodes,
    slices: perSlice,
    tumor_voxels: total,
    tumor_volume_ml: total * voxelMl,
    labels,
    volume,
    ...(range ? { slice_overlays_png: await Promise.all(overlays) } : {}),
  };
}
