import sharp from 'sharp';
import { join } from 'node:path';
import { writeFileAtomic } from '../lib/atomic.ts';
import { Rng, deriveSeed } from './brats.ts';

export type KaggleClass = 'yes' | 'no';

/** File name of the i-th (0-based) image of a class: `Y001.jpg` / `N001.jpg`. */
export function kaggleImageName(cls: KaggleClass, index: number): string {
  return `${cls === 'yes' ? 'Y' : 'N'}${String(index + 1).padStart(3, '0')}.jpg`;
}

function smoothstep(edge0: number, edge1: number, x: number): number {
  const t = Math.min(1, Math.max(0, (x - edge0) / (edge1 - edge0)));
  return t * t * (3 - 2 * t);
}

/**
 * One grayscale axial "MRI photo" like the Kaggle tumour/no-tumour set: dark background, bright skull ring,
 * a thin dark CSF gap, textured brain; 'yes' images also get a bright blob inside the brain.
 * Returns 8-bit pixels, row-major, `size * size`.
 */
export function generateKagglePixels(cls: KaggleClass, index: number, seed: number, size: number): Uint8Array {
  const rng = new Rng(deriveSeed(seed, `kaggle-${cls}`, index));
  const S = size;
  const cx = S / 2 + rng.range(-0.04, 0.04) * S;
  const cy = S / 2 + rng.range(-0.04, 0.04) * S;
  const a = S * rng.range(0.33, 0.4); // half-width
  const b = S * rng.range(0.4, 0.46); // half-height
  const rot = rng.range(-0.25, 0.25);
  const cosR = Math.cos(rot);
  const sinR = Math.sin(rot);
  const skullLevel = rng.range(190, 235);
  const brainLevel = rng.range(95, 135);
  const bgLevel = rng.range(4, 14);
  const texF = rng.range(0.12, 0.22);
  const texP = rng.range(0, 2 * Math.PI);
  const skullInner = rng.range(0.88, 0.92);
  const brainOuter = skullInner - rng.range(0.03, 0.05);

  // Blob for 'yes' images: somewhere in the inner part of the brain.
  const hasBlob = cls === 'yes';
  const br = S * rng.range(0.06, 0.13);
  const bang = rng.range(0, 2 * Math.PI);
  const bdist = rng.range(0, 0.5);
  const bx = bdist * Math.cos(bang);
  const by = bdist * Math.sin(bang);
  const blobLevel = rng.range(90, 120);
  const blobLump = rng.range(0.08, 0.2);
  const blobP = rng.range(0, 2 * Math.PI);

  const px = new Uint8Array(S * S);
  for (let y = 0; y < S; y++) {
    for (let x = 0; x < S; x++) {
      const ox = x + 0.5 - cx;
      const oy = y + 0.5 - cy;
      // Rotate into the head's frame, normalise by the radii.
      const u = (ox * cosR + oy * sinR) / a;
      const v = (-ox * sinR + oy * cosR) / b;
      const r = Math.sqrt(u * u + v * v);
      const soft = 1.5 / Math.min(a, b); // about 1.5 pixels of anti-aliasing
      let val = bgLevel;
      // Skull ring between skullInner and 1.
      const inHead = 1 - smoothstep(1 - soft, 1 + soft, r);
      const skull = inHead * smoothstep(skullInner - soft, skullInner + soft, r);
      val += skull * (skullLevel - bgLevel);
      // Brain inside brainOuter, with gyral texture and a slightly darker centre.
      const brain = 1 - smoothstep(brainOuter - soft, brainOuter + soft, r);
      const tex = 12 * Math.sin(texF * x + texP) * Math.sin(texF * 0.9 * y - texP) + 10 * (r / brainOuter);
      val += brain * (brainLevel + tex - bgLevel);
      if (hasBlob) {
        const du = (u - bx * brainOuter) * Math.min(a, b);
        const dv = (v - by * brainOuter) * Math.min(a, b);
        const ang = Math.atan2(dv, du);
        const d = Math.sqrt(du * du + dv * dv) / (br * (1 + blobLump * Math.sin(3 * ang + blobP)));
        val += brain * blobLevel * (1 - smoothstep(0.75, 1.05, d));
      }
      val += rng.normal() * 4;
      px[x + y * S] = val < 0 ? 0 : val > 255 ? 255 : Math.round(val);
    }
  }
  return px;
}

/** Encode 8-bit grayscale pixels as a single-channel JPEG. */
function encodeGrayJpeg(pixels: Uint8Array, size: number): Promise<Buffer> {
  return sharp(Buffer.from(pixels.buffer, pixels.byteOffset, pixels.byteLength), {
    raw: { width: size, height: size, channels: 1 },
  })
    .toColourspace('b-w')
    .jpeg({ quality: 90, chromaSubsampling: '4:4:4' })
    .toBuffer();
}

/** Generate and atomically write one image; returns its path. */
export async function writeKaggleImage(kaggleDir: string, cls: KaggleClass, index: number, seed: number, size: number): Promise<string> {
  const file = join(kaggleDir, cls, kaggleImageName(cls, index));
  const jpeg = await encodeGrayJpeg(generateKagglePixels(cls, index, seed, size), size);
  await writeFileAtomic(file, jpeg);
  return file;
}
