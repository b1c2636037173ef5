/**
 * The fuzz pass's targets (see fuzz-runner.ts, which loads this module only for the reader targets, so that its own
 * harness check starts fast): corpora built from the real fixtures and small written volumes, the mutations, and
 * per case the call and the checks of its outcome.
 */
import { existsSync } from 'node:fs';
import { mkdir, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { gunzipSync, gzipSync } from 'node:zlib';
import sharp from 'sharp';
import { preprocessPatient, readPatientVolumes, selectSlices, sliceMasks, volumeToSlices } from '../../src/imaging/brats.ts';
import { kaggleImageToInput } from '../../src/imaging/kaggle.ts';
import { niftiHeaderBytes, parseNiftiRaw, type RawNiftiVolume } from '../../src/imaging/nifti.ts';
import { encodeLabelsLike } from '../../src/imaging/nifti-write.ts';
import { decodeNpy, encodeNpy, openNpyRows, readNpy } from '../../src/imaging/npy.ts';
import { DataFileError, PatientDataError, SliceWiseError } from '../../src/lib/errors.ts';
import type { FuzzTarget, Target } from './fuzz-runner.ts';
import { encodeNifti, encodeNifti2 } from './nifti-writer.ts';

type Rng = () => number;
const int = (rng: Rng, n: number): number => Math.floor(rng() * n);
const pick = <T>(rng: Rng, xs: readonly T[]): T => xs[int(rng, xs.length)]!;

// ---------------------------------------------------------------------------------------------------------
// Generic byte mutations
// ---------------------------------------------------------------------------------------------------------

function randomBuffer(rng: Rng, n: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = int(rng, 256);
  return b;
}

/** One random byte-level mutation of `b` (never in place); `donors` feed splices. */
function mutateBytes(rng: Rng, b: Buffer, donors: readonly Buffer[], log: string[], protect = 0): Buffer {
  const len = b.length;
  const op = int(rng, 6);
  if (op === 0 || len === 0) {
    const out = Buffer.from(b);
    const k = 1 + int(rng, 8);
    for (let j = 0; j < k && len > 0; j++) {
      const bit = protect * 8 + int(rng, Math.max(1, (len - protect) * 8));
      if (bit >> 3 < len) out[bit >> 3]! ^= 1 << (bit & 7);
    }
    log.push(`flip ${k} bits`);
    return out;
  }
  if (op === 1) {
    // Truncations near the start, the header's end and the tail are the interesting ones.
    const at = pick(rng, [int(rng, len), int(rng, Math.min(len, 600)), len - 1 - int(rng, Math.min(len, 64)), Math.max(0, len - int(rng, 16))]);
    log.push(`truncate at ${at}/${len}`);
    return Buffer.from(b.subarray(0, Math.max(0, at)));
  }
  if (op === 2) {
    const donor = pick(rng, donors);
    const s = int(rng, donor.length);
    const n = 1 + int(rng, Math.min(2048, donor.length - s));
    const at = int(rng, len);
    const insert = rng() < 0.5;
    log.push(`splice ${n} donor bytes at ${at}${insert ? ' (insert)' : ''}`);
    const piece = donor.subarray(s, s + n);
    return insert ? Buffer.concat([b.subarray(0, at), piece, b.subarray(at)]) : Buffer.concat([b.subarray(0, at), piece, b.subarray(Math.min(len, at + n))]);
  }
  if (op === 3) {
    const out = Buffer.from(b);
    const s = protect + int(rng, Math.max(1, len - protect));
    const n = 1 + int(rng, Math.min(256, len - Math.min(s, len - 1)));
    const fill = pick(rng, ['zero', 'ones', 'random'] as const);
    for (let j = s; j < Math.min(len, s + n); j++) out[j] = fill === 'zero' ? 0 : fill === 'ones' ? 0xff : int(rng, 256);
    log.push(`overwrite ${n} bytes at ${s} with ${fill}`);
    return out;
  }
  if (op === 4) {
    const s = int(rng, len);
    const n = 1 + int(rng, Math.min(1024, len - s));
    log.push(`duplicate ${n} bytes at ${s}`);
    return Buffer.concat([b.subarray(0, s + n), b.subarray(s)]);
  }
  const n = int(rng, 4096);
  log.push(`replace with ${n} random bytes`);
  return randomBuffer(rng, n);
}

// ---------------------------------------------------------------------------------------------------------
// NIfTI
// ---------------------------------------------------------------------------------------------------------

type FieldType = 'i16' | 'i32' | 'i64' | 'f32' | 'f64' | 'bytes';
interface Field {
  name: string;
  off: number;
  type: FieldType;
}

const NIFTI1_FIELDS: Field[] = [
  { name: 'sizeof_hdr', off: 0, type: 'i32' },
  ...Array.from({ length: 8 }, (_, k) => ({ name: `dim[${k}]`, off: 40 + 2 * k, type: 'i16' as const })),
  { name: 'datatype', off: 70, type: 'i16' },
  { name: 'bitpix', off: 72, type: 'i16' },
  ...Array.from({ length: 8 }, (_, k) => ({ name: `pixdim[${k}]`, off: 76 + 4 * k, type: 'f32' as const })),
  { name: 'vox_offset', off: 108, type: 'f32' },
  { name: 'scl_slope', off: 112, type: 'f32' },
  { name: 'scl_inter', off: 116, type: 'f32' },
  { name: 'qform_code', off: 252, type: 'i16' },
  { name: 'sform_code', off: 254, type: 'i16' },
  ...Array.from({ length: 6 }, (_, k) => ({ name: `quatern/qoffset[${k}]`, off: 256 + 4 * k, type: 'f32' as const })),
  ...Array.from({ length: 12 }, (_, k) => ({ name: `srow[${k}]`, off: 280 + 4 * k, type: 'f32' as const })),
  { name: 'magic', off: 344, type: 'bytes' },
  { name: 'extension', off: 348, type: 'bytes' },
];

const NIFTI2_FIELDS: Field[] = [
  { name: 'sizeof_hdr', off: 0, type: 'i32' },
  { name: 'magic', off: 4, type: 'bytes' },
  { name: 'datatype', off: 12, type: 'i16' },
  { name: 'bitpix', off: 14, type: 'i16' },
  ...Array.from({ length: 8 }, (_, k) => ({ name: `dim[${k}]`, off: 16 + 8 * k, type: 'i64' as const })),
  ...Array.from({ length: 8 }, (_, k) => ({ name: `pixdim[${k}]`, off: 104 + 8 * k, type: 'f64' as const })),
  { name: 'vox_offset', off: 168, type: 'i64' },
  { name: 'scl_slope', off: 176, type: 'f64' },
  { name: 'scl_inter', off: 184, type: 'f64' },
  { name: 'qform_code', off: 344, type: 'i32' },
  { name: 'sform_code', off: 348, type: 'i32' },
  ...Array.from({ length: 12 }, (_, k) => ({ name: `srow[${k}]`, off: 400 + 8 * k, type: 'f64' as const })),
  { name: 'extension', off: 540, type: 'bytes' },
];

const DATATYPES = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304, 3, 17, -1, 32767];
const I16 = [0, 1, -1, 2, 3, 4, 7, 8, 9, 255, 256, 1000, 4096, 30000, 32767, -32768];
const I32 = [0, 348, 540, -1, 0x7fffffff, -0x80000000, 0x5c010000, 0x1c020000, 352, 1];
const I64 = [0n, 1n, -1n, 2n, 8n, 352n, 544n, 2n ** 31n, 2n ** 32n + 5n, 2n ** 53n, 2n ** 62n, -(2n ** 63n), 2n ** 63n - 1n, 100000n];
const FLOATS = [0, 1, -1, NaN, Infinity, -Infinity, 3e38, -3e38, 3.4028234663852886e38, 1.4e-45, 1e30, 0.5, 352, 1e10, 2 ** 31, 348, 3e-39, -0];

function mutateField(rng: Rng, hdr: Buffer, fields: readonly Field[], log: string[]): void {
  const le = hdr.readInt32LE(0) === 348 || hdr.readInt32LE(0) === 540;
  const f = pick(rng, fields);
  const rnd = rng() < 0.15;
  switch (f.type) {
    case 'i16': {
      const v = f.name === 'datatype' ? pick(rng, DATATYPES) : rnd ? int(rng, 65536) - 32768 : pick(rng, I16);
      if (le) hdr.writeInt16LE(v, f.off);
      else hdr.writeInt16BE(v, f.off);
      log.push(`${f.name}=${v}`);
      return;
    }
    case 'i32': {
      const v = rnd ? int(rng, 2 ** 32) - 2 ** 31 : pick(rng, I32);
      if (le) hdr.writeInt32LE(v, f.off);
      else hdr.writeInt32BE(v, f.off);
      log.push(`${f.name}=${v}`);
      return;
    }
    case 'i64': {
      const v = rnd ? BigInt(int(rng, 2 ** 40)) - 2n ** 39n : pick(rng, I64);
      if (le) hdr.writeBigInt64LE(v, f.off);
      else hdr.writeBigInt64BE(v, f.off);
      log.push(`${f.name}=${v}`);
      return;
    }
    case 'f32':
    case 'f64': {
      const v = rnd ? (rng() - 0.5) * 10 ** int(rng, 40) : pick(rng, FLOATS);
      if (f.type === 'f32') {
        if (le) hdr.writeFloatLE(v, f.off);
        else hdr.writeFloatBE(v, f.off);
      } else if (le) hdr.writeDoubleLE(v, f.off);
      else hdr.writeDoubleBE(v, f.off);
      log.push(`${f.name}=${v}`);
      return;
    }
    case 'bytes': {
      if (f.name === 'magic') {
        const m = pick(rng, ['n+1\0', 'ni1\0', 'n+2\0', 'n+2\0\r\n\x1a\n', 'xyz\0', '\0\0\0\0']);
        hdr.write(m, f.off, 'latin1');
        log.push(`magic=${JSON.stringify(m)}`);
      } else {
        // An extension: flag byte 1, then esize (a multiple of 16, or a lie) and ecode.
        if (f.off + 12 > hdr.length) return;
        hdr[f.off] = 1;
        const esize = pick(rng, [0, 8, 16, 32, 1 << 20, -16, 17, 0x7ffffff0]);
        if (le) hdr.writeInt32LE(esize, f.off + 4);
        else hdr.writeInt32BE(esize, f.off + 4);
        log.push(`extension esize=${esize}`);
      }
    }
  }
}

/** A small real volume: the fixture's own header (geometry, scaling) with a crop of its voxels. */
function cropReal(plain: Buffer, box: [number, number, number]): Buffer {
  const h = Buffer.from(plain.subarray(0, 352));
  const [nx, ny] = [h.readInt16LE(42), h.readInt16LE(44)];
  const bpv = h.readInt16LE(72) / 8;
  const voxOffset = Math.floor(h.readFloatLE(108));
  const [cx, cy, cz] = box;
  const [x0, y0, z0] = [100, 90, 70];
  const out = Buffer.alloc(352 + cx * cy * cz * bpv);
  h.copy(out, 0);
  out.writeInt16LE(3, 40);
  out.writeInt16LE(cx, 42);
  out.writeInt16LE(cy, 44);
  out.writeInt16LE(cz, 46);
  out.writeFloatLE(352, 108);
  out.fill(0, 348, 352);
  let o = 352;
  for (let z = 0; z < cz; z++) {
    for (let y = 0; y < cy; y++) {
      const src = voxOffset + (x0 + nx * (y0 + y + ny * (z0 + z))) * bpv;
      plain.copy(out, o, src, src + cx * bpv);
      o += cx * bpv;
    }
  }
  return out;
}

interface NiftiBase {
  name: string;
  /** Uncompressed .nii bytes. */
  plain: Buffer;
  nifti2: boolean;
}

async function niftiCorpus(fixtures: string): Promise<NiftiBase[]> {
  const pat = join(fixtures, 'brats2015-deepmedic', 'pat0001');
  const real = await Promise.all(
    ['Flair_subtrMeanDivStd.nii.gz', 'OTMultiClass.nii.gz', 'brainmask.nii.gz'].map(async (f) => ({ f, plain: gunzipSync(await readFile(join(pat, f))) })),
  );
  const bases: NiftiBase[] = real.map(({ f, plain }) => ({ name: `real ${f} crop`, plain: cropReal(plain, [24, 20, 6]), nifti2: false }));
  const dims = [12, 10, 6];
  const n = 720;
  const ramp = Array.from({ length: n }, (_, i) => (i * 37) % 101);
  const labels = Array.from({ length: n }, (_, i) => (i % 7 === 0 ? 1 + (i % 4) : 0));
  bases.push(
    { name: 'int16 slope 2 inter -5', plain: encodeNifti({ dims, datatype: 'int16', data: ramp, sclSlope: 2, sclInter: -5 }), nifti2: false },
    { name: 'uint8 labels', plain: encodeNifti({ dims, datatype: 'uint8', data: labels }), nifti2: false },
    { name: 'float32 big-endian', plain: encodeNifti({ dims, datatype: 'float32', data: ramp.map((v) => v / 3), bigEndian: true }), nifti2: false },
    { name: 'float64', plain: encodeNifti({ dims, datatype: 'float64', data: ramp }), nifti2: false },
    { name: 'uint16 4-D t=1', plain: encodeNifti({ dims: [...dims, 1], datatype: 'uint16', data: ramp }), nifti2: false },
    { name: 'int32 qform', plain: encodeNifti({ dims, datatype: 'int32', data: ramp, sform: { code: 0 }, qform: { code: 1, quatern: [0, 0, 1], qfac: -1 } }), nifti2: false },
    { name: 'nifti2 int16', plain: encodeNifti2({ dims, datatype: 'int16', data: ramp }), nifti2: true },
    { name: 'nifti2 float32 big-endian slope', plain: encodeNifti2({ dims, datatype: 'float32', data: ramp, bigEndian: true, sclSlope: 0.5, sclInter: 1 }), nifti2: true },
  );
  return bases;
}

const BYTES_PER_VOXEL: Record<number, number> = { 2: 1, 256: 1, 4: 2, 512: 2, 8: 4, 768: 4, 16: 4, 64: 8 };

/**
 * The file length a (mutated) header asks for, or -1: lets a case make a header's lie consistent (extreme shapes
 * such as 1 x 1 x 30000 with all their voxels) so that it reaches the slicing instead of failing as truncated.
 */
function declaredLength(h: Buffer, nifti2: boolean): number {
  if (h.length < (nifti2 ? 544 : 352)) return -1;
  const le = h.readInt32LE(0) === (nifti2 ? 540 : 348);
  const i16 = (o: number) => (le ? h.readInt16LE(o) : h.readInt16BE(o));
  const dim = (k: number) => (nifti2 ? Number(le ? h.readBigInt64LE(16 + 8 * k) : h.readBigInt64BE(16 + 8 * k)) : i16(40 + 2 * k));
  const ndim = dim(0);
  if (!(ndim >= 1 && ndim <= 7)) return -1;
  let n = 1;
  for (let k = 1; k <= ndim; k++) n *= dim(k);
  const bytes = BYTES_PER_VOXEL[i16(nifti2 ? 12 : 70)];
  const off = nifti2 ? Number(le ? h.readBigInt64LE(168) : h.readBigInt64BE(168)) : le ? h.readFloatLE(108) : h.readFloatBE(108);
  if (!bytes || !(n > 0) || !Number.isFinite(off)) return -1;
  return Math.max(nifti2 ? 544 : 352, Math.floor(off)) + n * bytes;
}

/** A mutated NIfTI file: header fields and/or bytes of the plain image, then gzip (or not), then maybe the stream. */
function niftiCase(rng: Rng, bases: readonly NiftiBase[], log: string[]): Buffer {
  const base = pick(rng, bases);
  log.push(base.name);
  let plain: Buffer = Buffer.from(base.plain);
  const fields = base.nifti2 ? NIFTI2_FIELDS : NIFTI1_FIELDS;
  const headerOps = int(rng, 4);
  for (let k = 0; k < headerOps; k++) mutateField(rng, plain, fields, log);
  if (headerOps === 0 || rng() < 0.3) plain = mutateBytes(rng, plain, bases.map((b) => b.plain), log);
  const want = declaredLength(plain, base.nifti2);
  if (want > 0 && want !== plain.length && want <= 4 * 2 ** 20 && rng() < 0.5) {
    log.push(`resize to the declared ${want} bytes`);
    const grown = Buffer.alloc(want);
    plain.copy(grown, 0, 0, Math.min(want, plain.length));
    for (let j = plain.length; j < want; j += 97) grown[j] = int(rng, 256);
    plain = grown;
  }
  if (rng() < 0.5) return plain;
  log.push('gzip');
  let gz: Buffer = gzipSync(plain, { level: 1 });
  if (rng() < 0.25) gz = mutateBytes(rng, gz, [gz], log, 10);
  return gz;
}

function checkVolume(v: RawNiftiVolume): string | null {
  const [nx, ny, nz] = v.dims;
  if (![nx, ny, nz].every((d) => Number.isInteger(d) && d >= 1)) return `dims ${v.dims.join('x')}`;
  if (v.raw.length !== nx * ny * nz) return `raw holds ${v.raw.length} values for ${v.dims.join('x')}`;
  if (!Number.isFinite(v.slope) || !Number.isFinite(v.inter)) return `slope ${v.slope} inter ${v.inter}`;
  if (!v.pixdim.every(Number.isFinite)) return `pixdim ${v.pixdim.join(',')} (meta.json cannot hold it)`;
  return null;
}

function nonFinite(a: Float32Array): number {
  for (let i = 0; i < a.length; i++) if (!Number.isFinite(a[i]!)) return i;
  return -1;
}

/** The decoded volume through the pure slicing path, as inference and (with a segmentation) training take it. */
function sliceChecks(v: RawNiftiVolume): string | null {
  const s = volumeToSlices(v, null, { imageSize: 12 });
  const bad = nonFinite(s.images);
  if (bad >= 0) return `volumeToSlices returned a non-finite value ${s.images[bad]} at ${bad}`;
  const sel = selectSlices(v, { keep: 'sampled', sampleKey: 'fuzz', imageSize: 12 });
  const m = sliceMasks(v, sel);
  if (m.some((x) => x > 1)) return 'a mask value other than 0/1';
  return null;
}

// ---------------------------------------------------------------------------------------------------------
// .npy
// ---------------------------------------------------------------------------------------------------------

function npyWithHeader(dict: string, data: Buffer, major = 1): Buffer {
  const pre = major === 1 ? 10 : 12;
  const total = Math.ceil((pre + dict.length + 1) / 64) * 64;
  const h = Buffer.alloc(total, 0x20);
  Buffer.from([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, major, 0]).copy(h, 0);
  if (major === 1) h.writeUInt16LE(total - pre, 8);
  else h.writeUInt32LE(total - pre, 8);
  h.write(dict, pre, major === 3 ? 'utf8' : 'latin1');
  h[total - 1] = 0x0a;
  return Buffer.concat([h, data]);
}

function npyCorpus(): Buffer[] {
  const f = Float32Array.from({ length: 60 }, (_, i) => Math.sin(i) * 3);
  const u = Uint8Array.from({ length: 60 }, (_, i) => i % 2);
  const be = Buffer.from(f.buffer.slice(0));
  be.swap32();
  return [
    encodeNpy(f, [3, 4, 5]),
    encodeNpy(u, [3, 4, 5]),
    encodeNpy(new Float32Array(0), [0, 8, 8]),
    encodeNpy(u.subarray(0, 7), [7]),
    encodeNpy(new Float32Array([2.5]), []),
    npyWithHeader("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 20), }", Buffer.from(f.buffer), 2),
    npyWithHeader("{'descr': '|u1', 'fortran_order': False, 'shape': (60,), }", Buffer.from(u), 3),
    npyWithHeader("{'descr': '>f4', 'fortran_order': False, 'shape': (5, 12)}", be),
  ];
}

const DESCRS = ['<f4', '>f4', '|u1', '<u1', '|b1', '<f8', '<i2', '|O', '<c8', "'", '', 'f4'];
const SHAPE_ITEMS = ['0', '1', '3', '-1', '4294967296', '1e3', '99999999999', '2.5', 'x', '', '3L', ' ', '9007199254740993'];

function npyCase(rng: Rng, bases: readonly Buffer[], log: string[]): Buffer {
  const base = pick(rng, bases);
  log.push(`base ${bases.indexOf(base)}`);
  const op = int(rng, 4);
  if (op === 0) {
    // A new header dict with lies in it, over the base's data.
    const start = base[6] === 1 ? 10 : 12;
    const hlen = base[6] === 1 ? base.readUInt16LE(8) : base.readUInt32LE(8);
    const data = base.subarray(start + hlen);
    const dims = Array.from({ length: int(rng, 5) }, () => pick(rng, SHAPE_ITEMS));
    const descr = pick(rng, DESCRS);
    const fortran = pick(rng, ['False', 'True', 'None', '0']);
    const shape = dims.length === 1 ? `(${dims[0]},)` : `(${dims.join(', ')})`;
    const dict = rng() < 0.1 ? `{'shape': ${shape}` : `{'descr': '${descr}', 'fortran_order': ${fortran}, 'shape': ${shape}, }`;
    log.push(`header ${dict}`);
    return npyWithHeader(dict, data, pick(rng, [1, 1, 2, 3]));
  }
  if (op === 1) {
    const out = Buffer.from(base);
    const what = int(rng, 3);
    if (what === 0) {
      out[6] = pick(rng, [0, 1, 2, 3, 4, 255]);
      out[7] = int(rng, 3);
      log.push(`version ${out[6]}.${out[7]}`);
    } else if (what === 1 && out.length >= 12) {
      const v = pick(rng, [0, 1, 10, 0xffff, 0xfffff, 0xffffffff, out.length, out.length - 10]);
      if (out[6] === 1) out.writeUInt16LE(v & 0xffff, 8);
      else out.writeUInt32LE(v >>> 0, 8);
      log.push(`header length ${v}`);
    } else {
      out[int(rng, 6)] ^= 1 << int(rng, 8);
      log.push('magic bit flip');
    }
    return out;
  }
  return mutateBytes(rng, base, bases, log);
}

// ---------------------------------------------------------------------------------------------------------
// Images
// ---------------------------------------------------------------------------------------------------------

const CRC_TABLE = Int32Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c;
});

function crc32(b: Uint8Array): number {
  let c = -1;
  for (let i = 0; i < b.length; i++) c = CRC_TABLE[(c ^ b[i]!) & 0xff]! ^ (c >>> 8);
  return (c ^ -1) >>> 0;
}

/** A PNG whose IHDR says width x height (CRC fixed, so the decoder trusts it). */
function pngWithSize(png: Buffer, width: number, height: number): Buffer {
  const out = Buffer.from(png);
  out.writeUInt32BE(width >>> 0, 16);
  out.writeUInt32BE(height >>> 0, 20);
  out.writeUInt32BE(crc32(out.subarray(12, 29)), 29);
  return out;
}

/** Offset of the first JPEG SOFn segment's height field, or -1. */
function jpegSof(b: Buffer): number {
  for (let i = 2; i + 9 < b.length; ) {
    if (b[i] !== 0xff) return -1;
    const m = b[i + 1]!;
    if (m >= 0xc0 && m <= 0xcf && m !== 0xc4 && m !== 0xc8 && m !== 0xcc) return i + 5;
    i += 2 + b.readUInt16BE(i + 2);
  }
  return -1;
}

interface ImageBase {
  name: string;
  bytes: Buffer;
}

async function imageCorpus(fixtures: string): Promise<ImageBase[]> {
  const root = join(fixtures, 'kaggle-navoneel');
  const files: string[] = [];
  for (const cls of ['yes', 'no']) for (const f of (await readdir(join(root, cls))).sort()) files.push(join(cls, f));
  const sized = await Promise.all(files.map(async (f) => ({ f, bytes: await readFile(join(root, f)) })));
  // The smaller half keeps cases fast; the RGBA PNG and a big one keep their own code paths in.
  sized.sort((a, b) => a.bytes.length - b.bytes.length);
  const chosen = sized.filter((s, i) => i < 8 || s.bytes[0] === 0x89 || i === sized.length - 1);
  const bases: ImageBase[] = chosen.map((s) => ({ name: s.f, bytes: s.bytes }));
  const small = chosen[2]!.bytes;
  bases.push({ name: 'png grey re-encode', bytes: await sharp(small).greyscale().resize(96, 96).png().toBuffer() });
  bases.push({ name: 'png 16-bit re-encode', bytes: await sharp(small).resize(80, 64).toColourspace('rgb16').png().toBuffer() });
  bases.push({ name: 'progressive jpeg re-encode', bytes: await sharp(small).resize(90, 90).jpeg({ progressive: true }).toBuffer() });
  return bases;
}

function imageCase(rng: Rng, bases: readonly ImageBase[], log: string[]): Buffer {
  const base = pick(rng, bases);
  log.push(base.name);
  const b = base.bytes;
  const op = int(rng, 5);
  if (op === 0 && b[0] === 0x89) {
    const [w, h] = pick(rng, [
      [100000, 100000],
      [65535, 1],
      [1, 65535],
      [0, 10],
      [2 ** 31 - 1, 2],
      [12000, 12000],
      [int(rng, 5000), int(rng, 5000)],
    ] as const);
    log.push(`IHDR ${w}x${h}`);
    return pngWithSize(b, w, h);
  }
  if (op === 0 || op === 1) {
    const sof = jpegSof(b);
    if (sof > 0) {
      const out = Buffer.from(b);
      const [h, w] = [pick(rng, [0, 1, 65535, 30000, int(rng, 65536)]), pick(rng, [0, 1, 65535, 30000, int(rng, 65536)])];
      out.writeUInt16BE(h, sof);
      out.writeUInt16BE(w, sof + 2);
      if (rng() < 0.3) out[sof + 4] = pick(rng, [0, 2, 4, 5, 255]);
      log.push(`SOF ${w}x${h} components ${out[sof + 4]}`);
      return out;
    }
  }
  let out = mutateBytes(rng, b, bases.map((x) => x.bytes), log, rng() < 0.7 ? 32 : 0);
  if (rng() < 0.3) out = mutateBytes(rng, out, bases.map((x) => x.bytes), log, 32);
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------------------------------------

/** A message that comes from deep inside rather than from a check of ours. */
const DEEP = /Cannot read propert|is not a function|is not iterable|of undefined|undefined is not|Invalid typed array length|Array buffer allocation failed|Maximum call stack|out of memory|Offset is outside|out of range of/i;

function judge(err: unknown, name: string | null, extra: (e: SliceWiseError) => string | null = () => null): { status: 'rejected' | 'bad'; message: string } {
  const e = err as Error;
  const message = `${e?.name ?? typeof err}: ${String(e?.message ?? err)}`;
  const clean = name ? message.split(name).join('<file>') : message;
  if (!(err instanceof SliceWiseError)) return { status: 'bad', message: `not a SliceWiseError: ${clean}` };
  if (name && !e.message.includes(name)) return { status: 'bad', message: `does not name the file: ${clean}` };
  if (DEEP.test(e.message)) return { status: 'bad', message: `a deep error: ${clean}` };
  const more = extra(err);
  if (more) return { status: 'bad', message: `${more}: ${clean}` };
  return { status: 'rejected', message: clean };
}

async function niftiTarget(fixtures: string): Promise<Target> {
  const bases = await niftiCorpus(fixtures);
  return {
    corpus: bases.length,
    async run(rng, i, log) {
      const bytes = niftiCase(rng, bases, log);
      const name = `fuzz-${i}.nii`;
      let v: RawNiftiVolume;
      try {
        v = await parseNiftiRaw(bytes, name);
      } catch (err) {
        return judge(err, name, (e) => (e instanceof DataFileError ? null : 'not a DataFileError'));
      }
      const wrong = checkVolume(v);
      if (wrong) return { status: 'bad', message: `decoded a volume that breaks the reader's contract: ${wrong}` };
      // What decodes, the header copier of `slicewise predict` must take too (its labels written in the input's
      // geometry), and the header alone must come out of niftiHeaderBytes as the demo reads it.
      try {
        const header = niftiHeaderBytes(bytes, name);
        const labels = encodeLabelsLike(header, new Uint8Array(v.raw.length));
        if (labels.length !== 352 + v.raw.length) return { status: 'bad', message: `encodeLabelsLike wrote ${labels.length} bytes` };
      } catch (err) {
        const j = judge(err, null, (e) => (/a NIfTI-1 header cannot hold/.test(e.message) ? null : 'a decodable header refused'));
        if (j.status === 'bad') return j;
      }
      try {
        const bad = sliceChecks(v);
        return bad ? { status: 'bad', message: bad } : { status: 'ok' };
      } catch (err) {
        return judge(err, null, (e) => (e.status === 422 ? null : `status ${e.status}`));
      }
    },
  };
}

async function niftiRealTarget(fixtures: string): Promise<Target> {
  const pat = join(fixtures, 'brats2015-deepmedic', 'pat0005');
  const files = await Promise.all(['Flair_subtrMeanDivStd.nii.gz', 'OTMultiClass.nii.gz', 'brainmask.nii.gz'].map((f) => readFile(join(pat, f))));
  return {
    corpus: files.length,
    async run(rng, i, log) {
      const base = pick(rng, files);
      log.push(`real file ${files.indexOf(base)}`);
      const op = int(rng, 3);
      let bytes: Buffer;
      if (op === 0) {
        const at = int(rng, base.length);
        log.push(`truncate at ${at}`);
        bytes = base.subarray(0, at);
      } else if (op === 1) {
        bytes = Buffer.from(base);
        const at = 10 + int(rng, base.length - 10);
        bytes[at]! ^= 1 << int(rng, 8);
        log.push(`flip a bit at ${at}`);
      } else {
        // Header field lies on the real, full-size header.
        const plain = gunzipSync(base);
        mutateField(rng, plain, NIFTI1_FIELDS, log);
        bytes = gzipSync(plain, { level: 1 });
      }
      const name = `real-${i}.nii.gz`;
      try {
        const v = await parseNiftiRaw(bytes, name);
        const wrong = checkVolume(v);
        return wrong ? { status: 'bad', message: wrong } : { status: 'ok' };
      } catch (err) {
        return judge(err, name);
      }
    },
  };
}

async function patientTarget(fixtures: string, tmp: string): Promise<Target> {
  const bases = await niftiCorpus(fixtures);
  const flairBase = bases.find((b) => b.name.startsWith('real Flair'))!;
  const segBase = bases.find((b) => b.name.startsWith('real OTMultiClass'))!;
  return {
    corpus: 2,
    async run(rng, i, log) {
      const id = `P${i}`;
      const dir = join(tmp, 'patients', id);
      const out = join(tmp, 'out');
      await mkdir(dir, { recursive: true });
      // Mutate one of the two files (or both); the other stays real.
      const which = pick(rng, ['flair', 'seg', 'both'] as const);
      log.push(`mutate ${which}`);
      const make = (base: NiftiBase, mutate: boolean): Buffer => (mutate ? niftiCase(rng, [base], log) : gzipSync(base.plain, { level: 1 }));
      const files = { flair: join(dir, 'Flair.nii.gz'), seg: join(dir, 'OTMultiClass.nii.gz') };
      await writeFile(files.flair, make(flairBase, which !== 'seg'));
      await writeFile(files.seg, make(segBase, which !== 'flair'));
      const patient = { patientId: id, dir, files };
      const check = (e: SliceWiseError): string | null => {
        if (!(e instanceof PatientDataError)) return `not a PatientDataError (${e.name})`;
        if (!e.message.includes(id)) return 'does not name the patient';
        if (e.file !== files.flair && e.file !== files.seg) return `names ${e.file}, not one of the patient's files`;
        return null;
      };
      let status: 'ok' | 'rejected' | 'bad' = 'ok';
      let message: string | undefined;
      try {
        if (i % 2 === 0) {
          const { volumes, seg } = await readPatientVolumes(patient, ['flair'], { seg: true });
          try {
            const s = volumeToSlices(volumes, seg!, { keep: 'sampled', sampleKey: id, imageSize: 12 });
            if (nonFinite(s.images) >= 0) return { status: 'bad', message: 'volumeToSlices returned non-finite values' };
          } catch (err) {
            return judge(err, null, (e) => (e.status === 422 ? null : `status ${e.status}`));
          }
        } else {
          const meta = await preprocessPatient(patient, out, { imageSize: 12 });
          const npy = await readNpy(join(out, id, 'images.npy'));
          if (nonFinite(npy.data as Float32Array) >= 0) return { status: 'bad', message: 'images.npy holds non-finite values' };
          if (npy.shape[0] !== meta.num_slices) return { status: 'bad', message: 'images.npy and meta.json disagree' };
        }
      } catch (err) {
        ({ status, message } = judge(err, null, check));
        if (message) message = message.split(tmp).join('<tmp>');
        if (i % 2 === 1) {
          const left = ['images.npy', 'masks.npy', 'meta.json'].filter((f) => existsSync(join(out, id, f)));
          if (left.length > 0) return { status: 'bad', message: `a failed patient left ${left.join(', ')}: ${message}` };
        }
      } finally {
        await rm(dir, { recursive: true, force: true });
        await rm(join(out, id), { recursive: true, force: true });
      }
      return { status, message };
    },
  };
}

async function npyTarget(tmp: string): Promise<Target> {
  const bases = npyCorpus();
  return {
    corpus: bases.length,
    async run(rng, i, log) {
      const bytes = npyCase(rng, bases, log);
      const name = join(tmp, `fuzz-${i}.npy`);
      try {
        const a = decodeNpy(bytes, name);
        const n = a.shape.reduce((x, y) => x * y, 1);
        if (a.data.length !== n) return { status: 'bad', message: `decoded ${a.data.length} values for shape (${a.shape.join(', ')})` };
        if (i % 4 === 0) {
          await writeFile(name, bytes);
          try {
            const b = await readNpy(name);
            if (b.data.length !== n) return { status: 'bad', message: 'readNpy and decodeNpy disagree' };
            const rows = await openNpyRows(name).catch((err: unknown) => err);
            if (rows instanceof Error) {
              const j = judge(rows, name);
              if (j.status === 'bad') return j;
            } else {
              const r = rows as Awaited<ReturnType<typeof openNpyRows>>;
              const row = new Float32Array(r.shape[1] * r.shape[2]);
              for (let k = 0; k < Math.min(r.rows, 3); k++) await r.readRow(k, row, 0);
              await r.close();
            }
          } finally {
            await rm(name, { force: true });
          }
        }
        return { status: 'ok' };
      } catch (err) {
        return judge(err, name);
      }
    },
  };
}

async function imageTarget(fixtures: string): Promise<Target> {
  const bases = await imageCorpus(fixtures);
  return {
    corpus: bases.length,
    async run(rng, _i, log) {
      const bytes = imageCase(rng, bases, log);
      let r;
      try {
        r = await kaggleImageToInput(bytes, { imageSize: 32 });
      } catch (err) {
        return judge(err, null);
      }
      if (r.ok) {
        if (nonFinite(r.image) >= 0) return { status: 'bad', message: 'a non-finite value in the model input' };
        if (!(r.brainFraction > 0 && r.brainFraction <= 1)) return { status: 'bad', message: `brain fraction ${r.brainFraction}` };
        return { status: 'ok' };
      }
      if (typeof r.reason !== 'string' || r.reason.length === 0) return { status: 'bad', message: 'a rejection without a reason' };
      if (DEEP.test(r.reason)) return { status: 'bad', message: `a deep error as the reason: ${r.reason}` };
      return { status: 'rejected', message: r.reason };
    },
  };
}

/** The target named, its corpus built. */
export async function makeTarget(target: Exclude<FuzzTarget, 'harness'>, fixtures: string, tmp: string): Promise<Target> {
  if (target === 'nifti') return niftiTarget(fixtures);
  if (target === 'nifti-real') return niftiRealTarget(fixtures);
  if (target === 'patient') return patientTarget(fixtures, tmp);
  if (target === 'npy') return npyTarget(tmp);
  return imageTarget(fixtures);
}
