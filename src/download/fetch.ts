import http from 'node:http';
import https from 'node:https';
import type { IncomingMessage, OutgoingHttpHeaders } from 'node:http';
import { createHash, type Hash } from 'node:crypto';
import { createReadStream, createWriteStream } from 'node:fs';
import { mkdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { dirname } from 'node:path';
import { Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { SliceWiseError } from '../lib/errors.ts';
import { isLoopbackHost, redactUrl } from './sources.ts';
import { pinnedLookup, resolvePublic, type NetworkPolicy } from './network.ts';
import { env } from '../env.ts';

export interface DownloadOptions {
  /** Expected sha256 (hex). Mismatch: SliceWiseError 'checksum_mismatch', and the partial file is deleted. */
  sha256?: string;
  signal?: AbortSignal;
  /** Bytes written so far (including resumed bytes) and the total when the server says it. Throttled. */
  onProgress?: (bytes: number, total?: number) => void;
  /** Extra request headers (e.g. Authorization). Never echoed in errors; Authorization and Cookie are dropped
   *  when a redirect leaves the original origin. */
  headers?: Record<string, string>;
  /** Extra attempts after a network failure or 5xx, each resuming from the partial file (default 3). */
  retries?: number;
  /** Socket inactivity timeout in ms (default 60 000). */
  timeoutMs?: number;
  /** Default 10. */
  maxRedirects?: number;
  /** Which hosts may be reached (every redirect hop is checked). Default: public addresses only, unless
   *  SLICEWISE_ALLOW_PRIVATE_NETWORKS=1. */
  network?: NetworkPolicy;
  /** The largest file accepted, checked against Content-Length and counted while streaming. Default:
   *  SLICEWISE_EXTRACT_MAX_BYTES (an archive larger than what it may extract to is refused anyway). */
  maxBytes?: number;
}

export interface DownloadResult {
  path: string;
  bytes: number;
  /** sha256 of the file; absent when an existing `dest` was reused without a pinned checksum. */
  sha256?: string;
  /** True when the transfer continued a partial file with a Range request. */
  resumed: boolean;
  /** True when `dest` already existed and was reused without any request. */
  reused: boolean;
}

const retryable = new WeakSet<object>();

function markRetryable<E extends object>(err: E): E {
  retryable.add(err);
  return err;
}

const RETRYABLE_CODES = new Set(['ECONNRESET', 'ECONNREFUSED', 'ETIMEDOUT', 'EPIPE', 'EAI_AGAIN', 'ENETUNREACH', 'EHOSTUNREACH', 'ERR_STREAM_PREMATURE_CLOSE', 'UND_ERR_SOCKET']);

function isRetryable(err: unknown): boolean {
  if (typeof err !== 'object' || err === null) return false;
  if (retryable.has(err)) return true;
  const code = (err as { code?: unknown }).code;
  if (typeof code === 'string' && RETRYABLE_CODES.has(code)) return true;
  return err instanceof Error && /aborted|socket hang up|premature/i.test(err.message) && err.name !== 'AbortError';
}

function isAbort(err: unknown, signal?: AbortSignal): boolean {
  return !!signal?.aborted || (err instanceof Error && err.name === 'AbortError');
}

function upstreamError(status: number, statusText: string | undefined, url: string): SliceWiseError {
  const shown = redactUrl(url);
  const hint =
    status === 401
      ? 'authentication required, or the credentials were rejected'
      : status === 403
        ? 'access denied (check the credentials and that you may download this file)'
        : status === 404
          ? 'not found: check the URL'
          : status === 416
            ? 'range not satisfiable'
            : 'unexpected response';
  const code = status === 401 ? 'download_unauthorized' : status === 403 ? 'download_forbidden' : status === 404 ? 'download_not_found' : 'download_http_error';
  const err = new SliceWiseError(`GET ${shown}: HTTP ${status}${statusText ? ' ' + statusText : ''} (${hint})`, {
    status: 502,
    code,
    details: { url: shown, httpStatus: status },
  });
  return status >= 500 || status === 408 || status === 429 ? markRetryable(err) : err;
}

function deleteHeader(headers: OutgoingHttpHeaders, name: string): void {
  for (const k of Object.keys(headers)) if (k.toLowerCase() === name) delete headers[k];
}

/**
 * One GET, no redirect handling. Resolves on the response head. The host is checked against the network policy
 * first and the socket connects to the very address that was checked (no second DNS answer in between).
 */
async function requestOnce(url: URL, headers: OutgoingHttpHeaders, signal: AbortSignal | undefined, timeoutMs: number, network: NetworkPolicy): Promise<IncomingMessage> {
  const mod = url.protocol === 'https:' ? https : http;
  const pinned = await resolvePublic(url, network);
  return new Promise((resolve, reject) => {
    const req = mod.request(url, { method: 'GET', headers, signal, timeout: timeoutMs, agent: false, ...(pinned ? { lookup: pinnedLookup(pinned) } : {}) }, resolve);
    req.on('timeout', () => {
      req.destroy(markRetryable(new SliceWiseError(`GET ${redactUrl(url.toString())}: no data for ${timeoutMs} ms`, { status: 504, code: 'download_timeout' })));
    });
    req.on('error', reject);
    req.end();
  });
}

/**
 * GET with redirects followed by hand, so that credentials never follow a redirect to another origin (Kaggle
 * answers with a redirect to a signed storage URL) and https is never downgraded to http (except loopback).
 */
async function openUrl(
  start: URL,
  baseHeaders: OutgoingHttpHeaders,
  signal: AbortSignal | undefined,
  timeoutMs: number,
  maxRedirects: number,
  network: NetworkPolicy,
): Promise<{ res: IncomingMessage; url: URL }> {
  let url = start;
  const headers: OutgoingHttpHeaders = { ...baseHeaders };
  for (let hop = 0; ; hop++) {
    let res: IncomingMessage;
    try {
      res = await requestOnce(url, headers, signal, timeoutMs, network);
    } catch (err) {
      // A refused hop says where the redirect came from: the caller only named the first URL.
      if (hop > 0 && err instanceof SliceWiseError && err.code === 'private_address') {
        throw new SliceWiseError(`GET ${redactUrl(start.toString())} redirected (hop ${hop}): ${err.message}`, { status: err.status, code: err.code, details: err.details, cause: err });
      }
      throw err;
    }
    const status = res.statusCode ?? 0;
    if (![301, 302, 303, 307, 308].includes(status)) return { res, url };
    res.resume();
    const location = res.headers.location;
    if (!location) throw upstreamError(status, 'redirect without Location', url.toString());
    if (hop >= maxRedirects) {
      throw new SliceWiseError(`GET ${redactUrl(start.toString())}: more than ${maxRedirects} redirects`, { status: 502, code: 'download_redirects' });
    }
    let next: URL;
    try {
      next = new URL(location, url);
    } catch {
      throw new SliceWiseError(`GET ${redactUrl(url.toString())}: invalid redirect location`, { status: 502, code: 'download_redirects' });
    }
    if (next.protocol !== 'https:' && next.protocol !== 'http:') {
      throw new SliceWiseError(`GET ${redactUrl(url.toString())}: redirect to unsupported scheme ${next.protocol}`, { status: 502, code: 'download_redirects' });
    }
    if (next.protocol === 'http:' && !isLoopbackHost(next.hostname)) {
      throw new SliceWiseError(`GET ${redactUrl(url.toString())}: refusing redirect to plain http (${redactUrl(next.toString())})`, {
        status: 502,
        code: 'download_redirects',
      });
    }
    if (next.origin !== url.origin) {
      deleteHeader(headers, 'authorization');
      deleteHeader(headers, 'cookie');
    }
    if (next.username || next.password) {
      next.username = '';
      next.password = '';
    }
    url = next;
  }
}

async function fileSize(path: string): Promise<number | undefined> {
  try {
    const s = await stat(path);
    return s.isFile() ? s.size : undefined;
  } catch {
    return undefined;
  }
}

async function hashFile(path: string, hash: Hash = createHash('sha256')): Promise<Hash> {
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
  return hash;
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const t = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(t);
      reject(signal?.reason);
    };
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

function checksumError(url: string, expected: string, actual: string): SliceWiseError {
  const shown = redactUrl(url);
  return new SliceWiseError(`sha256 mismatch for ${shown}: expected ${expected}, actual ${actual}`, {
    status: 502,
    code: 'checksum_mismatch',
    details: { url: shown, expected, actual },
  });
}

/**
 * Download `url` to `dest`, streaming into `dest + '.part'` and renaming when complete (so `dest` only ever
 * exists complete). An existing `.part` is resumed with `Range: bytes=N-` (206 appends; a 200 restarts from
 * zero; the response's ETag / Last-Modified is kept in `.part.meta` and sent as If-Range, so a changed
 * remote file restarts instead of corrupting). Network failures, timeouts and 5xx are retried `retries`
 * times with backoff, each attempt resuming; other 4xx and checksum errors are not retried. If `dest` already
 * exists it is reused (verified first when `sha256` is given). On abort the `.part` is kept for a later
 * resume. Errors name the URL with credentials and query values removed.
 *
 * Not safe for two concurrent downloads to the same `dest` (they would both append to the same `.part`).
 */
export async function downloadFile(url: string, dest: string, opts: DownloadOptions = {}): Promise<DownloadResult> {
  const expected = opts.sha256?.toLowerCase();
  if (expected !== undefined && !/^[0-9a-f]{64}$/.test(expected)) {
    throw new SliceWiseError('downloadFile: sha256 must be 64 hex digits', { status: 400, code: 'bad_checksum' });
  }
  let start: URL;
  try {
    start = new URL(url);
  } catch {
    throw new SliceWiseError(`downloadFile: invalid URL ${redactUrl(url)}`, { status: 400, code: 'bad_source' });
  }
  if (start.protocol !== 'https:' && start.protocol !== 'http:') {
    throw new SliceWiseError(`downloadFile: unsupported scheme ${start.protocol}`, { status: 400, code: 'bad_source' });
  }

  const headers: OutgoingHttpHeaders = { 'user-agent': 'slicewise', 'accept-encoding': 'identity', accept: '*/*' };
  for (const [k, v] of Object.entries(opts.headers ?? {})) headers[k.toLowerCase()] = v;
  // URL user-info becomes a Basic Authorization header and is stripped from the URL, so it never shows up in
  // messages and is dropped like any credential on a cross-origin redirect.
  if (start.username || start.password) {
    const user = decodeURIComponent(start.username);
    const pass = decodeURIComponent(start.password);
    headers.authorization = 'Basic ' + Buffer.from(`${user}:${pass}`).toString('base64');
    start.username = '';
    start.password = '';
  }
  const shownUrl = redactUrl(start.toString());

  await mkdir(dirname(dest), { recursive: true });
  const existing = await fileSize(dest);
  if (existing !== undefined) {
    if (expected === undefined) return { path: dest, bytes: existing, resumed: false, reused: true };
    const actual = (await hashFile(dest)).digest('hex');
    if (actual === expected) return { path: dest, bytes: existing, sha256: actual, resumed: false, reused: true };
    await rm(dest, { force: true }); // stale or corrupt: fetch again
  }

  const part = dest + '.part';
  const retries = opts.retries ?? 3;
  const timeoutMs = opts.timeoutMs ?? 60_000;
  const maxRedirects = opts.maxRedirects ?? 10;
  const maxBytes = opts.maxBytes ?? env().extractMaxBytes;
  let lastErr: unknown;
  for (let attempt = 0; attempt <= retries; attempt++) {
    if (attempt > 0) await sleep(Math.min(8000, 250 * 2 ** (attempt - 1)), opts.signal);
    try {
      return await attemptDownload(start, shownUrl, dest, part, headers, expected, opts, timeoutMs, maxRedirects, maxBytes);
    } catch (err) {
      lastErr = err;
      if (isAbort(err, opts.signal) || !isRetryable(err)) throw err;
    }
  }
  if (lastErr instanceof SliceWiseError) throw lastErr;
  const reason = lastErr instanceof Error ? lastErr.message : String(lastErr);
  throw new SliceWiseError(`GET ${shownUrl}: failed after ${retries + 1} attempts: ${reason} (partial data kept in ${part} for a later resume)`, {
    status: 502,
    code: 'download_failed',
    details: { url: shownUrl, attempts: retries + 1, reason },
  });
}

/** A strong validator for If-Range: a non-weak ETag, else Last-Modified. */
function validatorOf(res: IncomingMessage): string | undefined {
  const etag = res.headers.etag;
  if (etag && !etag.startsWith('W/')) return etag;
  return res.headers['last-modified'] || undefined;
}

async function readValidator(metaPath: string): Promise<string | undefined> {
  try {
    const v = (JSON.parse(await readFile(metaPath, 'utf8')) as { validator?: unknown }).validator;
    return typeof v === 'string' ? v : undefined;
  } catch {
    return undefined;
  }
}

async function dropPartial(part: string): Promise<void> {
  await rm(part, { force: true });
  await rm(part + '.meta', { force: true });
}

async function attemptDownload(
  start: URL,
  shownUrl: string,
  dest: string,
  part: string,
  baseHeaders: OutgoingHttpHeaders,
  expected: string | undefined,
  opts: DownloadOptions,
  timeoutMs: number,
  maxRedirects: number,
  maxBytes: number,
): Promise<DownloadResult> {
  let offset = (await fileSize(part)) ?? 0;
  const metaPath = part + '.meta';
  const headers: OutgoingHttpHeaders = { ...baseHeaders };
  // The validator (ETag / Last-Modified) of the response the partial file came from: sent as If-Range so a
  // server whose file changed answers 200 with the new file instead of appending new bytes to old ones.
  const validator = offset > 0 ? await readValidator(metaPath) : undefined;
  if (offset > 0) headers.range = `bytes=${offset}-`;
  if (validator) headers['if-range'] = validator;

  const { res, url } = await openUrl(start, headers, opts.signal, timeoutMs, maxRedirects, opts.network ?? {});
  const status = res.statusCode ?? 0;
  const contentLength = res.headers['content-length'] !== undefined ? Number(res.headers['content-length']) : undefined;
  let total: number | undefined;
  let resumed = false;

  if (status === 206 && offset > 0) {
    const m = /^bytes (\d+)-(\d+)\/(\d+|\*)$/.exec(res.headers['content-range'] ?? '');
    const now = validatorOf(res);
    if (!m || Number(m[1]) !== offset || (validator !== undefined && now !== undefined && now !== validator)) {
      // A different range than asked, or the remote file changed: start over from zero on the next attempt.
      res.resume();
      await dropPartial(part);
      throw markRetryable(new SliceWiseError(`GET ${shownUrl}: server answered an unexpected range`, { status: 502, code: 'download_range' }));
    }
    total = m[3] !== '*' ? Number(m[3]) : contentLength !== undefined ? offset + contentLength : undefined;
    resumed = true;
  } else if (status === 200 || status === 206) {
    // 200: the server ignored the Range header (or there was none): restart from zero.
    // 206 without our Range would be odd; treat its body as the whole file only if it starts at 0.
    if (status === 206 && !/^bytes 0-/.test(res.headers['content-range'] ?? '')) {
      res.resume();
      throw upstreamError(status, 'unexpected partial content', url.toString());
    }
    offset = 0;
    total = contentLength;
    const v = validatorOf(res);
    if (v) await writeFile(metaPath, JSON.stringify({ validator: v }) + '\n');
    else await rm(metaPath, { force: true });
    if (status === 206) {
      const m = /\/(\d+)$/.exec(res.headers['content-range'] ?? '');
      if (m) total = Number(m[1]);
    }
  } else if (status === 416 && offset > 0) {
    res.resume();
    const m = /^bytes \*\/(\d+)$/.exec(res.headers['content-range'] ?? '');
    if (m && Number(m[1]) === offset) {
      // The partial file already holds everything.
      return finish(shownUrl, dest, part, offset, expected, true);
    }
    await dropPartial(part);
    throw markRetryable(new SliceWiseError(`GET ${shownUrl}: partial file does not match the remote file; restarting`, { status: 502, code: 'download_range' }));
  } else {
    res.resume();
    throw upstreamError(status, res.statusMessage, url.toString());
  }

  const tooLarge = (n: number) =>
    new SliceWiseError(`GET ${shownUrl}: the file is ${n === total ? '' : 'over '}${n} bytes, more than the limit of ${maxBytes} (SLICEWISE_EXTRACT_MAX_BYTES)`, {
      status: 422,
      code: 'download_too_large',
      details: { url: shownUrl, bytes: n, limit: maxBytes },
    });
  if (total !== undefined && total > maxBytes) {
    res.destroy(); // not read: it is the size that is refused
    throw tooLarge(total);
  }
  const hash = createHash('sha256');
  if (offset > 0) await hashFile(part, hash);
  let bytes = offset;
  let lastReport = 0;
  const report = (force: boolean) => {
    if (!opts.onProgress) return;
    const now = Date.now();
    if (!force && now - lastReport < 200) return;
    lastReport = now;
    opts.onProgress(bytes, total);
  };
  report(true);
  const meter = new Transform({
    transform(chunk: Buffer, _enc, cb) {
      hash.update(chunk);
      bytes += chunk.length;
      // A server that says nothing of the size, or lies about it, is stopped at the limit, not at a full disk.
      if (bytes > maxBytes) return cb(tooLarge(bytes));
      report(false);
      cb(null, chunk);
    },
  });
  try {
    await pipeline(res, meter, createWriteStream(part, { flags: offset > 0 ? 'a' : 'w' }), { signal: opts.signal });
  } catch (err) {
    // Nothing worth resuming: the same file would be refused again.
    if (err instanceof SliceWiseError && err.code === 'download_too_large') await dropPartial(part);
    throw err;
  }
  report(true);
  if (total !== undefined && bytes !== total) {
    throw markRetryable(
      new SliceWiseError(`GET ${shownUrl}: connection ended after ${bytes} of ${total} bytes`, { status: 502, code: 'download_incomplete', details: { url: shownUrl, bytes, total } }),
    );
  }
  return finish(shownUrl, dest, part, bytes, expected, resumed, hash);
}

async function finish(
  shownUrl: string,
  dest: string,
  part: string,
  bytes: number,
  expected: string | undefined,
  resumed: boolean,
  hash?: Hash,
): Promise<DownloadResult> {
  const actual = (hash ?? (await hashFile(part))).digest('hex');
  if (expected !== undefined && actual !== expected) {
    await dropPartial(part);
    throw checksumError(shownUrl, expected, actual);
  }
  await rename(part, dest);
  await rm(part + '.meta', { force: true });
  return { path: dest, bytes, sha256: actual, resumed, reused: false };
}
