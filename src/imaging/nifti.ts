/**
 * Reading NIfTI-1 (and NIfTI-2) single-file volumes (.nii, .nii.gz) into a Float32Array.
 *
 * Header fields come from nifti-reader-js; decompression is node:zlib (native, on the libuv thread pool, far
 * faster than a JS inflater), and the voxel conversion uses typed-array views and TypedArray#set, which
 * converts element types natively, instead of per-voxel DataView calls.
 */
import buffer from 'node:buffer';
import { constants as fsConstants, readFileSync, statSync } from 'node:fs';
import { open, readFile } from 'node:fs/promises';
import { constants as zlibConstants, gunzip, gunzipSync } from 'node:zlib';
import { promisify } from 'node:util';
import * as nifti from 'nifti-reader-js';
import { DataFileError } from '../lib/errors.js';

const gunzipAsync = promisify(gunzip);

/** What the header says about the voxel grid. */
interface NiftiGeometry {
  /** Voxels along the i, j, k axes (x, y, z in NIfTI's words). */
  dims: [number, number, number];
  /** Voxel size along i, j, k (usually mm), as stored in the header. */
  pixdim: [number, number, number];
  /** Datatype as stored on disk: uint8, int8, int16, uint16, int32, uint32, float32 or float64. */
  datatype: string;
  /**
   * The world direction each voxel axis i, j, k points to, as nibabel's aff2axcodes spells it (e.g. 'RAS',
   * 'LPS'), from the sform when sform_code is set, else from the qform when qform_code is set (nibabel's
   * precedence); null when neither is set or the matrix is degenerate.
   */
  axisCodes: string | null;
}

export interface NiftiVolume extends NiftiGeometry {
  /** Voxels in file order (i fastest, then j, then k: voxel (i, j, k) at i + nx * (j + ny * k)), scaling applied. */
  data: Float32Array;
}

export interface RawNiftiVolume extends NiftiGeometry {
  /** Voxels in file order (i fastest), in the stored datatype. */
  raw: NumericArray;
  /** Scaling to apply: value = raw * slope + inter (1 and 0 when the file has none). */
  slope: number;
  inter: number;
}

export type NumericArray = Uint8Array | Int8Array | Int16Array | Uint16Array | Int32Array | Uint32Array | Float32Array | Float64Array;

interface DatatypeInfo {
  name: string;
  bytes: number;
  view: (buffer: ArrayBufferLike, byteOffset: number, length: number) => NumericArray;
}

/** The datatypes we convert, by NIfTI datatype code. */
const SUPPORTED: Record<number, DatatypeInfo> = {
  2: { name: 'uint8', bytes: 1, view: (b, o, n) => new Uint8Array(b, o, n) },
  256: { name: 'int8', bytes: 1, view: (b, o, n) => new Int8Array(b, o, n) },
  4: { name: 'int16', bytes: 2, view: (b, o, n) => new Int16Array(b, o, n) },
  512: { name: 'uint16', bytes: 2, view: (b, o, n) => new Uint16Array(b, o, n) },
  8: { name: 'int32', bytes: 4, view: (b, o, n) => new Int32Array(b, o, n) },
  768: { name: 'uint32', bytes: 4, view: (b, o, n) => new Uint32Array(b, o, n) },
  16: { name: 'float32', bytes: 4, view: (b, o, n) => new Float32Array(b, o, n) },
  64: { name: 'float64', bytes: 8, view: (b, o, n) => new Float64Array(b, o, n) },
};

/** Names of the datatypes we refuse, for the error message. */
const UNSUPPORTED_NAMES: Record<number, string> = {
  0: 'unknown',
  1: 'binary (1 bit)',
  32: 'complex64',
  128: 'RGB',
  1024: 'int64',
  1280: 'uint64',
  1536: 'float128',
  1792: 'complex128',
  2048: 'complex256',
  2304: 'RGBA',
};

const NIFTI1_HEADER_BYTES = 348;
const NIFTI2_HEADER_BYTES = 540;

function isGzip(buf: Uint8Array): boolean {
  return buf.length >= 2 && buf[0] === 0x1f && buf[1] === 0x8b;
}

/**
 * Output chunk size for inflating `gz` in one piece. The gzip trailer's ISIZE is the uncompressed size (mod 2^32,
 * of the last member); one chunk of that size means one thread-pool round trip and no final concatenation, about
 * twice as fast as the 16 KiB default. A corrupt ISIZE only costs speed: it is bounded by deflate's maximum ratio
 * (~1032:1), and too small a chunk just means more chunks.
 */
function gunzipChunkSize(gz: Buffer): number {
  const min = 64 * 1024;
  if (gz.length < 18) return min;
  const isize = gz.readUInt32LE(gz.length - 4);
  return Math.max(min, Math.min(isize, gz.length * 1100) + 1);
}

/** A fresh ArrayBuffer holding the first `n` bytes (nifti-reader-js wants an ArrayBuffer that starts at the header). */
function headerCopy(buf: Buffer, n: number): ArrayBuffer {
  const len = Math.min(n, buf.length);
  const out = new ArrayBuffer(len);
  new Uint8Array(out).set(buf.subarray(0, len));
  return out;
}

/**
 * Below this size a file is read, and inflated, in place: for a small volume the hand-offs to libuv's thread pool
 * (open, stat, read, close, inflate: one each) cost more than the work.
 */
const SMALL_FILE = 256 * 1024;

/** A named pipe is read up to this much (a file's size is known; a pipe's is not). */
const MAX_PIPE_BYTES = 4 * 2 ** 30;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/**
 * A named pipe (a volume another program streams in): opened without blocking and read as its data arrives. A
 * blocking open or read would hold the thread in a system call until a writer came, and a thread held there cannot
 * be stopped: a worker's forced stop (a second SIGTERM) would hang on it instead of exiting.
 */
async function readPipe(file: string): Promise<Buffer> {
  const fh = await open(file, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK);
  try {
    const chunks: Buffer[] = [];
    let total = 0;
    for (;;) {
      const buf = Buffer.allocUnsafe(1 << 16);
      let n: number;
      try {
        n = (await fh.read(buf, 0, buf.length, null)).bytesRead;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EAGAIN') throw err;
        n = -1; // a writer is there, its data is not yet
      }
      if (n > 0) {
        chunks.push(buf.subarray(0, n));
        total += n;
        if (total > MAX_PIPE_BYTES) throw new DataFileError(file, `a named pipe that sends more than ${MAX_PIPE_BYTES / 2 ** 30} GiB`);
        continue;
      }
      // End of data once something came; before that, no writer has come yet.
      if (n === 0 && total > 0) break;
      await sleep(10);
    }
    return Buffer.concat(chunks, total);
  } finally {
    await fh.close();
  }
}

async function readRaw(file: string): Promise<Buffer> {
  try {
    const st = statSync(file);
    if (st.isFile()) return st.size < SMALL_FILE ? readFileSync(file) : await readFile(file);
    if (st.isFIFO()) return await readPipe(file);
    if (st.isDirectory()) return await readFile(file); // EISDIR, said below
    throw new DataFileError(file, 'is not a regular file (a device or a socket), so not a NIfTI file');
  } catch (err) {
    if (err instanceof DataFileError) throw err;
    const code = (err as NodeJS.ErrnoException).code;
    const cause = { cause: err };
    if (code === 'ENOENT') throw new DataFileError(file, 'file not found', cause);
    if (code === 'EISDIR') throw new DataFileError(file, 'is a directory, not a NIfTI file', cause);
    if (code === 'EACCES' || code === 'EPERM') throw new DataFileError(file, 'permission denied', cause);
    throw new DataFileError(file, `cannot read file: ${(err as Error).message}`, cause);
  }
}

/**
 * Read a NIfTI volume. Every failure is a DataFileError naming the file and saying what is wrong with it.
 * A 4-D file is accepted only when its 4th and higher dimensions are 1.
 */
export async function readNifti(file: string): Promise<NiftiVolume> {
  return toFloat32(await readNiftiRaw(file));
}

/**
 * Read a NIfTI volume without converting it: the voxels in their stored type (native byte order), and the
 * scaling to apply (value = raw * slope + inter; slope 1, inter 0 when the file has none). For callers that stream
 * over the data once and can skip a whole-volume float32 copy. Same checks and errors as readNifti.
 */
export async function readNiftiRaw(file: string): Promise<RawNiftiVolume> {
  return inflateAndDecode(await readRaw(file), file);
}

/**
 * The same for a NIfTI image already in memory (.nii or .nii.gz bytes, e.g. an upload); `name` stands for the
 * file in error messages. `bytes` is left unchanged.
 */
export async function parseNiftiRaw(bytes: Uint8Array, name = '<upload>'): Promise<RawNiftiVolume> {
  const buf = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  // Inflating makes a fresh buffer; plain bytes are copied because decoding may byte-swap them in place.
  return inflateAndDecode(isGzip(buf) ? buf : Buffer.from(buf), name);
}

/**
 * The header of a NIfTI image in memory (.nii or .nii.gz bytes), unparsed: its first 348 bytes (NIfTI-1) or 540
 * (NIfTI-2), inflating only the start of a gzip stream. For writers that copy the input's geometry
 * (nifti-write.ts, encodeLabelsLike). `name` stands for the file in error messages.
 */
export function niftiHeaderBytes(bytes: Uint8Array, name = '<upload>'): Buffer {
  let head = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (isGzip(head)) {
    const gz = head;
    // Inflate a growing prefix of the stream; a truncated prefix is fine with a sync flush at its end.
    for (let n = 1024; ; n *= 4) {
      try {
        head = gunzipSync(gz.subarray(0, n), { finishFlush: zlibConstants.Z_SYNC_FLUSH });
      } catch (err) {
        throw new DataFileError(name, `gzip data is corrupt or truncated: ${(err as Error).message}`, { cause: err });
      }
      if (head.length >= NIFTI2_HEADER_BYTES || n >= gz.length) break;
    }
  }
  const size = head.length >= 4 ? [head.readInt32LE(0), head.readInt32BE(0)] : [];
  const want = size.includes(NIFTI1_HEADER_BYTES) ? NIFTI1_HEADER_BYTES : size.includes(NIFTI2_HEADER_BYTES) ? NIFTI2_HEADER_BYTES : 0;
  if (!want) throw new DataFileError(name, 'not a NIfTI file (sizeof_hdr is neither 348 nor 540)');
  if (head.length < want) throw new DataFileError(name, `not a NIfTI file: only ${head.length} bytes, its header alone is ${want}`);
  return Buffer.from(head.subarray(0, want));
}

/** Slack over the size a header declares: extensions and padding may follow it. */
const INFLATE_SLACK = 1024 * 1024;

/**
 * The bytes a file's header says it holds (vox_offset + voxels x bytes per voxel), read from the header alone: a
 * gzip stream is inflated only as far as that, so a small file that inflates to gigabytes (a decompression bomb)
 * fails at once instead of filling memory.
 */
function declaredBytes(head: Buffer): number {
  const nifti2 = head.length >= NIFTI2_HEADER_BYTES && (head.readInt32LE(0) === NIFTI2_HEADER_BYTES || head.readInt32BE(0) === NIFTI2_HEADER_BYTES);
  const le = head.readInt32LE(0) === (nifti2 ? NIFTI2_HEADER_BYTES : NIFTI1_HEADER_BYTES);
  const i16 = (o: number) => (le ? head.readInt16LE(o) : head.readInt16BE(o));
  const i64 = (o: number) => Number(le ? head.readBigInt64LE(o) : head.readBigInt64BE(o));
  const f32 = (o: number) => (le ? head.readFloatLE(o) : head.readFloatBE(o));
  const dim = (k: number) => (nifti2 ? i64(16 + 8 * k) : i16(40 + 2 * k));
  const ndim = Math.max(0, Math.min(7, dim(0)));
  let voxels = 1;
  for (let k = 1; k <= ndim; k++) voxels *= Math.max(1, dim(k));
  // The decoder reads the datatype's bytes per voxel and ignores bitpix, so a bitpix that lies (smaller than the
  // datatype) must not cap the inflation below what the decoder then needs; an unknown datatype falls back to it.
  const bitpix = nifti2 ? i16(14) : i16(72);
  const bytes = SUPPORTED[nifti2 ? i16(12) : i16(70)]?.bytes ?? Math.max(1, bitpix / 8);
  // A vox_offset that is not a number (NaN, infinite) or inside the header means "just after it", as in decodeNifti.
  const raw = nifti2 ? i64(168) : f32(108);
  const offset = Number.isFinite(raw) && raw > 0 ? raw : 0;
  return offset + voxels * bytes;
}

/** `raw` must be ours to change (see decodeNifti). */
async function inflateAndDecode(raw: Buffer, file: string): Promise<RawNiftiVolume> {
  if (isGzip(raw)) {
    const declared = declaredBytes(niftiHeaderBytes(raw, file));
    if (!(declared <= buffer.constants.MAX_LENGTH)) {
      throw new DataFileError(file, `its header declares ${Math.round(declared / 2 ** 20)} MiB of voxels, more than one volume can hold in memory`);
    }
    try {
      const opts = { chunkSize: gunzipChunkSize(raw), maxOutputLength: Math.min(buffer.constants.MAX_LENGTH, declared + INFLATE_SLACK) };
      raw = raw.length < SMALL_FILE && declared < 16 * SMALL_FILE ? gunzipSync(raw, opts) : await gunzipAsync(raw, opts);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ERR_BUFFER_TOO_LARGE') {
        throw new DataFileError(file, `inflates to more than its header declares (${declared} bytes): not a NIfTI volume, or a decompression bomb`, { cause: err });
      }
      throw new DataFileError(file, `gzip data is corrupt or truncated: ${(err as Error).message}`, { cause: err });
    }
  }
  return decodeNifti(raw, file);
}

const AXIS_LETTERS = [
  ['L', 'R'],
  ['P', 'A'],
  ['I', 'S'],
] as const;

/** The 3 x 3 voxel-to-world part of the affine nibabel would use (sform first), or null when neither form is set. */
function worldMatrix(header: nifti.NIFTI1 | nifti.NIFTI2, headerBytes: ArrayBuffer, isNifti2: boolean): number[][] | null {
  if (header.sform_code > 0) {
    // Read srow_x/y/z ourselves: nifti-reader-js's `affine` is the qform when qform_code > sform_code, as in the
    // BraTS 2015 segmentations (qform 2, sform 1), where nibabel takes the sform.
    const view = new DataView(headerBytes);
    const [base, step] = isNifti2 ? [400, 8] : [280, 4];
    const at = (o: number): number => (isNifti2 ? view.getFloat64(o, header.littleEndian) : view.getFloat32(o, header.littleEndian));
    return [0, 1, 2].map((r) => [0, 1, 2].map((c) => at(base + (r * 4 + c) * step)));
  }
  if (header.qform_code > 0) return header.getQformMat().slice(0, 3).map((row) => row.slice(0, 3));
  return null;
}

/**
 * nibabel's io_orientation + aff2axcodes: normalise the columns, take the nearest rotation (polar factor, here
 * by Newton's iteration X <- (X + X^-T) / 2 instead of an SVD), then for i, j, k in turn the world axis with the
 * largest component, each world axis used once. Null for a singular matrix (nibabel would drop that axis).
 */
function axisCodesOf(m: readonly (readonly number[])[]): string | null {
  let x = [0, 1, 2].map((r) => [0, 1, 2].map((c) => m[r][c]));
  for (let c = 0; c < 3; c++) {
    const norm = Math.hypot(x[0][c], x[1][c], x[2][c]) || 1;
    for (let r = 0; r < 3; r++) x[r][c] /= norm;
  }
  for (let iter = 0; iter < 50; iter++) {
    const [a, b, c] = x;
    const det = a[0] * (b[1] * c[2] - b[2] * c[1]) - a[1] * (b[0] * c[2] - b[2] * c[0]) + a[2] * (b[0] * c[1] - b[1] * c[0]);
    if (!(Math.abs(det) > 1e-6)) return null;
    // Inverse transpose = cofactor matrix / det.
    const cof = [
      [b[1] * c[2] - b[2] * c[1], b[2] * c[0] - b[0] * c[2], b[0] * c[1] - b[1] * c[0]],
      [a[2] * c[1] - a[1] * c[2], a[0] * c[2] - a[2] * c[0], a[1] * c[0] - a[0] * c[1]],
      [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]],
    ];
    let change = 0;
    const next = x.map((row, r) =>
      row.map((v, k) => {
        const n = (v + cof[r][k] / det) / 2;
        change = Math.max(change, Math.abs(n - v));
        return n;
      }),
    );
    x = next;
    if (change < 1e-12) break;
  }
  let codes = '';
  for (let c = 0; c < 3; c++) {
    let best = -1;
    for (let r = 0; r < 3; r++) if (best < 0 || Math.abs(x[r][c]) > Math.abs(x[best][c])) best = r;
    if (!(Math.abs(x[best][c]) > 1e-8)) return null;
    codes += AXIS_LETTERS[best][x[best][c] > 0 ? 1 : 0];
    for (let k = 0; k < 3; k++) x[best][k] = 0;
  }
  return codes;
}

/**
 * Decode an uncompressed NIfTI image held in `raw`. `raw` must be ours to change: big-endian data is byte-swapped
 * in place, and the returned typed array is a view of it whenever the voxels are aligned.
 */
function decodeNifti(raw: Buffer, file: string): RawNiftiVolume {
  if (raw.length < NIFTI1_HEADER_BYTES) {
    throw new DataFileError(file, `not a NIfTI file: only ${raw.length} bytes, a NIfTI header alone is ${NIFTI1_HEADER_BYTES}`);
  }
  const first = headerCopy(raw, NIFTI2_HEADER_BYTES);
  // Pass the header alone (no extensions, no voxels) so that the library neither parses extensions nor copies data.
  let header: nifti.NIFTI1 | nifti.NIFTI2;
  let headerBytes: number;
  // The library takes the magic's word for the version and then fails on sizeof_hdr with a message of its own
  // ("This does not appear to be a NIFTI file!"): say which field disagrees instead.
  const sizeofHdr = [raw.readInt32LE(0), raw.readInt32BE(0)];
  const magicSays = nifti.isNIFTI1(first) ? NIFTI1_HEADER_BYTES : nifti.isNIFTI2(first) ? NIFTI2_HEADER_BYTES : 0;
  if (magicSays && !sizeofHdr.includes(magicSays)) {
    throw new DataFileError(file, `not a NIfTI file: its magic says NIfTI-${magicSays === NIFTI1_HEADER_BYTES ? 1 : 2} but sizeof_hdr is ${sizeofHdr[0]} (${magicSays} expected)`);
  }
  // The library looks at 3 of the magic's 4 bytes; nibabel, and our own header copier (nifti-write.ts), at all 4.
  const magicAt = magicSays === NIFTI1_HEADER_BYTES ? 344 : 4;
  if (magicSays && raw[magicAt + 3] !== 0) {
    const magic = raw.toString('latin1', magicAt, magicAt + 4);
    throw new DataFileError(file, `not a NIfTI file: its magic is ${JSON.stringify(magic)}, expected "${magic.slice(0, 3)}\\0"`);
  }
  try {
    if (nifti.isNIFTI1(first)) {
      headerBytes = NIFTI1_HEADER_BYTES;
      header = nifti.readHeader(first.slice(0, NIFTI1_HEADER_BYTES));
    } else if (nifti.isNIFTI2(first)) {
      // isNIFTI2 looks at the magic alone; the library would read the rest of the 540 bytes past the end.
      if (first.byteLength < NIFTI2_HEADER_BYTES) {
        throw new DataFileError(file, `truncated: only ${raw.length} bytes, a NIfTI-2 header alone is ${NIFTI2_HEADER_BYTES}`);
      }
      headerBytes = NIFTI2_HEADER_BYTES;
      header = nifti.readHeader(first);
    } else if (nifti.isNIFTI(first, true)) {
      throw new DataFileError(file, 'this is the header of a NIfTI .hdr/.img pair; only single-file .nii or .nii.gz is supported');
    } else {
      throw new DataFileError(file, 'not a NIfTI file (no NIfTI magic "n+1" or "n+2" in the header)');
    }
  } catch (err) {
    if (err instanceof DataFileError) throw err;
    throw new DataFileError(file, `not a NIfTI file: ${(err as Error).message}`, { cause: err });
  }

  const ndim = header.dims[0];
  if (!Number.isInteger(ndim) || ndim < 1 || ndim > 7) {
    throw new DataFileError(file, `invalid header: dim[0] is ${ndim}, expected 1 to 7 dimensions`);
  }
  const dimAt = (i: number): number => (i <= ndim ? header.dims[i] : 1);
  const dims: [number, number, number] = [dimAt(1), dimAt(2), dimAt(3)];
  for (let i = 0; i < 3; i++) {
    if (!Number.isInteger(dims[i]) || dims[i] < 1) {
      throw new DataFileError(file, `invalid header: dimension ${i + 1} is ${dims[i]}`);
    }
  }
  const extra: number[] = [];
  for (let i = 4; i <= ndim; i++) extra.push(header.dims[i]);
  // A 4th (or higher) dimension of 0 or less is no more valid than a 3rd: nibabel reads such a file as empty, and
  // a writer copying this header (nifti-write.ts) would count no voxels.
  const empty = extra.findIndex((d) => !Number.isInteger(d) || d < 1);
  if (empty >= 0) throw new DataFileError(file, `invalid header: dimension ${empty + 4} is ${extra[empty]}`);
  if (extra.some((d) => d > 1)) {
    throw new DataFileError(file, `a ${ndim}-D volume (${header.dims.slice(1, ndim + 1).join('x')}) where a 3-D volume was expected`);
  }
  const pixAt = (i: number): number => (i <= ndim ? header.pixDims[i] : 1);
  const pixdim: [number, number, number] = [pixAt(1), pixAt(2), pixAt(3)];
  // The voxel size goes into meta.json and volume measurements: NaN or infinite would become null there (JSON),
  // or a NaN volume in ml.
  for (let i = 0; i < 3; i++) {
    if (!Number.isFinite(pixdim[i])) throw new DataFileError(file, `invalid header: pixdim[${i + 1}] (voxel size) is ${pixdim[i]}`);
  }

  const code = header.datatypeCode;
  const info = SUPPORTED[code];
  if (!info) {
    const name = UNSUPPORTED_NAMES[code] ?? 'not a NIfTI datatype';
    throw new DataFileError(
      file,
      `unsupported datatype code ${code} (${name}); supported: ${Object.values(SUPPORTED).map((d) => d.name).join(', ')}`,
    );
  }

  const n = dims[0] * dims[1] * dims[2];
  const nbytes = n * info.bytes;
  // vox_offset is 352 in practice; files that leave it 0 (or otherwise inside the header) mean "just after it".
  let offset = Math.floor(header.vox_offset);
  if (!Number.isFinite(offset) || offset < headerBytes) offset = headerBytes + 4;
  const available = Math.max(0, raw.length - offset);
  if (available < nbytes) {
    throw new DataFileError(
      file,
      `truncated: header says ${dims.join('x')} ${info.name} (${nbytes} bytes) but only ${available} bytes of voxel data`,
    );
  }

  let region: Uint8Array = raw.subarray(offset, offset + nbytes);
  if (info.bytes > 1 && region.byteOffset % info.bytes !== 0) {
    // Typed-array views need aligned offsets: one native copy into a fresh buffer.
    const aligned = new Uint8Array(nbytes);
    aligned.set(region);
    region = aligned;
  }
  if (!header.littleEndian && info.bytes > 1) {
    const b = Buffer.from(region.buffer, region.byteOffset, region.byteLength);
    if (info.bytes === 2) b.swap16();
    else if (info.bytes === 4) b.swap32();
    else b.swap64();
  }
  const src = info.view(region.buffer, region.byteOffset, n);
  // nibabel's rule: a slope of 0, NaN or infinity means "no scaling" (the intercept is ignored with it); a valid
  // slope with an intercept that is not a finite number is an error.
  const slope = header.scl_slope;
  const hasSlope = Number.isFinite(slope) && slope !== 0;
  const inter = hasSlope ? header.scl_inter : 0;
  if (!Number.isFinite(inter)) throw new DataFileError(file, `invalid header: scl_slope is ${slope} but scl_inter is ${inter}`);
  const scaled = hasSlope && !(slope === 1 && inter === 0);
  if (scaled || info.name === 'float64') checkFloat32Range(src, scaled ? slope : 1, scaled ? inter : 0, file);
  const world = worldMatrix(header, first, headerBytes === NIFTI2_HEADER_BYTES);
  const axisCodes = world && axisCodesOf(world);
  return { dims, pixdim, datatype: info.name, axisCodes, raw: src, slope: scaled ? slope : 1, inter: scaled ? inter : 0 };
}

/** Largest finite float32. */
const FLOAT32_MAX = 3.4028234663852886e38;

/**
 * Every consumer turns voxels into float32 after scaling (toFloat32, the slicing in brats.ts). A scaling that takes
 * the stored values past float32's range (an int16 with scl_slope 3e38) would turn them into infinities and, after
 * the z-score, into NaN everywhere: refuse it here, naming the values. One pass over the stored values (min and
 * max; the scaled extremes are at them, the scaling being linear). NaN voxels of a float file are left to the
 * consumers, which refuse them by name.
 */
function checkFloat32Range(raw: NumericArray, slope: number, inter: number, file: string): void {
  let min = Infinity;
  let max = -Infinity;
  for (let i = 0; i < raw.length; i++) {
    const v = raw[i]!;
    if (v < min) min = v;
    if (v > max) max = v;
  }
  if (min > max) return; // no voxels, or NaN only
  const a = min * slope + inter;
  const b = max * slope + inter;
  if (Math.abs(a) <= FLOAT32_MAX && Math.abs(b) <= FLOAT32_MAX) return;
  const limit = `not finite in float32 (largest ${FLOAT32_MAX.toExponential(4)})`;
  if (slope === 1 && inter === 0) throw new DataFileError(file, `the stored values span [${min}, ${max}], ${limit}`);
  throw new DataFileError(file, `scl_slope ${slope} and scl_inter ${inter} scale the stored values [${min}, ${max}] to [${Math.min(a, b)}, ${Math.max(a, b)}], ${limit}`);
}

/** Apply the scaling and convert to float32 (in place when the stored data already is float32). */
function toFloat32(v: RawNiftiVolume): NiftiVolume {
  const { raw, slope, inter } = v;
  const n = raw.length;
  let data: Float32Array;
  if (slope !== 1 || inter !== 0) {
    // Scale from the stored values in double precision (an int32 would lose bits if converted to float32 first).
    data = raw instanceof Float32Array ? raw : new Float32Array(n);
    for (let i = 0; i < n; i++) data[i] = raw[i] * slope + inter;
  } else if (raw instanceof Float32Array) {
    data = raw;
  } else {
    data = new Float32Array(n);
    data.set(raw);
  }
  return { dims: v.dims, pixdim: v.pixdim, datatype: v.datatype, axisCodes: v.axisCodes, data };
}
