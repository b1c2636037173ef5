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
