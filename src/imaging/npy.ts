/**
 * NumPy .npy files: writer (format 1.0) and reader (formats 1.0, 2.0 and 3.0) for the two dtypes the pipeline
 * stores, little-endian float32 ('<f4') and uint8 ('|u1'), C order: whole arrays (readNpy, decodeNpy), or one row
 * at a time from a file on disk (openNpyRows), both through the one header parser below.
 *
 * Layout: "\x93NUMPY", major, minor, header length (uint16 LE in 1.0, uint32 LE in 2.0/3.0), then a Python dict
 * literal padded with spaces and ended by '\n' so that the data starts at a multiple of 64 bytes (as numpy writes it).
 */
import type { FileHandle } from 'node:fs/promises';
import { openDataFile, readDataFile } from '../lib/data-file.js';
import { DataFileError } from '../lib/errors.js';

const MAGIC = Buffer.from([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59]); // \x93NUMPY
const ALIGN = 64;
/**
 * Longest header dict we read. Ours are under 128 bytes and format 1.0 cannot exceed 65535; a 2.0/3.0 header
 * length field can claim 4 GiB, which readers would otherwise try to buffer (numpy itself refuses headers over
 * 10000 bytes by default).
 */
const MAX_HEADER_BYTES = 65535;

interface NpyArray {
  data: Float32Array | Uint8Array;
  shape: number[];
  dtype: string;
}

function shapeLiteral(shape: number[]): string {
  if (shape.length === 0) return '()';
  if (shape.length === 1) return `(${shape[0]},)`;
  return `(${shape.join(', ')})`;
}

function product(shape: number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

/** The .npy 1.0 preamble and header for `descr` and `shape`, padded so that the data starts at a multiple of 64. */
function npyHeader(descr: string, shape: number[]): Buffer {
  for (const d of shape) {
    if (!Number.isInteger(d) || d < 0) throw new RangeError(`npy: invalid shape (${shape.join(', ')})`);
  }
  const dict = `{'descr': '${descr}', 'fortran_order': False, 'shape': ${shapeLiteral(shape)}, }`;
  const preamble = MAGIC.length + 2 + 2;
  const headerLen = Math.ceil((preamble + dict.length + 1) / ALIGN) * ALIGN - preamble;
  if (headerLen > 0xffff) throw new RangeError('npy: header too long for format 1.0');
  const out = Buffer.alloc(preamble + headerLen);
  MAGIC.copy(out, 0);
  out[6] = 1;
  out[7] = 0;
  out.writeUInt16LE(headerLen, 8);
  out.write(dict.padEnd(headerLen - 1, ' ') + '\n', preamble, 'latin1');
  return out;
}

/** Encode `data` (C order) with the given shape as a .npy 1.0 file ('<f4' for Float32Array, '|u1' for Uint8Array). */
export function encodeNpy(data: Float32Array | Uint8Array, shape: number[]): Buffer {
  if (product(shape) !== data.length) {
    throw new RangeError(`encodeNpy: shape (${shape.join(', ')}) holds ${product(shape)} values but data has ${data.length}`);
  }
  const header = npyHeader(data instanceof Float32Array ? '<f4' : '|u1', shape);
  const out = Buffer.allocUnsafe(header.length + data.byteLength);
  header.copy(out, 0);
  out.set(new Uint8Array(data.buffer, data.byteOffset, data.byteLength), header.length);
  return out;
}

/**
 * A zero-filled .npy file image with its header written, and a typed-array view of its data part: fill `data`,
 * then write `file` as is (no copy of the array into a file buffer).
 */
export function allocNpy(dtype: 'float32', shape: number[]): { file: Buffer; data: Float32Array };
export function allocNpy(dtype: 'uint8', shape: number[]): { file: Buffer; data: Uint8Array };
export function allocNpy(dtype: 'float32' | 'uint8', shape: number[]): { file: Buffer; data: Float32Array | Uint8Array } {
  const header = npyHeader(dtype === 'float32' ? '<f4' : '|u1', shape);
  const n = product(shape);
  const file = Buffer.alloc(header.length + n * (dtype === 'float32' ? 4 : 1));
  header.copy(file, 0);
  const offset = file.byteOffset + header.length; // Buffer.alloc is never pooled: offset 0 + a multiple of 64
  const data = dtype === 'float32' ? new Float32Array(file.buffer, offset, n) : new Uint8Array(file.buffer, offset, n);
  return { file, data };
}

interface NpyHeader {
  descr: string;
  shape: number[];
  /** Byte offset of the data. */
  dataOffset: number;
}

/**
 * The header at the start of `buf` (a whole file, or its first bytes); null when `buf` ends before the header
 * does. Throws a DataFileError naming `file` when the bytes are not a .npy header this reader supports.
 */
function parseNpyHeader(buf: Buffer, file: string): NpyHeader | null {
  if (buf.length < MAGIC.length) return null;
  if (!buf.subarray(0, MAGIC.length).equals(MAGIC)) throw new DataFileError(file, 'not a .npy file (no \\x93NUMPY magic)');
  if (buf.length < 8) return null;
  const major = buf[6];
  const lengthBytes = major === 1 ? 2 : major === 2 || major === 3 ? 4 : 0;
  if (lengthBytes === 0) throw new DataFileError(file, `unsupported .npy format version ${major}.${buf[7]}`);
  const start = 8 + lengthBytes;
  if (buf.length < start) return null;
  const headerLen = lengthBytes === 2 ? buf.readUInt16LE(8) : buf.readUInt32LE(8);
  if (headerLen > MAX_HEADER_BYTES) throw new DataFileError(file, `.npy header length ${headerLen} is more than the ${MAX_HEADER_BYTES} bytes supported`);
  if (buf.length < start + headerLen) return null;
  const header = buf.toString(major === 3 ? 'utf8' : 'latin1', start, start + headerLen);

  const descr = /'descr'\s*:\s*'([^']*)'/.exec(header)?.[1];
  const fortran = /'fortran_order'\s*:\s*(True|False)/.exec(header)?.[1];
  const shapeText = /'shape'\s*:\s*\(([^)]*)\)/.exec(header)?.[1];
  if (descr === undefined || fortran === undefined || shapeText === undefined) {
    throw new DataFileError(file, `malformed .npy header: ${header.trim()}`);
  }
  if (fortran === 'True') throw new DataFileError(file, 'Fortran-order .npy arrays are not supported');
  const shape = shapeText
    .split(',')
    .map((s) => s.trim())
    .filter((s) => s !== '')
    .map((s) => Number(s.replace(/L$/, '')));
  if (shape.some((d) => !Number.isInteger(d) || d < 0)) throw new DataFileError(file, `malformed .npy shape (${shapeText})`);
  return { descr, shape, dataOffset: start + headerLen };
}

/** Decode a .npy file held in memory. The returned data is a copy, never a view of `buf`. */
export function decodeNpy(buf: Buffer, file = '<buffer>'): NpyArray {
  const h = parseNpyHeader(buf, file);
  if (!h) throw new DataFileError(file, 'truncated .npy header');
  const { descr, shape, dataOffset: dataStart } = h;
  const n = product(shape);
  let data: Float32Array | Uint8Array;
  let dtype: string;
  if (descr === '<f4' || descr === '>f4') {
    dtype = '<f4';
    const nbytes = n * 4;
    if (buf.length - dataStart < nbytes) {
      throw new DataFileError(file, `truncated: shape (${shape.join(', ')}) float32 needs ${nbytes} bytes but only ${buf.length - dataStart} follow the header`);
    }
    const aligned = new Uint8Array(nbytes); // a copy, which also realigns the data to 4 bytes
    aligned.set(buf.subarray(dataStart, dataStart + nbytes));
    if (descr === '>f4') Buffer.from(aligned.buffer, 0, nbytes).swap32();
    data = new Float32Array(aligned.buffer, 0, n);
  } else if (descr === '|u1' || descr === '<u1' || descr === '>u1' || descr === '|b1') {
    dtype = '|u1';
    if (buf.length - dataStart < n) {
      throw new DataFileError(file, `truncated: shape (${shape.join(', ')}) uint8 needs ${n} bytes but only ${buf.length - dataStart} follow the header`);
    }
    data = new Uint8Array(n);
    data.set(buf.subarray(dataStart, dataStart + n));
  } else {
    throw new DataFileError(file, `unsupported .npy dtype '${descr}' (supported: '<f4', '|u1')`);
  }
  return { data, shape, dtype };
}

/** Read and decode a .npy file; every failure is a DataFileError naming the file. */
export async function readNpy(file: string): Promise<NpyArray> {
  return decodeNpy(await readDataFile(file), file);
}

/** Random access to the rows (first-axis entries) of a float32 ('<f4') N x H x W .npy file, read on demand. */
export interface NpyRows {
  readonly file: string;
  /** N x H x W. */
  readonly shape: readonly [number, number, number];
  readonly rows: number;
  /** Copies row `i` (H x W floats) into `out` at `offset`. */
  readRow(i: number, out: Float32Array, offset: number): Promise<void>;
  close(): Promise<void>;
}

/** The header of an open .npy file, read in growing chunks from its start. */
async function readHeader(fh: FileHandle, file: string): Promise<NpyHeader> {
  for (let size = 256; ; size *= 4) {
    const buf = Buffer.alloc(size);
    const { bytesRead } = await fh.read(buf, 0, size, 0);
    const header = parseNpyHeader(buf.subarray(0, bytesRead), file);
    if (header) return header;
    if (bytesRead < size) throw new DataFileError(file, 'truncated .npy header');
  }
}

/**
 * Opens a float32 N x H x W .npy file for row reads: only its header is read here, and each readRow reads one
 * row. Checks the dtype, the rank and that the file holds all the data its header describes. Close it when done.
 */
export async function openNpyRows(file: string): Promise<NpyRows> {
  const fh = await openDataFile(file);
  try {
    const { descr, shape, dataOffset } = await readHeader(fh, file);
    if (descr !== '<f4') throw new DataFileError(file, `expected float32 ('<f4') rows, found '${descr}'`);
    if (shape.length !== 3) throw new DataFileError(file, `expected an N x H x W array, found shape (${shape.join(', ')})`);
    const { size: fileSize } = await fh.stat();
    const need = dataOffset + product(shape) * 4;
    if (fileSize < need) throw new DataFileError(file, `truncated: ${need} bytes expected, ${fileSize} present`);
    const [rows, h, w] = shape as [number, number, number];
    const rowBytes = h * w * 4;
    return {
      file,
      shape: [rows, h, w],
      rows,
      async readRow(i, out, offset) {
        if (!Number.isInteger(i) || i < 0 || i >= rows) throw new RangeError(`${file}: row ${i} is out of range (${rows} rows)`);
        const bytes = Buffer.alloc(rowBytes);
        const { bytesRead } = await fh.read(bytes, 0, rowBytes, dataOffset + i * rowBytes);
        if (bytesRead !== rowBytes) throw new DataFileError(file, `short read of row ${i}`);
        // Buffer.alloc never hands out pooled memory: the bytes start at offset 0, aligned for a Float32Array view
        // (the data is little-endian, as is every platform Node runs on).
        out.set(new Float32Array(bytes.buffer, bytes.byteOffset, h * w), offset);
      },
      close: () => fh.close(),
    };
  } catch (err) {
    await fh.close();
    throw err;
  }
}
