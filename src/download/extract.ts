import { createWriteStream } from 'node:fs';
import { mkdir, open, rename, rm, stat } from 'node:fs/promises';
import { basename, dirname, join, resolve, sep } from 'node:path';
import { randomBytes } from 'node:crypto';
import { constants as zlibConstants, gunzipSync } from 'node:zlib';
import { pipeline } from 'node:stream/promises';
import type { Readable } from 'node:stream';
import yauzl from 'yauzl';
import * as tar from 'tar';
import { SliceWiseError } from '../lib/errors.ts';
import { writeJsonAtomic } from '../lib/atomic.ts';

export type ArchiveFormat = 'zip' | 'tar.gz' | 'tar';

export interface ExtractOptions {
  signal?: AbortSignal;
  /** Entries written so far and, for zip, the entry count. */
  onProgress?: (done: number, total?: number) => void;
}

export interface ExtractResult {
  dir: string;
  format: ArchiveFormat;
  /** Files and directories written. */
  entries: number;
  /** Entries skipped on purpose (symbolic and hard links, macOS `__MACOSX/` resource forks). */
  skipped: number;
}

/** Marker written last into an extracted directory; its presence means the extraction completed. */
export const COMPLETE_MARKER = '.complete';

function isTarHeader(block: Buffer): boolean {
  if (block.length < 512) return false;
  if (block.toString('latin1', 257, 262) === 'ustar') return true;
  // Pre-POSIX (v7) header: verify the checksum (sum of the header with the checksum field read as spaces).
  const stored = parseInt(block.toString('latin1', 148, 156).replace(/\0.*$/, '').trim(), 8);
  if (!Number.isFinite(stored)) return false;
  let sum = 0;
  for (let i = 0; i < 512; i++) sum += i >= 148 && i < 156 ? 0x20 : block[i]!;
  return sum === stored && block[0] !== 0;
}

function unsupported(file: string, reason: string): SliceWiseError {
  return new SliceWiseError(`${basename(file)}: ${reason}; supported archives are .zip, .tar.gz/.tgz and .tar`, {
    status: 422,
    code: 'unsupported_archive',
    details: { file: basename(file), reason },
  });
}

/** Identify an archive by its first bytes (not its name). Throws 'unsupported_archive' otherwise. */
export async function detectArchiveFormat(file: string): Promise<ArchiveFormat> {
  const fh = await open(file, 'r');
  let head: Buffer;
  try {
    const buf = Buffer.alloc(1024);
    const { bytesRead } = await fh.read(buf, 0, buf.length, 0);
    head = buf.subarray(0, bytesRead);
  } finally {
    await fh.close();
  }
  if (head.length >= 4 && head[0] === 0x50 && head[1] === 0x4b && [0x0304, 0x0506, 0x0708].includes(head.readUInt16BE(2))) return 'zip';
  if (head.length >= 2 && head[0] === 0x1f && head[1] === 0x8b) {
    // A gzip stream: make sure it holds a tar (a lone .nii.gz is gzip too). Read just enough to see a header.
    let inner: Buffer;
    try {
      inner = await gunzipPrefix(file, 512);
    } catch {
      throw unsupported(file, 'gzip data is corrupt');
    }
    if (isTarHeader(inner)) return 'tar.gz';
    throw unsupported(file, 'gzip file that does not contain a tar archive');
  }
  if (isTarHeader(head.subarray(0, 512))) return 'tar';
  if (head.subarray(0, 3).toString('latin1') === 'BZh') throw unsupported(file, 'bzip2 archives are not supported');
  if (head.subarray(0, 6).equals(Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]))) throw unsupported(file, 'xz archives are not supported');
  if (head.subarray(0, 2).toString('latin1') === '7z') throw unsupported(file, '7z archives are not supported');
  if (head.subarray(0, 4).toString('latin1') === 'Rar!') throw unsupported(file, 'rar archives are not supported');
  const text = head.toString('utf8', 0, Math.min(head.length, 200)).trimStart().toLowerCase();
  if (text.startsWith('<!doctype html') || text.startsWith('<html') || text.startsWith('{')) {
    throw unsupported(file, 'this is a web page or JSON document, not an archive (a login page or an error answer?)');
  }
  throw unsupported(file, 'unrecognised file format');
}

/** First `n` decompressed bytes of a gzip file, reading only as much compressed data as needed. */
async function gunzipPrefix(file: string, n: number): Promise<Buffer> {
  const fh = await open(file, 'r');
  try {
    const size = (await fh.stat()).size;
    for (let len = 4096; ; len *= 4) {
      const buf = Buffer.alloc(Math.min(len, size));
      const { bytesRead } = await fh.read(buf, 0, buf.length, 0);
      try {
        // finishFlush SYNC_FLUSH lets a truncated stream decode what it can.
        const out = gunzipSync(buf.subarray(0, bytesRead), { finishFlush: zlibConstants.Z_SYNC_FLUSH });
        if (out.length >= n || bytesRead >= size) return out.subarray(0, n);
      } catch (err) {
        if (bytesRead >= size) throw err;
      }
      if (bytesRead >= size) throw new Error('short gzip');
    }
  } finally {
    await fh.close();
  }
}

function slipError(archive: string, entry: string): SliceWiseError {
  return new SliceWiseError(`${basename(archive)}: entry ${JSON.stringify(entry)} would be written outside the destination directory; refusing to extract`, {
    status: 422,
    code: 'zip_slip',
    details: { file: basename(archive), entry },
  });
}

/** Resolve an entry name under root, or undefined when it escapes root. */
function safeTarget(root: string, name: string): string | undefined {
  if (name.includes('\0')) return undefined;
  if (/^[a-zA-Z]:/.test(name) || name.startsWith('/') || name.startsWith('\\')) return undefined;
  const target = resolve(root, name);
  if (target !== root && !target.startsWith(root + sep)) return undefined;
  return target;
}

function checkAbort(signal?: AbortSignal): void {
  if (signal?.aborted) {
    const err = new Error('extraction aborted');
    err.name = 'AbortError';
    throw err;
  }
}

function openZip(file: string): Promise<yauzl.ZipFile> {
  return new Promise((resolvePromise, reject) => {
    yauzl.open(file, { lazyEntries: true, autoClose: true, decodeStrings: true, validateEntrySizes: true }, (err, zip) => {
      if (err || !zip) reject(err ?? new Error('cannot open zip'));
      else resolvePromise(zip);
    });
  });
}

function openEntryStream(zip: yauzl.ZipFile, entry: yauzl.Entry): Promise<Readable> {
  return new Promise((resolvePromise, reject) => {
    zip.openReadStream(entry, (err, stream) => {
      if (err || !stream) reject(err ?? new Error('cannot read zip entry'));
      else resolvePromise(stream);
    });
  });
}

async function extractZip(file: string, root: string, opts: ExtractOptions): Promise<{ entries: number; skipped: number }> {
  let zip: yauzl.ZipFile;
  try {
    zip = await openZip(file);
  } catch (err) {
    throw new SliceWiseError(`${basename(file)}: not a readable zip archive (${err instanceof Error ? err.message : String(err)})`, {
      status: 422,
      code: 'bad_archive',
      details: { file: basename(file) },
      cause: err,
    });
  }
  const total = zip.entryCount;
  let entries = 0;
  let skipped = 0;
  try {
    await new Promise<void>((resolvePromise, reject) => {
      let failed = false;
      const fail = (err: unknown) => {
        if (failed) return;
        failed = true;
        zip.close();
        reject(err);
      };
      zip.on('error', (err: Error) => {
        // yauzl validates names itself: absolute paths and '..' segments.
        const m = /^(?:absolute path|invalid relative path): (.*)$/s.exec(err.message);
        fail(m ? slipError(file, m[1]!) : new SliceWiseError(`${basename(file)}: corrupt zip archive (${err.message})`, { status: 422, code: 'bad_archive', details: { file: basename(file) } }));
      });
      zip.on('end', () => {
        if (!failed) resolvePromise();
      });
      zip.on('entry', (entry: yauzl.Entry) => {
        (async () => {
          checkAbort(opts.signal);
          const name = entry.fileName;
          if (name.startsWith('__MACOSX/')) {
            skipped++;
            return;
          }
          const target = safeTarget(root, name);
          if (!target) throw slipError(file, name);
          const mode = (entry.externalFileAttributes >>> 16) & 0o170000;
          if (mode === 0o120000) {
            skipped++; // symbolic link: never materialised
            return;
          }
          if (entry.isEncrypted()) {
            throw new SliceWiseError(`${basename(file)}: entry ${JSON.stringify(name)} is encrypted`, { status: 422, code: 'bad_archive' });
          }
          if (name.endsWith('/')) {
            await mkdir(target, { recursive: true });
          } else {
            await mkdir(dirname(target), { recursive: true });
            const stream = await openEntryStream(zip, entry);
            await pipeline(stream, createWriteStream(target));
          }
          entries++;
          opts.onProgress?.(entries, total);
        })().then(
          () => {
            if (!failed) zip.readEntry();
          },
          fail,
        );
      });
      zip.readEntry();
    });
  } catch (err) {
    if (err instanceof SliceWiseError || (err instanceof Error && err.name === 'AbortError')) throw err;
    throw new SliceWiseError(`${basename(file)}: cannot extract (${err instanceof Error ? err.message : String(err)})`, {
      status: 422,
      code: 'bad_archive',
      details: { file: basename(file) },
      cause: err,
    });
  }
  return { entries, skipped };
}

async function extractTar(file: string, root: string, opts: ExtractOptions): Promise<{ entries: number; skipped: number }> {
  let entries = 0;
  let skipped = 0;
  let escaped: string | undefined;
  try {
    await tar.x({
      file,
      cwd: root,
      strict: true,
      preservePaths: false,
      preserveOwner: false,
      filter: (path, entry) => {
        if (opts.signal?.aborted) return false;
        const type = 'type' in entry ? entry.type : undefined;
        if (type === 'SymbolicLink' || type === 'Link') {
          skipped++;
          return false;
        }
        if (path.startsWith('__MACOSX/') || path.startsWith('./__MACOSX/')) {
          skipped++;
          return false;
        }
        if (!safeTarget(root, path) || path.split(/[\\/]/).includes('..')) {
          escaped ??= path;
          return false;
        }
        entries++;
        opts.onProgress?.(entries);
        return true;
      },
    });
  } catch (err) {
    const msg = err instanceof Error ? err.message : String(err);
    const m = /path contains '\.\.'|absolute|outside/i.test(msg);
    if (m) throw slipError(file, (err as { path?: string }).path ?? msg);
    throw new SliceWiseError(`${basename(file)}: corrupt tar archive (${msg})`, { status: 422, code: 'bad_archive', details: { file: basename(file) }, cause: err });
  }
  if (escaped !== undefined) throw slipError(file, escaped);
  checkAbort(opts.signal);
  return { entries, skipped };
}

/**
 * Extract a .zip (yauzl) or .tar.gz/.tgz/.tar (`tar`) into `destDir`, the format told by magic bytes.
 * Entries are written into a temporary directory beside `destDir`, which then replaces `destDir`; the
 * `.complete` marker is written last. So a crash leaves either no `destDir`, or one without the marker —
 * never a half-extracted directory that looks finished. Entries that would land outside the destination
 * (absolute paths, `..`) fail the whole extraction with 'zip_slip'; links are skipped.
 */
export async function extractArchive(file: string, destDir: string, opts: ExtractOptions = {}): Promise<ExtractResult> {
  try {
    if (!(await stat(file)).isFile()) throw new Error('not a file');
  } catch {
    throw new SliceWiseError(`archive not found: ${file}`, { status: 404, code: 'not_found', details: { file } });
  }
  const format = await detectArchiveFormat(file);
  const dest = resolve(destDir);
  await mkdir(dirname(dest), { recursive: true });
  const tmp = `${dest}.extracting-${process.pid}-${randomBytes(4).toString('hex')}`;
  await mkdir(tmp);
  try {
    checkAbort(opts.signal);
    const r = format === 'zip' ? await extractZip(file, tmp, opts) : await extractTar(file, tmp, opts);
    checkAbort(opts.signal);
    await rm(join(tmp, COMPLETE_MARKER), { force: true }); // an archive must not smuggle in our marker
    await rm(dest, { recursive: true, force: true });
    await rename(tmp, dest);
    await writeJsonAtomic(join(dest, COMPLETE_MARKER), { archive: basename(file), format, entries: r.entries, skipped: r.skipped });
    return { dir: dest, format, ...r };
  } catch (err) {
    await rm(tmp, { recursive: true, force: true });
    throw err;
  }
}

/** True when `dir` holds a completed extraction (or other completed result carrying the marker). */
export async function isComplete(dir: string): Promise<boolean> {
  try {
    return (await stat(join(dir, COMPLETE_MARKER))).isFile();
  } catch {
    return false;
  }
}
