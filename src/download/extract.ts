import { createReadStream, createWriteStream } from 'node:fs';
import { mkdir, open, rename, rm, stat } from 'node:fs/promises';
import { basename, dirname, isAbsolute, join, resolve, sep } from 'node:path';
import { randomBytes } from 'node:crypto';
import { constants as zlibConstants, gunzipSync } from 'node:zlib';
import { pipeline } from 'node:stream/promises';
import { Transform, type Readable } from 'node:stream';
import yauzl from 'yauzl';
import * as tar from 'tar';
import { SliceWiseError } from '../lib/errors.ts';
import { writeJsonAtomic } from '../lib/atomic.ts';
import { env } from '../env.ts';

export type ArchiveFormat = 'zip' | 'tar.gz' | 'tar';

export interface ExtractOptions {
  signal?: AbortSignal;
  /** Entries written so far and, for zip, the entry count. */
  onProgress?: (done: number, total?: number) => void;
  /** Caps on what the archive may extract to; unset fields come from the SLICEWISE_EXTRACT_* knobs. */
  limits?: Partial<ExtractLimits>;
}

export interface ExtractResult {
  dir: string;
  format: ArchiveFormat;
  /** Files and directories written. */
  entries: number;
  /** Entries skipped on purpose (links that stay inside the tree, macOS `__MACOSX/` resource forks). */
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

/**
 * True when a link entry would point outside root: an absolute target, or one that `..` leads out of. A hard
 * link's target is relative to the archive's root, a symbolic link's to the link's own folder.
 */
function linkEscapes(root: string, name: string, target: string, hard: boolean): boolean {
  if (!target || target.includes('\0') || isAbsolute(target) || /^[a-zA-Z]:/.test(target) || target.startsWith('\\')) return true;
  const base = hard ? root : dirname(resolve(root, name));
  const resolved = resolve(base, target);
  return resolved !== root && !resolved.startsWith(root + sep);
}

function linkError(archive: string, entry: string, kind: string, target: string): SliceWiseError {
  return new SliceWiseError(`${basename(archive)}: entry ${JSON.stringify(entry)} is a ${kind} to ${JSON.stringify(target.slice(0, 200))}, outside the destination directory; refusing to extract`, {
    status: 422,
    code: 'zip_slip',
    details: { file: basename(archive), entry, link: kind },
  });
}

function unsafeEntry(archive: string, entry: string, kind: string): SliceWiseError {
  return new SliceWiseError(`${basename(archive)}: entry ${JSON.stringify(entry)} is a ${kind}, which a dataset never holds; refusing to extract`, {
    status: 422,
    code: 'unsafe_entry',
    details: { file: basename(archive), entry, kind },
  });
}

function checkAbort(signal?: AbortSignal): void {
  if (signal?.aborted) throw abortError();
}

function abortError(): Error {
  const err = new Error('extraction aborted');
  err.name = 'AbortError';
  return err;
}

/** Extraction stays within this before the expansion ratio counts: small archives of compressible files are fine. */
const RATIO_ALLOWANCE = 256 * 1024 * 1024;

export interface ExtractLimits {
  /** Most bytes one archive may extract to. Default: SLICEWISE_EXTRACT_MAX_BYTES. */
  maxBytes: number;
  /** Most bytes extracted per archive byte. Default: SLICEWISE_EXTRACT_MAX_RATIO. */
  maxRatio: number;
  /** Bytes extracted before the ratio applies. Default: RATIO_ALLOWANCE. */
  ratioAllowance: number;
}

function fmtBytes(n: number): string {
  const units = ['bytes', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return u === 0 ? `${n} bytes` : `${v.toFixed(v < 10 ? 1 : 0)} ${units[u]}`;
}

/**
 * Counts what an extraction writes against its limit: the smaller of the byte cap and ratio x the archive's size
 * (but never below the allowance). Checked before each entry is written (its declared size) and while it
 * streams (its actual bytes), so a bomb stops at the limit with flat memory, not at a full disk.
 */
class Budget {
  total = 0;
  readonly limit: number;
  private readonly byRatio: boolean;
  constructor(
    private readonly archive: string,
    private readonly archiveSize: number,
    private readonly limits: ExtractLimits,
  ) {
    const ratioLimit = Math.max(limits.ratioAllowance, limits.maxRatio * archiveSize);
    this.byRatio = ratioLimit < limits.maxBytes;
    this.limit = Math.min(limits.maxBytes, ratioLimit);
  }

  /** Throws when `n` more bytes of `entry` would take the total past the limit. */
  check(entry: string, n: number): void {
    if (this.total + n > this.limit) throw this.error(entry, this.total + n);
  }

  add(entry: string, n: number): void {
    this.check(entry, n);
    this.total += n;
  }

  private error(entry: string, size: number): SliceWiseError {
    const { maxBytes, maxRatio, ratioAllowance } = this.limits;
    const why = this.byRatio
      ? `at most ${maxRatio}x the archive's ${fmtBytes(this.archiveSize)} once past ${fmtBytes(ratioAllowance)}: SLICEWISE_EXTRACT_MAX_RATIO=${maxRatio}`
      : `SLICEWISE_EXTRACT_MAX_BYTES=${maxBytes}`;
    return new SliceWiseError(
      `${basename(this.archive)}: entry ${JSON.stringify(entry)} takes the extracted size to ${fmtBytes(size)}, past the limit of ${fmtBytes(this.limit)} (${why}); refusing to extract`,
      {
        status: 422,
        code: 'archive_too_large',
        details: { file: basename(this.archive), entry, bytes: size, limit: this.limit, maxBytes, maxRatio, archiveBytes: this.archiveSize },
      },
    );
  }

  /** A pass-through that counts an entry's bytes as they stream and fails the moment the limit is passed. */
  meter(entry: string): Transform {
    return new Transform({
      transform: (chunk: Buffer, _enc, cb) => {
        try {
          this.add(entry, chunk.length);
        } catch (err) {
          return cb(err as Error);
        }
        cb(null, chunk);
      },
    });
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

/** A zip symlink's target is its content; a few KiB at most is read. */
async function readLinkTarget(zip: yauzl.ZipFile, entry: yauzl.Entry): Promise<string> {
  const stream = await openEntryStream(zip, entry);
  const chunks: Buffer[] = [];
  let n = 0;
  for await (const chunk of stream) {
    chunks.push(chunk as Buffer);
    n += (chunk as Buffer).length;
    if (n > 4096) break;
  }
  stream.destroy();
  return Buffer.concat(chunks).subarray(0, 4096).toString('utf8');
}

/** Unix file types in a zip's external attributes (the high 16 bits hold st_mode when made on Unix). */
const ZIP_TYPES: Record<number, string> = { 0o010000: 'FIFO', 0o020000: 'character device', 0o060000: 'block device', 0o140000: 'socket' };

async function extractZip(file: string, root: string, opts: ExtractOptions, budget: Budget): Promise<{ entries: number; skipped: number }> {
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
            // A symbolic link is never materialised; one that points out of the tree marks a hostile archive.
            const linkTarget = await readLinkTarget(zip, entry);
            if (linkEscapes(root, name, linkTarget, false)) throw linkError(file, name, 'symbolic link', linkTarget);
            skipped++;
            return;
          }
          if (ZIP_TYPES[mode]) throw unsafeEntry(file, name, ZIP_TYPES[mode]!);
          if (entry.isEncrypted()) {
            throw new SliceWiseError(`${basename(file)}: entry ${JSON.stringify(name)} is encrypted`, { status: 422, code: 'bad_archive' });
          }
          if (name.endsWith('/')) {
            await mkdir(target, { recursive: true });
          } else {
            // The declared size first: a bomb is refused before a byte of it is inflated. The meter then counts
            // what really comes out (yauzl also fails an entry that exceeds its declared size).
            budget.check(name, entry.uncompressedSize);
            await mkdir(dirname(target), { recursive: true });
            const stream = await openEntryStream(zip, entry);
            await pipeline(stream, budget.meter(name), createWriteStream(target), { signal: opts.signal });
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

/**
 * Compressed bytes handed to tar at a time. tar inflates each chunk at once, so this bounds the memory one
 * chunk of a highly compressible entry can take (gzip expands at most about 1000x: 16 MiB here).
 */
const TAR_READ_CHUNK = 16 * 1024;

async function extractTar(file: string, root: string, opts: ExtractOptions, budget: Budget): Promise<{ entries: number; skipped: number }> {
  let entries = 0;
  let skipped = 0;
  // The first refusal wins; tar is then stopped and its own error is only the echo of ours.
  let failure: unknown;
  const stop = (err: unknown): false => {
    if (failure === undefined) {
      failure = err;
      unpack.abort(new Error('extraction stopped'));
    }
    return false;
  };
  const unpack = new tar.Unpack({
    cwd: root,
    strict: true,
    preservePaths: false,
    preserveOwner: false,
    filter: (path, e) => {
      if (failure !== undefined) return false;
      if (opts.signal?.aborted) return stop(abortError());
      const entry = e as tar.ReadEntry;
      if (path.startsWith('__MACOSX/') || path.startsWith('./__MACOSX/')) {
        // Not written, but still inflated: it counts, or a bomb could hide in the skipped entries.
        try {
          budget.add(path, entry.size ?? 0);
        } catch (err) {
          return stop(err);
        }
        skipped++;
        return false;
      }
      if (!safeTarget(root, path) || path.split(/[\\/]/).includes('..')) return stop(slipError(file, path));
      switch (entry.type) {
        case 'File':
        case 'OldFile':
        case 'ContiguousFile':
          // A tar entry's size is exact (the reader hands over just that many bytes), so the header's count
          // is the streamed count, known before a byte of the entry is inflated.
          try {
            budget.add(path, entry.size ?? 0);
          } catch (err) {
            return stop(err);
          }
          entry.mode = 0o644; // no setuid or world-writable bits from an archive
          break;
        case 'Directory':
        case 'GNUDumpDir':
          entry.mode = 0o755;
          break;
        case 'SymbolicLink':
        case 'Link': {
          const hard = entry.type === 'Link';
          if (linkEscapes(root, path, entry.linkpath ?? '', hard)) return stop(linkError(file, path, hard ? 'hard link' : 'symbolic link', entry.linkpath ?? ''));
          skipped++; // links inside the tree are harmless, and never materialised
          return false;
        }
        default:
          return stop(unsafeEntry(file, path, entry.type === 'CharacterDevice' ? 'character device' : entry.type === 'BlockDevice' ? 'block device' : entry.type));
      }
      entries++;
      opts.onProgress?.(entries);
      return true;
    },
  });
  const input = createReadStream(file, { highWaterMark: TAR_READ_CHUNK });
  const onAbort = () => stop(abortError());
  opts.signal?.addEventListener('abort', onAbort, { once: true });
  try {
    await new Promise<void>((resolvePromise, reject) => {
      unpack.on('error', reject);
      unpack.on('close', () => resolvePromise());
      input.on('error', reject);
      input.pipe(unpack as unknown as NodeJS.WritableStream);
    });
  } catch (err) {
    if (failure !== undefined) throw failure;
    const msg = err instanceof Error ? err.message : String(err);
    // tar's own guard against compressed data that expands more than 1000x, whatever it holds.
    if (/max decompression ratio exceeded/.test(msg)) {
      throw new SliceWiseError(`${basename(file)}: the compressed data expands more than 1000x (${msg}); refusing to extract`, {
        status: 422,
        code: 'archive_too_large',
        details: { file: basename(file) },
        cause: err,
      });
    }
    if (/path contains '\.\.'|absolute|outside/i.test(msg)) throw slipError(file, (err as { path?: string }).path ?? msg);
    throw new SliceWiseError(`${basename(file)}: corrupt tar archive (${msg})`, { status: 422, code: 'bad_archive', details: { file: basename(file) }, cause: err });
  } finally {
    opts.signal?.removeEventListener('abort', onAbort);
    input.destroy();
  }
  if (failure !== undefined) throw failure;
  checkAbort(opts.signal);
  return { entries, skipped };
}

/**
 * Extract a .zip (yauzl) or .tar.gz/.tgz/.tar (`tar`) into `destDir`, the format told by magic bytes.
 * Entries are written into a temporary directory beside `destDir`, which then replaces `destDir`; the
 * `.complete` marker is written last. So a crash leaves either no `destDir`, or one without the marker —
 * never a half-extracted directory that looks finished. Entries that would land outside the destination
 * (absolute paths, `..`, links pointing out) fail the whole extraction with 'zip_slip', device files and FIFOs
 * with 'unsafe_entry'; links inside the tree are skipped. The bytes written are capped (see Budget): past the
 * cap the extraction fails at once with 'archive_too_large', naming the archive, the entry and the limit.
 */
export async function extractArchive(file: string, destDir: string, opts: ExtractOptions = {}): Promise<ExtractResult> {
  try {
    if (!(await stat(file)).isFile()) throw new Error('not a file');
  } catch {
    throw new SliceWiseError(`archive not found: ${file}`, { status: 404, code: 'not_found', details: { file } });
  }
  const format = await detectArchiveFormat(file);
  const { extractMaxBytes, extractMaxRatio } = env();
  const limits: ExtractLimits = { maxBytes: extractMaxBytes, maxRatio: extractMaxRatio, ratioAllowance: RATIO_ALLOWANCE, ...opts.limits };
  const budget = new Budget(file, (await stat(file)).size, limits);
  const dest = resolve(destDir);
  await mkdir(dirname(dest), { recursive: true });
  const tmp = `${dest}.extracting-${process.pid}-${randomBytes(4).toString('hex')}`;
  await mkdir(tmp);
  try {
    checkAbort(opts.signal);
    const r = format === 'zip' ? await extractZip(file, tmp, opts, budget) : await extractTar(file, tmp, opts, budget);
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
