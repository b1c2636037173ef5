import { gzip } from 'node:zlib';
import { promisify } from 'node:util';
import { endianness } from 'node:os';
import { writeFileAtomic } from '../lib/atomic.ts';
import { SliceWiseError } from '../lib/errors.ts';

const gzipAsync = promisify(gzip);

/** Voxel arrays this writer understands, with their NIfTI-1 datatype code and bits per voxel. */
export type NiftiVoxels = Int16Array | Uint8Array | Float32Array;

export interface NiftiWriteOptions {
  /** Voxel size in mm along x, y, z (default 1 mm isotropic, as in BraTS). */
  pixdim?: [number, number, number];
  /** scl_slope; 1 by default (the stored values are the real values). */
  sclSlope?: number;
  /** scl_inter; 0 by default. */
  sclInter?: number;
  /** Free text for the 80-byte `descrip` field (ASCII, truncated). */
  description?: string;
  /** gzip level for writeNifti when the file ends with .gz (default 6). */
  gzipLevel?: number;
}

export const NIFTI_HEADER_SIZE = 348;
export const NIFTI_VOX_OFFSET = 352;

/** NIfTI-1 datatype codes used here. */
export const NIFTI_DT = { uint8: 2, int16: 4, float32: 16 } as const;

function datatypeOf(data: NiftiVoxels): { code: number; bitpix: number } {
  if (data instanceof Int16Array) return { code: NIFTI_DT.int16, bitpix: 16 };
  if (data instanceof Uint8Array) return { code: NIFTI_DT.uint8, bitpix: 8 };
  if (data instanceof Float32Array) return { code: NIFTI_DT.float32, bitpix: 32 };
  throw new SliceWiseError('encodeNifti: unsupported voxel array type', { code: 'nifti_write' });
}

function writeAscii(buf: Buffer, offset: number, maxLen: number, text: string): void {
  // Printable ASCII only, NUL-padded (the buffer is zeroed already).
  const clean = text.replace(/[^\x20-\x7e]/g, '?').slice(0, maxLen - 1);
  buf.write(clean, offset, 'latin1');
}

/**
 * Encode a 3-D volume as a single-file NIfTI-1 image ('n+1'): 348-byte little-endian header, 4 zero
 * extension bytes, voxels from byte 352.
 *
 * Voxel order is the NIfTI one: x fastest, then y, then z, i.e. `data[x + y * X + z * X * Y]`; the last axis
 * is the axial (slice) axis as in BraTS. The affine is diagonal (qform and sform code 1, scanner space).
 */
export function encodeNifti(
  data: NiftiVoxels,
  dims: [number, number, number],
  opts: NiftiWriteOptions = {},
): Buffer {
  const [nx, ny, nz] = dims;
  for (const d of dims) {
    if (!Number.isInteger(d) || d < 1 || d > 32767) {
      throw new SliceWiseError(`encodeNifti: bad dimension ${d} in [${dims.join(', ')}] (1..32767)`, { code: 'nifti_write', details: { dims } });
    }
  }
  const voxels = nx * ny * nz;
  if (data.length !== voxels) {
    throw new SliceWiseError(`encodeNifti: ${data.length} voxels given for dims [${dims.join(', ')}] (= ${voxels})`, {
      code: 'nifti_write',
      details: { dims, length: data.length },
    });
  }
  const { code, bitpix } = datatypeOf(data);
  const pixdim = opts.pixdim ?? [1, 1, 1];
  const slope = opts.sclSlope ?? 1;
  const inter = opts.sclInter ?? 0;

  const buf = Buffer.alloc(NIFTI_VOX_OFFSET + data.byteLength);
  buf.writeInt32LE(NIFTI_HEADER_SIZE, 0); // sizeof_hdr
  buf.writeInt8(0x72, 38); // regular = 'r'
  // dim[0..7]
  const dim = [3, nx, ny, nz, 1, 1, 1, 1];
  dim.forEach((v, i) => buf.writeInt16LE(v, 40 + 2 * i));
  buf.writeInt16LE(code, 70); // datatype
  buf.writeInt16LE(bitpix, 72); // bitpix
  // pixdim[0] = qfac (1), then voxel sizes, then zeros.
  const pd = [1, pixdim[0], pixdim[1], pixdim[2], 0, 0, 0, 0];
  pd.forEach((v, i) => buf.writeFloatLE(v, 76 + 4 * i));
  buf.writeFloatLE(NIFTI_VOX_OFFSET, 108); // vox_offset
  buf.writeFloatLE(slope, 112); // scl_slope
  buf.writeFloatLE(inter, 116); // scl_inter
  buf.writeUInt8(2 | 8, 123); // xyzt_units: mm + s
  writeAscii(buf, 148, 80, opts.description ?? 'slicewise');
  buf.writeInt16LE(1, 252); // qform_code: scanner
  buf.writeInt16LE(1, 254); // sform_code: scanner
  // quatern_b/c/d and qoffset_x/y/z stay 0 (identity rotation at the origin).
  // srow_x/y/z: diagonal affine.
  buf.writeFloatLE(pixdim[0], 280);
  buf.writeFloatLE(pixdim[1], 296 + 4);
  buf.writeFloatLE(pixdim[2], 312 + 8);
  buf.write('n+1\0', 344, 'latin1'); // magic
  // Bytes 348..351: extension flag, all zero (no extensions).

  const raw = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  if (endianness() === 'LE' || bitpix === 8) {
    raw.copy(buf, NIFTI_VOX_OFFSET);
  } else {
    const view = new DataView(buf.buffer, buf.byteOffset + NIFTI_VOX_OFFSET, data.byteLength);
    for (let i = 0; i < data.length; i++) {
      if (bitpix === 16) view.setInt16(i * 2, data[i]!, true);
      else view.setFloat32(i * 4, data[i]!, true);
    }
  }
  return buf;
}

/** Encode and write atomically; gzipped when the file name ends with `.gz` (e.g. `x_flair.nii.gz`). */
export async function writeNifti(
  file: string,
  data: NiftiVoxels,
  dims: [number, number, number],
  opts: NiftiWriteOptions = {},
): Promise<void> {
  const encoded = encodeNifti(data, dims, opts);
  const bytes = file.toLowerCase().endsWith('.gz') ? await gzipAsync(encoded, { level: opts.gzipLevel ?? 6 }) : encoded;
  await writeFileAtomic(file, bytes);
}

/** What encodeLabelsLike writes into the header it copies; everything else is the input's. */
export const LABELS_DESCRIPTION = 'SliceWise segmentation';

const NIFTI2_HEADER_SIZE = 540;

function labelsError(message: string, details?: Record<string, unknown>): SliceWiseError {
  return new SliceWiseError(`encodeLabelsLike: ${message}`, { status: 422, code: 'nifti_write', details });
}

/** sizeof_hdr in either byte order: the header's size and endianness, or null. */
function headerKind(h: Uint8Array): { size: 348 | 540; le: boolean } | null {
  if (h.length < 4) return null;
  const v = new DataView(h.buffer, h.byteOffset, h.byteLength);
  for (const size of [NIFTI_HEADER_SIZE, NIFTI2_HEADER_SIZE] as const) {
    if (v.getInt32(0, true) === size) return { size, le: true };
    if (v.getInt32(0, false) === size) return { size, le: false };
  }
  return null;
}

/**
 * A NIfTI-2 header (540 bytes) as the NIfTI-1 header (348 bytes) of the same image, in the same byte order:
 * every field converted (doubles to float32, 64-bit integers to 16-bit ones), as nibabel does when it saves a
 * NIfTI-2 image as NIfTI-1. Refused when a value does not fit (a dimension above 32767, say).
 */
function nifti2ToNifti1(src: Uint8Array, le: boolean): Buffer {
  const s = new DataView(src.buffer, src.byteOffset, src.byteLength);
  const out = Buffer.alloc(NIFTI_HEADER_SIZE);
  const d = new DataView(out.buffer, out.byteOffset, out.byteLength);
  const int16 = (field: string, value: number | bigint, at: number): void => {
    const n = Number(value);
    if (!Number.isInteger(n) || n < -32768 || n > 32767) {
      throw labelsError(`the NIfTI-2 input's ${field} is ${n}, which a NIfTI-1 header cannot hold (16 bits); such a volume is not supported`, { field, value: n });
    }
    d.setInt16(at, n, le);
  };
  const uint8 = (field: string, value: number, at: number): void => {
    if (!Number.isInteger(value) || value < 0 || value > 255) throw labelsError(`the NIfTI-2 input's ${field} is ${value}, which a NIfTI-1 header cannot hold (8 bits)`, { field, value });
    d.setUint8(at, value);
  };
  const f64to32 = (from: number, to: number): void => d.setFloat32(to, s.getFloat64(from, le), le);
  const bytes = (from: number, to: number, n: number): void => out.set(src.subarray(from, from + n), to);

  d.setInt32(0, NIFTI_HEADER_SIZE, le);
  d.setUint8(38, 0x72); // regular = 'r'
  d.setUint8(39, s.getUint8(524)); // dim_info
  for (let i = 0; i < 8; i++) int16(`dim[${i}]`, s.getBigInt64(16 + 8 * i, le), 40 + 2 * i);
  for (let i = 0; i < 3; i++) f64to32(80 + 8 * i, 56 + 4 * i); // intent_p1..3
  int16('intent_code', s.getInt32(504, le), 68);
  int16('slice_start', s.getBigInt64(224, le), 74);
  for (let i = 0; i < 8; i++) f64to32(104 + 8 * i, 76 + 4 * i); // pixdim
  int16('slice_end', s.getBigInt64(232, le), 120);
  uint8('slice_code', s.getInt32(496, le), 122);
  uint8('xyzt_units', s.getInt32(500, le), 123);
  f64to32(208, 132); // slice_duration
  f64to32(216, 136); // toffset
  bytes(320, 228, 24); // aux_file
  int16('qform_code', s.getInt32(344, le), 252);
  int16('sform_code', s.getInt32(348, le), 254);
  for (let i = 0; i < 6; i++) f64to32(352 + 8 * i, 256 + 4 * i); // quatern_b/c/d, qoffset_x/y/z
  for (let i = 0; i < 12; i++) f64to32(400 + 8 * i, 280 + 4 * i); // srow_x/y/z
  bytes(508, 328, 16); // intent_name
  // datatype, bitpix, vox_offset, scaling, cal_*, descrip and magic are set by encodeLabelsLike.
  return out;
}

/**
 * A segmentation in the geometry of the image it was computed from: a single-file NIfTI-1 uint8 volume whose
 * header is `inputHeader` (the input's first 348 bytes, or 540 for NIfTI-2: see niftiHeaderBytes in nifti.ts)
 * with only datatype (uint8), bitpix (8), scl_slope (1), scl_inter (0), vox_offset (352), cal_min (0), cal_max (1)
 * and descrip changed, and no extensions. dim, pixdim, qform_code, quatern_*, qoffset_*, sform_code, srow_*,
 * xyzt_units and the rest are the input's, so the file lies exactly over the input in ITK-SNAP or 3D Slicer.
 *
 * The byte order is the input's (a big-endian header is copied as it is and its changed fields written
 * big-endian; uint8 voxels have no byte order). A NIfTI-2 input gets the equivalent NIfTI-1 header (float32
 * geometry), refused when a value does not fit one. `labels` holds one value per voxel in NIfTI order (i fastest).
 */
export function encodeLabelsLike(inputHeader: Uint8Array, labels: Uint8Array, { description = LABELS_DESCRIPTION }: { description?: string } = {}): Buffer {
  const kind = headerKind(inputHeader);
  if (!kind) throw labelsError('the input header is not a NIfTI header (sizeof_hdr is neither 348 nor 540 in either byte order)');
  if (inputHeader.length < kind.size) throw labelsError(`the input header has ${inputHeader.length} bytes, a NIfTI-${kind.size === NIFTI_HEADER_SIZE ? 1 : 2} header ${kind.size}`);
  const { le } = kind;
  let header: Buffer;
  if (kind.size === NIFTI_HEADER_SIZE) {
    const magic = Buffer.from(inputHeader.subarray(344, 348)).toString('latin1');
    if (magic !== 'n+1\0' && magic !== 'ni1\0') throw labelsError(`the input header has no NIfTI-1 magic ("n+1" or "ni1"), found ${JSON.stringify(magic)}`);
    header = Buffer.from(inputHeader.subarray(0, NIFTI_HEADER_SIZE));
  } else {
    const magic = Buffer.from(inputHeader.subarray(4, 8)).toString('latin1');
    if (magic !== 'n+2\0' && magic !== 'ni2\0') throw labelsError(`the input header has no NIfTI-2 magic ("n+2" or "ni2"), found ${JSON.stringify(magic)}`);
    header = nifti2ToNifti1(inputHeader, le);
  }
  const h = new DataView(header.buffer, header.byteOffset, header.byteLength);
  const ndim = h.getInt16(40, le);
  if (!(ndim >= 1 && ndim <= 7)) throw labelsError(`the input header's dim[0] is ${ndim}, expected 1 to 7`);
  let voxels = 1;
  for (let i = 1; i <= ndim; i++) voxels *= h.getInt16(40 + 2 * i, le);
  if (labels.length !== voxels) {
    const dims = Array.from({ length: ndim }, (_, i) => h.getInt16(42 + 2 * i, le));
    throw labelsError(`${labels.length} labels given for an input of ${dims.join(' x ')} (= ${voxels}) voxels`, { dims, length: labels.length });
  }

  h.setInt16(70, NIFTI_DT.uint8, le); // datatype
  h.setInt16(72, 8, le); // bitpix
  h.setFloat32(108, NIFTI_VOX_OFFSET, le); // vox_offset
  h.setFloat32(112, 1, le); // scl_slope
  h.setFloat32(116, 0, le); // scl_inter
  h.setFloat32(124, 1, le); // cal_max
  h.setFloat32(128, 0, le); // cal_min
  header.fill(0, 148, 228);
  writeAscii(header, 148, 80, description);
  header.write('n+1\0', 344, 'latin1'); // single file (the input's own magic, or its NIfTI-1 equivalent)

  const out = Buffer.alloc(NIFTI_VOX_OFFSET + voxels);
  header.copy(out, 0);
  // Bytes 348..351: the extension flag, zero: no extensions.
  out.set(labels, NIFTI_VOX_OFFSET);
  return out;
}

/** encodeLabelsLike, gzipped when the name ends with `.gz`, written atomically. */
export async function writeLabelsLike(file: string, inputHeader: Uint8Array, labels: Uint8Array, opts: { description?: string; gzipLevel?: number } = {}): Promise<void> {
  const encoded = encodeLabelsLike(inputHeader, labels, opts);
  const bytes = file.toLowerCase().endsWith('.gz') ? await gzipAsync(encoded, { level: opts.gzipLevel ?? 6 }) : encoded;
  await writeFileAtomic(file, bytes);
}
