/**
 * The demo's REST API (the original's FastAPI endpoints, REFERENCE.md): the served model's info, classification,
 * segmentation, both at once with Grad-CAM, their batch forms, and a patient's volume from a NIfTI file or a stack
 * of slices. Routes only check and translate: uploads are read here (size, emptiness, type by magic bytes, pixel
 * count), everything else is src/serving (analyze.ts in the inference threads). Images go out as base64 PNG.
 */
import { performance } from 'node:perf_hooks';
import { Hono, type Context } from 'hono';
import { bodyLimit } from 'hono/body-limit';
import sharp, { type Metadata } from 'sharp';
import { z } from 'zod';
import { niftiHeaderBytes } from '../imaging/nifti.ts';
import { SliceWiseError } from '../lib/errors.ts';
import type { ImageAnalysis, ImageRequest } from '../serving/analyze.ts';
import type { DemoService, ServingModel } from '../serving/demo-service.ts';

/** Room for multipart boundaries and part headers on top of the files themselves. */
const MULTIPART_SLACK = 64 * 1024;
/** The original's rule: /predict_multitask segments when p(tumour) >= 0.3. */
const SEGMENT_FROM = 0.3;
const DEFAULT_MIN_OBJECT_SIZE = 50;

type Kind = 'png' | 'jpeg' | 'nifti';

interface Upload {
  name: string;
  bytes: Uint8Array;
  kind: Kind;
}

interface ImageUpload extends Upload {
  width: number;
  height: number;
}

// ---------------------------------------------------------------------------------------------------------
// Parameters: from the query string or multipart text fields, validated with zod (a typo is named, not ignored)
// ---------------------------------------------------------------------------------------------------------

const blank = (v: unknown) => (v === '' ? undefined : v);
const flag = z.preprocess(
  (v) => (typeof v === 'string' ? v.trim().toLowerCase() : v),
  z.enum(['true', 'false', '1', '0', 'yes', 'no', 'on', 'off'], { error: 'expected true or false' }).transform((v) => ['true', '1', 'yes', 'on'].includes(v)),
);
const number = (s: z.ZodNumber) => z.preprocess(blank, z.coerce.number().pipe(s).optional());
const threshold = number(z.number().min(0).max(1));
const minObjectSize = number(z.number().int().min(0));
const spacing = number(z.number().positive().max(100));
const filename = z.string().max(255).optional();

const ClassifyParams = z.strictObject({ gradcam: flag.optional(), filename });
const SegmentParams = z.strictObject({ threshold, min_object_size: minObjectSize, overlay: flag.optional(), filename });
const MultitaskParams = z.strictObject({ threshold, min_object_size: minObjectSize, gradcam: flag.optional(), filename });
const StackParams = z.strictObject({
  threshold,
  min_object_size: minObjectSize,
  slice_overlays: flag.optional(),
  pixel_spacing_mm: spacing,
  slice_thickness_mm: spacing,
  filename,
});

// ---------------------------------------------------------------------------------------------------------
// Uploads
// ---------------------------------------------------------------------------------------------------------

function mb(bytes: number): string {
  return bytes % (1024 * 1024) === 0 ? `${bytes / (1024 * 1024)} MB` : `${bytes.toLocaleString('en-US')} bytes`;
}

function tooLarge(limit: number): SliceWiseError {
  return new SliceWiseError(`upload too large: the limit is ${mb(limit)} per request (maxUploadBytes)`, { status: 413, code: 'upload_too_large', details: { limit } });
}

/**
 * Refuses a body over the limit before it is buffered: at once when content-length says so, else while it streams
 * in (counted chunk by chunk, reading stops at the limit).
 */
function limitBody(demo: DemoService) {
  const max = demo.limits.maxUploadBytes;
  return bodyLimit({
    maxSize: max + MULTIPART_SLACK,
    onError: () => {
      throw tooLarge(max);
    },
  });
}

/** PNG, JPEG or NIfTI (.nii by its header size, .nii.gz by gzip's magic: checkVolume reads the header inside). */
function sniff(b: Uint8Array): Kind | null {
  if (b.length >= 8 && b[0] === 0x89 && b[1] === 0x50 && b[2] === 0x4e && b[3] === 0x47 && b[4] === 0x0d && b[5] === 0x0a && b[6] === 0x1a && b[7] === 0x0a) return 'png';
  if (b.length >= 3 && b[0] === 0xff && b[1] === 0xd8 && b[2] === 0xff) return 'jpeg';
  if (b.length >= 2 && b[0] === 0x1f && b[1] === 0x8b) return 'nifti';
  if (b.length >= 4) {
    const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
    for (const le of [true, false]) if ([348, 540].includes(v.getInt32(0, le))) return 'nifti';
  }
  return null;
}

function describeStart(b: Uint8Array): string {
  const head = Buffer.from(b.subarray(0, 16));
  const printable = head.toString('latin1').replace(/[^\x20-\x7e]/g, '.');
  return `it starts with ${head.toString('hex').replace(/(..)/g, '$1 ').trim()} ("${printable}")`;
}

function safeName(name: string | undefined): string {
  const base = (name ?? '').split(/[\\/]/).pop()!.trim();
  return (base || 'upload').slice(0, 200);
}

function checkUpload(name: string, bytes: Uint8Array, demo: DemoService): Upload {
  if (bytes.byteLength === 0) throw new SliceWiseError(`${name} is empty (0 bytes)`, { status: 400, code: 'empty_file', details: { file: name } });
  const max = demo.limits.maxUploadBytes;
  if (bytes.byteLength > max) {
    throw new SliceWiseError(`${name} is ${bytes.byteLength.toLocaleString('en-US')} bytes: the limit is ${mb(max)} (maxUploadBytes)`, {
      status: 413,
      code: 'upload_too_large',
      details: { file: name, bytes: bytes.byteLength, limit: max },
    });
  }
  const kind = sniff(bytes);
  if (!kind) {
    throw new SliceWiseError(`${name} is not a PNG, JPEG or NIfTI (.nii, .nii.gz) file: ${describeStart(bytes)}`, {
      status: 415,
      code: 'unsupported_media_type',
      details: { file: name },
    });
  }
  return { name, bytes, kind };
}

interface Received {
  files: Upload[];
  fields: Record<string, string>;
}

/**
 * The files of a request: multipart fields `file` (one) or `files` (several, in order), or the raw body with its
 * name in ?filename= or an X-Filename header. Other multipart fields are parameters (strings). JSON or text is
 * refused with a hint: it is never a file.
 */
async function receive(c: Context, demo: DemoService, { batch }: { batch: boolean }): Promise<Received> {
  const type = (c.req.header('content-type') ?? '').split(';')[0]!.trim().toLowerCase();
  const fields: Record<string, string> = {};
  const files: Upload[] = [];
  if (type === 'multipart/form-data') {
    let form: Record<string, string | File | (string | File)[]>;
    try {
      form = await c.req.parseBody({ all: true });
    } catch (err) {
      if (err instanceof SliceWiseError) throw err;
      throw new SliceWiseError(`the multipart body cannot be read: ${(err as Error).message}`, { status: 400, code: 'invalid_multipart' });
    }
    for (const [key, value] of Object.entries(form)) {
      const values = Array.isArray(value) ? value : [value];
      if (['file', 'files', 'files[]'].includes(key)) {
        for (const v of values) {
          if (typeof v === 'string') throw new SliceWiseError(`field ${key} must be a file upload, not text`, { status: 400, code: 'invalid_request' });
          files.push(checkUpload(safeName(v.name), new Uint8Array(await v.arrayBuffer()), demo));
        }
      } else {
        if (values.length > 1 || typeof values[0] !== 'string') throw new SliceWiseError(`field ${key} must be given once, as text`, { status: 400, code: 'invalid_request' });
        fields[key] = values[0];
      }
    }
  } else if (type === 'application/json' || type.startsWith('text/')) {
    throw new SliceWiseError(`send the file as multipart/form-data (field ${batch ? 'files' : 'file'}) or as the raw bytes (e.g. content-type application/octet-stream), not ${type}`, {
      status: 415,
      code: 'unsupported_media_type',
    });
  } else {
    // The raw file (any other type, or none; urlencoded too, curl --data-binary's default): sniffed like any upload.
    const bytes = new Uint8Array(await c.req.arrayBuffer());
    files.push(checkUpload(safeName(c.req.query('filename') ?? c.req.header('x-filename')), bytes, demo));
  }
  if (files.length === 0) {
    throw new SliceWiseError(`no file: send it as multipart/form-data field ${batch ? 'files (repeated, in order)' : 'file'}, or as the raw request body with ?filename=NAME`, {
      status: 400,
      code: 'no_file',
    });
  }
  if (!batch && files.length > 1) throw new SliceWiseError(`one file per request here, got ${files.length} (use the /batch endpoint for several)`, { status: 400, code: 'too_many_files' });
  if (files.length > demo.limits.maxBatchFiles) {
    throw new SliceWiseError(`${files.length} files: the limit is ${demo.limits.maxBatchFiles} per request (maxBatchFiles)`, {
      status: 400,
      code: 'too_many_files',
      details: { files: files.length, limit: demo.limits.maxBatchFiles },
    });
  }
  return { files, fields };
}

/** GET /model/info takes no parameters: one sent is a mistake to name (e.g. `?run=` hoping to pick a model), not to ignore. */
const ModelInfoQuery = z.record(z.string(), z.never({ error: 'GET /model/info takes no query parameters (the served model is chosen when the server starts: --from-run)' }));

function params<T extends z.ZodType>(schema: T, c: Context, fields: Record<string, string>): z.infer<T> {
  return schema.parse({ ...fields, ...c.req.query() });
}

/** An image's size from its header, before anything decodes it: a 30000 x 30000 PNG of a few KB is refused here. */
async function checkImage(u: Upload, demo: DemoService): Promise<ImageUpload> {
  if (u.kind === 'nifti') {
    throw new SliceWiseError(`${u.name} is a NIfTI volume: send it to POST /patient/analyze_stack (this endpoint takes a PNG or JPEG image)`, {
      status: 415,
      code: 'unsupported_media_type',
      details: { file: u.name },
    });
  }
  let meta: Metadata;
  try {
    meta = await sharp(u.bytes).metadata();
  } catch (err) {
    throw new SliceWiseError(`${u.name}: cannot read the ${u.kind.toUpperCase()} header: ${(err as Error).message}`, { status: 422, code: 'bad_image', details: { file: u.name } });
  }
  const { width = 0, height = 0 } = meta;
  const limit = demo.limits.maxImagePixels;
  if (width * height > limit) {
    throw new SliceWiseError(`${u.name} is ${width} x ${height} = ${(width * height).toLocaleString('en-US')} pixels: the limit is ${limit.toLocaleString('en-US')} pixels (maxImagePixels)`, {
      status: 413,
      code: 'image_too_large',
      details: { file: u.name, width, height, limit },
    });
  }
  return { ...u, width, height };
}

/** Voxels the header declares (every dimension), or null when it cannot tell (the thread then names the problem). */
function declaredVoxels(h: Buffer): { dims: number[]; voxels: number } | null {
  const v1 = h.length === 348;
  const le = h.readInt32LE(0) === h.length;
  const dim = (i: number) => (v1 ? (le ? h.readInt16LE(40 + 2 * i) : h.readInt16BE(40 + 2 * i)) : Number(le ? h.readBigInt64LE(16 + 8 * i) : h.readBigInt64BE(16 + 8 * i)));
  const rank = dim(0);
  if (!(rank >= 1 && rank <= 7)) return null;
  const dims = Array.from({ length: rank }, (_, i) => Math.max(1, dim(i + 1)));
  return { dims, voxels: dims.reduce((a, b) => a * b, 1) };
}

/** A volume's voxel count from its header, before a thread inflates and decodes it. */
async function checkVolume(u: Upload, demo: DemoService): Promise<void> {
  // The header alone (a .nii.gz inflated only that far): not a NIfTI at all is a 422 naming the file, here.
  const declared = declaredVoxels(niftiHeaderBytes(u.bytes, u.name));
  const limit = demo.limits.maxVolumeVoxels;
  if (declared && declared.voxels > limit) {
    throw new SliceWiseError(`${u.name} is ${declared.dims.join(' x ')} = ${declared.voxels.toLocaleString('en-US')} voxels: the limit is ${limit.toLocaleString('en-US')} (maxVolumeVoxels)`, {
      status: 413,
      code: 'volume_too_large',
      details: { file: u.name, dims: declared.dims, limit },
    });
  }
}

// ---------------------------------------------------------------------------------------------------------
// Answers
// ---------------------------------------------------------------------------------------------------------

/** PNG bytes as they come back from a thread (a Buffer becomes a plain Uint8Array on the way) -> base64. */
function b64(png: Uint8Array | null | undefined): string | null {
  return png ? Buffer.from(png.buffer, png.byteOffset, png.byteLength).toString('base64') : null;
}

function segmentationJson(s: NonNullable<ImageAnalysis['segmentation']>, { overlay = true } = {}) {
  return {
    threshold: s.threshold,
    min_object_size: s.min_object_size,
    tumor_pixels: s.tumor_pixels,
    tumor_fraction: s.tumor_fraction,
    mask_png_base64: b64(s.mask_png)!,
    overlay_png_base64: overlay ? b64(s.overlay_png) : null,
  };
}

const ms = (t0: number) => Math.round((performance.now() - t0) * 10) / 10;

/** An analysis error that concerns the file (a 4xx): one entry of a batch answer rather than the whole request's failure. */
function fileError(name: string, err: unknown) {
  if (err instanceof SliceWiseError && err.status >= 400 && err.status < 500) return { file: name, error: { code: err.code, message: err.message } };
  throw err;
}

// ---------------------------------------------------------------------------------------------------------
// Routes
// ---------------------------------------------------------------------------------------------------------

type SegmentParamsT = { threshold?: number; min_object_size?: number };

function classifyRequest(m: ServingModel, gradcam: boolean): ImageRequest {
  return { imageSize: m.info.image_size, segment: 'never', gradcam };
}

function segmentRequest(m: ServingModel, p: SegmentParamsT): ImageRequest {
  return {
    imageSize: m.info.image_size,
    threshold: p.threshold ?? m.info.threshold,
    minObjectSize: p.min_object_size ?? DEFAULT_MIN_OBJECT_SIZE,
    segment: 'always',
    gradcam: false,
  };
}

function classifyJson(file: string, a: ImageAnalysis) {
  return { file, classification: a.classification, gradcam_overlay_png_base64: b64(a.gradcam_png), image_size: a.image_size };
}

function segmentJson(file: string, a: ImageAnalysis, overlay: boolean) {
  return { file, segmentation: segmentationJson(a.segmentation!, { overlay }), image_size: a.image_size };
}

export function demoRoutes(demo: DemoService) {
  const limit = limitBody(demo);

  /** The request's images and parameters, checked; the time it arrived. */
  async function readImages<T extends z.ZodType>(c: Context, batch: boolean, schema: T) {
    const t0 = performance.now();
    const { files, fields } = await receive(c, demo, { batch });
    const p = params(schema, c, fields);
    const images = await Promise.all(files.map((f) => checkImage(f, demo)));
    return { t0, p, images };
  }

  /** One image per request: its analysis error is the request's. */
  async function one(images: ImageUpload[], request: (m: ServingModel) => ImageRequest) {
    const m = await demo.model();
    const [f] = images;
    return { file: f!.name, a: await m.pool.image(f!.bytes, f!.name, request(m)) };
  }

  /** A batch: every image on the threads at once; a file the model cannot take is an error entry, not a failed batch. */
  async function batch<R>(images: ImageUpload[], request: (m: ServingModel) => ImageRequest, answer: (file: string, a: ImageAnalysis) => R) {
    const m = await demo.model();
    const req = request(m);
    const results = await Promise.all(images.map((f) => m.pool.image(f.bytes, f.name, req).then((a) => answer(f.name, a), (err: unknown) => fileError(f.name, err))));
    return { count: results.length, failed: results.filter((r) => 'error' in (r as object)).length, results };
  }

  return new Hono()
    .get('/demo', (c) => c.redirect('/ui/demo'))
    .get('/model/info', async (c) => {
      ModelInfoQuery.parse(c.req.query());
      const { info, pool } = await demo.model();
      const b = pool.backend;
      return c.json({
        ...info,
        engine: b?.engine ?? null,
        backend: b?.backend ?? null,
        engine_version: b?.version ?? null,
        device: b?.device ?? null,
        threads: pool.size,
        compute_threads_per_thread: b?.threads ?? null,
        limits: demo.limits,
      });
    })
    .post('/predict_multitask', limit, async (c) => {
      const { t0, p, images } = await readImages(c, false, MultitaskParams);
      const { file, a } = await one(images, (m) => ({ ...segmentRequest(m, p), segment: 'if-tumor', segmentFrom: SEGMENT_FROM, gradcam: p.gradcam ?? true }));
      return c.json({
        file,
        classification: a.classification,
        segmentation: a.segmentation ? segmentationJson(a.segmentation) : null,
        segment_from: SEGMENT_FROM,
        gradcam_overlay_png_base64: b64(a.gradcam_png),
        image_size: a.image_size,
        processing_time_ms: ms(t0),
      });
    })
    .post('/classify', limit, async (c) => {
      const { t0, p, images } = await readImages(c, false, ClassifyParams);
      const { file, a } = await one(images, (m) => classifyRequest(m, p.gradcam ?? false));
      return c.json({ ...classifyJson(file, a), processing_time_ms: ms(t0) });
    })
    .post('/classify/batch', limit, async (c) => {
      const { t0, p, images } = await readImages(c, true, ClassifyParams);
      const out = await batch(images, (m) => classifyRequest(m, p.gradcam ?? false), classifyJson);
      return c.json({ ...out, processing_time_ms: ms(t0) });
    })
    .post('/segment', limit, async (c) => {
      const { t0, p, images } = await readImages(c, false, SegmentParams);
      const { file, a } = await one(images, (m) => segmentRequest(m, p));
      return c.json({ ...segmentJson(file, a, p.overlay ?? true), processing_time_ms: ms(t0) });
    })
    .post('/segment/batch', limit, async (c) => {
      const { t0, p, images } = await readImages(c, true, SegmentParams);
      const out = await batch(images, (m) => segmentRequest(m, p), (file, a) => segmentJson(file, a, p.overlay ?? true));
      return c.json({ ...out, processing_time_ms: ms(t0) });
    })
    .post('/patient/analyze_stack', limit, async (c) => {
      const t0 = performance.now();
      const { files, fields } = await receive(c, demo, { batch: true });
      const p = params(StackParams, c, fields);
      const volumes = files.filter((f) => f.kind === 'nifti');
      if (volumes.length > 0) {
        if (files.length > 1) {
          throw new SliceWiseError(`send one NIfTI volume, or image slices: got ${volumes.length} volume(s) and ${files.length - volumes.length} image(s)`, { status: 400, code: 'invalid_request' });
        }
        if (p.pixel_spacing_mm !== undefined || p.slice_thickness_mm !== undefined) {
          throw new SliceWiseError(`pixel_spacing_mm and slice_thickness_mm are for stacks of images: a NIfTI volume's voxel size comes from its header`, { status: 400, code: 'invalid_request' });
        }
        return c.json({ ...(await analyzeNifti(demo, volumes[0]!, p)), processing_time_ms: ms(t0) });
      }
      const images = await Promise.all(files.map((f) => checkImage(f, demo)));
      return c.json({ ...(await analyzeImageStack(demo, images, p)), processing_time_ms: ms(t0) });
    });
}

type StackParamsT = z.infer<typeof StackParams>;

async function analyzeNifti(demo: DemoService, f: Upload, p: StackParamsT) {
  await checkVolume(f, demo);
  const m = await demo.model();
  const v = await m.pool.volume(f.bytes, f.name, {
    imageSize: m.info.image_size,
    threshold: p.threshold ?? m.info.threshold,
    minObjectSize: p.min_object_size ?? DEFAULT_MIN_OBJECT_SIZE,
    sliceOverlays: p.slice_overlays ?? false,
  });
  const spacing = v.pixdim.map(Math.abs) as [number, number, number];
  return {
    input: 'nifti' as const,
    file: f.name,
    shape: v.shape,
    axis_codes: v.axis_codes,
    voxel_spacing_mm: spacing,
    spacing_source: 'nifti_header' as const,
    voxel_volume_ml: (spacing[0] * spacing[1] * spacing[2]) / 1000,
    threshold: p.threshold ?? m.info.threshold,
    min_object_size: p.min_object_size ?? DEFAULT_MIN_OBJECT_SIZE,
    slice_count: v.slices.length,
    slices_with_tumor: v.slices.filter((s) => s.tumor_pixels > 0).length,
    tumor_voxels: v.tumor_voxels,
    tumor_volume_ml: v.tumor_volume_ml,
    slices: v.slices.map((s, k) => ({ ...s, ...(v.slice_overlays_png ? { overlay_png_base64: b64(v.slice_overlays_png[k]) } : {}) })),
  };
}

/**
 * Image slices in the order sent: each through the image path, segmented; a slice's tumour area from its own pixel
 * count at the model's size scaled back to the image's pixels (pixel_spacing_mm each), times slice_thickness_mm.
 * PNG and JPEG carry no voxel size, so both default to 1 mm, and the answer says which were given.
 */
async function analyzeImageStack(demo: DemoService, images: ImageUpload[], p: StackParamsT) {
  const m = await demo.model();
  const size = m.info.image_size;
  const request = segmentRequest(m, p);
  const analyses = await Promise.all(images.map((f) => m.pool.image(f.bytes, f.name, request)));
  const pixel = p.pixel_spacing_mm ?? 1;
  const thickness = p.slice_thickness_mm ?? 1;
  const given = [p.pixel_spacing_mm !== undefined && 'pixel_spacing_mm', p.slice_thickness_mm !== undefined && 'slice_thickness_mm'].filter(Boolean);
  const defaulted = [p.pixel_spacing_mm === undefined && 'pixel_spacing_mm', p.slice_thickness_mm === undefined && 'slice_thickness_mm'].filter(Boolean);
  let voxels = 0;
  let mm3 = 0;
  const slices = analyses.map((a, k) => {
    const f = images[k]!;
    const seg = a.segmentation!;
    // One model pixel covers (width / size) x (height / size) image pixels.
    const pixelAreaMm2 = ((f.width * f.height) / (size * size)) * pixel * pixel;
    voxels += seg.tumor_pixels;
    mm3 += seg.tumor_pixels * pixelAreaMm2 * thickness;
    return {
      slice_idx: k,
      file: f.name,
      tumor_probability: a.classification.tumor_probability,
      tumor_pixels: seg.tumor_pixels,
      image_width: f.width,
      image_height: f.height,
      pixel_area_mm2: pixelAreaMm2,
      tumor_area_mm2: seg.tumor_pixels * pixelAreaMm2,
      ...(p.slice_overlays ? { overlay_png_base64: b64(seg.overlay_png) } : {}),
    };
  });
  return {
    input: 'images' as const,
    files: images.map((f) => f.name),
    voxel_spacing_mm: [pixel, pixel, thickness] as [number, number, number],
    spacing_source: defaulted.length === 0 ? ('request' as const) : given.length === 0 ? ('default' as const) : ('request_and_default' as const),
    spacing_note:
      defaulted.length === 0
        ? 'voxel size from pixel_spacing_mm (per image pixel) and slice_thickness_mm as sent'
        : `PNG and JPEG files carry no voxel size: ${defaulted.join(' and ')} taken as 1 mm (the default); send them to measure a real volume`,
    image_size: size,
    threshold: request.threshold,
    min_object_size: request.minObjectSize,
    slice_count: slices.length,
    slices_with_tumor: slices.filter((s) => s.tumor_pixels > 0).length,
    tumor_voxels: voxels,
    tumor_volume_ml: mm3 / 1000,
    slices,
  };
}
