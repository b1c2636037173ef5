import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { gunzipSync, gzipSync } from 'node:zlib';
import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { niftiHeaderBytes, parseNiftiRaw, readNifti, readNiftiRaw } from '../src/imaging/nifti.js';
import { encodeLabelsLike, writeLabelsLike } from '../src/imaging/nifti-write.js';
import { allocNpy, decodeNpy, encodeNpy, openNpyRows, readNpy } from '../src/imaging/npy.js';
import { DataFileError } from '../src/lib/errors.js';
import { encodeNifti, encodeNifti2, writeNifti, type NiftiDatatype, type NiftiSpec } from './helpers/nifti-writer.js';
import { compareWithNibabel, indexSums, nibabelMissing } from './helpers/nibabel.js';

const here = path.dirname(fileURLToPath(import.meta.url));
const FIXTURES = process.env.SLICEWISE_FIXTURES ?? path.resolve(here, '../../shared/fixtures');
const BRATS = path.join(FIXTURES, 'brats2015-deepmedic');

let tmp: string;
beforeAll(async () => {
  tmp = await mkdtemp(path.join(tmpdir(), 'slicewise-nifti-'));
});
afterAll(async () => {
  await rm(tmp, { recursive: true, force: true });
});

/** Expect `p` to reject with a DataFileError for `file` whose reason matches `reason`. */
async function expectDataFileError(p: Promise<unknown>, file: string, reason: RegExp | string): Promise<DataFileError> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(DataFileError);
  const e = err as DataFileError;
  expect(e.file).toBe(file);
  expect(e.message).toContain(file);
  if (typeof reason === 'string') expect(e.details?.reason).toContain(reason);
  else expect(String(e.details?.reason)).toMatch(reason);
  expect(e.status).toBe(422);
  return e;
}

/** Per axial slice (last axis), the number of voxels with label > 0. */
function tumourPerSlice(data: Float32Array, dims: [number, number, number]): number[] {
  const plane = dims[0] * dims[1];
  const out: number[] = [];
  for (let z = 0; z < dims[2]; z++) {
    let c = 0;
    for (let i = z * plane; i < (z + 1) * plane; i++) if (data[i] > 0) c++;
    out.push(c);
  }
  return out;
}

describe('readNifti on the real BraTS 2015 fixtures', () => {
  it.each([
    ['pat0001', 74, 69],
    ['pat0005', 76, 70],
  ])('%s: geometry and tumour slice counts match nibabel', async (pat, withTumour, atLeast100) => {
    const seg = await readNifti(path.join(BRATS, pat, 'OTMultiClass.nii.gz'));
    expect(seg.dims).toEqual([240, 240, 155]);
    expect(seg.pixdim).toEqual([1, 1, 1]);
    expect(seg.datatype).toBe('float32');
    expect(seg.data).toBeInstanceOf(Float32Array);
    expect(seg.data.length).toBe(240 * 240 * 155);
    const counts = tumourPerSlice(seg.data, seg.dims);
    expect(counts.filter((c) => c > 0).length).toBe(withTumour);
    expect(counts.filter((c) => c >= 100).length).toBe(atLeast100);
    const labels = new Set(seg.data);
    for (const l of labels) expect([0, 1, 2, 3, 4]).toContain(l);

    const flair = await readNifti(path.join(BRATS, pat, 'Flair_subtrMeanDivStd.nii.gz'));
    expect(flair.dims).toEqual([240, 240, 155]);
    expect(flair.pixdim).toEqual([1, 1, 1]);
    expect(flair.data.every(Number.isFinite)).toBe(true);
  });

  it('applies scl_slope/scl_inter of the int32 brain mask', async () => {
    const file = path.join(BRATS, 'pat0001', 'brainmask.nii.gz');
    const mask = await readNifti(file);
    expect(mask.datatype).toBe('int32');
    expect(mask.dims).toEqual([240, 240, 155]);
    let inside = 0;
    let outside = 0;
    let max = -Infinity;
    for (const v of mask.data) {
      if (v > 0.5) inside++;
      else outside++;
      if (v > max) max = v;
    }
    // nibabel reads ~0.99999997 inside the brain: raw int32 values times a tiny slope plus 0.5, not the raw ints.
    expect(max).toBeCloseTo(0.99999997, 6);
    expect(Math.min(...new Set(mask.data))).toBeCloseTo(0, 6);
    expect(inside).toBeGreaterThan(100_000);
    expect(outside).toBeGreaterThan(inside);
    const raw = await readNiftiRaw(file);
    expect(raw.slope).not.toBe(1);
    expect(raw.raw).toBeInstanceOf(Int32Array);
  });

  it('reads a gzip file by its content, whatever its name', async () => {
    const gz = await readFile(path.join(BRATS, 'pat0001', 'OTMultiClass.nii.gz'));
    const misnamed = path.join(tmp, 'seg-really-gzipped.nii');
    await writeFile(misnamed, gz);
    const v = await readNifti(misnamed);
    expect(v.dims).toEqual([240, 240, 155]);
  });
});

describe('voxel axis codes (nibabel\'s aff2axcodes) and parseNiftiRaw', () => {
  const dims = [4, 3, 2];
  const data = Array.from({ length: 24 }, (_, i) => i);
  const codesOf = async (name: string, geometry: Pick<NiftiSpec, 'sform' | 'qform'>): Promise<string | null> => {
    const file = path.join(tmp, `axes-${name}.nii`);
    await writeNifti(file, { dims, datatype: 'int16', data, ...geometry });
    return (await readNiftiRaw(file)).axisCodes;
  };
  const rotZ = (deg: number): number[][] => {
    const [c, s] = [Math.cos((deg * Math.PI) / 180), Math.sin((deg * Math.PI) / 180)];
    return [
      [c, -s, 0, 0],
      [s, c, 0, 0],
      [0, 0, 1, 0],
    ];
  };

  it('reads LPS from the BraTS 2015 fixtures, whose segmentation has qform code 2 and sform code 1', async () => {
    for (const f of ['Flair_subtrMeanDivStd.nii.gz', 'OTMultiClass.nii.gz']) {
      expect((await readNiftiRaw(path.join(BRATS, 'pat0001', f))).axisCodes).toBe('LPS');
    }
  });

  it('takes the sform when its code is set, else the qform, else null', async () => {
    expect(await codesOf('default', {})).toBe('RAS');
    expect(await codesOf('none', { sform: { code: 0 } })).toBeNull();
    // Both set: nibabel uses the sform even when the qform code is higher (nifti-reader-js's affine would not).
    const flipXY = [
      [-1, 0, 0, 3],
      [0, -1, 0, 2],
      [0, 0, 1, 0],
    ];
    expect(await codesOf('both', { sform: { code: 1, srow: flipXY }, qform: { code: 2 } })).toBe('LPS');
    // qform alone: 180 degrees about z is the quaternion (0, 0, 1); qfac -1 flips k.
    expect(await codesOf('qform', { sform: { code: 0 }, qform: { code: 1, quatern: [0, 0, 1] } })).toBe('LPS');
    expect(await codesOf('qfac', { sform: { code: 0 }, qform: { code: 1, quatern: [0, 0, 1], qfac: -1 } })).toBe('LPI');
  });

  it('names permuted and oblique axes as nibabel does', async () => {
    const permuted = [
      [0, 2, 0, 0],
      [1.5, 0, 0, 0],
      [0, 0, -1, 0],
    ];
    expect(await codesOf('permuted', { sform: { code: 1, srow: permuted } })).toBe('ARI');
    expect(await codesOf('rot30', { sform: { code: 1, srow: rotZ(30) } })).toBe('RAS');
    // i points mostly anterior, j mostly left.
    expect(await codesOf('rot60', { sform: { code: 1, srow: rotZ(60) } })).toBe('ALS');
    expect(await codesOf('singular', { sform: { code: 1, srow: [[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]] } })).toBeNull();
  });

  it('parseNiftiRaw reads bytes in memory like readNiftiRaw reads the file, leaving the bytes unchanged', async () => {
    const file = path.join(BRATS, 'pat0001', 'OTMultiClass.nii.gz');
    const fromFile = await readNiftiRaw(file);
    const fromBytes = await parseNiftiRaw(await readFile(file), 'upload.nii.gz');
    expect({ ...fromBytes, raw: null }).toEqual({ ...fromFile, raw: null });
    expect(Buffer.from(fromBytes.raw.buffer, fromBytes.raw.byteOffset, fromBytes.raw.byteLength).equals(
      Buffer.from(fromFile.raw.buffer, fromFile.raw.byteOffset, fromFile.raw.byteLength),
    )).toBe(true);
    const bigEndian = encodeNifti({ dims, datatype: 'int16', data, bigEndian: true });
    const copy = Buffer.from(bigEndian);
    expect(Array.from((await parseNiftiRaw(bigEndian)).raw)).toEqual(data);
    expect(bigEndian.equals(copy)).toBe(true);
    await expectDataFileError(parseNiftiRaw(Buffer.from('not a volume'), 'upload.nii'), 'upload.nii', /not a NIfTI file/);
  });
});

describe('readNifti on small volumes written here', () => {
  const dims = [4, 3, 2];
  const n = 24;
  const ramp = (f: (i: number) => number): number[] => Array.from({ length: n }, (_, i) => f(i));

  const cases: [NiftiDatatype, number[]][] = [
    ['uint8', ramp((i) => i * 10)],
    ['int8', ramp((i) => i * 5 - 60)],
    ['int16', ramp((i) => i * 1000 - 12000)],
    ['uint16', ramp((i) => i * 2700)],
    ['int32', ramp((i) => i * 100000 - 1_000_000)],
    ['uint32', ramp((i) => i * 100000)],
    ['float32', ramp((i) => i * 0.25 - 3)],
    ['float64', ramp((i) => i / 3 - 2)],
  ];

  for (const [datatype, values] of cases) {
    for (const bigEndian of [false, true]) {
      for (const gzip of [false, true]) {
        it(`${datatype}, ${bigEndian ? 'big' : 'little'}-endian, ${gzip ? '.nii.gz' : '.nii'}`, async () => {
          const file = path.join(tmp, `${datatype}-${bigEndian ? 'be' : 'le'}.nii${gzip ? '.gz' : ''}`);
          await writeNifti(file, { dims, datatype, data: values, bigEndian, gzip, pixdim: [0.9, 1.1, 2.5] });
          const v = await readNifti(file);
          expect(v.dims).toEqual([4, 3, 2]);
          expect(v.pixdim[0]).toBeCloseTo(0.9, 6);
          expect(v.pixdim[1]).toBeCloseTo(1.1, 6);
          expect(v.pixdim[2]).toBeCloseTo(2.5, 6);
          expect(v.datatype).toBe(datatype);
          expect(v.data).toBeInstanceOf(Float32Array);
          expect(Array.from(v.data)).toEqual(values.map((x) => Math.fround(x)));
        });
      }
    }
  }

  it('keeps file order: x fastest, then y, then z', async () => {
    const file = path.join(tmp, 'order.nii');
    // value = 100 z + 10 y + x
    const data: number[] = [];
    for (let z = 0; z < 2; z++) for (let y = 0; y < 3; y++) for (let x = 0; x < 4; x++) data.push(100 * z + 10 * y + x);
    await writeNifti(file, { dims, datatype: 'int16', data });
    const v = await readNifti(file);
    expect(v.data[1]).toBe(1);
    expect(v.data[4]).toBe(10);
    expect(v.data[12]).toBe(100);
    expect(v.data[3 + 4 * 2 + 12 * 1]).toBe(123);
  });

  it('applies scl_slope and scl_inter', async () => {
    const file = path.join(tmp, 'scaled.nii.gz');
    await writeNifti(file, { dims, datatype: 'int16', data: ramp((i) => i), sclSlope: 0.5, sclInter: 10, gzip: true });
    const v = await readNifti(file);
    expect(Array.from(v.data)).toEqual(ramp((i) => i * 0.5 + 10));
  });

  it('applies an intercept alone (slope 1, inter non-zero) and ignores slope 0', async () => {
    const a = path.join(tmp, 'inter-only.nii');
    await writeNifti(a, { dims, datatype: 'uint8', data: ramp((i) => i), sclSlope: 1, sclInter: -5 });
    expect(Array.from((await readNifti(a)).data)).toEqual(ramp((i) => i - 5));
    const b = path.join(tmp, 'slope-zero.nii');
    await writeNifti(b, { dims, datatype: 'uint8', data: ramp((i) => i), sclSlope: 0, sclInter: 7 });
    expect(Array.from((await readNifti(b)).data)).toEqual(ramp((i) => i));
  });

  it('scales float32 data too, and int32 in double precision', async () => {
    const a = path.join(tmp, 'scaled-f32.nii');
    await writeNifti(a, { dims, datatype: 'float32', data: ramp((i) => i), sclSlope: 2, sclInter: 1 });
    expect(Array.from((await readNifti(a)).data)).toEqual(ramp((i) => 2 * i + 1));
    const b = path.join(tmp, 'scaled-i32.nii');
    // 2^31 - 1 - i times 2^-31 is just under 1; converting the int to float32 first would round it to 2^31 first.
    await writeNifti(b, { dims, datatype: 'int32', data: ramp((i) => 2147483647 - i), sclSlope: 2 ** -31 });
    const v = await readNifti(b);
    for (let i = 0; i < n; i++) expect(v.data[i]).toBe(Math.fround((2147483647 - i) * 2 ** -31));
  });

  it('accepts a 4-D file with one volume and a 2-D image', async () => {
    const a = path.join(tmp, 'four-d-one.nii');
    await writeNifti(a, { dims: [4, 3, 2, 1], datatype: 'int16', data: ramp((i) => i) });
    expect((await readNifti(a)).dims).toEqual([4, 3, 2]);
    const b = path.join(tmp, 'two-d.nii');
    await writeNifti(b, { dims: [6, 4], datatype: 'uint8', data: Array.from({ length: 24 }, (_, i) => i) });
    const v = await readNifti(b);
    expect(v.dims).toEqual([6, 4, 1]);
    expect(v.data.length).toBe(24);
  });

  it('rejects a real 4-D volume', async () => {
    const file = path.join(tmp, 'four-d.nii.gz');
    await writeNifti(file, { dims: [4, 3, 2, 2], datatype: 'int16', data: Array.from({ length: 48 }, (_, i) => i), gzip: true });
    await expectDataFileError(readNifti(file), file, /4-D volume \(4x3x2x2\) where a 3-D volume was expected/);
  });
});

describe('readNifti from a named pipe, and from a device', () => {
  // Why it is read without blocking (a worker's forced stop must not hang on it) is test/faults/signals.faults.ts's.
  it('reads a volume that a writer streams into a FIFO after the read began', async () => {
    const file = path.join(tmp, 'streamed.nii.gz');
    execFileSync('mkfifo', [file]);
    const data = Uint8Array.from({ length: 40 * 40 * 30 }, (_, i) => i % 251);
    const bytes = gzipSync(encodeNifti({ dims: [40, 40, 30], datatype: 'uint8', data }));
    const reading = readNiftiRaw(file);
    await new Promise((r) => setTimeout(r, 300));
    await writeFile(file, bytes);
    const v = await reading;
    expect(v.dims).toEqual([40, 40, 30]);
    expect(Buffer.from(v.raw.buffer, v.raw.byteOffset, v.raw.byteLength).equals(Buffer.from(data))).toBe(true);
  });

  it('a device is refused naming it', async () => {
    await expectDataFileError(readNifti('/dev/zero'), '/dev/zero', /not a regular file/);
  });
});

describe('readNifti errors', () => {
  it('missing file', async () => {
    const file = path.join(tmp, 'nope.nii.gz');
    await expectDataFileError(readNifti(file), file, 'file not found');
  });

  it('not a NIfTI file (plain bytes, and too short)', async () => {
    const a = path.join(tmp, 'random.nii');
    await writeFile(a, Buffer.concat([Buffer.from([0x50, 0x4b]), randomBytes(2000)]));
    await expectDataFileError(readNifti(a), a, 'not a NIfTI file');
    const b = path.join(tmp, 'short.nii');
    await writeFile(b, Buffer.from('hello'));
    await expectDataFileError(readNifti(b), b, /not a NIfTI file: only 5 bytes/);
  });

  it('a decompression bomb: a small .nii.gz that inflates far past what its header declares fails at once', async () => {
    // An 8 x 8 x 8 uint8 header, followed by 256 MiB of zeros: about 250 KB gzipped.
    const honest = encodeNifti({ dims: [8, 8, 8], datatype: 'uint8', data: new Uint8Array(512) });
    const bomb = gzipSync(Buffer.concat([honest, Buffer.alloc(256 * 1024 * 1024)]), { level: 9 });
    expect(bomb.length).toBeLessThan(1024 * 1024);
    const before = process.memoryUsage().arrayBuffers;
    await expect(parseNiftiRaw(bomb, 'bomb.nii.gz')).rejects.toThrow(/bomb\.nii\.gz: inflates to more than its header declares \(864 bytes\)/);
    // It stopped near the declared size instead of inflating the quarter gigabyte.
    expect(process.memoryUsage().arrayBuffers - before).toBeLessThan(64 * 1024 * 1024);
    // A header that declares an impossible size is refused before inflating anything.
    const huge = Buffer.from(honest);
    for (const [k, v] of [[1, 32000], [2, 32000], [3, 32000]]) huge.writeInt16LE(v!, 40 + 2 * k!);
    await expect(parseNiftiRaw(gzipSync(huge), 'huge.nii.gz')).rejects.toThrow(/huge\.nii\.gz: its header declares \d+ MiB of voxels/);
  });

  it('corrupt gzip (random bytes after the gzip magic)', async () => {
    const file = path.join(tmp, 'corrupt.nii.gz');
    await writeFile(file, Buffer.concat([Buffer.from([0x1f, 0x8b, 0x08, 0x00, 0, 0, 0, 0, 0, 0x03]), randomBytes(4096)]));
    await expectDataFileError(readNifti(file), file, /^gzip data is corrupt or truncated: /);
  });

  it('gzip stream cut in half (real fixture)', async () => {
    const gz = await readFile(path.join(BRATS, 'pat0001', 'Flair_subtrMeanDivStd.nii.gz'));
    const file = path.join(tmp, 'flair-half.nii.gz');
    await writeFile(file, gz.subarray(0, gz.length >> 1));
    await expectDataFileError(readNifti(file), file, /^gzip data is corrupt or truncated: /);
  });

  it('truncated voxel data, uncompressed and inside a valid gzip', async () => {
    const full = encodeNifti({ dims: [240, 240, 155], datatype: 'int16', data: new Int16Array(240 * 240 * 155) });
    const cut = full.subarray(0, 352 + 1000);
    const a = path.join(tmp, 'truncated.nii');
    await writeFile(a, cut);
    await expectDataFileError(readNifti(a), a, 'truncated: header says 240x240x155 int16 (17856000 bytes) but only 1000 bytes of voxel data');
    const b = path.join(tmp, 'truncated.nii.gz');
    await writeFile(b, gzipSync(cut));
    await expectDataFileError(readNifti(b), b, 'truncated: header says 240x240x155 int16 (17856000 bytes) but only 1000 bytes of voxel data');
  });

  it('unsupported datatype', async () => {
    const file = path.join(tmp, 'rgb.nii');
    await writeNifti(file, { dims: [2, 2, 1], datatype: 'uint8', data: [1, 2, 3, 4], datatypeCodeOverride: 128 });
    await expectDataFileError(readNifti(file), file, /^unsupported datatype code 128 \(RGB\)/);
  });

  it('a directory instead of a file', async () => {
    await expectDataFileError(readNifti(tmp), tmp, /is a directory/);
  });

  it('values past float32 after scaling (int16 with scl_slope 3e38), or stored so (float64), name the values', async () => {
    const slope = path.join(tmp, 'slope3e38.nii.gz');
    await writeNifti(slope, { dims: [4, 3, 2], datatype: 'int16', data: Array.from({ length: 24 }, (_, i) => i - 5), sclSlope: 3e38, gzip: true });
    await expectDataFileError(readNiftiRaw(slope), slope, /^scl_slope 3\.0000000\d*e\+38 and scl_inter 0 scale the stored values \[-5, 18\] to \[-1\.5\d*e\+39, 5\.4\d*e\+39\], not finite in float32/);
    const wide = path.join(tmp, 'float64-1e39.nii');
    await writeNifti(wide, { dims: [2, 2, 1], datatype: 'float64', data: [0, 1, 2, 1e39] });
    await expectDataFileError(readNifti(wide), wide, 'the stored values span [0, 1e+39], not finite in float32');
    // At the edge of the range they read, and the scaling is applied.
    await writeNifti(slope, { dims: [2, 1, 1], datatype: 'int16', data: [-1, 1], sclSlope: 3.4e38, gzip: true });
    expect(Array.from((await readNifti(slope)).data)).toEqual([Math.fround(-3.4e38), Math.fround(3.4e38)]);
  });

  it('a valid scl_slope with a non-finite scl_inter is refused as nibabel refuses it; with no slope the intercept is ignored', async () => {
    const file = path.join(tmp, 'inter-nan.nii');
    await writeNifti(file, { dims: [2, 2, 1], datatype: 'int16', data: [1, 2, 3, 4], sclSlope: 2, sclInter: NaN });
    await expectDataFileError(readNifti(file), file, 'invalid header: scl_slope is 2 but scl_inter is NaN');
    await writeNifti(file, { dims: [2, 2, 1], datatype: 'int16', data: [1, 2, 3, 4], sclSlope: 0, sclInter: Infinity });
    expect(Array.from((await readNifti(file)).data)).toEqual([1, 2, 3, 4]);
  });

  it('a NIfTI-2 file cut inside its 540-byte header (found by the fuzz pass: the library read past the end)', async () => {
    const file = path.join(tmp, 'nifti2-cut.nii');
    await writeFile(file, encodeNifti2({ dims: [2, 2, 2], datatype: 'int16', data: [1, 2, 3, 4, 5, 6, 7, 8] }).subarray(0, 400));
    await expectDataFileError(readNifti(file), file, 'truncated: only 400 bytes, a NIfTI-2 header alone is 540');
  });

  it('a magic whose 4th byte is not NUL (found by the fuzz pass: read, then refused by the header copier of predict)', async () => {
    const file = path.join(tmp, 'magic-at.nii');
    const bytes = encodeNifti({ dims: [2, 2, 1], datatype: 'uint8', data: [1, 2, 3, 4] });
    bytes[347] = 0x40;
    await writeFile(file, bytes);
    await expectDataFileError(readNifti(file), file, 'not a NIfTI file: its magic is "n+1@", expected "n+1\\0"');
  });

  it('a voxel size that is not a number (it would be null in meta.json)', async () => {
    const file = path.join(tmp, 'pixdim-nan.nii');
    await writeNifti(file, { dims: [2, 2, 2], datatype: 'uint8', data: [1, 2, 3, 4, 5, 6, 7, 8], pixdim: [1, NaN, 1] });
    await expectDataFileError(readNifti(file), file, 'invalid header: pixdim[2] (voxel size) is NaN');
  });

  it('a .nii.gz with a NaN vox_offset, or a bitpix smaller than its datatype, reads as the plain file does', async () => {
    // The inflation limit is computed from the header; it must read the fields as the decoder does (vox_offset NaN
    // means "after the header"; the datatype, not bitpix, sizes a voxel), or it refuses a good file as a bomb.
    const data = Float32Array.from({ length: 128 * 128 * 24 }, (_, i) => (i % 1000) / 7);
    const plain = encodeNifti({ dims: [128, 128, 24], datatype: 'float32', data });
    plain.writeFloatLE(NaN, 108);
    plain.writeInt16LE(8, 72);
    const file = path.join(tmp, 'nan-offset-bitpix8.nii.gz');
    await writeFile(file, gzipSync(plain));
    const v = await readNifti(file);
    expect(v.dims).toEqual([128, 128, 24]);
    expect(v.data).toEqual(data);
  });
});

describe('npy', () => {
  it('round-trips float32 and uint8 arrays with the numpy header layout', () => {
    const f = Float32Array.from({ length: 24 }, (_, i) => i * 0.5 - 3);
    const buf = encodeNpy(f, [2, 3, 4]);
    expect(buf.subarray(0, 8)).toEqual(Buffer.from([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 1, 0]));
    const headerLen = buf.readUInt16LE(8);
    expect((10 + headerLen) % 64).toBe(0);
    const header = buf.toString('latin1', 10, 10 + headerLen);
    expect(header).toMatch(/^\{'descr': '<f4', 'fortran_order': False, 'shape': \(2, 3, 4\), \} *\n$/);
    expect(buf.length).toBe(10 + headerLen + 24 * 4);
    const back = decodeNpy(buf);
    expect(back.dtype).toBe('<f4');
    expect(back.shape).toEqual([2, 3, 4]);
    expect(back.data).toBeInstanceOf(Float32Array);
    expect(Array.from(back.data)).toEqual(Array.from(f));

    const u = Uint8Array.from([0, 1, 1, 0, 255]);
    const ub = encodeNpy(u, [5]);
    expect(ub.toString('latin1', 10, 10 + ub.readUInt16LE(8))).toContain("'descr': '|u1', 'fortran_order': False, 'shape': (5,), }");
    const uback = decodeNpy(ub);
    expect(uback.dtype).toBe('|u1');
    expect(uback.shape).toEqual([5]);
    expect(Array.from(uback.data)).toEqual([0, 1, 1, 0, 255]);
  });

  it('handles empty arrays and matches allocNpy byte for byte', () => {
    const empty = decodeNpy(encodeNpy(new Float32Array(0), [0, 256, 256]));
    expect(empty.shape).toEqual([0, 256, 256]);
    expect(empty.data.length).toBe(0);
    const a = allocNpy('float32', [3, 2]);
    a.data.set([1, 2, 3, 4, 5, 6]);
    expect(a.file.equals(encodeNpy(Float32Array.from([1, 2, 3, 4, 5, 6]), [3, 2]))).toBe(true);
    const m = allocNpy('uint8', [2, 2]);
    m.data.set([0, 1, 1, 0]);
    expect(m.file.equals(encodeNpy(Uint8Array.from([0, 1, 1, 0]), [2, 2]))).toBe(true);
  });

  it('refuses a shape that does not match the data', () => {
    expect(() => encodeNpy(new Float32Array(5), [2, 3])).toThrow(/holds 6 values but data has 5/);
  });

  it('reads files and reports bad ones as DataFileError', async () => {
    const file = path.join(tmp, 'a.npy');
    await writeFile(file, encodeNpy(Float32Array.from([1.5, -2]), [1, 2]));
    const v = await readNpy(file);
    expect(v.shape).toEqual([1, 2]);
    expect(Array.from(v.data)).toEqual([1.5, -2]);

    const truncated = path.join(tmp, 'truncated.npy');
    await writeFile(truncated, encodeNpy(new Float32Array(100), [10, 10]).subarray(0, 200));
    await expectDataFileError(readNpy(truncated), truncated, /^truncated: shape \(10, 10\) float32 needs 400 bytes/);
    const notNpy = path.join(tmp, 'not.npy');
    await writeFile(notNpy, 'hello world');
    await expectDataFileError(readNpy(notNpy), notNpy, /not a \.npy file/);
    const missing = path.join(tmp, 'missing.npy');
    await expectDataFileError(readNpy(missing), missing, 'file not found');
    expect(existsSync(missing)).toBe(false);
  });

  it('refuses a header length of 4 GiB (format 2.0) at once, whole-file and row readers alike', async () => {
    const good = encodeNpy(new Float32Array(2 * 3 * 4), [2, 3, 4]);
    // Format 2.0: a 4-byte length field; the dict moves 2 bytes on.
    const lying = Buffer.concat([good.subarray(0, 8), Buffer.from([0xff, 0xff, 0xff, 0xff]), good.subarray(10)]);
    lying[6] = 2;
    const file = path.join(tmp, 'header-4gib.npy');
    await writeFile(file, lying);
    const reason = '.npy header length 4294967295 is more than the 65535 bytes supported';
    await expectDataFileError(readNpy(file), file, reason);
    await expectDataFileError(openNpyRows(file), file, reason);
  });

  it('reads numpy-written headers (format 1.0, other spacing, big-endian float)', () => {
    const header = "{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }";
    const padded = header.padEnd(117, ' ') + '\n';
    const data = Buffer.alloc(8);
    data.writeFloatBE(1.25, 0);
    data.writeFloatBE(-7, 4);
    const pre = Buffer.from([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 1, 0, padded.length & 0xff, padded.length >> 8]);
    const v = decodeNpy(Buffer.concat([pre, Buffer.from(padded, 'latin1'), data]));
    expect(v.shape).toEqual([2]);
    expect(Array.from(v.data)).toEqual([1.25, -7]);
  });
});

describe('encodeLabelsLike: a segmentation in the geometry of its input', () => {
  // Distinct sizes and an asymmetric pattern, so that a swapped or flipped axis changes the index sums below.
  const dims = [7, 5, 4];
  const count = 7 * 5 * 4;
  const labels = Uint8Array.from({ length: count }, (_, p) => {
    const [i, j, k] = [p % 7, Math.floor(p / 7) % 5, Math.floor(p / 35)];
    return (i * 3 + j * 5 + k * 7) % 4 === 0 && i < 5 ? 1 : 0;
  });
  // Oblique and anisotropic: 30 degrees about z, voxels 0.9 x 1.1 x 2.5 mm, an offset; a different qform (code 2).
  const pixdim = [0.9, 1.1, 2.5];
  const [c, s] = [Math.cos(Math.PI / 6), Math.sin(Math.PI / 6)];
  const geometry: Pick<NiftiSpec, 'pixdim' | 'sform' | 'qform'> = {
    pixdim,
    sform: { code: 1, srow: [[c * 0.9, -s * 1.1, 0, -12.5], [s * 0.9, c * 1.1, 0, 30.25], [0, 0, 2.5, -7]] },
    qform: { code: 2, quatern: [0, 0, 1], qfac: -1 },
  };
  const data = Array.from({ length: count }, (_, p) => (p % 11) - 3);
  /** Header bytes encodeLabelsLike changes: datatype + bitpix, vox_offset + scl_slope + scl_inter, cal_max + cal_min, descrip. */
  const CHANGED = [[70, 74], [108, 120], [124, 132], [148, 228]];
  const changed = (o: number) => CHANGED.some(([a, b]) => o >= a && o < b);

  /** What nibabel says, each geometry field equal to the input's, and the labels where we put them. */
  function expectNibabelAgrees(input: string, output: string, endian: '<' | '>'): void {
    if (nibabelMissing) {
      console.log(`skipping the nibabel check of ${path.basename(output)}: ${nibabelMissing}`);
      return;
    }
    const r = compareWithNibabel(input, output);
    expect(r.output_shape).toEqual(r.input_shape);
    expect(r).toMatchObject({ affine_equal: true, pixdim_equal: true, qform_equal: true, sform_equal: true, output_dtype: 'uint8', output_endian: endian, output_sizeof_hdr: 348 });
    expect(r.qform_code[1]).toBe(r.qform_code[0]);
    expect(r.sform_code[1]).toBe(r.sform_code[0]);
    expect(r.xyzt_units[1]).toBe(r.xyzt_units[0]);
    expect(r.axcodes[1]).toEqual(r.axcodes[0]);
    expect(r.values).toEqual([0, 1]);
    expect({ ones: r.ones, index_sums: r.index_sums }).toEqual(indexSums(labels, dims));
    expect(r.descrip).toBe('SliceWise segmentation');
  }

  it('niftiHeaderBytes: the first 348 bytes of .nii and .nii.gz, inflating only the start', async () => {
    const gz = await readFile(path.join(BRATS, 'pat0001', 'Flair_subtrMeanDivStd.nii.gz'));
    const header = niftiHeaderBytes(gz, 'flair.nii.gz');
    expect(header.equals(gunzipSync(gz).subarray(0, 348))).toBe(true);
    const plain = encodeNifti({ dims, datatype: 'int16', data });
    expect(niftiHeaderBytes(plain).equals(plain.subarray(0, 348))).toBe(true);
    const two = encodeNifti2({ dims, datatype: 'int16', data, gzip: true });
    expect(niftiHeaderBytes(two).equals(gunzipSync(two).subarray(0, 540))).toBe(true);
    expect(() => niftiHeaderBytes(Buffer.from('not a volume at all'), 'x.nii')).toThrow(DataFileError);
    expect(() => niftiHeaderBytes(Buffer.from([0x1f, 0x8b, 8, 0, 1, 2, 3, 4, 5, 6, 7]), 'x.nii.gz')).toThrow(/x\.nii\.gz: (gzip data is corrupt|not a NIfTI)/);
  });

  it('copies a little-endian NIfTI-1 header byte for byte but for the label fields, and writes .nii.gz atomically', async () => {
    const input = path.join(tmp, 'labels-in-le.nii.gz');
    await writeNifti(input, { dims: [...dims, 1], datatype: 'float32', data, gzip: true, sclSlope: 2, sclInter: 1, ...geometry });
    const header = niftiHeaderBytes(await readFile(input), input);
    const out = encodeLabelsLike(header, labels);
    expect(out.length).toBe(352 + count);
    for (let o = 0; o < 348; o++) if (!changed(o)) expect(out[o], `header byte ${o}`).toBe(header[o]);
    expect(out.readInt16LE(70)).toBe(2); // uint8
    expect(out.readInt16LE(72)).toBe(8);
    expect([out.readFloatLE(108), out.readFloatLE(112), out.readFloatLE(116), out.readFloatLE(124), out.readFloatLE(128)]).toEqual([352, 1, 0, 1, 0]);
    expect(out.subarray(148, 228).toString('latin1').replace(/\0+$/, '')).toBe('SliceWise segmentation');
    expect(out.subarray(348, 352).equals(Buffer.alloc(4))).toBe(true); // no extensions
    expect(out.subarray(352).equals(labels)).toBe(true);

    const dir = path.join(tmp, 'labels-out');
    const output = path.join(dir, 'seg.nii.gz');
    await writeLabelsLike(output, header, labels);
    expect(gunzipSync(await readFile(output)).equals(out)).toBe(true);
    expect(await import('node:fs/promises').then((fs) => fs.readdir(dir))).toEqual(['seg.nii.gz']);
    const [a, b] = [await readNiftiRaw(input), await readNiftiRaw(output)];
    expect({ dims: b.dims, pixdim: b.pixdim, axisCodes: b.axisCodes, datatype: b.datatype }).toEqual({ dims: a.dims, pixdim: a.pixdim, axisCodes: a.axisCodes, datatype: 'uint8' });
    expect(a.axisCodes).toBe('RAS');
    expect(Array.from(b.raw)).toEqual(Array.from(labels));
    expectNibabelAgrees(input, output, '<');
  });

  it('keeps a big-endian header big-endian', async () => {
    const input = path.join(tmp, 'labels-in-be.nii');
    await writeNifti(input, { dims, datatype: 'int16', data, bigEndian: true, ...geometry });
    const header = niftiHeaderBytes(await readFile(input));
    const out = encodeLabelsLike(header, labels);
    expect(out.readInt32BE(0)).toBe(348);
    for (let o = 0; o < 348; o++) if (!changed(o)) expect(out[o], `header byte ${o}`).toBe(header[o]);
    expect([out.readInt16BE(70), out.readInt16BE(72), out.readFloatBE(108), out.readFloatBE(112)]).toEqual([2, 8, 352, 1]);
    const output = path.join(tmp, 'labels-out-be.nii');
    await writeLabelsLike(output, header, labels);
    const [a, b] = [await readNiftiRaw(input), await readNiftiRaw(output)];
    expect({ dims: b.dims, pixdim: b.pixdim, axisCodes: b.axisCodes }).toEqual({ dims: a.dims, pixdim: a.pixdim, axisCodes: a.axisCodes });
    expect(Array.from(b.raw)).toEqual(Array.from(labels));
    expectNibabelAgrees(input, output, '>');
  });

  it.each([false, true])('writes a NIfTI-2 input (big-endian: %s) as the equivalent NIfTI-1 image', async (bigEndian) => {
    const input = path.join(tmp, `labels-in-n2-${bigEndian ? 'be' : 'le'}.nii`);
    await writeFile(input, encodeNifti2({ dims, datatype: 'float32', data, bigEndian, ...geometry }));
    const header = niftiHeaderBytes(await readFile(input));
    expect(header.length).toBe(540);
    const out = encodeLabelsLike(header, labels);
    expect(bigEndian ? out.readInt32BE(0) : out.readInt32LE(0)).toBe(348);
    expect(out.subarray(344, 348).toString('latin1')).toBe('n+1\0');
    const output = path.join(tmp, `labels-out-n2-${bigEndian ? 'be' : 'le'}.nii.gz`);
    await writeLabelsLike(output, header, labels);
    const [a, b] = [await readNiftiRaw(input), await readNiftiRaw(output)];
    expect(b.dims).toEqual(a.dims);
    b.pixdim.forEach((v, i) => expect(v).toBeCloseTo(a.pixdim[i]!, 6));
    expect(b.axisCodes).toBe(a.axisCodes);
    expect(Array.from(b.raw)).toEqual(Array.from(labels));
    expectNibabelAgrees(input, output, bigEndian ? '>' : '<');
  });

  it('refuses what it cannot write, saying why', () => {
    const header = encodeNifti({ dims, datatype: 'int16', data }).subarray(0, 348);
    expect(() => encodeLabelsLike(header, labels.subarray(1))).toThrow('139 labels given for an input of 7 x 5 x 4 (= 140) voxels');
    expect(() => encodeLabelsLike(Buffer.from('hello world, not a header'), labels)).toThrow(/not a NIfTI header/);
    expect(() => encodeLabelsLike(header.subarray(0, 200), labels)).toThrow(/has 200 bytes, a NIfTI-1 header 348/);
    const wide = encodeNifti2({ dims: [40000, 1, 1], datatype: 'uint8', data: new Uint8Array(40000) }).subarray(0, 540);
    expect(() => encodeLabelsLike(wide, new Uint8Array(40000))).toThrow("the NIfTI-2 input's dim[1] is 40000, which a NIfTI-1 header cannot hold");
  });
});
