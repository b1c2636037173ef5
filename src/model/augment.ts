/**
 * Training-time augmentation of NHWC batches (the original configured presets but never applied them).
 *
 * Geometric transforms (flips, rotation, scaling) are drawn once per sample and applied to the image (all
 * channels, bilinear) and to its mask (nearest neighbour, so it stays 0/1) with the same mapping; positions that
 * fall outside the input are clamped to the nearest edge pixel. Intensity transforms (contrast, brightness,
 * Gaussian noise) touch the image only. All randomness comes from the `rng` passed in, so a batch's augmentation
 * is reproducible from (seed, epoch, batch).
 *
 * Presets:
 *   none        identity
 *   minimal     horizontal flip (p 0.5)
 *   moderate    horizontal + vertical flips (p 0.5 each), rotation +-10 deg (p 0.5), contrast x[0.9, 1.1] and
 *               brightness +-0.1 (p 0.5)
 *   aggressive  flips (p 0.5 each), rotation +-20 deg (p 0.7), scale [0.9, 1.1] (p 0.5), contrast x[0.8, 1.2] and
 *               brightness +-0.2 (p 0.8), Gaussian noise sd 0.05 (p 0.3)
 * Images are z-scored, so brightness and noise are in standard deviations.
 */

export type AugmentPreset = 'none' | 'minimal' | 'moderate' | 'aggressive';

export interface AugmentSpec {
  hflip: number;
  vflip: number;
  /** Maximum absolute rotation in degrees, applied with probability rotateP. */
  rotateDeg: number;
  rotateP: number;
  /** Zoom range [lo, hi], applied with probability scaleP. */
  scale: [number, number];
  scaleP: number;
  /** Contrast factor drawn from [1 - contrast, 1 + contrast] and brightness offset from [-brightness, brightness]. */
  contrast: number;
  brightness: number;
  intensityP: number;
  noiseStd: number;
  noiseP: number;
}

const IDENTITY: AugmentSpec = {
  hflip: 0,
  vflip: 0,
  rotateDeg: 0,
  rotateP: 0,
  scale: [1, 1],
  scaleP: 0,
  contrast: 0,
  brightness: 0,
  intensityP: 0,
  noiseStd: 0,
  noiseP: 0,
};

export const AUGMENT_PRESETS: Record<AugmentPreset, AugmentSpec> = {
  none: IDENTITY,
  minimal: { ...IDENTITY, hflip: 0.5 },
  moderate: { ...IDENTITY, hflip: 0.5, vflip: 0.5, rotateDeg: 10, rotateP: 0.5, contrast: 0.1, brightness: 0.1, intensityP: 0.5 },
  aggressive: {
    hflip: 0.5,
    vflip: 0.5,
    rotateDeg: 20,
    rotateP: 0.7,
    scale: [0.9, 1.1],
    scaleP: 0.5,
    contrast: 0.2,
    brightness: 0.2,
    intensityP: 0.8,
    noiseStd: 0.05,
    noiseP: 0.3,
  },
};

function resolveAugment(preset: AugmentPreset | Partial<AugmentSpec> | undefined): AugmentSpec {
  if (preset === undefined) return IDENTITY;
  if (typeof preset === 'string') {
    const spec = AUGMENT_PRESETS[preset];
    if (!spec) throw new RangeError(`unknown augmentation preset "${preset}" (known: ${Object.keys(AUGMENT_PRESETS).join(', ')})`);
    return spec;
  }
  return { ...IDENTITY, ...preset };
}

interface AugmentBatch {
  /** N x H x W x C images, modified in place. */
  x: Float32Array;
  /** N x H x W x 1 masks (or null), modified in place with the same geometry. */
  mask: Float32Array | null;
  n: number;
  height: number;
  width: number;
  channels: number;
}

/** The transform drawn for one sample (exported for tests and logging). */
interface SampleTransform {
  hflip: boolean;
  vflip: boolean;
  /** Radians. */
  angle: number;
  scale: number;
  contrast: number;
  brightness: number;
  noiseStd: number;
}

function drawTransform(spec: AugmentSpec, rng: () => number): SampleTransform {
  // Always draw the same number of values per sample, so one sample's draws do not shift the next one's.
  const u = Array.from({ length: 10 }, () => rng());
  const uniform = (x: number, lo: number, hi: number): number => lo + x * (hi - lo);
  const t: SampleTransform = {
    hflip: u[0]! < spec.hflip,
    vflip: u[1]! < spec.vflip,
    angle: u[2]! < spec.rotateP ? (uniform(u[3]!, -spec.rotateDeg, spec.rotateDeg) * Math.PI) / 180 : 0,
    scale: u[4]! < spec.scaleP ? uniform(u[5]!, spec.scale[0], spec.scale[1]) : 1,
    contrast: 1,
    brightness: 0,
    noiseStd: u[8]! < spec.noiseP ? spec.noiseStd : 0,
  };
  if (u[6]! < spec.intensityP) {
    t.contrast = uniform(u[7]!, 1 - spec.contrast, 1 + spec.contrast);
    t.brightness = uniform(u[9]!, -spec.brightness, spec.brightness);
  }
  return t;
}

function isIdentityGeometry(t: SampleTransform): boolean {
  return !t.hflip && !t.vflip && t.angle === 0 && t.scale === 1;
}

/** Standard normal from two uniforms (Box-Muller). */
function gaussian(rng: () => number): number {
  const u = 1 - rng();
  const v = rng();
  return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * v);
}

/**
 * Apply one transform to sample `i` of the batch in place. The geometric mapping sends each output pixel (r, c)
 * to an input position: undo the flips, then rotate by -angle and divide by the scale about the image centre.
 */
function applyTransform(b: AugmentBatch, i: number, t: SampleTransform, rng: () => number): void {
  const { height: H, width: W, channels: C } = b;
  const area = H * W;
  const xOff = i * area * C;
  const mOff = i * area;
  if (!isIdentityGeometry(t)) {
    const src = b.x.slice(xOff, xOff + area * C);
    const srcMask = b.mask ? b.mask.slice(mOff, mOff + area) : null;
    const cy = (H - 1) / 2;
    const cx = (W - 1) / 2;
    const cos = Math.cos(t.angle) / t.scale;
    const sin = Math.sin(t.angle) / t.scale;
    const rotates = t.angle !== 0 || t.scale !== 1;
    for (let r = 0; r < H; r++) {
      for (let c = 0; c < W; c++) {
        // Flip first (on the output grid), then the inverse rotation / scale.
        const fr = t.vflip ? H - 1 - r : r;
        const fc = t.hflip ? W - 1 - c : c;
        let sy = fr;
        let sx = fc;
        if (rotates) {
          const dy = fr - cy;
          const dx = fc - cx;
          sy = cy + cos * dy - sin * dx;
          sx = cx + sin * dy + cos * dx;
        }
        sy = Math.min(Math.max(sy, 0), H - 1);
        sx = Math.min(Math.max(sx, 0), W - 1);
        const out = r * W + c;
        if (!rotates) {
          const s = sy * W + sx;
          for (let ch = 0; ch < C; ch++) b.x[xOff + out * C + ch] = src[s * C + ch]!;
          if (srcMask && b.mask) b.mask[mOff + out] = srcMask[s]!;
          continue;
        }
        const y0 = Math.floor(sy);
        const x0 = Math.floor(sx);
        const y1 = Math.min(y0 + 1, H - 1);
        const x1 = Math.min(x0 + 1, W - 1);
        const fy = sy - y0;
        const fx = sx - x0;
        for (let ch = 0; ch < C; ch++) {
          const v00 = src[(y0 * W + x0) * C + ch]!;
          const v01 = src[(y0 * W + x1) * C + ch]!;
          const v10 = src[(y1 * W + x0) * C + ch]!;
          const v11 = src[(y1 * W + x1) * C + ch]!;
          b.x[xOff + out * C + ch] = (v00 * (1 - fx) + v01 * fx) * (1 - fy) + (v10 * (1 - fx) + v11 * fx) * fy;
        }
        if (srcMask && b.mask) b.mask[mOff + out] = srcMask[Math.round(sy) * W + Math.round(sx)]!;
      }
    }
  }
  if (t.contrast !== 1 || t.brightness !== 0) {
    for (let k = xOff; k < xOff + area * C; k++) b.x[k] = b.x[k]! * t.contrast + t.brightness;
  }
  if (t.noiseStd > 0) {
    for (let k = xOff; k < xOff + area * C; k++) b.x[k] = b.x[k]! + t.noiseStd * gaussian(rng);
  }
}

/**
 * Augment every sample of a batch in place (image and mask with the same geometry). 'none' (or an identity
 * spec) leaves the arrays untouched. Returns the transforms drawn, one per sample.
 */
export function augmentBatch(b: AugmentBatch, preset: AugmentPreset | Partial<AugmentSpec>, rng: () => number): SampleTransform[] {
  const spec = resolveAugment(preset);
  if (b.x.length !== b.n * b.height * b.width * b.channels) throw new RangeError('augmentBatch: x does not match n x height x width x channels');
  if (b.mask && b.mask.length !== b.n * b.height * b.width) throw new RangeError('augmentBatch: mask does not match n x height x width');
  const out: SampleTransform[] = [];
  if (spec === IDENTITY) return out;
  for (let i = 0; i < b.n; i++) {
    const t = drawTransform(spec, rng);
    applyTransform(b, i, t, rng);
    out.push(t);
  }
  return out;
}
