import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mulberry32 } from '../src/lib/random.ts';
import { copyFile, mkdir, mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { randomBytes } from 'node:crypto';
import { crc32 } from 'node:zlib';
import sharp from 'sharp';
import { SliceWiseError, DataFileError } from '../src/lib/errors.js';
import {
  borderForegroundFraction,
  dilate,
  ellipseHalfWidths,
  erode,
  fillHoles,
  kaggleImageToInput,
  largestComponent,
  listKaggleImages,
  otsuThreshold,
  percentileU8,
  preprocessKaggleDataset,
  preprocessKaggleImage,
  type KaggleDatasetResult,
} from '../src/imaging/kaggle.js';
import { kaggleFiles, readKaggleMeta } from '../src/disk/layout.ts';
import { expectSliceWiseError, rejection } from './helpers/errors.js';

const here = path.dirname(fileURLToPath(import.meta.url));
const FIXTURES = process.env.SLICEWISE_FIXTURES ?? path.resolve(here, '../../shared/fixtures');
const KAGGLE = path.join(FIXTURES, 'kaggle-navoneel');

// ---------------------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------------------

/** Deterministic PRNG so the randomised reference checks are reproducible. */
const rng = mulberry32;

/** Minimal .npy reader for the test (independent of src/imaging/npy.ts). */
function readNpy(buf: Buffer): { descr: string; shape: number[]; data: Float32Array | Uint8Array } {
  expect(buf.subarray(0, 6).equals(Buffer.from([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59]))).toBe(true);
  const major = buf[6]!;
  const hl = major === 1 ? buf.readUInt16LE(8) : buf.readUInt32LE(8);
  const start = major === 1 ? 10 : 12;
  const header = buf.subarray(start, start + hl).toString('latin1');
  const descr = /'descr':\s*'([^']+)'/.exec(header)![1]!;
  const shapeText = /'shape':\s*\(([^)]*)\)/.exec(header)![1]!;
  const shape = shapeText
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean)
    .map(Number);
  const body = buf.subarray(start + hl);
  const copy = new Uint8Array(body); // aligned copy
  const data = descr === '<f4' ? new Float32Array(copy.buffer, 0, copy.byteLength / 4) : copy;
  return { descr, shape, data };
}

function brainStats(img: Float32Array): { count: number; mean: number; std: number } {
  let count = 0;
  let sum = 0;
  for (const v of img) if (v !== 0) (count++, (sum += v));
  const mean = sum / count;
  let ss = 0;
  for (const v of img) if (v !== 0) ss += (v - mean) ** 2;
  return { count, mean, std: Math.sqrt(ss / count) };
}

function cornerValues(img: Float32Array, size: number, patch = 3): number[] {
  const out: number[] = [];
  for (let y = 0; y < patch; y++) {
    for (let x = 0; x < patch; x++) {
      out.push(img[y * size + x]!, img[y * size + size - 1 - x]!, img[(size - 1 - y) * size + x]!, img[(size - 1 - y) * size + size - 1 - x]!);
    }
  }
  return out;
}

/** Brute-force reference morphology: direct ellipse-kernel scan, OpenCV border semantics. */
function refMorph(mask: Uint8Array, w: number, h: number, r: number, mode: 'dilate' | 'erode'): Uint8Array {
  const hw = ellipseHalfWidths(r);
  const out = new Uint8Array(w * h);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      let any = 0;
      let all = 1;
      for (let dy = -r; dy <= r; dy++) {
        for (let dx = -hw[dy + r]!; dx <= hw[dy + r]!; dx++) {
          const yy = y + dy;
          const xx = x + dx;
          if (yy < 0 || yy >= h || xx < 0 || xx >= w) continue;
          const v = mask[yy * w + xx]!;
          any |= v;
          all &= v;
        }
      }
      out[y * w + x] = mode === 'dilate' ? any : all;
    }
  }
  return out;
}

function maskFrom(rows: string[]): { m: Uint8Array; w: number; h: number } {
  const h = rows.length;
  const w = rows[0]!.length;
  const m = new Uint8Array(w * h);
  rows.forEach((row, y) => [...row].forEach((c, x) => (m[y * w + x] = c === '#' ? 1 : 0)));
  return { m, w, h };
}

function toRows(m: Uint8Array, w: number, h: number): string[] {
  const rows: string[] = [];
  for (let y = 0; y < h; y++) rows.push([...m.subarray(y * w, y * w + w)].map((v) => (v ? '#' : '.')).join(''));
  return rows;
}

/** A synthetic 'head': a textured bright ellipse, grey levels 80..200, on black. */
function syntheticHead(size: number): Uint8Array {
  const g = new Uint8Array(size * size);
  const rand = rng(7);
  const c = size / 2;
  for (let y = 0; y < size; y++) {
    for (let x = 0; x < size; x++) {
      const e = ((x - c) / (size * 0.35)) ** 2 + ((y - c) / (size * 0.42)) ** 2;
      if (e <= 1) g[y * size + x] = 80 + Math.round(60 * (1 + Math.sin(x / 5) * Math.cos(y / 7))) + Math.round(rand() * 10);
    }
  }
  return g;
}

let tmp: string;
beforeAll(async () => {
  tmp = await mkdtemp(path.join(tmpdir(), 'slicewise-kaggle-'));
});
afterAll(async () => {
  if (tmp) await rm(tmp, { recursive: true, force: true });
});

// ---------------------------------------------------------------------------------------------------------
// typed-array building blocks
// ---------------------------------------------------------------------------------------------------------

describe('mask building blocks', () => {
  it('percentileU8 matches numpy-style linear interpolation on sorted values', () => {
    const rand = rng(1);
    for (const n of [1, 2, 7, 100, 1001]) {
      const v = new Uint8Array(n).map(() => Math.floor(rand() * 256));
      const sorted = [...v].sort((a, b) => a - b);
      for (const q of [0, 2, 25, 50, 98, 100]) {
        const pos = (q / 100) * (n - 1);
        const lo = Math.floor(pos);
        const hi = Math.min(lo + 1, n - 1);
        const expected = sorted[lo]! + (sorted[hi]! - sorted[lo]!) * (pos - lo);
        expect(percentileU8(v, q)).toBeCloseTo(expected, 9);
      }
    }
  });

  it('otsuThreshold maximises the between-class variance (brute-force check) and splits a bimodal image', () => {
    const rand = rng(2);
    const v = new Uint8Array(5000).map((_, i) => (i % 3 === 0 ? 40 : 180) + Math.floor(rand() * 30) - 15);
    const t = otsuThreshold(v);
    // The low mode spans 25..54 and the high one 165..194: any t in 54..164 separates them exactly.
    expect(t).toBeGreaterThanOrEqual(54);
    expect(t).toBeLessThanOrEqual(164);
    const between = (th: number) => {
      let n0 = 0, s0 = 0, n1 = 0, s1 = 0;
      for (const x of v) if (x <= th) (n0++, (s0 += x)); else (n1++, (s1 += x));
      return n0 && n1 ? n0 * n1 * (s0 / n0 - s1 / n1) ** 2 : -1;
    };
    let best = -1;
    for (let th = 0; th < 256; th++) best = Math.max(best, between(th));
    expect(between(t)).toBeCloseTo(best, 3);
    expect(otsuThreshold(new Uint8Array(100).fill(9))).toBe(0);
  });

  it('ellipse kernels have OpenCV MORPH_ELLIPSE shapes', () => {
    expect([...ellipseHalfWidths(2)]).toEqual([0, 2, 2, 2, 0]); // 5x5: 1,5,5,5,1 pixels per row
    expect([...ellipseHalfWidths(1)]).toEqual([0, 1, 0]); // 3x3: a cross
  });

  it('dilate / erode equal a brute-force kernel scan (random masks, non-square, border cases)', () => {
    const rand = rng(3);
    for (const [w, h] of [[17, 11], [32, 32], [5, 40]] as const) {
      for (const density of [0.2, 0.6, 0.95]) {
        const m = new Uint8Array(w * h).map(() => (rand() < density ? 1 : 0));
        for (const r of [1, 2, 3]) {
          expect(dilate(m, w, h, r)).toEqual(refMorph(m, w, h, r, 'dilate'));
          expect(erode(m, w, h, r)).toEqual(refMorph(m, w, h, r, 'erode'));
        }
      }
    }
  });

  it('largestComponent uses 8-connectivity and keeps the biggest region', () => {
    const { m, w, h } = maskFrom([
      '#.....##',
      '.#....##',
      '..#.....',
      '...#..#.',
      '........',
    ]);
    expect(toRows(largestComponent(m, w, h), w, h)).toEqual(['#.......', '.#......', '..#.....', '...#....', '........']);
    expect([...largestComponent(new Uint8Array(12), 4, 3)].every((v) => v === 0)).toBe(true);
  });

  it('fillHoles fills enclosed background only', () => {
    const { m, w, h } = maskFrom([
      '........',
      '.#####..',
      '.#...#..',
      '.#.#.#..',
      '.#####..',
      '......#.',
      '.....#.#',
    ]);
    // The '.' at the bottom right sits on the border row, so it is background, not a hole.
    expect(toRows(fillHoles(m, w, h), w, h)).toEqual([
      '........',
      '.#####..',
      '.#####..',
      '.#####..',
      '.#####..',
      '......#.',
      '.....#.#',
    ]);
    // A diamond (8-connected ring) encloses its centre: background is 4-connected, so the centre is a hole.
    const d = maskFrom(['.....', '..#..', '.#.#.', '..#..', '.....']);
    expect(toRows(fillHoles(d.m, d.w, d.h), d.w, d.h)).toEqual(['.....', '..#..', '.###.', '..#..', '.....']);
  });

  it('borderForegroundFraction measures the outer band', () => {
    const w = 10, h = 10;
    const m = new Uint8Array(w * h);
    for (let x = 0; x < w; x++) m[x] = 1; // top row only
    expect(borderForegroundFraction(m, w, h, 1)).toBeCloseTo(10 / 36, 9);
    expect(borderForegroundFraction(m, w, h, 2)).toBeCloseTo(10 / 64, 9);
  });
});

// ---------------------------------------------------------------------------------------------------------
// listing
// ---------------------------------------------------------------------------------------------------------

describe('listKaggleImages', () => {
  it('lists all 60 real fixtures, any extension case, names with spaces, sorted by relPath', async () => {
    const imgs = await listKaggleImages(KAGGLE);
    expect(imgs).toHaveLength(60);
    expect(imgs.filter((i) => i.label === 1)).toHaveLength(30);
    expect(imgs.filter((i) => i.label === 0)).toHaveLength(30);
    const rels = imgs.map((i) => i.relPath);
    expect(rels).toContain('no/1 no.jpeg');
    expect(rels).toContain('no/N19.JPG');
    expect(rels).toContain('yes/Y113.JPG');
    expect(rels).toContain('no/No17.jpg'); // actually an RGBA PNG
    expect(rels).toEqual([...rels].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0)));
    for (const i of imgs) {
      expect(path.isAbsolute(i.file)).toBe(true);
      expect(i.file).toBe(path.join(KAGGLE, i.relPath));
      expect(i.label).toBe(i.relPath.startsWith('yes/') ? 1 : 0);
    }
    // A relative root still yields absolute files.
    const rel = await listKaggleImages(path.relative(process.cwd(), KAGGLE));
    expect(rel.map((i) => i.file)).toEqual(imgs.map((i) => i.file));
  });

  it('finds nested, differently-cased class folders and skips junk; the shallowest level wins', async () => {
    const root = path.join(tmp, 'nested');
    const png = await sharp({ create: { width: 8, height: 8, channels: 3, background: '#000' } }).png().toBuffer();
    for (const rel of ['brain_tumor_dataset/YES/a b.PNG', 'brain_tumor_dataset/No/c.JPEG', 'brain_tumor_dataset/No/sub/d.jpg', '__MACOSX/brain_tumor_dataset/yes/._a.PNG', 'brain_tumor_dataset/YES/._e.jpg']) {
      await mkdir(path.dirname(path.join(root, rel)), { recursive: true });
      await writeFile(path.join(root, rel), png);
    }
    await writeFile(path.join(root, 'brain_tumor_dataset/YES/notes.txt'), 'x');
    const imgs = await listKaggleImages(root);
    expect(imgs.map((i) => [i.relPath, i.label])).toEqual([
      ['brain_tumor_dataset/No/c.JPEG', 0],
      ['brain_tumor_dataset/No/sub/d.jpg', 0],
      ['brain_tumor_dataset/YES/a b.PNG', 1],
    ]);

    // The navoneel zip holds yes/ and brain_tumor_dataset/yes/ with the same files: take only the top level.
    await mkdir(path.join(root, 'yes'), { recursive: true });
    await writeFile(path.join(root, 'yes', 'top.jpg'), png);
    expect((await listKaggleImages(root)).map((i) => i.relPath)).toEqual(['yes/top.jpg']);

    // Two levels down is still found.
    const deep = path.join(tmp, 'deep');
    await mkdir(path.join(deep, 'a', 'b', 'no'), { recursive: true });
    await writeFile(path.join(deep, 'a', 'b', 'no', 'x.png'), png);
    expect((await listKaggleImages(deep)).map((i) => i.relPath)).toEqual(['a/b/no/x.png']);
  });

  it('throws SliceWiseError 422 no_images naming the root when there is no yes/ or no/ folder', async () => {
    const root = path.join(tmp, 'empty-root');
    await mkdir(path.join(root, 'images'), { recursive: true });
    for (const r of [root, path.join(tmp, 'does-not-exist')]) {
      expectSliceWiseError(await rejection(listKaggleImages(r)), { status: 422, code: 'no_images', message: r });
    }
  });
});

// ---------------------------------------------------------------------------------------------------------
// single images
// ---------------------------------------------------------------------------------------------------------

describe('preprocessKaggleImage', () => {
  it('rejects an undecodable file with a reason instead of throwing', async () => {
    const f = path.join(tmp, 'garbage.jpg');
    await writeFile(f, randomBytes(4096));
    const r = await preprocessKaggleImage(f);
    expect(r.ok).toBe(false);
    if (!r.ok) expect(r.reason).toMatch(/^cannot decode image: .+/);
  });

  it('refuses an image too large in pixels from its header, before decoding it', async () => {
    // A 64 x 64 PNG whose IHDR says 100000 x 100000 (CRC fixed, so a decoder trusts it): 10 gigapixels from 200 bytes.
    const png = await sharp({ create: { width: 64, height: 64, channels: 3, background: { r: 40, g: 40, b: 40 } } }).png().toBuffer();
    const huge = Buffer.from(png);
    huge.writeUInt32BE(100000, 16);
    huge.writeUInt32BE(100000, 20);
    huge.writeUInt32BE(crc32(huge.subarray(12, 29)), 29);
    const t0 = performance.now();
    const r = await kaggleImageToInput(huge);
    expect(r).toEqual({ ok: false, reason: 'image is 100000 x 100000 = 10000000000 pixels, more than the limit of 50000000 pixels' });
    expect(performance.now() - t0).toBeLessThan(1000);
    // The limit is an option: a real image over a small limit is refused by its size, and read under the default.
    const real = await readFile(path.join(KAGGLE, 'yes', 'Y1.jpg'));
    const meta = await sharp(real).metadata();
    const small = await kaggleImageToInput(real, { maxPixels: meta.width! * meta.height! - 1 });
    expect(small).toEqual({ ok: false, reason: `image is ${meta.width} x ${meta.height} = ${meta.width! * meta.height!} pixels, more than the limit of ${meta.width! * meta.height! - 1} pixels` });
    expect((await kaggleImageToInput(real, { maxPixels: meta.width! * meta.height! })).ok).toBe(true);
    expectSliceWiseError(await rejection(kaggleImageToInput(real, { maxPixels: 0 })), { status: 400, code: 'invalid_option', message: 'maxPixels must be a positive integer' });
  });

  it('decodes JPEG and PNG only, whatever else the image library could read', async () => {
    const real = await readFile(path.join(KAGGLE, 'yes', 'Y1.jpg'));
    for (const [format, bytes] of [
      ['webp', await sharp(real).webp().toBuffer()],
      ['gif', await sharp(real).gif().toBuffer()],
      ['tiff', await sharp(real).tiff().toBuffer()],
    ] as const) {
      expect(await kaggleImageToInput(bytes), format).toEqual({ ok: false, reason: `not a JPEG or PNG image (its content reads as ${format})` });
    }
  });

  it('throws DataFileError for a file that does not exist (a broken dataset, not a bad image)', async () => {
    await expect(preprocessKaggleImage(path.join(tmp, 'missing.jpg'))).rejects.toBeInstanceOf(DataFileError);
  });

  it('rejects a nearly-black image with the coverage reason', async () => {
    const size = 256;
    const g = new Uint8Array(size * size);
    const rand = rng(4);
    for (let i = 0; i < g.length; i++) g[i] = rand() < 0.05 ? 1 : 0; // sensor noise
    for (let y = 120; y < 132; y++) for (let x = 120; x < 132; x++) g[y * size + x] = 40; // a tiny faint blob
    const f = path.join(tmp, 'black.png');
    await sharp(g, { raw: { width: size, height: size, channels: 1 } }).png().toFile(f);
    const r = await preprocessKaggleImage(f);
    expect(r.ok).toBe(false);
    if (!r.ok) expect(r.reason).toMatch(/^brain mask covers \d+\.\d% of the image \(< 3%\)$/);

    const allBlack = path.join(tmp, 'allblack.jpg');
    await sharp({ create: { width: 300, height: 300, channels: 3, background: '#000' } }).jpeg().toFile(allBlack);
    const r2 = await preprocessKaggleImage(allBlack);
    expect(r2).toEqual({ ok: false, reason: 'brain mask covers 0.0% of the image (< 3%)' });
  });

  it('handles RGBA PNGs: the real RGBA fixture and a head on a transparent background', async () => {
    const meta = await sharp(path.join(KAGGLE, 'no', 'No17.jpg')).metadata();
    expect([meta.format, meta.channels]).toEqual(['png', 4]);
    const real = await preprocessKaggleImage(path.join(KAGGLE, 'no', 'No17.jpg'));
    expect(real.ok).toBe(true);

    // Transparent pixels are white underneath: they must flatten to black, not to a white background.
    const size = 200;
    const head = syntheticHead(size);
    const rgba = Buffer.alloc(size * size * 4);
    for (let i = 0; i < size * size; i++) {
      const inside = head[i]! > 0;
      rgba.fill(inside ? head[i]! : 255, i * 4, i * 4 + 3);
      rgba[i * 4 + 3] = inside ? 255 : 0;
    }
    const f = path.join(tmp, 'rgba.png');
    await sharp(rgba, { raw: { width: size, height: size, channels: 4 } }).png().toFile(f);
    expect((await sharp(f).metadata()).channels).toBe(4);
    const r = await preprocessKaggleImage(f);
    expect(r.ok).toBe(true);
    if (r.ok) {
      const ellipse = Math.PI * 0.35 * 0.42; // area fraction of the synthetic head
      expect(r.brainFraction).toBeGreaterThan(ellipse * 0.85);
      expect(r.brainFraction).toBeLessThan(ellipse * 1.05);
      expect(cornerValues(r.image, 256).every((v) => v === 0)).toBe(true);
    }
  });

  it('kaggleImageToInput: the bytes of an upload give what the file gives, with the brain mask it used', async () => {
    const file = path.join(KAGGLE, 'yes', 'Y1.jpg');
    const fromFile = await preprocessKaggleImage(file, { imageSize: 128 });
    const fromBytes = await kaggleImageToInput(await readFile(file), { imageSize: 128 });
    expect(fromBytes).toEqual(fromFile);
    if (!fromBytes.ok) throw new Error(fromBytes.reason);
    const { image, brainMask, brainFraction } = fromBytes;
    expect(brainMask).toHaveLength(128 * 128);
    expect(brainMask.every((m) => m === 0 || m === 1)).toBe(true);
    expect(brainMask.reduce((a, b) => a + b, 0) / brainMask.length).toBe(brainFraction);
    expect(image.every((v, i) => brainMask[i] === 1 || v === 0)).toBe(true);
    const garbage = await kaggleImageToInput(randomBytes(2048));
    expect(garbage.ok).toBe(false);
    if (!garbage.ok) expect(garbage.reason).toMatch(/^cannot decode image: .+/);
  });

  it('honours imageSize', async () => {
    const r = await preprocessKaggleImage(path.join(KAGGLE, 'yes', 'Y1.jpg'), { imageSize: 128 });
    expect(r.ok).toBe(true);
    if (r.ok) expect(r.image).toHaveLength(128 * 128);
    await expect(preprocessKaggleImage(path.join(KAGGLE, 'yes', 'Y1.jpg'), { imageSize: 0 })).rejects.toBeInstanceOf(SliceWiseError);
  });
});

// ---------------------------------------------------------------------------------------------------------
// whole dataset
// ---------------------------------------------------------------------------------------------------------

describe('preprocessKaggleDataset on the 60 real fixtures', () => {
  let out: string;
  let result: KaggleDatasetResult;
  let elapsedMs: number;
  const progress: [number, number][] = [];

  beforeAll(async () => {
    out = path.join(tmp, 'out-all');
    const t0 = performance.now();
    result = await preprocessKaggleDataset(KAGGLE, out, { onProgress: (d, t) => progress.push([d, t]) });
    elapsedMs = performance.now() - t0;
  });

  it('processes or rejects every image, most are processed, and it is fast', () => {
    expect(result.processed + result.rejected.length).toBe(60);
    expect(result.processed).toBeGreaterThanOrEqual(50);
    for (const r of result.rejected) expect(r.reason.length).toBeGreaterThan(0);
    expect(result.labels.yes + result.labels.no).toBe(result.processed);
    expect(progress).toHaveLength(60);
    expect(progress.at(-1)).toEqual([60, 60]);
    expect(elapsedMs).toBeLessThan(10_000);
  });

  it('writes images.npy, labels.npy and meta.json with matching shapes and no temp files', async () => {
    expect((await readdir(out)).sort()).toEqual(['images.npy', 'labels.npy', 'meta.json']);
    // The three were written in a temporary sibling folder that replaced `out` whole; none is left over.
    expect((await readdir(path.dirname(out))).filter((n) => n.startsWith('.'))).toEqual([]);
    const images = readNpy(await readFile(path.join(out, 'images.npy')));
    const labels = readNpy(await readFile(path.join(out, 'labels.npy')));
    const meta = JSON.parse(await readFile(path.join(out, 'meta.json'), 'utf8'));
    expect(images.descr).toBe('<f4');
    expect(images.shape).toEqual([result.processed, 256, 256]);
    expect(labels.descr).toBe('|u1');
    expect(labels.shape).toEqual([result.processed]);
    expect(meta.image_size).toBe(256);
    expect(meta.items).toHaveLength(result.processed);
    expect(meta.rejected).toEqual(result.rejected);
    expect(await readKaggleMeta(kaggleFiles(out))).toEqual(meta);
    meta.items.forEach((it: { index: number; relPath: string; label: number; brain_fraction: number }, i: number) => {
      expect(it.index).toBe(i);
      expect(it.label).toBe(it.relPath.startsWith('yes/') ? 1 : 0);
      expect(labels.data[i]).toBe(it.label);
      expect(it.brain_fraction).toBeGreaterThanOrEqual(0.03);
      expect(it.brain_fraction).toBeLessThanOrEqual(0.95);
    });
    expect([...labels.data].reduce((a, b) => a + b, 0)).toBe(result.labels.yes);
  });

  it('every processed image is z-scored over the brain (mean ~0, std ~1) with a zero background', () => {
    return readFile(path.join(out, 'images.npy')).then((buf) => {
      const images = readNpy(buf).data as Float32Array;
      const px = 256 * 256;
      for (let i = 0; i < result.processed; i++) {
        const img = images.subarray(i * px, (i + 1) * px);
        expect(img.every((v) => Number.isFinite(v))).toBe(true);
        const s = brainStats(img);
        expect(s.count / px).toBeGreaterThan(0.03);
        expect(Math.abs(s.mean)).toBeLessThan(0.01);
        expect(Math.abs(s.std - 1)).toBeLessThan(0.01);
        expect(cornerValues(img, 256).every((v) => v === 0)).toBe(true);
      }
    });
  });
});

describe('preprocessKaggleDataset on a copy with a corrupt file', () => {
  const picks = ['yes/Y1.jpg', 'yes/Y113.JPG', 'yes/Y41.jpg', 'no/1 no.jpeg', 'no/N19.JPG', 'no/No17.jpg', 'no/no 5.jpeg'];

  it('rejects the corrupt file with a reason, keeps the rest, and re-runs byte-identically', async () => {
    const root = path.join(tmp, 'copy');
    for (const rel of picks) {
      await mkdir(path.dirname(path.join(root, rel)), { recursive: true });
      await copyFile(path.join(KAGGLE, rel), path.join(root, rel));
    }
    await writeFile(path.join(root, 'yes', 'x.jpg'), randomBytes(3000));

    const outA = path.join(tmp, 'copy-out-a');
    const outB = path.join(tmp, 'copy-out-b');
    const a = await preprocessKaggleDataset(root, outA);
    expect(a.processed + a.rejected.length).toBe(picks.length + 1);
    const bad = a.rejected.find((r) => r.relPath === 'yes/x.jpg');
    expect(bad?.reason).toMatch(/^cannot decode image: .+/);
    expect(a.processed).toBeGreaterThanOrEqual(picks.length - 1);
    const images = readNpy(await readFile(path.join(outA, 'images.npy')));
    expect(images.shape).toEqual([a.processed, 256, 256]);
    expect(readNpy(await readFile(path.join(outA, 'labels.npy'))).shape).toEqual([a.processed]);

    // Same input -> byte-identical output, whether to a fresh directory or over the previous run.
    const b = await preprocessKaggleDataset(root, outB);
    expect(b).toEqual(a);
    const again = await preprocessKaggleDataset(root, outA);
    expect(again).toEqual(a);
    for (const name of ['images.npy', 'labels.npy', 'meta.json']) {
      const fa = await readFile(path.join(outA, name));
      const fb = await readFile(path.join(outB, name));
      expect(fa.equals(fb), name).toBe(true);
    }
  });
});
