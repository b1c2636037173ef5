import { join } from 'node:path';
import { writeNifti } from '../imaging/nifti-write.ts';

// ---------------------------------------------------------------------------------------------------------
// Seeded randomness (shared with kaggle.ts). Everything synthetic is derived from (seed, stream, index) so
// that a patient's bytes do not depend on how many other patients or images are generated, nor on the
// order in which asynchronous writes finish.
// ---------------------------------------------------------------------------------------------------------

/** 32-bit avalanche mix (xor-shift / multiply rounds). */
function mix32(x: number): number {
  x = Math.imul(x ^ (x >>> 16), 0x7feb352d);
  x = Math.imul(x ^ (x >>> 15), 0x846ca68b);
  return (x ^ (x >>> 16)) >>> 0;
}

/** A seed for one generated item: independent streams for BraTS patients and Kaggle images. */
export function deriveSeed(seed: number, stream: string, index: number): number {
  let h = mix32((seed >>> 0) ^ 0x9e3779b9);
  for (let i = 0; i < stream.length; i++) h = mix32(h ^ stream.charCodeAt(i));
  return mix32(h ^ Math.imul(index + 1, 0x85ebca6b));
}

/** Small deterministic PRNG (counter-based: state advances by a Weyl constant, output is the mixed state). */
export class Rng {
  private state: number;
  private spare: number | null = null;

  constructor(seed: number) {
    this.state = seed >>> 0;
  }

  /** Uniform in [0, 1). */
  next(): number {
    this.state = (this.state + 0x9e3779b9) >>> 0;
    return mix32(this.state) / 4294967296;
  }

  /** Uniform in [lo, hi). */
  range(lo: number, hi: number): number {
    return lo + (hi - lo) * this.next();
  }

  /** Standard normal (Box-Muller, the second value kept for the next call). */
  normal(): number {
    if (this.spare !== null) {
      const s = this.spare;
      this.spare = null;
      return s;
    }
    let u = this.next();
    while (u <= 1e-12) u = this.next();
    const v = this.next();
    const r = Math.sqrt(-2 * Math.log(u));
    this.spare = r * Math.sin(2 * Math.PI * v);
    return r * Math.cos(2 * Math.PI * v);
  }
}

// ---------------------------------------------------------------------------------------------------------
// BraTS-like volumes
// ---------------------------------------------------------------------------------------------------------

export const BRATS_MODALITIES = ['flair', 't1', 't1ce', 't2'] as const;
export type BratsModality = (typeof BRATS_MODALITIES)[number];

/** `BraTS20_Training_001` for index 0 (the real release's naming). */
export function bratsPatientId(index: number): string {
  return `BraTS20_Training_${String(index + 1).padStart(3, '0')}`;
}

/** Tissue classes used while synthesising (not written anywhere). */
const enum Tissue {
  Background = 0,
  White = 1,
  Grey = 2,
  Csf = 3,
  Oedema = 4,
  Enhancing = 5,
  Necrotic = 6,
}

/** Mean intensity per tissue and modality (order: flair, t1, t1ce, t2); tumour is bright in FLAIR and T2. */
const TISSUE_MEANS: Record<Tissue, [number, number, number, number]> = {
  [Tissue.Background]: [0, 0, 0, 0],
  [Tissue.White]: [240, 620, 640, 300],
  [Tissue.Grey]: [300, 460, 480, 430],
  [Tissue.Csf]: [70, 210, 220, 900],
  [Tissue.Oedema]: [640, 420, 440, 860],
  [Tissue.Enhancing]: [580, 430, 1150, 720],
  [Tissue.Necrotic]: [460, 250, 260, 960],
};

export interface BratsPatientVolumes {
  id: string;
  dims: [number, number, number];
  modalities: Record<BratsModality, Int16Array>;
  /** Labels 0 background, 1 necrotic core, 2 oedema, 4 enhancing tumour. */
  seg: Int16Array;
  /** Tumour (label > 0) voxel count per axial slice. */
  tumourPixelsPerSlice: number[];
}

/** Smooth 1-D profile: a sum of two random low-frequency sinusoids, amplitude about `amp`. */
function smoothProfile(rng: Rng, n: number, amp: number): Float32Array {
  const out = new Float32Array(n);
  const f1 = rng.range(0.5, 1.5);
  const f2 = rng.range(1.5, 3.0);
  const p1 = rng.range(0, 2 * Math.PI);
  const p2 = rng.range(0, 2 * Math.PI);
  for (let i = 0; i < n; i++) {
    const t = i / Math.max(1, n - 1);
    out[i] = amp * (0.7 * Math.sin(2 * Math.PI * f1 * t + p1) + 0.3 * Math.sin(2 * Math.PI * f2 * t + p2));
  }
  return out;
}

/**
 * One synthetic patient: a skull-stripped ellipsoidal brain (grey-matter rim, white-matter core, two
 * ventricles), smooth bias-field-like intensity variation, Gaussian noise, and one lumpy tumour
 * (necrotic core 1 inside enhancing rim 4 inside oedema 2). Background is exactly 0, as in BraTS.
 */
export function generateBratsPatient(index: number, seed: number, dims: [number, number, number]): BratsPatientVolumes {
  const rng = new Rng(deriveSeed(seed, 'brats', index));
  const [X, Y, Z] = dims;
  const nxy = X * Y;
  const n = nxy * Z;

  // Brain ellipsoid.
  const cx = X / 2 + rng.range(-0.03, 0.03) * X;
  const cy = Y / 2 + rng.range(-0.03, 0.03) * Y;
  const cz = Z / 2 + rng.range(-0.02, 0.02) * Z;
  const rx = X * rng.range(0.36, 0.42);
  const ry = Y * rng.range(0.4, 0.46);
  const rz = Z * rng.range(0.4, 0.46);

  // Ventricles: two small ellipsoids either side of the midline, slightly above the centre.
  const vent = [-1, 1].map((side) => ({
    x: cx + side * rx * rng.range(0.14, 0.2),
    y: cy + ry * rng.range(-0.12, 0.02),
    z: cz + rz * rng.range(0.0, 0.15),
    a: rx * rng.range(0.07, 0.1),
    b: ry * rng.range(0.22, 0.3),
    c: rz * rng.range(0.2, 0.3),
  }));

  // Tumour: centre well inside the brain, radii large enough to span several slices.
  const tcx = cx + rx * rng.range(-0.45, 0.45);
  const tcy = cy + ry * rng.range(-0.45, 0.45);
  const tcz = cz + rz * rng.range(-0.35, 0.35);
  const tra = Math.max(2.5, Math.min(X, Y) * rng.range(0.11, 0.18));
  const trb = Math.max(2.5, tra * rng.range(0.8, 1.25));
  const trc = Math.max(2, Z * rng.range(0.1, 0.17));
  const lumpA = rng.range(0.08, 0.16);
  const lumpB = rng.range(0.05, 0.1);
  const lumpK = 2 + Math.floor(rng.next() * 3);
  const lumpP1 = rng.range(0, 2 * Math.PI);
  const lumpP2 = rng.range(0, 2 * Math.PI);
  // The core sits off-centre inside the oedema.
  const coreDx = tra * rng.range(-0.12, 0.12);
  const coreDy = trb * rng.range(-0.12, 0.12);
  const enhancingR = rng.range(0.5, 0.6);
  const necroticR = rng.range(0.25, 0.33);

  // Bias-field-like smooth variation (separable) and per-modality scanner gain.
  const fx = smoothProfile(rng, X, 0.06);
  const fy = smoothProfile(rng, Y, 0.06);
  const fz = smoothProfile(rng, Z, 0.04);
  const gain = BRATS_MODALITIES.map(() => rng.range(0.85, 1.2));
  const noiseSd = BRATS_MODALITIES.map(() => rng.range(0.03, 0.05));
  // Gyral texture in the grey/white pattern.
  const gyrusF = Math.round(rng.range(9, 15));
  const gyrusP = rng.range(0, 2 * Math.PI);

  const modalities = {
    flair: new Int16Array(n),
    t1: new Int16Array(n),
    t1ce: new Int16Array(n),
    t2: new Int16Array(n),
  } satisfies Record<BratsModality, Int16Array>;
  const outs = [modalities.flair, modalities.t1, modalities.t1ce, modalities.t2];
  const seg = new Int16Array(n);
  const tumourPixelsPerSlice = new Array<number>(Z).fill(0);

  const mean = [0, 0, 0, 0];
  for (let z = 0; z < Z; z++) {
    const dz = (z + 0.5 - cz) / rz;
    const tz = (z + 0.5 - tcz) / trc;
    for (let y = 0; y < Y; y++) {
      const dy = (y + 0.5 - cy) / ry;
      const ty = (y + 0.5 - tcy) / trb;
      for (let x = 0; x < X; x++) {
        const i = x + y * X + z * nxy;
        const dx = (x + 0.5 - cx) / rx;
        const r2 = dx * dx + dy * dy + dz * dz;
        if (r2 >= 1) continue; // background stays 0
        const r = Math.sqrt(r2);

        // Normal tissue: grey rim with gyral undulation, white core, ventricles.
        const theta = Math.atan2(dy, dx);
        const rim = 0.8 + 0.04 * Math.sin(gyrusF * theta + gyrusP + 4 * dz);
        let tissue: Tissue = r > rim ? Tissue.Grey : Tissue.White;
        for (const v of vent) {
          const ex = (x + 0.5 - v.x) / v.a;
          const ey = (y + 0.5 - v.y) / v.b;
          const ez = (z + 0.5 - v.z) / v.c;
          if (ex * ex + ey * ey + ez * ez < 1) tissue = Tissue.Csf;
        }
        const base = TISSUE_MEANS[tissue];
        for (let m = 0; m < 4; m++) mean[m] = base[m]!;

        // Tumour (only where the brain is, one voxel in from its surface).
        const tx = (x + 0.5 - tcx) / tra;
        if (r < 0.97 && Math.abs(tx) < 1.4 && Math.abs(ty) < 1.4 && Math.abs(tz) < 1.4) {
          const ang = Math.atan2(ty, tx);
          const lump = 1 + lumpA * Math.sin(lumpK * ang + lumpP1) + lumpB * Math.cos(3 * tz + lumpP2);
          const d = Math.sqrt(tx * tx + ty * ty + tz * tz) / lump;
          if (d < 1) {
            const cxn = (x + 0.5 - tcx - coreDx) / tra;
            const cyn = (y + 0.5 - tcy - coreDy) / trb;
            const dc = Math.sqrt(cxn * cxn + cyn * cyn + tz * tz) / lump;
            let label = 2;
            let t: Tissue = Tissue.Oedema;
            if (dc < necroticR) {
              label = 1;
              t = Tissue.Necrotic;
            } else if (dc < enhancingR) {
              label = 4;
              t = Tissue.Enhancing;
            }
            seg[i] = label;
            tumourPixelsPerSlice[z]!++;
            // Partial-volume blend at the oedema edge so the boundary is not a hard step.
            const w = Math.min(1, (1 - d) / 0.2);
            const tm = TISSUE_MEANS[t];
            for (let m = 0; m < 4; m++) mean[m] = mean[m]! * (1 - w) + tm[m]! * w;
          }
        }

        const bias = 1 + fx[x]! + fy[y]! + fz[z]!;
        // Slight darkening towards the brain surface (coil / partial volume).
        const edge = r > 0.92 ? 1 - (r - 0.92) * 3 : 1;
        for (let m = 0; m < 4; m++) {
          const mu = mean[m]! * bias * edge * gain[m]!;
          const v = Math.round(mu + rng.normal() * noiseSd[m]! * mu);
          outs[m]![i] = v < 1 ? 1 : v > 32767 ? 32767 : v;
        }
      }
    }
  }

  return { id: bratsPatientId(index), dims, modalities, seg, tumourPixelsPerSlice };
}

/** Write one patient as `dir/<id>/<id>_{flair,t1,t1ce,t2,seg}.nii.gz` (int16, 1 mm voxels). */
export async function writeBratsPatient(bratsDir: string, p: BratsPatientVolumes): Promise<string[]> {
  const dir = join(bratsDir, p.id);
  const files: Array<[string, Int16Array]> = [
    ...BRATS_MODALITIES.map((m): [string, Int16Array] => [m, p.modalities[m]]),
    ['seg', p.seg],
  ];
  const written: string[] = [];
  await Promise.all(
    files.map(async ([suffix, data]) => {
      const file = join(dir, `${p.id}_${suffix}.nii.gz`);
      await writeNifti(file, data, p.dims, { pixdim: [1, 1, 1], description: `slicewise synthetic ${suffix}` });
      written.push(file);
    }),
  );
  return written.sort();
}
