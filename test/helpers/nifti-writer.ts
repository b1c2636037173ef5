/**
 * A small NIfTI-1 single-file writer for tests and benchmarks: 348-byte header, 4 extension bytes (none), voxels.
 * Written from the NIfTI-1 header layout (nifti1.h); enough for readers to take dims, pixdim, datatype, scaling.
 */
import { writeFile } from 'node:fs/promises';
import { gzipSync } from 'node:zlib';

export type NiftiDatatype = 'uint8' | 'int8' | 'int16' | 'uint16' | 'int32' | 'uint32' | 'float32' | 'float64';

const CODES: Record<NiftiDatatype, { code: number; bytes: number }> = {
  uint8: { code: 2, bytes: 1 },
  int8: { code: 256, bytes: 1 },
  int16: { code: 4, bytes: 2 },
  uint16: { code: 512, bytes: 2 },
  int32: { code: 8, bytes: 4 },
  uint32: { code: 768, bytes: 4 },
  float32: { code: 16, bytes: 4 },
  float64: { code: 64, bytes: 8 },
};

export interface NiftiSpec {
  /** Voxels along each axis (up to 7); x fastest in `data`. */
  dims: number[];
  datatype: NiftiDatatype;
  /** Voxel values in file order; converted to `datatype` (rounded/clamped as the typed array does). */
  data: ArrayLike<number>;
  pixdim?: number[];
  sclSlope?: number;
  sclInter?: number;
  bigEndian?: boolean;
  gzip?: boolean;
  /** Override the datatype code written in the header (to test unsupported types); bytes still follow `datatype`. */
  datatypeCodeOverride?: number;
  /** gzip level (default 6, as gzip and nibabel use). */
  gzipLevel?: number;
  /** Voxel-to-world geometry (default: sform code 1 with a diagonal srow of the voxel sizes, no qform). */
  sform?: { code: number; srow?: number[][] };
  /** qform code, quaternion (b, c, d) and qfac (pixdim[0], 1 or -1); default code 0. */
  qform?: { code: number; quatern?: [number, number, number]; qfac?: number };
}

/** Encode a NIfTI-1 .nii (or .nii.gz when spec.gzip) image. */
export function encodeNifti(spec: NiftiSpec): Buffer {
  const { code, bytes } = CODES[spec.datatype];
  const le = !spec.bigEndian;
  const count = spec.dims.reduce((a, b) => a * b, 1);
  if (spec.data.length !== count) throw new Error(`encodeNifti: dims ${spec.dims.join('x')} hold ${count} voxels, data has ${spec.data.length}`);
  const voxOffset = 352;
  const buf = Buffer.alloc(voxOffset + count * bytes);
  const v = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  v.setInt32(0, 348, le); // sizeof_hdr
  v.setInt16(40, spec.dims.length, le); // dim[0]
  for (let i = 0; i < 7; i++) v.setInt16(42 + 2 * i, spec.dims[i] ?? 1, le);
  v.setInt16(70, spec.datatypeCodeOverride ?? code, le);
  v.setInt16(72, bytes * 8, le); // bitpix
  const pixdim = spec.pixdim ?? [];
  v.setFloat32(76, spec.qform?.qfac ?? 1, le); // pixdim[0] = qfac
  for (let i = 0; i < 7; i++) v.setFloat32(80 + 4 * i, pixdim[i] ?? 1, le);
  v.setFloat32(108, voxOffset, le);
  v.setFloat32(112, spec.sclSlope ?? 0, le);
  v.setFloat32(116, spec.sclInter ?? 0, le);
  v.setUint8(123, 2 | 8); // xyzt_units: mm, s
  buf.write('slicewise test volume', 148, 'latin1'); // descrip
  v.setInt16(252, spec.qform?.code ?? 0, le); // qform_code
  v.setInt16(254, spec.sform?.code ?? 1, le); // sform_code: 1 = scanner
  const [qb, qc, qd] = spec.qform?.quatern ?? [0, 0, 0];
  v.setFloat32(256, qb, le);
  v.setFloat32(260, qc, le);
  v.setFloat32(264, qd, le);
  const srow = spec.sform?.srow ?? [
    [pixdim[0] ?? 1, 0, 0, 0],
    [0, pixdim[1] ?? 1, 0, 0],
    [0, 0, pixdim[2] ?? 1, 0],
  ];
  for (let r = 0; r < 3; r++) for (let c = 0; c < 4; c++) v.setFloat32(280 + 16 * r + 4 * c, srow[r][c] ?? 0, le);
  buf.write('n+1\0', 344, 'latin1');
  // bytes 348..351: extension flag, all zero (no extension)

  writeVoxels(v, spec, voxOffset, bytes, le);
  return spec.gzip ? gzipSync(buf, { level: spec.gzipLevel ?? 6 }) : buf;
}

/** Write a NIfTI-1 file; returns the path. */
export async function writeNifti(path: string, spec: NiftiSpec): Promise<string> {
  await writeFile(path, encodeNifti(spec));
  return path;
}

/**
 * Encode a NIfTI-2 .nii (or .nii.gz) image: 540-byte header (nifti2.h: 64-bit dims, double geometry), 4 extension
 * bytes (none), voxels from byte 544. Same spec as encodeNifti; the geometry defaults are the same too.
 */
export function encodeNifti2(spec: NiftiSpec): Buffer {
  const { code, bytes } = CODES[spec.datatype];
  const le = !spec.bigEndian;
  const count = spec.dims.reduce((a, b) => a * b, 1);
  if (spec.data.length !== count) throw new Error(`encodeNifti2: dims ${spec.dims.join('x')} hold ${count} voxels, data has ${spec.data.length}`);
  const voxOffset = 544;
  const buf = Buffer.alloc(voxOffset + count * bytes);
  const v = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  v.setInt32(0, 540, le); // sizeof_hdr
  buf.write('n+2\0\r\n\x1a\n', 4, 'latin1'); // magic
  v.setInt16(12, spec.datatypeCodeOverride ?? code, le);
  v.setInt16(14, bytes * 8, le); // bitpix
  v.setBigInt64(16, BigInt(spec.dims.length), le); // dim[0]
  for (let i = 0; i < 7; i++) v.setBigInt64(24 + 8 * i, BigInt(spec.dims[i] ?? 1), le);
  const pixdim = spec.pixdim ?? [];
  v.setFloat64(104, spec.qform?.qfac ?? 1, le); // pixdim[0] = qfac
  for (let i = 0; i < 7; i++) v.setFloat64(112 + 8 * i, pixdim[i] ?? 1, le);
  v.setBigInt64(168, BigInt(voxOffset), le);
  v.setFloat64(176, spec.sclSlope ?? 0, le);
  v.setFloat64(184, spec.sclInter ?? 0, le);
  buf.write('slicewise test volume (NIfTI-2)', 240, 'latin1'); // descrip
  v.setInt32(344, spec.qform?.code ?? 0, le); // qform_code
  v.setInt32(348, spec.sform?.code ?? 1, le); // sform_code
  const [qb, qc, qd] = spec.qform?.quatern ?? [0, 0, 0];
  v.setFloat64(352, qb, le);
  v.setFloat64(360, qc, le);
  v.setFloat64(368, qd, le);
  const srow = spec.sform?.srow ?? [
    [pixdim[0] ?? 1, 0, 0, 0],
    [0, pixdim[1] ?? 1, 0, 0],
    [0, 0, pixdim[2] ?? 1, 0],
  ];
  for (let r = 0; r < 3; r++) for (let c = 0; c < 4; c++) v.setFloat64(400 + 32 * r + 8 * c, srow[r][c] ?? 0, le);
  v.setInt32(500, 2 | 8, le); // xyzt_units: mm, s
  // bytes 540..543: extension flag, all zero

  writeVoxels(v, spec, voxOffset, bytes, le);
  return spec.gzip ? gzipSync(buf, { level: spec.gzipLevel ?? 6 }) : buf;
}

/** The voxels of `spec`, in its datatype and byte order, from `voxOffset` on (NIfTI-1 and -2 alike). */
function writeVoxels(v: DataView, spec: NiftiSpec, voxOffset: number, bytes: number, le: boolean): void {
  const d = spec.data;
  for (let i = 0; i < d.length; i++) {
    const x = d[i]!;
    const o = voxOffset + i * bytes;
    switch (spec.datatype) {
      case 'uint8': v.setUint8(o, x); break;
      case 'int8': v.setInt8(o, x); break;
      case 'int16': v.setInt16(o, x, le); break;
      case 'uint16': v.setUint16(o, x, le); break;
      case 'int32': v.setInt32(o, x, le); break;
      case 'uint32': v.setUint32(o, x, le); break;
      case 'float32': v.setFloat32(o, x, le); break;
      case 'float64': v.setFloat64(o, x, le); break;
    }
  }
}
