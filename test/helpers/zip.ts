/**
 * A tiny zip writer for tests. It writes whatever entry names and file types it is given, including hostile
 * ones like '../evil.txt' or a symlink to /etc, which is the point: real zip tools refuse to. Entries are
 * stored, or deflated ahead of time (see deflatedZeros) for archives that expand far beyond their size.
 */
import { constants, crc32 as zlibCrc32, deflateRawSync } from 'node:zlib';


const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

export function crc32(data: Uint8Array): number {
  let c = 0xffffffff;
  for (let i = 0; i < data.length; i++) c = CRC_TABLE[(c ^ data[i]!) & 0xff]! ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

export interface ZipEntry {
  /** Forward slashes; a trailing '/' makes a directory entry. */
  name: string;
  data?: Uint8Array | string;
  /** Unix st_mode with its type bits (0o120777: a symbolic link whose target is `data`). Default: file or dir. */
  mode?: number;
  /** Deflated content (method 8) with its inflated size and CRC-32; `data` is ignored. */
  deflated?: Deflated;
}

export interface Deflated {
  data: Buffer;
  size: number;
  crc: number;
}

/**
 * `prefix` followed by `zeros` zero bytes as raw deflate data, without ever holding the zeros: one 1 MiB block
 * of zeros is compressed once, with a full flush (so it refers to nothing before it), and repeated. A few
 * hundred MiB come to a few hundred KiB: a decompression bomb that is a valid stream.
 */
export function deflatedZeros(zeros: number, prefix: Buffer = Buffer.alloc(0)): Deflated {
  const CHUNK = 1 << 20;
  const flush = { finishFlush: constants.Z_FULL_FLUSH };
  const parts: Buffer[] = [];
  let crc = 0;
  if (prefix.length) {
    parts.push(deflateRawSync(prefix, flush));
    crc = zlibCrc32(prefix, crc);
  }
  const zero = Buffer.alloc(CHUNK);
  const block = deflateRawSync(zero, flush);
  for (let left = zeros; left > 0; left -= CHUNK) {
    const n = Math.min(CHUNK, left);
    parts.push(n === CHUNK ? block : deflateRawSync(zero.subarray(0, n), flush));
    crc = zlibCrc32(zero.subarray(0, n), crc);
  }
  parts.push(Buffer.from([0x03, 0x00])); // the final block: fixed Huffman codes, end-of-block only
  return { data: Buffer.concat(parts), size: prefix.length + zeros, crc: crc >>> 0 };
}

/** A gzip file around deflated data. */
export function gzipWrap(d: Deflated): Buffer {
  const head = Buffer.from([0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3]);
  const trailer = Buffer.alloc(8);
  trailer.writeUInt32LE(d.crc, 0);
  trailer.writeUInt32LE(d.size % 2 ** 32, 4);
  return Buffer.concat([head, d.data, trailer]);
}

/** Build a zip archive (stored entries, UTF-8 names, fixed 1980-01-01 timestamps). */
export function buildZip(entries: ZipEntry[]): Buffer {
  const locals: Buffer[] = [];
  const centrals: Buffer[] = [];
  let offset = 0;
  const DOS_TIME = 0;
  const DOS_DATE = (0 << 9) | (1 << 5) | 1; // 1980-01-01
  for (const e of entries) {
    const name = Buffer.from(e.name, 'utf8');
    const raw = typeof e.data === 'string' ? Buffer.from(e.data, 'utf8') : Buffer.from(e.data ?? new Uint8Array(0));
    const data = e.deflated ? e.deflated.data : raw;
    const crc = e.deflated ? e.deflated.crc : crc32(raw);
    const size = e.deflated ? e.deflated.size : raw.length;
    const method = e.deflated ? 8 : 0;
    const isDir = e.name.endsWith('/');

    const local = Buffer.alloc(30);
    local.writeUInt32LE(0x04034b50, 0);
    local.writeUInt16LE(20, 4); // version needed
    local.writeUInt16LE(0x0800, 6); // flags: UTF-8 names
    local.writeUInt16LE(method, 8);
    local.writeUInt16LE(DOS_TIME, 10);
    local.writeUInt16LE(DOS_DATE, 12);
    local.writeUInt32LE(crc, 14);
    local.writeUInt32LE(data.length, 18);
    local.writeUInt32LE(size, 22);
    local.writeUInt16LE(name.length, 26);
    local.writeUInt16LE(0, 28); // extra length
    locals.push(local, name, data);

    const central = Buffer.alloc(46);
    central.writeUInt32LE(0x02014b50, 0);
    central.writeUInt16LE((3 << 8) | 20, 4); // made by: unix, 2.0
    central.writeUInt16LE(20, 6);
    central.writeUInt16LE(0x0800, 8);
    central.writeUInt16LE(method, 10);
    central.writeUInt16LE(DOS_TIME, 12);
    central.writeUInt16LE(DOS_DATE, 14);
    central.writeUInt32LE(crc, 16);
    central.writeUInt32LE(data.length, 20);
    central.writeUInt32LE(size, 24);
    central.writeUInt16LE(name.length, 28);
    central.writeUInt16LE(0, 30); // extra
    central.writeUInt16LE(0, 32); // comment
    central.writeUInt16LE(0, 34); // disk
    central.writeUInt16LE(0, 36); // internal attrs
    central.writeUInt32LE((((e.mode ?? (isDir ? 0o040755 : 0o100644)) << 16) | (isDir ? 0x10 : 0)) >>> 0, 38);
    central.writeUInt32LE(offset, 42);
    centrals.push(central, name);

    offset += local.length + name.length + data.length;
  }
  const centralSize = centrals.reduce((s, b) => s + b.length, 0);
  const end = Buffer.alloc(22);
  end.writeUInt32LE(0x06054b50, 0);
  end.writeUInt16LE(0, 4);
  end.writeUInt16LE(0, 6);
  end.writeUInt16LE(entries.length, 8);
  end.writeUInt16LE(entries.length, 10);
  end.writeUInt32LE(centralSize, 12);
  end.writeUInt32LE(offset, 16);
  end.writeUInt16LE(0, 20);
  return Buffer.concat([...locals, ...centrals, end]);
}

/** A ustar header, written by hand so that hostile names, links and file types survive. */
export function tarHeader(name: string, size: number, { type = '0', linkName = '', mode = 0o644 }: { type?: string; linkName?: string; mode?: number } = {}): Buffer {
  const h = Buffer.alloc(512);
  h.write(name, 0, 'utf8');
  h.write(mode.toString(8).padStart(7, '0') + '\0', 100);
  h.write('0000000\0', 108);
  h.write('0000000\0', 116);
  h.write(size.toString(8).padStart(11, '0') + '\0', 124);
  h.write('00000000000\0', 136);
  h.write('        ', 148);
  h.write(type, 156);
  h.write(linkName, 157);
  h.write('ustar\0', 257);
  h.write('00', 263);
  let sum = 0;
  for (const b of h) sum += b;
  h.write(sum.toString(8).padStart(6, '0') + '\0 ', 148);
  return h;
}

/** One tar entry: header and data padded to 512 bytes. */
export function tarEntry(name: string, data: string, type = '0', linkName = '', mode = 0o644): Buffer {
  const body = Buffer.alloc(Math.ceil(Buffer.byteLength(data) / 512) * 512);
  body.write(data);
  return Buffer.concat([tarHeader(name, Buffer.byteLength(data), { type, linkName, mode }), body]);
}
