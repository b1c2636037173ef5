/**
 * NumPy .npy files: writer (format 1.0) and reader (formats 1.0, 2.0 and 3.0) for the two dtypes the pipeline
 * stores, little-endian float32 ('<f4') and uint8 ('|u1'), C order.
 *
 * Layout: "\x93NUMPY", major, minor, header length (uint16 LE in 1.0, uint32 LE in 2.0/3.0), then a Python dict
 * literal padded with spaces and ended by '\n' so that the data starts at a multiple of 64 bytes (as numpy writes it).
 */
import { readFile } from 'node:fs/promises';
import { DataFileError } from '../lib/errors.js';

const MAGIC = Buffer.from([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59]); // \x93NUMPY
const ALIGN = 64;

export interface NpyArray {
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

/** Decode a .npy file held in memory. The returned data is a copy, never a view of `buf`. */
export function decodeNpy(buf: Buffer, file = '<buffer>'): NpyArray {
  if (buf.length < 10 || !buf.subarray(0, 6).equals(MAGIC)) throw new DataFileError(file, 'not a .npy file (no \\x93NUMPY magic)');
  const major = buf[6];
  let headerLen: number;
  let start: number;
  if (major === 1) {
    headerLen = buf.readUInt16LE(8);
    start = 10;
  } else if (major === 2 || major === 3) {
    if (buf.length < 12) throw new DataFileError(file, 'truncated .npy header');
    headerLen = buf.readUInt32LE(8);
    start = 12;
  } else {
    throw new DataFileError(file, `unsupported .npy format version ${major}.${buf[7]}`);
  }
  if (buf.length < start + headerLen) throw new DataFileError(file, 'truncated .npy header');
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

  const n = product(shape);
  const dataStart = start + headerLen;
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
  let buf: Buffer;
  try {
    buf = await readFile(file);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new DataFileError(file, code === 'ENOENT' ? 'file not found' : `cannot read file: ${(err as Error).message}`);
  }
  return decodeNpy(buf, file);
}
