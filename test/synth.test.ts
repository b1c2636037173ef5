import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mkdtemp, readdir, readFile, rm, mkdir, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { gunzipSync } from 'node:zlib';
import { createHash } from 'node:crypto';
import sharp from 'sharp';
import * as niftiReader from 'nifti-reader-js';
import { synthesize, type SynthOptions } from '../src/synth/index.ts';
import { encodeNifti } from '../src/imaging/nifti-write.ts';

/** Minimal NIfTI-1 reader, independent of the writer: header fields and int16 voxels. */
function readNifti(file: Buffer) {
  const buf = file[0] === 0x1f && file[1] === 0x8b ? gunzipSync(file) : file;
  const sizeofHdr = buf.readInt32LE(0);
  const magic = buf.toString('latin1', 344, 348);
  const dims = [0, 1, 2, 3, 4, 5, 6, 7].map((i) => buf.readInt16LE(40 + 2 * i));
  const datatype = buf.readInt16LE(70);
  const bitpix = buf.readInt16LE(72);
  const pixdim = [1, 2, 3].map((i) => buf.readFloatLE(76 + 4 * i));
  const voxOffset = buf.readFloatLE(108);
  const n = dims[1]! * dims[2]! * dims[3]!;
  const extension = [...buf.subarray(348, 352)];
  let data: Int16Array | undefined;
  if (datatype === 4) {
    const bytes = buf.subarray(voxOffset, voxOffset + n * 2);
    data = new Int16Array(n);
    for (let i = 0; i < n; i++) data[i] = bytes.readInt16LE(2 * i);
  }
  return { sizeofHdr, magic, dims, datatype, bitpix, pixdim, voxOffset, extension, length: buf.length, data };
}

async function listFiles(root: string): Promise<string[]> {
  const out: string[] = [];
  async function walk(d: string) {
    for (const e of await readdir(d, { withFileTypes: true })) {
      const p = join(d, e.name);
      if (e.isDirectory()) await walk(p);
      else out.push(relative(root, p));
    }
  }
  await walk(root);
  return out.sort();
}

async function treeHashes(root: string): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  for (const f of await listFiles(root)) out[f] = createHash('sha256').update(await readFile(join(root, f))).digest('hex');
  return out;
}

const MODS = ['flair', 't1', 't1ce', 't2', 'seg'];

describe('synthesize', () => {
  let tmp: string;
  let outA: string;
  let resultA: Awaited<ReturnType<typeof synthesize>>;
  let elapsedMs = 0;

  beforeAll(async () => {
    tmp = await mkdtemp(join(tmpdir(), 'slicewise-synth-'));
    outA = join(tmp, 'a');
    const t0 = performance.now();
    resultA = await synthesize({ out: outA });
    elapsedMs = performance.now() - t0;
  });

  afterAll(async () => {
    await rm(tmp, { recursive: true, force: true });
  });

  it('writes the real-release layout and names with the defaults, quickly', async () => {
    expect(resultA.bratsDir).toBe(join(outA, 'brats'));
    expect(resultA.kaggleDir).toBe(join(outA, 'kaggle'));
    expect(resultA.patients).toEqual([1, 2, 3, 4, 5, 6].map((i) => `BraTS20_Training_00${i}`));
    expect(resultA.kaggleImages).toBe(40);
    const files = await listFiles(outA);
    for (const id of resultA.patients) {
      for (const m of MODS) expect(files).toContain(`brats/${id}/${id}_${m}.nii.gz`);
    }
    expect(files.filter((f) => /^kaggle\/yes\/[^/]+\.jpg$/.test(f))).toHaveLength(20);
    expect(files.filter((f) => /^kaggle\/no\/[^/]+\.jpg$/.test(f))).toHaveLength(20);
    // Nothing else: no temp files left behind by the atomic writes.
    expect(files).toHaveLength(1 + 6 * 5 + 40);
    expect(elapsedMs).toBeLessThan(10_000); // ~1 s on a 2-core box; generous for loaded CI
  });

  it('labels the data as synthetic, with the options', async () => {
    const text = await readFile(join(outA, 'SYNTHETIC.txt'), 'utf8');
    expect(text).toMatch(/^SYNTHETIC DATA - NOT REAL PATIENT IMAGES/);
    expect(text).toContain('slicewise synth');
    expect(text).toContain('"seed": 42');
    expect(text).toContain('"patients": 6');
    expect(text).not.toContain(outA); // the label does not depend on where it was written
  });

  it('volumes are valid int16 NIfTI-1 with BraTS labels and a learnable tumour', async () => {
    for (const id of resultA.patients) {
      const vols: Record<string, ReturnType<typeof readNifti>> = {};
      for (const m of MODS) {
        const v = readNifti(await readFile(join(resultA.bratsDir, id, `${id}_${m}.nii.gz`)));
        expect(v.sizeofHdr).toBe(348);
        expect(v.magic).toBe('n+1\0');
        expect(v.voxOffset).toBe(352);
        expect(v.extension).toEqual([0, 0, 0, 0]);
        expect(v.dims.slice(0, 4)).toEqual([3, 96, 96, 48]);
        expect(v.datatype).toBe(4);
        expect(v.bitpix).toBe(16);
        expect(v.pixdim).toEqual([1, 1, 1]);
        expect(v.length).toBe(352 + 96 * 96 * 48 * 2);
        vols[m] = v;
      }
      const seg = vols.seg!.data!;
      const flair = vols.flair!.data!;
      const labels = new Set(seg);
      for (const l of labels) expect([0, 1, 2, 4]).toContain(l);
      expect(labels).toEqual(new Set([0, 1, 2, 4]));

      // Tumour spans several axial (last-axis) slices, with >= 100 pixels in some.
      const perSlice = new Array(48).fill(0);
      let tumourSum = 0;
      let tumourN = 0;
      let brainSum = 0;
      let brainN = 0;
      let outsideBrain = 0;
      for (let i = 0; i < seg.length; i++) {
        if (seg[i]! > 0) {
          perSlice[Math.floor(i / (96 * 96))]++;
          tumourSum += flair[i]!;
          tumourN++;
          if (flair[i]! <= 0) outsideBrain++;
        } else if (flair[i]! > 0) {
          brainSum += flair[i]!;
          brainN++;
        }
      }
      expect(outsideBrain).toBe(0); // tumour lies inside the brain
      expect(perSlice.filter((c) => c > 0).length).toBeGreaterThanOrEqual(5);
      expect(Math.max(...perSlice)).toBeGreaterThanOrEqual(100);
      // Tumour clearly brighter in FLAIR than the rest of the brain.
      expect(tumourSum / tumourN).toBeGreaterThan(1.5 * (brainSum / brainN));
      // Background (corners) is exactly zero, as in skull-stripped BraTS.
      expect(flair[0]).toBe(0);
      expect(flair[flair.length - 1]).toBe(0);
      // Brain occupies a plausible fraction of the volume.
      expect(brainN / flair.length).toBeGreaterThan(0.15);
      expect(brainN / flair.length).toBeLessThan(0.6);
    }
  });

  it('volumes also decode with nifti-reader-js', async () => {
    const id = resultA.patients[0]!;
    const raw = await readFile(join(resultA.bratsDir, id, `${id}_flair.nii.gz`));
    let ab = raw.buffer.slice(raw.byteOffset, raw.byteOffset + raw.byteLength) as ArrayBuffer;
    expect(niftiReader.isCompressed(ab)).toBe(true);
    ab = niftiReader.decompress(ab) as ArrayBuffer;
    expect(niftiReader.isNIFTI1(ab)).toBe(true);
    const h = niftiReader.readHeader(ab)!;
    expect(h.dims.slice(0, 4)).toEqual([3, 96, 96, 48]);
    expect(h.datatypeCode).toBe(4);
    expect(h.vox_offset).toBe(352);
    const img = new Int16Array(niftiReader.readImage(h, ab));
    expect(img.length).toBe(96 * 96 * 48);
  });

  it('JPEGs decode with sharp; "yes" images carry a bright blob', async () => {
    const brightCount = async (file: string) => {
      const meta = await sharp(file).metadata();
      expect(meta.format).toBe('jpeg');
      expect(meta.width).toBe(128);
      expect(meta.height).toBe(128);
      expect(meta.channels).toBe(1);
      const { data } = await sharp(file).extractChannel(0).raw().toBuffer({ resolveWithObject: true });
      // Dark background in the corner.
      expect(data[0]!).toBeLessThan(40);
      let n = 0;
      for (const v of data) if (v > 170) n++;
      return n;
    };
    const mean = async (cls: 'yes' | 'no') => {
      const dir = join(resultA.kaggleDir, cls);
      const names = (await readdir(dir)).sort();
      let s = 0;
      for (const f of names) s += await brightCount(join(dir, f));
      return s / names.length;
    };
    const yes = await mean('yes');
    const no = await mean('no');
    expect(no).toBeGreaterThan(300); // the skull ring
    expect(yes - no).toBeGreaterThan(100); // plus the tumour blob
  });

  it('is deterministic: same seed, same bytes; another seed, other bytes', async () => {
    const outB = join(tmp, 'b');
    await synthesize({ out: outB, seed: 42 });
    expect(await treeHashes(outB)).toEqual(await treeHashes(outA));

    // A patient's bytes depend on the seed and its index, not on how many others are generated.
    const outC = join(tmp, 'c');
    await synthesize({ out: outC, seed: 42, patients: 1, kaggleYes: 1, kaggleNo: 0 });
    const id = 'BraTS20_Training_001';
    for (const m of MODS) {
      const f = `${id}/${id}_${m}.nii.gz`;
      expect((await readFile(join(outC, 'brats', f))).equals(await readFile(join(outA, 'brats', f)))).toBe(true);
    }

    const outD = join(tmp, 'd');
    await synthesize({ out: outD, seed: 7, patients: 1, kaggleYes: 1, kaggleNo: 1 });
    for (const m of MODS) {
      const f = `${id}/${id}_${m}.nii.gz`;
      expect((await readFile(join(outD, 'brats', f))).equals(await readFile(join(outA, 'brats', f)))).toBe(false);
    }
    expect((await readFile(join(outD, 'kaggle/yes/Y001.jpg'))).equals(await readFile(join(outA, 'kaggle/yes/Y001.jpg')))).toBe(false);
  });

  it('re-running into a labelled directory replaces the old synthetic data', async () => {
    const out = join(tmp, 'rerun');
    await synthesize({ out, patients: 3, kaggleYes: 2, kaggleNo: 2, size: [32, 32, 16] });
    await synthesize({ out, patients: 1, kaggleYes: 1, kaggleNo: 0, size: [32, 32, 16] });
    expect(await readdir(join(out, 'brats'))).toEqual(['BraTS20_Training_001']);
    expect(await readdir(join(out, 'kaggle/yes'))).toEqual(['Y001.jpg']);
    expect(await readdir(join(out, 'kaggle/no'))).toEqual([]);
  });

  it('refuses to mix synthetic data into a directory that holds other data', async () => {
    const out = join(tmp, 'real');
    await mkdir(join(out, 'brats', 'BraTS20_Training_001'), { recursive: true });
    await writeFile(join(out, 'brats', 'BraTS20_Training_001', 'x.nii.gz'), 'real');
    await expect(synthesize({ out, patients: 1 })).rejects.toMatchObject({ status: 409, code: 'synth_out_not_empty' });
    expect(await readFile(join(out, 'brats', 'BraTS20_Training_001', 'x.nii.gz'), 'utf8')).toBe('real');
  });

  it('rejects bad options with 400', async () => {
    const bad: Array<Partial<SynthOptions>> = [{ patients: -1 }, { patients: 1.5 }, { size: [96, 96, 2] }, { kaggleSize: 8 }, { seed: -3 }];
    for (const o of bad) {
      await expect(synthesize({ out: join(tmp, 'bad'), ...o })).rejects.toMatchObject({ status: 400, code: 'bad_synth_options' });
    }
  });
});

describe('encodeNifti', () => {
  it('encodes uint8 and float32 with the right datatype, scaling and voxel order', () => {
    const dims: [number, number, number] = [3, 2, 2];
    const u8 = Uint8Array.from({ length: 12 }, (_, i) => i * 10);
    const a = encodeNifti(u8, dims, { pixdim: [0.5, 0.5, 2], sclSlope: 2, sclInter: -1 });
    expect(a.length).toBe(352 + 12);
    expect(a.readInt16LE(70)).toBe(2);
    expect(a.readInt16LE(72)).toBe(8);
    expect(a.readFloatLE(80)).toBe(0.5);
    expect(a.readFloatLE(88)).toBe(2);
    expect(a.readFloatLE(112)).toBe(2);
    expect(a.readFloatLE(116)).toBe(-1);
    expect([...a.subarray(352)]).toEqual([...u8]);

    const f32 = Float32Array.from({ length: 12 }, (_, i) => i / 4 - 1);
    const b = encodeNifti(f32, dims);
    expect(b.readInt16LE(70)).toBe(16);
    expect(b.readInt16LE(72)).toBe(32);
    // x fastest: voxel (x=2, y=1, z=1) is index 2 + 1*3 + 1*6 = 11.
    expect(b.readFloatLE(352 + 11 * 4)).toBe(f32[11]);
    const ab = b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength) as ArrayBuffer;
    const h = niftiReader.readHeader(ab)!;
    expect(h.dims.slice(0, 4)).toEqual([3, 3, 2, 2]);
    expect(Array.from(new Float32Array(niftiReader.readImage(h, ab)))).toEqual(Array.from(f32));
  });

  it('rejects a length that does not match the dims', () => {
    expect(() => encodeNifti(new Int16Array(5), [2, 2, 2])).toThrow(/5 voxels given/);
  });
});
