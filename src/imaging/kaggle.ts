/**
 * Kaggle tumour / no-tumour image preprocessing (navoneel/brain-mri-images-for-brain-tumor-detection and
 * look-alikes): a pure domain module, no queue or database imports.
 *
 * Per image (REFERENCE.md "Kaggle preprocessing"): decode -> greyscale -> resize to S x S -> brain mask
 * (2-98 percentile clip, Gaussian blur 5, Otsu with an inversion check, elliptic closing, largest component,
 * fill holes, small erosion) -> reject when the mask covers < 3 % or > 95 % -> z-score over brain pixels,
 * background 0. Two additions to the reference steps, both for real Kaggle files (see brainMask): a thin
 * frame is blanked before the component analysis (film scans with white edge lines), and a nearly flat
 * image is not contrast-stretched into noise. kaggleImageToInput does this for one image, from a file or from the
 * bytes of an upload, so that training and the demo prepare images alike; preprocessKaggleDataset writes a folder.
 *
 * Library choice:
 * - sharp (already a dependency) does what it is built for: decoding JPEG/PNG of any channel layout and bit
 *   depth (sniffed from the bytes, not the extension: one fixture named .jpg is an RGBA PNG), EXIF
 *   orientation, alpha flattening, greyscale, resizing, and the Gaussian blur (sigma 1.1 with minAmplitude
 *   0.1 gives libvips a 5-tap kernel, i.e. OpenCV's GaussianBlur((5,5), 0)).
 * - The binary-mask steps (percentiles, Otsu, ellipse morphology, connected components, hole filling) are
 *   small typed-array functions written here, not image-js v1. image-js has equivalents, but using it would
 *   add a sizeable dependency and a round trip of every image through its Image/Mask objects for roughly
 *   150 lines of code whose exact semantics we need to pin down anyway (OpenCV's ellipse kernel shape,
 *   erosion treating outside-the-image as foreground, 8-connected components with 4-connected background
 *   for hole filling). On Uint8Arrays each step is a single O(pixels x kernel rows) pass, a few
 *   milliseconds per 256 x 256 image, and each is unit-tested in test/imaging-kaggle.test.ts.
 */
import { readdir, readFile, stat } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import sharp from 'sharp';
import { kaggleFiles, writeKaggleMeta, type KaggleMeta } from '../disk/layout.ts';
import { DataFileError, SliceWiseError } from '../lib/errors.js';
import { replaceDirAtomic, writeFileAtomic } from '../lib/atomic.js';
import { encodeNpy } from './npy.js';

export interface KaggleImage {
  /** Absolute path. */
  file: string;
  /** Path relative to the dataset root with '/' separators, e.g. 'yes/Y1.jpg'. */
  relPath: string;
  /** yes = 1 (tumour), no = 0. */
  label: 0 | 1;
}

export type KaggleResult =
  | {
      ok: true;
      /** The model input: size x size, row-major (rows = image y), z-scored over brain pixels, background 0. */
      image: Float32Array;
      /** The brain mask the z-score used, 0/1, same layout. */
      brainMask: Uint8Array;
      /** Fraction of the image the mask covers. */
      brainFraction: number;
    }
  | { ok: false; reason: string };

export interface KaggleDatasetResult {
  processed: number;
  rejected: { relPath: string; reason: string }[];
  /** Counts of processed (not rejected) images per class. */
  labels: { yes: number; no: number };
}

export const DEFAULT_IMAGE_SIZE = 256;
/** Reject a mask covering less / more than this fraction of the image. */
export const MIN_BRAIN_FRACTION = 0.03;
export const MAX_BRAIN_FRACTION = 0.95;
/** OpenCV's sigma for GaussianBlur with ksize 5 and sigma 0: 0.3 * ((5 - 1) / 2 - 1) + 0.8. */
const BLUR_SIGMA = 1.1;
/** Closing with a 5 x 5 ellipse, erosion with a 3 x 3 ellipse (a cross), as radii. */
const CLOSE_RADIUS = 2;
const ERODE_RADIUS = 1;
const DATASET_CONCURRENCY = 2;
/** Width of the outer band used by the inversion check, as a fraction of the image size. */
const INVERSION_BAND = 0.05;
/** Width of the frame blanked before the component analysis, as a fraction of the image size. */
const FRAME_MARGIN = 0.02;
/** Narrowest intensity window (in 8-bit grey levels) that is stretched to full contrast for the mask. */
const MIN_CONTRAST = 10;

const IMAGE_EXT = /\.(jpe?g|png)$/i;
/**
 * Largest image decoded, in pixels (width x height, read from the header before decoding): a few KB of PNG can
 * declare 100000 x 100000. The demo's default limit (src/serving/demo-service.ts) is the same; the real Kaggle
 * images are at most about 2 million.
 */
export const MAX_IMAGE_PIXELS = 50_000_000;
/** What sharp may decode: the formats the datasets use. sharp would also take TIFF, GIF, WebP, SVG, HEIF, ... */
const DECODED_FORMATS = new Set(['jpeg', 'png']);
/** How deep below root a yes/ or no/ folder may sit (0 = root/yes, 2 = root/a/b/yes). */
const MAX_CLASS_DIR_DEPTH = 2;

// ---------------------------------------------------------------------------------------------------------
// Listing
// ---------------------------------------------------------------------------------------------------------

/** Hidden entries and macOS zip debris (__MACOSX/, AppleDouble '._Y1.jpg') are never data. */
function isJunk(name: string): boolean {
  return name.startsWith('.') || name === '__MACOSX';
}

async function entryKind(dir: string, ent: { name: string; isFile(): boolean; isDirectory(): boolean; isSymbolicLink(): boolean }): Promise<'file' | 'dir' | 'other'> {
  if (ent.isFile()) return 'file';
  if (ent.isDirectory()) return 'dir';
  if (ent.isSymbolicLink()) {
    try {
      const s = await stat(join(dir, ent.name));
      return s.isFile() ? 'file' : s.isDirectory() ? 'dir' : 'other';
    } catch {
      return 'other'; // dangling link
    }
  }
  return 'other';
}

async function listDir(dir: string) {
  return readdir(dir, { withFileTypes: true });
}

/** Image files under a class folder (recursively), as paths relative to that folder. */
async function listImagesUnder(dir: string, rel: string, out: string[]): Promise<void> {
  for (const ent of await listDir(dir)) {
    if (isJunk(ent.name)) continue;
    const kind = await entryKind(dir, ent);
    const childRel = rel ? `${rel}/${ent.name}` : ent.name;
    if (kind === 'dir') await listImagesUnder(join(dir, ent.name), childRel, out);
    else if (kind === 'file' && IMAGE_EXT.test(ent.name)) out.push(childRel);
  }
}

/**
 * All yes/no images under root. Class folders are matched case-insensitively (yes, Yes, NO, ...) at root
 * level or up to two levels below it (Kaggle zips nest them as brain_tumor_dataset/yes). Only the
 * shallowest level that has any class folder is used: the navoneel zip ships both yes/ and
 * brain_tumor_dataset/yes/ with the same images, and taking both would count every image twice.
 * Extensions .jpg/.jpeg/.png in any case; names with spaces are fine. Sorted by relPath (code-unit order,
 * independent of locale).
 */
export async function listKaggleImages(rootArg: string): Promise<KaggleImage[]> {
  const root = resolve(rootArg); // KaggleImage.file is absolute even for a relative root
  let level: string[] = ['']; // directories (relative to root) at the current depth
  let classDirs: { rel: string; label: 0 | 1 }[] = [];
  for (let depth = 0; depth <= MAX_CLASS_DIR_DEPTH && level.length > 0 && classDirs.length === 0; depth++) {
    const next: string[] = [];
    for (const parentRel of level) {
      const parent = parentRel ? join(root, parentRel) : root;
      let ents;
      try {
        ents = await listDir(parent);
      } catch (err) {
        if (depth === 0) {
          throw new SliceWiseError(`no Kaggle images: cannot read ${root}: ${(err as Error).message}`, {
            status: 422,
            code: 'no_images',
            details: { root },
          });
        }
        continue;
      }
      for (const ent of ents) {
        if (isJunk(ent.name) || (await entryKind(parent, ent)) !== 'dir') continue;
        const rel = parentRel ? `${parentRel}/${ent.name}` : ent.name;
        const lower = ent.name.toLowerCase();
        if (lower === 'yes' || lower === 'no') classDirs.push({ rel, label: lower === 'yes' ? 1 : 0 });
        else next.push(rel);
      }
    }
    level = next;
  }
  if (classDirs.length === 0) {
    throw new SliceWiseError(`no Kaggle images: ${root} has no yes/ or no/ folder (searched ${MAX_CLASS_DIR_DEPTH} levels down)`, {
      status: 422,
      code: 'no_images',
      details: { root },
    });
  }
  const images: KaggleImage[] = [];
  for (const cd of classDirs) {
    const rels: string[] = [];
    await listImagesUnder(join(root, cd.rel), '', rels);
    for (const r of rels) {
      const relPath = `${cd.rel}/${r}`;
      images.push({ file: join(root, ...relPath.split('/')), relPath, label: cd.label });
    }
  }
  if (images.length === 0) {
    throw new SliceWiseError(`no Kaggle images: the yes/ and no/ folders under ${root} hold no .jpg, .jpeg or .png file`, {
      status: 422,
      code: 'no_images',
      details: { root, folders: classDirs.map((c) => c.rel) },
    });
  }
  images.sort((a, b) => (a.relPath < b.relPath ? -1 : a.relPath > b.relPath ? 1 : 0));
  return images;
}

// ---------------------------------------------------------------------------------------------------------
// Typed-array mask operations (exported for the tests). Masks are Uint8Array of 0/1, row-major, w x h.
// ---------------------------------------------------------------------------------------------------------

/** 256-bin histogram of 8-bit values. */
export function histogram256(values: Uint8Array): Float64Array {
  const h = new Float64Array(256);
  for (let i = 0; i < values.length; i++) h[values[i]!]++;
  return h;
}

/** q-th percentile (0..100) of 8-bit values, with numpy's default linear interpolation between order statistics. */
export function percentileU8(values: Uint8Array, q: number, hist: Float64Array = histogram256(values)): number {
  const n = values.length;
  if (n === 0) return Number.NaN;
  const pos = (Math.min(Math.max(q, 0), 100) / 100) * (n - 1);
  const lo = Math.floor(pos);
  const frac = pos - lo;
  const kth = (k: number): number => {
    let acc = 0;
    for (let v = 0; v < 256; v++) {
      acc += hist[v]!;
      if (acc > k) return v;
    }
    return 255;
  };
  const a = kth(lo);
  return frac === 0 ? a : a + (kth(Math.min(lo + 1, n - 1)) - a) * frac;
}

/**
 * Otsu's threshold on 8-bit values: the t maximising the between-class variance of {v <= t} and {v > t}
 * (foreground is v > t, as OpenCV's THRESH_BINARY). Ties keep the smallest t. Returns 0 for a constant image.
 */
export function otsuThreshold(values: Uint8Array, hist: Float64Array = histogram256(values)): number {
  const n = values.length;
  let sumAll = 0;
  for (let v = 0; v < 256; v++) sumAll += v * hist[v]!;
  let w0 = 0;
  let sum0 = 0;
  let best = -1;
  let bestT = 0;
  for (let t = 0; t < 256; t++) {
    w0 += hist[t]!;
    if (w0 === 0) continue;
    const w1 = n - w0;
    if (w1 === 0) break;
    sum0 += t * hist[t]!;
    const m0 = sum0 / w0;
    const m1 = (sumAll - sum0) / w1;
    const between = w0 * w1 * (m0 - m1) * (m0 - m1);
    if (between > best) {
      best = between;
      bestT = t;
    }
  }
  return bestT;
}

/**
 * Half-widths of an elliptic structuring element of size (2r+1) x (2r+1), one per row dy = -r..r, built the
 * way OpenCV's getStructuringElement(MORPH_ELLIPSE) does: r = 2 gives rows of width 1, 5, 5, 5, 1 and
 * r = 1 gives a 3 x 3 cross.
 */
export function ellipseHalfWidths(r: number): Int32Array {
  const hw = new Int32Array(2 * r + 1);
  for (let dy = -r; dy <= r; dy++) {
    hw[dy + r] = Math.abs(dy) < r ? Math.round(r * Math.sqrt((r * r - dy * dy) / (r * r))) : 0;
  }
  return hw;
}

/**
 * Horizontal pass of a binary morphology: every pixel becomes the OR (dilation) / AND (erosion) of the
 * pixels x - k .. x + k of its row, pixels outside the row being skipped. Done as 2k shifted, branch-free
 * passes over each row, which V8 runs far faster than a per-pixel window loop.
 */
function horizontalPass(mask: Uint8Array, w: number, h: number, k: number, dilation: boolean): Uint8Array {
  const out = new Uint8Array(mask);
  for (let d = -k; d <= k; d++) {
    if (d === 0) continue;
    const x0 = Math.max(0, -d);
    const x1 = Math.min(w, w - d);
    for (let y = 0; y < h; y++) {
      const row = y * w;
      const end = row + x1;
      if (dilation) for (let i = row + x0; i < end; i++) out[i] |= mask[i + d]!;
      else for (let i = row + x0; i < end; i++) out[i] &= mask[i + d]!;
    }
  }
  return out;
}

/**
 * Binary morphology with an ellipse of radius r, done as one horizontal pass per distinct row width and a
 * vertical OR (dilation) / AND (erosion) over the kernel rows. Rows outside the image are skipped, i.e.
 * count as background for dilation and as foreground for erosion (OpenCV's default border values).
 */
function morph(mask: Uint8Array, w: number, h: number, r: number, mode: 'dilate' | 'erode'): Uint8Array {
  const hw = ellipseHalfWidths(r);
  const passes = new Map<number, Uint8Array>();
  for (const k of hw) if (!passes.has(k)) passes.set(k, horizontalPass(mask, w, h, k, mode === 'dilate'));
  const out = new Uint8Array(w * h).fill(mode === 'dilate' ? 0 : 1);
  for (let j = 0; j < hw.length; j++) {
    const src = passes.get(hw[j]!)!;
    const dy = j - r;
    const y0 = Math.max(0, -dy);
    const y1 = Math.min(h, h - dy);
    const off = dy * w;
    if (mode === 'dilate') {
      for (let i = y0 * w, end = y1 * w; i < end; i++) out[i] |= src[i + off]!;
    } else {
      for (let i = y0 * w, end = y1 * w; i < end; i++) out[i] &= src[i + off]!;
    }
  }
  return out;
}

/** Binary dilation with an ellipse of radius r; pixels outside the image count as background. */
export function dilate(mask: Uint8Array, w: number, h: number, r: number): Uint8Array {
  return morph(mask, w, h, r, 'dilate');
}

/** Binary erosion with an ellipse of radius r; pixels outside the image count as foreground (OpenCV's default). */
export function erode(mask: Uint8Array, w: number, h: number, r: number): Uint8Array {
  return morph(mask, w, h, r, 'erode');
}

/** Morphological closing (dilate, then erode) with an ellipse of radius r. */
export function close(mask: Uint8Array, w: number, h: number, r: number): Uint8Array {
  return erode(dilate(mask, w, h, r), w, h, r);
}

/**
 * The 8-connected components of a 0/1 mask: a label per pixel (0 = background, components numbered from 1 in
 * raster order of their first pixel) and each component's size (sizes[label]). An iterative flood fill: a
 * component can be as large as the image.
 */
export function labelComponents(mask: Uint8Array, w: number, h: number): { labels: Int32Array; sizes: number[] } {
  const n = w * h;
  const labels = new Int32Array(n);
  const stack = new Int32Array(n);
  const sizes = [0];
  for (let start = 0; start < n; start++) {
    if (!mask[start] || labels[start]) continue;
    const label = sizes.length;
    let size = 0;
    let sp = 0;
    stack[sp++] = start;
    labels[start] = label;
    while (sp > 0) {
      const p = stack[--sp]!;
      size++;
      const px = p % w;
      const py = (p - px) / w;
      for (let dy = -1; dy <= 1; dy++) {
        const yy = py + dy;
        if (yy < 0 || yy >= h) continue;
        for (let dx = -1; dx <= 1; dx++) {
          const xx = px + dx;
          if (xx < 0 || xx >= w) continue;
          const q = yy * w + xx;
          if (mask[q] && !labels[q]) {
            labels[q] = label;
            stack[sp++] = q;
          }
        }
      }
    }
    sizes.push(size);
  }
  return { labels, sizes };
}

/**
 * Keep only the largest 8-connected component of a 0/1 mask (the first one in raster order on a tie).
 * Returns an all-zero mask for an empty input.
 */
export function largestComponent(mask: Uint8Array, w: number, h: number): Uint8Array {
  const { labels, sizes } = labelComponents(mask, w, h);
  let best = 0;
  for (let l = 1; l < sizes.length; l++) if (sizes[l]! > sizes[best]!) best = l;
  const out = new Uint8Array(w * h);
  if (best) for (let i = 0; i < out.length; i++) out[i] = labels[i] === best ? 1 : 0;
  return out;
}

/**
 * Fill holes: every background pixel not 4-connected to the image border becomes foreground (the dual of
 * 8-connected foreground, as scipy's binary_fill_holes).
 */
export function fillHoles(mask: Uint8Array, w: number, h: number): Uint8Array {
  const n = w * h;
  const outside = new Uint8Array(n);
  const stack = new Int32Array(n);
  let sp = 0;
  const seed = (p: number) => {
    if (!mask[p] && !outside[p]) {
      outside[p] = 1;
      stack[sp++] = p;
    }
  };
  for (let x = 0; x < w; x++) {
    seed(x);
    seed((h - 1) * w + x);
  }
  for (let y = 0; y < h; y++) {
    seed(y * w);
    seed(y * w + w - 1);
  }
  while (sp > 0) {
    const p = stack[--sp]!;
    const px = p % w;
    if (px > 0) seed(p - 1);
    if (px < w - 1) seed(p + 1);
    if (p >= w) seed(p - w);
    if (p < n - w) seed(p + w);
  }
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) out[i] = outside[i] ? 0 : 1;
  return out;
}

/**
 * Fraction of the outer band of the image (every pixel within `band` pixels of an edge) that is foreground.
 */
export function borderForegroundFraction(mask: Uint8Array, w: number, h: number, band = 1): number {
  const b = Math.max(1, Math.min(band, Math.floor(Math.min(w, h) / 2)));
  let fg = 0;
  let total = 0;
  for (let y = 0; y < h; y++) {
    const row = y * w;
    if (y < b || y >= h - b) {
      for (let x = 0; x < w; x++) fg += mask[row + x]!;
      total += w;
    } else {
      for (let x = 0; x < b; x++) fg += mask[row + x]! + mask[row + w - 1 - x]!;
      total += 2 * b;
    }
  }
  return total ? fg / total : 0;
}

// ---------------------------------------------------------------------------------------------------------
// Per-image preprocessing
// ---------------------------------------------------------------------------------------------------------

/**
 * The brain mask of an 8-bit greyscale S x S image (the mask steps of REFERENCE.md), as 0/1.
 *
 * Inversion check: MRI backgrounds are dark, so the Otsu foreground should be the bright head, which sits
 * inside the frame. If the foreground covers more than half of the outer band of the image (the pixels
 * within 5 % of the size from an edge), the picture has a bright background (inverted display, film scan)
 * and the mask is inverted. A band rather than the 1-pixel frame, because several Kaggle images are film
 * scans with a thin white line along their edges that would flip a 1-pixel test; a border test rather than
 * "foreground > 50 % of the image", because a tightly cropped head legitimately fills most of the image
 * while the band around it stays mostly dark.
 */
export async function brainMask(gray: Uint8Array, w: number, h: number): Promise<Uint8Array> {
  const n = w * h;
  // 1. Robust contrast: clip to the 2nd..98th percentile and stretch to 0..255. When that window is narrower
  //    than MIN_CONTRAST grey levels, 96 % of the image is one flat level (a nearly black picture with sensor
  //    or JPEG noise): stretching it would blow the noise up into a "brain", so use the full min..max range
  //    instead, where only content that really stands out from the flat level survives. A fully flat image
  //    (max - min below MIN_CONTRAST) has nothing to segment and gets an empty mask.
  const hist = histogram256(gray);
  let lo = percentileU8(gray, 2, hist);
  let hi = percentileU8(gray, 98, hist);
  if (hi - lo < MIN_CONTRAST) {
    let mn = 255;
    let mx = 0;
    for (let v = 0; v < 256; v++) {
      if (hist[v]! > 0) {
        if (v < mn) mn = v;
        if (v > mx) mx = v;
      }
    }
    lo = mn;
    hi = mx;
  }
  if (hi - lo < MIN_CONTRAST) return new Uint8Array(n); // (nearly) constant image: nothing to segment
  const stretched = new Uint8Array(n);
  const scale = 255 / (hi - lo);
  for (let i = 0; i < n; i++) {
    const v = (gray[i]! - lo) * scale;
    stretched[i] = v <= 0 ? 0 : v >= 255 ? 255 : Math.round(v);
  }
  // 2. Gaussian blur, 5-tap kernel with sigma 1.1 (OpenCV's GaussianBlur((5,5), 0)).
  //    (toColourspace('b-w'): without it libvips hands a 1-band raw input back as 3-band sRGB.)
  const blurred = await sharp(stretched, { raw: { width: w, height: h, channels: 1 } })
    .blur({ sigma: BLUR_SIGMA, minAmplitude: 0.1, precision: 'float' })
    .toColourspace('b-w')
    .raw({ depth: 'uchar' })
    .toBuffer({ resolveWithObject: true });
  const b = firstChannel(blurred.data, blurred.info.channels, n);
  // 3. Otsu, foreground = brighter class; inversion check (see above).
  const t = otsuThreshold(b);
  let mask: Uint8Array = new Uint8Array(n);
  for (let i = 0; i < n; i++) mask[i] = b[i]! > t ? 1 : 0;
  const band = Math.round(INVERSION_BAND * Math.min(w, h));
  if (borderForegroundFraction(mask, w, h, band) > 0.5) {
    for (let i = 0; i < n; i++) mask[i] = 1 - mask[i]!;
  }
  // 4. Blank a thin frame (2 % of the size) so the white edge lines of film scans cannot join the head into one
  //    ring-shaped component whose "hole" would then be filled to the whole image. The head loses at most
  //    that strip where it is cropped by the image edge.
  const margin = Math.max(1, Math.round(FRAME_MARGIN * Math.min(w, h)));
  for (let y = 0; y < h; y++) {
    const row = y * w;
    if (y < margin || y >= h - margin) mask.fill(0, row, row + w);
    else {
      mask.fill(0, row, row + margin);
      mask.fill(0, row + w - margin, row + w);
    }
  }
  // 5. Close small gaps (5 x 5 ellipse), keep the largest component, fill holes, trim the rim (3 x 3 ellipse).
  mask = close(mask, w, h, CLOSE_RADIUS);
  mask = largestComponent(mask, w, h);
  mask = fillHoles(mask, w, h);
  mask = erode(mask, w, h, ERODE_RADIUS);
  return mask;
}

/** Band 0 of an interleaved raw buffer as a fresh Uint8Array of n pixels. */
function firstChannel(data: Buffer, channels: number, n: number): Uint8Array {
  if (data.length < n * channels) throw new Error(`raw buffer holds ${data.length} bytes, expected ${n * channels}`);
  const out = new Uint8Array(n);
  if (channels === 1) out.set(data.subarray(0, n));
  else for (let i = 0; i < n; i++) out[i] = data[i * channels]!;
  return out;
}

function checkImageSize(size: number): void {
  if (!Number.isInteger(size) || size < 16 || size > 4096) {
    throw new SliceWiseError(`imageSize must be an integer between 16 and 4096, got ${size}`, {
      status: 400,
      code: 'invalid_option',
      details: { imageSize: size },
    });
  }
}

/**
 * One image -> model input: a file path, or the bytes of a JPEG or PNG (an upload). Never throws for bad image
 * content: undecodable bytes, or an image whose brain mask is implausible, come back as { ok: false, reason }. A
 * file that cannot be read at all (missing, permission denied) is not a bad image but a broken dataset, and
 * throws DataFileError.
 */
export async function kaggleImageToInput(source: string | Uint8Array, opts: { imageSize?: number; maxPixels?: number } = {}): Promise<KaggleResult> {
  const size = opts.imageSize ?? DEFAULT_IMAGE_SIZE;
  checkImageSize(size);
  const maxPixels = opts.maxPixels ?? MAX_IMAGE_PIXELS;
  if (!(Number.isInteger(maxPixels) && maxPixels > 0)) {
    throw new SliceWiseError(`maxPixels must be a positive integer, got ${maxPixels}`, { status: 400, code: 'invalid_option', details: { maxPixels } });
  }
  if (typeof source !== 'string') return bytesToInput(source, size, maxPixels);
  let bytes: Buffer;
  try {
    bytes = await readFile(source);
  } catch (err) {
    throw new DataFileError(source, `cannot read file: ${(err as Error).message}`, { cause: err });
  }
  return bytesToInput(bytes, size, maxPixels);
}

/** Preprocess one image file; see kaggleImageToInput. */
export function preprocessKaggleImage(file: string, opts: { imageSize?: number } = {}): Promise<KaggleResult> {
  return kaggleImageToInput(file, opts);
}

/**
 * libvips's message for undecodable bytes, on one line: it repeats each decoder warning on a line of its own
 * (three times, as often as not), which would spread one reason over several lines of meta.json and the logs.
 */
function decodeReason(err: unknown): string {
  const lines = String((err as Error)?.message ?? err)
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l !== '');
  return `cannot decode image: ${[...new Set(lines)].join('; ') || 'unknown error'}`;
}

/** The per-image steps of the module comment, on encoded image bytes; no file IO. */
async function bytesToInput(bytes: Uint8Array, size: number, maxPixels: number): Promise<KaggleResult> {
  // The header first, before any pixel is decoded: the format and the size.
  let format: string | undefined;
  let width = 0;
  let height = 0;
  try {
    // No pixel limit here (metadata decodes none): sharp's own default would answer a huge header with a bare
    // "Input image exceeds pixel limit" instead of the size.
    ({ format, width = 0, height = 0 } = await sharp(bytes, { limitInputPixels: false }).metadata());
  } catch (err) {
    return { ok: false, reason: decodeReason(err) };
  }
  if (!format || !DECODED_FORMATS.has(format)) return { ok: false, reason: `not a JPEG or PNG image (its content reads as ${format ?? 'unknown'})` };
  if (width * height > maxPixels) {
    return { ok: false, reason: `image is ${width} x ${height} = ${width * height} pixels, more than the limit of ${maxPixels} pixels` };
  }
  let gray: Uint8Array;
  try {
    // Content is sniffed from the bytes (a '.jpg' may be a PNG). Alpha is flattened onto black, the MRI
    // background; 16-bit input is scaled to 8 bits by the uchar cast. limitInputPixels repeats the size check
    // in the decoder itself.
    const { data, info } = await sharp(bytes, { limitInputPixels: maxPixels })
      .autoOrient()
      .flatten({ background: '#000000' })
      .greyscale()
      .resize(size, size, { fit: 'fill' })
      .raw({ depth: 'uchar' })
      .toBuffer({ resolveWithObject: true });
    if (info.width !== size || info.height !== size) throw new Error(`unexpected decoded size ${info.width}x${info.height}`);
    gray = firstChannel(data, info.channels, size * size);
  } catch (err) {
    return { ok: false, reason: decodeReason(err) };
  }

  const n = size * size;
  const mask = await brainMask(gray, size, size);
  let count = 0;
  for (let i = 0; i < n; i++) count += mask[i]!;
  const fraction = count / n;
  const pct = (fraction * 100).toFixed(1);
  if (fraction < MIN_BRAIN_FRACTION) {
    return { ok: false, reason: `brain mask covers ${pct}% of the image (< ${MIN_BRAIN_FRACTION * 100}%)` };
  }
  if (fraction > MAX_BRAIN_FRACTION) {
    return { ok: false, reason: `brain mask covers ${pct}% of the image (> ${MAX_BRAIN_FRACTION * 100}%)` };
  }

  // z-score of the resized greyscale (not the clipped/blurred copy used for the mask), over brain pixels only.
  let sum = 0;
  for (let i = 0; i < n; i++) if (mask[i]) sum += gray[i]!;
  const mean = sum / count;
  let ss = 0;
  for (let i = 0; i < n; i++) {
    if (mask[i]) {
      const d = gray[i]! - mean;
      ss += d * d;
    }
  }
  const std = Math.sqrt(ss / count);
  if (!(std > 1e-6)) return { ok: false, reason: 'brain region has no contrast (intensity std is 0)' };
  const image = new Float32Array(n);
  for (let i = 0; i < n; i++) if (mask[i]) image[i] = (gray[i]! - mean) / std;
  return { ok: true, image, brainMask: mask, brainFraction: fraction };
}

// ---------------------------------------------------------------------------------------------------------
// Whole dataset
// ---------------------------------------------------------------------------------------------------------

/**
 * Preprocess every image under root and write outDir/images.npy (float32 N x S x S, processed images in
 * relPath order), outDir/labels.npy (uint8 N) and outDir/meta.json, into a temporary folder that replaces outDir
 * once all three are written (meta.json last), so a reader that finds meta.json finds the arrays it describes.
 * Rejected images are listed in meta.json and the result; they do not fail the run. Output is deterministic:
 * re-running on the same input gives byte-identical files.
 */
export async function preprocessKaggleDataset(
  root: string,
  outDir: string,
  opts: { imageSize?: number; onProgress?: (done: number, total: number) => void } = {},
): Promise<KaggleDatasetResult> {
  const size = opts.imageSize ?? DEFAULT_IMAGE_SIZE;
  checkImageSize(size);
  const images = await listKaggleImages(root);
  const total = images.length;
  const results: KaggleResult[] = new Array(total);

  let nextIndex = 0;
  let done = 0;
  let failed = false; // after a thrown error (unreadable file) the other worker stops taking new images
  const worker = async () => {
    while (nextIndex < total && !failed) {
      const i = nextIndex++;
      try {
        results[i] = await preprocessKaggleImage(images[i]!.file, { imageSize: size });
      } catch (err) {
        failed = true;
        throw err;
      }
      done++;
      opts.onProgress?.(done, total);
    }
  };
  await Promise.all(Array.from({ length: Math.min(DATASET_CONCURRENCY, total) }, worker));

  const pixels = size * size;
  const kept: KaggleMeta['items'] = [];
  const rejected: { relPath: string; reason: string }[] = [];
  for (let i = 0; i < total; i++) {
    const r = results[i]!;
    if (r.ok) kept.push({ index: kept.length, relPath: images[i]!.relPath, label: images[i]!.label, brain_fraction: r.brainFraction });
    else rejected.push({ relPath: images[i]!.relPath, reason: r.reason });
  }
  const stack = new Float32Array(kept.length * pixels);
  const labels = new Uint8Array(kept.length);
  let k = 0;
  for (let i = 0; i < total; i++) {
    const r = results[i]!;
    if (!r.ok) continue;
    stack.set(r.image, k * pixels);
    labels[k] = images[i]!.label;
    k++;
  }

  // The three files replace the folder together (meta.json written last inside a temporary folder): a worker
  // killed between two renames must not leave a new images.npy beside the old meta.json of an earlier attempt.
  await replaceDirAtomic(outDir, async (tmpDir) => {
    const paths = kaggleFiles(tmpDir);
    await writeFileAtomic(paths.images, encodeNpy(stack, [kept.length, size, size]));
    await writeFileAtomic(paths.labels, encodeNpy(labels, [kept.length]));
    await writeKaggleMeta(paths, { image_size: size, items: kept, rejected });
  });

  const yes = kept.filter((it) => it.label === 1).length;
  return { processed: kept.length, rejected, labels: { yes, no: kept.length - yes } };
}
