import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { createHash } from 'node:crypto';
import { inspect } from 'node:util';
import { mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { gzipSync } from 'node:zlib';
import * as tar from 'tar';
import { buildZip, tarEntry } from './helpers/zip.ts';
import { parseSource, describeSource, formatSource, ACCEPTED_SOURCE_FORMS } from '../src/download/sources.ts';
import { downloadFile } from '../src/download/fetch.ts';
import { extractArchive } from '../src/download/extract.ts';
import { kaggleCredentials, downloadKaggleDataset } from '../src/download/kaggle-api.ts';
import { materializeSource } from '../src/download/index.ts';
import { SliceWiseError } from '../src/lib/errors.ts';

// ------------------------------------------------------------------------------------------------ helpers

interface TestServer {
  url: string;
  requests: Array<{ url: string; headers: http.IncomingHttpHeaders }>;
  close(): Promise<void>;
}

async function startServer(handler: (req: http.IncomingMessage, res: http.ServerResponse, n: number) => void): Promise<TestServer> {
  const requests: TestServer['requests'] = [];
  const server = http.createServer((req, res) => {
    requests.push({ url: req.url ?? '', headers: req.headers });
    handler(req, res, requests.length);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}`,
    requests,
    close: () =>
      new Promise<void>((r) => {
        server.closeAllConnections();
        server.close(() => r());
      }),
  };
}

/** Serve `body` honouring `Range: bytes=N-` with 206 (unless ignoreRange). */
function serveBody(req: http.IncomingMessage, res: http.ServerResponse, body: Buffer, opts: { ignoreRange?: boolean } = {}) {
  const m = /^bytes=(\d+)-$/.exec(req.headers.range ?? '');
  if (m && !opts.ignoreRange) {
    const start = Number(m[1]);
    if (start >= body.length) {
      res.writeHead(416, { 'content-range': `bytes */${body.length}` });
      res.end();
      return;
    }
    res.writeHead(206, { 'content-length': body.length - start, 'content-range': `bytes ${start}-${body.length - 1}/${body.length}` });
    res.end(body.subarray(start));
    return;
  }
  res.writeHead(200, { 'content-length': body.length, 'content-type': 'application/octet-stream' });
  res.end(body);
}

/** First answer: headers for the full body, half of it, then the connection is dropped. */
function serveHalfThenDrop(res: http.ServerResponse, body: Buffer) {
  res.writeHead(200, { 'content-length': body.length });
  res.write(body.subarray(0, body.length >> 1), () => {
    setTimeout(() => res.socket?.destroy(), 20);
  });
}

async function listFiles(root: string): Promise<string[]> {
  const out: string[] = [];
  async function walk(d: string) {
    for (const e of await readdir(d, { withFileTypes: true })) {
      const p = join(d, e.name);
      if (e.isDirectory()) await walk(p);
      else out.push(p);
    }
  }
  await walk(root);
  return out.sort();
}

function sha256(b: Buffer): string {
  return createHash('sha256').update(b).digest('hex');
}

async function exists(p: string): Promise<boolean> {
  try {
    await stat(p);
    return true;
  } catch {
    return false;
  }
}

/** A deterministic pseudo-random body (incompressible, so ranges matter). */
function bigBody(n: number): Buffer {
  const b = Buffer.alloc(n);
  let x = 12345;
  for (let i = 0; i < n; i++) {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    b[i] = x >>> 24;
  }
  return b;
}

// ------------------------------------------------------------------------------------------------ fixtures

let tmp: string;
let kaggleZip: Buffer;
let bratsTgz: Buffer;

beforeAll(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'slicewise-dl-'));
  kaggleZip = buildZip([
    { name: 'brain_tumor_dataset/' },
    { name: 'brain_tumor_dataset/yes/' },
    { name: 'brain_tumor_dataset/yes/Y1.jpg', data: 'yes-image-1' },
    { name: 'brain_tumor_dataset/no/' },
    { name: 'brain_tumor_dataset/no/N1.jpg', data: 'no-image-1' },
    { name: 'brain_tumor_dataset/no/1 no.jpeg', data: 'no-image-2' },
    { name: '__MACOSX/brain_tumor_dataset/._Y1.jpg', data: 'junk' },
  ]);
  // A BraTS-like tree nested like the Kaggle archive, as a .tar.gz.
  const src = join(tmp, 'tar-src');
  for (const id of ['BraTS20_Training_001', 'BraTS20_Training_002']) {
    const d = join(src, 'BraTS2020_TrainingData', 'MICCAI_BraTS2020_TrainingData', id);
    await mkdir(d, { recursive: true });
    for (const m of ['flair', 't1', 't1ce', 't2', 'seg']) await writeFile(join(d, `${id}_${m}.nii`), `${id}-${m}`);
  }
  const tgz = join(tmp, 'brats.tar.gz');
  await tar.c({ gzip: true, file: tgz, cwd: src, portable: true }, ['BraTS2020_TrainingData']);
  bratsTgz = await readFile(tgz);
});

afterAll(async () => {
  await rm(tmp, { recursive: true, force: true });
});

// Every server here listens on loopback, which downloads reach only when the operator allows private networks
// (test/sources-security.test.ts checks the refusal without it).
let savedAllowPrivate: string | undefined;
beforeAll(() => {
  savedAllowPrivate = process.env.SLICEWISE_ALLOW_PRIVATE_NETWORKS;
  process.env.SLICEWISE_ALLOW_PRIVATE_NETWORKS = '1';
});
afterAll(() => {
  if (savedAllowPrivate === undefined) delete process.env.SLICEWISE_ALLOW_PRIVATE_NETWORKS;
  else process.env.SLICEWISE_ALLOW_PRIVATE_NETWORKS = savedAllowPrivate;
});

const KAGGLE_ENV = ['KAGGLE_USERNAME', 'KAGGLE_KEY', 'KAGGLE_CONFIG_DIR', 'KAGGLE_API_BASE'] as const;
const savedEnv: Partial<Record<string, string | undefined>> = {};
beforeAll(() => {
  for (const k of KAGGLE_ENV) savedEnv[k] = process.env[k];
});
afterEach(() => {
  for (const k of KAGGLE_ENV) {
    if (savedEnv[k] === undefined) delete process.env[k];
    else process.env[k] = savedEnv[k];
  }
});

// ------------------------------------------------------------------------------------------------ parseSource

describe('parseSource / describeSource', () => {
  it('accepts the documented forms', () => {
    expect(parseSource('synthetic')).toEqual({ kind: 'synthetic' });
    expect(parseSource(' synthetic:12 ')).toEqual({ kind: 'synthetic', count: 12 });
    expect(parseSource('path:/data/brats')).toEqual({ kind: 'path', path: '/data/brats' });
    expect(parseSource('path:./x.tar.gz')).toEqual({ kind: 'path', path: './x.tar.gz' });
    expect(parseSource('https://example.org/data/brats.zip')).toEqual({ kind: 'https', url: 'https://example.org/data/brats.zip' });
    const hex = 'AB'.repeat(32);
    expect(parseSource(`https://example.org/x.tgz#sha256=${hex}`)).toEqual({ kind: 'https', url: 'https://example.org/x.tgz', sha256: hex.toLowerCase() });
    expect(parseSource('kaggle:awsaf49/brats20-dataset-training-validation')).toEqual({
      kind: 'kaggle',
      owner: 'awsaf49',
      dataset: 'brats20-dataset-training-validation',
    });
    // Plain http for loopback test servers only.
    expect(parseSource('http://127.0.0.1:8080/a.zip')).toEqual({ kind: 'https', url: 'http://127.0.0.1:8080/a.zip' });
    expect(parseSource('http://localhost/a.zip').kind).toBe('https');
  });

  it('rejects anything else with 400 bad_source listing the accepted forms', () => {
    const bad = [
      '',
      'brats',
      '/data/brats',
      'synthetic:0',
      'synthetic:-3',
      'synthetic:many',
      'path:',
      'kaggle:owner',
      'kaggle:a/b/c',
      'kaggle:../x/y',
      'http://example.org/a.zip',
      'ftp://example.org/a.zip',
      'file:///etc/passwd',
      'https://example.org/a.zip#md5=abc',
      'https://example.org/a.zip#sha256=abc',
    ];
    for (const spec of bad) {
      let err: unknown;
      try {
        parseSource(spec);
      } catch (e) {
        err = e;
      }
      expect(err, spec).toBeInstanceOf(SliceWiseError);
      expect((err as SliceWiseError).status).toBe(400);
      expect((err as SliceWiseError).code).toBe('bad_source');
      for (const form of ['synthetic:N', 'path:DIR_OR_ARCHIVE', 'https://', 'kaggle:OWNER/DATASET']) expect((err as Error).message).toContain(form);
    }
    expect(ACCEPTED_SOURCE_FORMS.length).toBe(5);
  });

  it('never prints credentials, and refuses to store them', () => {
    const d = describeSource({ kind: 'https', url: 'https://alice:s3cret@example.org/a.zip?token=t0ps3cret' });
    expect(d).not.toContain('s3cret');
    expect(d).not.toContain('t0ps3cret');
    expect(d).toContain('example.org/a.zip');
    for (const spec of ['https://alice:s3cret@example.org/a.zip', 'https://example.org/a.zip?X-Amz-Signature=t0ps3cret', 'https://example.org/a.zip?token=t0ps3cret']) {
      let refused: Error | undefined;
      try {
        parseSource(spec);
      } catch (e) {
        refused = e as Error;
      }
      expect(refused?.message, spec).toMatch(/credential/);
      expect(refused!.message).not.toContain('s3cret');
    }
    // What a run stores reads back as the same source.
    const pinned = `https://example.org/a.zip?part=2#sha256=${'ab'.repeat(32)}`;
    expect(formatSource(parseSource(pinned))).toBe(pinned);
    expect(parseSource(formatSource(parseSource(pinned)))).toEqual(parseSource(pinned));
    let msg = '';
    try {
      parseSource('http://bob:hunter22@example.org/a.zip');
    } catch (e) {
      msg = (e as Error).message + JSON.stringify((e as SliceWiseError).details);
    }
    expect(msg).toContain('example.org');
    expect(msg).not.toContain('hunter22');
    expect(describeSource({ kind: 'kaggle', owner: 'o', dataset: 'd' })).toBe('kaggle:o/d');
    expect(describeSource({ kind: 'synthetic', count: 3 })).toBe('synthetic:3');
  });
});

// ------------------------------------------------------------------------------------------------ download + extract

describe('download and extract over HTTP', () => {
  let server: TestServer;
  let hits: Record<string, number>;
  let dropFirst: boolean;
  const big = bigBody(256 * 1024);
  const bigV2 = Buffer.from(big).reverse();

  beforeAll(async () => {
    hits = {};
    server = await startServer((req, res) => {
      const path = (req.url ?? '').split('?')[0]!;
      hits[path] = (hits[path] ?? 0) + 1;
      if (path === '/kaggle.zip') return serveBody(req, res, kaggleZip);
      if (path === '/brats.tar.gz') return serveBody(req, res, bratsTgz);
      if (path === '/blob.bin') return serveBody(req, res, big);
      if (path === '/blob-no-range.bin') {
        if (!req.headers.range && hits[path] === 1) return serveHalfThenDrop(res, big);
        return serveBody(req, res, big, { ignoreRange: true });
      }
      if (path === '/flaky.bin') {
        if (dropFirst) {
          dropFirst = false;
          return serveHalfThenDrop(res, big);
        }
        return serveBody(req, res, big);
      }
      if (path === '/versioned.bin') {
        // Version 1 is served once, half, then the connection drops; afterwards the file is version 2.
        const version = hits[path] === 1 ? 1 : 2;
        const body = version === 1 ? big : bigV2;
        const etag = `"v${version}"`;
        if (version === 1) {
          res.writeHead(200, { 'content-length': body.length, etag });
          res.write(body.subarray(0, body.length >> 1), () => setTimeout(() => res.socket?.destroy(), 20));
          return;
        }
        if (req.headers['if-range'] && req.headers['if-range'] !== etag) {
          res.writeHead(200, { 'content-length': body.length, etag });
          return res.end(body);
        }
        return serveBody(req, res, body);
      }
      if (path === '/redirect') {
        res.writeHead(302, { location: '/kaggle.zip' });
        return res.end();
      }
      if (path === '/slow.bin') {
        res.writeHead(200, { 'content-length': big.length });
        res.write(big.subarray(0, 1024));
        return; // never finishes
      }
      if (path === '/page.zip') {
        res.writeHead(200, { 'content-type': 'text/html' });
        return res.end('<!DOCTYPE html><html><body>Please log in</body></html>');
      }
      res.writeHead(404);
      res.end('not found');
    });
  });
  afterAll(async () => {
    await server.close();
  });

  it('downloads and extracts a zip; reuses the completed result', async () => {
    const dest = join(tmp, 'm-zip');
    const src = parseSource(`${server.url}/kaggle.zip`);
    const msgs: string[] = [];
    const r = await materializeSource(src, dest, { kind: 'kaggle', onProgress: (m) => msgs.push(m) });
    expect(r.synthetic).toBe(false);
    expect(r.dir).toBe(join(dest, 'extracted', 'brain_tumor_dataset'));
    expect(await readFile(join(r.dir, 'yes', 'Y1.jpg'), 'utf8')).toBe('yes-image-1');
    expect(await readFile(join(r.dir, 'no', '1 no.jpeg'), 'utf8')).toBe('no-image-2');
    expect(await exists(join(dest, 'extracted', '__MACOSX'))).toBe(false);
    expect(await exists(join(dest, 'extracted', '.complete'))).toBe(true);
    expect(await exists(join(dest, '.complete'))).toBe(true);
    expect(await exists(join(dest, 'download', 'kaggle.zip'))).toBe(false); // archive removed after extraction
    expect(msgs.some((m) => m.startsWith('downloading'))).toBe(true);

    const before = hits['/kaggle.zip'];
    const again = await materializeSource(src, dest, { kind: 'kaggle' });
    expect(again).toEqual(r);
    expect(hits['/kaggle.zip']).toBe(before);
  });

  it('downloads a sha256-pinned tar.gz and finds the BraTS data root inside', async () => {
    const dest = join(tmp, 'm-tgz');
    const r = await materializeSource(parseSource(`${server.url}/brats.tar.gz#sha256=${sha256(bratsTgz)}`), dest, { kind: 'brats' });
    expect(r.dir).toBe(join(dest, 'extracted', 'BraTS2020_TrainingData', 'MICCAI_BraTS2020_TrainingData'));
    expect((await readdir(r.dir)).sort()).toEqual(['BraTS20_Training_001', 'BraTS20_Training_002']);
    expect(await readFile(join(r.dir, 'BraTS20_Training_002', 'BraTS20_Training_002_seg.nii'), 'utf8')).toBe('BraTS20_Training_002-seg');
  });

  it('follows redirects', async () => {
    const dest = join(tmp, 'redir', 'k.zip');
    const r = await downloadFile(`${server.url}/redirect`, dest);
    expect(sha256(await readFile(dest))).toBe(sha256(kaggleZip));
    expect(r.sha256).toBe(sha256(kaggleZip));
  });

  it('resumes a dropped download with a Range request', async () => {
    const dest = join(tmp, 'resume', 'blob.bin');
    dropFirst = true;
    const before = server.requests.length;
    await expect(downloadFile(`${server.url}/flaky.bin`, dest, { retries: 0 })).rejects.toBeInstanceOf(SliceWiseError);
    const partSize = (await stat(dest + '.part')).size;
    expect(partSize).toBeGreaterThan(0);
    expect(partSize).toBeLessThan(big.length);
    expect(await exists(dest)).toBe(false);

    const progress: number[] = [];
    const r = await downloadFile(`${server.url}/flaky.bin`, dest, { sha256: sha256(big), onProgress: (b) => progress.push(b) });
    expect(r.resumed).toBe(true);
    expect(r.bytes).toBe(big.length);
    const reqs = server.requests.slice(before).filter((q) => q.url === '/flaky.bin');
    expect(reqs).toHaveLength(2);
    expect(reqs[0]!.headers.range).toBeUndefined();
    expect(reqs[1]!.headers.range).toBe(`bytes=${partSize}-`);
    expect((await readFile(dest)).equals(big)).toBe(true);
    expect(await exists(dest + '.part')).toBe(false);
    expect(progress[0]).toBe(partSize);
    expect(progress.at(-1)).toBe(big.length);

    // Already there: reused without a request (and verified when pinned).
    const n = server.requests.length;
    const again = await downloadFile(`${server.url}/flaky.bin`, dest, { sha256: sha256(big) });
    expect(again.reused).toBe(true);
    expect(server.requests.length).toBe(n);
  });

  it('retries by itself, resuming, when the connection drops', async () => {
    const dest = join(tmp, 'resume2', 'blob.bin');
    dropFirst = true;
    const before = server.requests.length;
    const r = await downloadFile(`${server.url}/flaky.bin`, dest);
    expect(r.resumed).toBe(true);
    expect((await readFile(dest)).equals(big)).toBe(true);
    const ranges = server.requests.slice(before).map((q) => q.headers.range);
    expect(ranges[0]).toBeUndefined();
    expect(ranges[1]).toMatch(/^bytes=\d+-$/);
  });

  it('restarts from zero when the server ignores Range (200)', async () => {
    const dest = join(tmp, 'norange', 'blob.bin');
    await expect(downloadFile(`${server.url}/blob-no-range.bin`, dest, { retries: 0 })).rejects.toThrow();
    expect((await stat(dest + '.part')).size).toBeGreaterThan(0);
    const r = await downloadFile(`${server.url}/blob-no-range.bin`, dest, { sha256: sha256(big) });
    expect(r.resumed).toBe(false);
    expect((await readFile(dest)).equals(big)).toBe(true);
  });

  it('sends If-Range with the ETag of the partial data; a changed file restarts from zero', async () => {
    const dest = join(tmp, 'ifrange', 'v.bin');
    await expect(downloadFile(`${server.url}/versioned.bin`, dest, { retries: 0 })).rejects.toThrow();
    expect(JSON.parse(await readFile(dest + '.part.meta', 'utf8'))).toEqual({ validator: '"v1"' });
    const r = await downloadFile(`${server.url}/versioned.bin`, dest);
    const last = server.requests.filter((q) => q.url === '/versioned.bin').at(-1)!;
    expect(last.headers['if-range']).toBe('"v1"');
    expect(last.headers.range).toMatch(/^bytes=\d+-$/);
    expect(r.resumed).toBe(false);
    expect((await readFile(dest)).equals(bigV2)).toBe(true);
    expect(await exists(dest + '.part.meta')).toBe(false);
  });

  it('rejects a sha256 mismatch, naming expected and actual, and deletes the partial file', async () => {
    const dest = join(tmp, 'sum', 'blob.bin');
    const wrong = '0'.repeat(64);
    let err: SliceWiseError | undefined;
    try {
      await downloadFile(`${server.url}/blob.bin`, dest, { sha256: wrong });
    } catch (e) {
      err = e as SliceWiseError;
    }
    expect(err).toBeInstanceOf(SliceWiseError);
    expect(err!.code).toBe('checksum_mismatch');
    expect(err!.message).toContain(wrong);
    expect(err!.message).toContain(sha256(big));
    expect(await exists(dest)).toBe(false);
    expect(await exists(dest + '.part')).toBe(false);

    // Through materializeSource, via the URL fragment.
    await expect(materializeSource(parseSource(`${server.url}/kaggle.zip#sha256=${wrong}`), join(tmp, 'sum-m'), { kind: 'kaggle' })).rejects.toMatchObject({
      code: 'checksum_mismatch',
    });
    expect(await exists(join(tmp, 'sum-m', '.complete'))).toBe(false);
  });

  it('404 names the URL', async () => {
    const url = `${server.url}/missing/brats.zip`;
    const err = await downloadFile(url, join(tmp, 'x', 'y.zip')).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(SliceWiseError);
    expect((err as SliceWiseError).code).toBe('download_not_found');
    expect((err as Error).message).toContain(url);
    expect((err as Error).message).toContain('404');
    expect(server.requests.filter((r) => r.url === '/missing/brats.zip')).toHaveLength(1); // not retried
  });

  it('an abort keeps the partial file for a later resume', async () => {
    const dest = join(tmp, 'abort', 'slow.bin');
    const ac = new AbortController();
    const p = downloadFile(`${server.url}/slow.bin`, dest, { signal: ac.signal }).catch((e: unknown) => e);
    // Abort once the first KiB has reached the partial file (the server never sends the rest).
    for (let i = 0; i < 200 && ((await stat(dest + '.part').catch(() => undefined))?.size ?? 0) < 1024; i++) {
      await new Promise((r) => setTimeout(r, 10));
    }
    ac.abort();
    const err = await p;
    expect((err as Error).name).toBe('AbortError');
    expect((await stat(dest + '.part')).size).toBe(1024);
    expect(await exists(dest)).toBe(false);
  });

  it('detects the format by magic bytes and explains non-archives', async () => {
    const zipAsBin = join(tmp, 'magic', 'data.bin');
    await mkdir(dirname(zipAsBin), { recursive: true });
    await writeFile(zipAsBin, kaggleZip);
    const r = await extractArchive(zipAsBin, join(tmp, 'magic', 'out'));
    expect(r.format).toBe('zip');
    expect(await readFile(join(r.dir, 'brain_tumor_dataset', 'yes', 'Y1.jpg'), 'utf8')).toBe('yes-image-1');

    const tgzAsZip = join(tmp, 'magic', 'misnamed.zip');
    await writeFile(tgzAsZip, bratsTgz);
    expect((await extractArchive(tgzAsZip, join(tmp, 'magic', 'out2'))).format).toBe('tar.gz');

    const dest = join(tmp, 'page');
    const err = await materializeSource(parseSource(`${server.url}/page.zip`), dest, { kind: 'kaggle' }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'unsupported_archive' });
    expect((err as Error).message).toMatch(/web page/);
    expect(await exists(join(dest, 'extracted'))).toBe(false);
  });
});

// ------------------------------------------------------------------------------------------------ zip slip

describe('extractArchive safety', () => {
  it('rejects zip entries escaping the destination and leaves nothing behind', async () => {
    for (const name of ['../evil.txt', 'ok/../../evil.txt', '/tmp/slicewise-evil.txt']) {
      const root = await mkdtemp(join(tmp, 'slip-'));
      const zip = join(root, 'evil.zip');
      await writeFile(zip, buildZip([{ name: 'fine.txt', data: 'fine' }, { name, data: 'pwned' }]));
      const dest = join(root, 'inner', 'out');
      const err = await extractArchive(zip, dest).catch((e: unknown) => e);
      expect(err, name).toBeInstanceOf(SliceWiseError);
      expect((err as SliceWiseError).code).toBe('zip_slip');
      expect((err as Error).message).toContain(name);
      expect(await exists(join(root, 'inner', 'evil.txt'))).toBe(false);
      expect(await exists(join(root, 'evil.txt'))).toBe(false);
      expect(await exists(dest)).toBe(false);
      expect(await readdir(join(root, 'inner'))).toEqual([]); // temp directory removed
    }
    expect(await exists('/tmp/slicewise-evil.txt')).toBe(false);
  });

  it('rejects tar entries escaping the destination and skips links that stay inside', async () => {
    for (const name of ['../evil.txt', 'a/../../evil.txt', '/tmp/slicewise-evil-tar.txt']) {
      const root = await mkdtemp(join(tmp, 'tarslip-'));
      const archive = join(root, 'evil.tgz');
      await writeFile(archive, gzipSync(Buffer.concat([tarEntry('fine.txt', 'fine'), tarEntry(name, 'pwned'), Buffer.alloc(1024)])));
      const err = await extractArchive(archive, join(root, 'inner', 'out')).catch((e: unknown) => e);
      expect(err, name).toMatchObject({ code: 'zip_slip' });
      expect(await exists(join(root, 'evil.txt'))).toBe(false);
      expect(await exists(join(root, 'inner', 'out'))).toBe(false);
    }
    expect(await exists('/tmp/slicewise-evil-tar.txt')).toBe(false);

    const root = await mkdtemp(join(tmp, 'tarlink-'));
    const archive = join(root, 'links.tar');
    await writeFile(archive, Buffer.concat([tarEntry('fine.txt', 'fine'), tarEntry('sub/here', '', '2', '../fine.txt'), tarEntry('again', '', '1', 'fine.txt'), Buffer.alloc(1024)]));
    const r = await extractArchive(archive, join(root, 'out'));
    expect(r).toMatchObject({ format: 'tar', entries: 1, skipped: 2 });
    expect((await readdir(r.dir)).sort()).toEqual(['.complete', 'fine.txt']);
  });

  it('replaces an earlier extraction and writes the marker last', async () => {
    const root = await mkdtemp(join(tmp, 'replace-'));
    const zip = join(root, 'a.zip');
    await writeFile(zip, buildZip([{ name: 'a.txt', data: 'A' }, { name: '.complete', data: 'forged' }]));
    const dest = join(root, 'out');
    await mkdir(dest);
    await writeFile(join(dest, 'stale.txt'), 'old');
    await extractArchive(zip, dest);
    expect((await readdir(dest)).sort()).toEqual(['.complete', 'a.txt']);
    expect(JSON.parse(await readFile(join(dest, '.complete'), 'utf8'))).toMatchObject({ archive: 'a.zip', format: 'zip' });
  });
});

// ------------------------------------------------------------------------------------------------ Kaggle

describe('Kaggle API', () => {
  const USER = 'slicewise-tester';
  const KEY = 'k3y-0123456789abcdef0123456789abcdef';
  let api: TestServer;
  let storage: TestServer;

  beforeAll(async () => {
    storage = await startServer((req, res) => {
      if (!(req.url ?? '').startsWith('/blob/brain-mri.zip?')) {
        res.writeHead(404);
        return res.end();
      }
      serveBody(req, res, kaggleZip);
    });
    api = await startServer((req, res) => {
      const expected = 'Basic ' + Buffer.from(`${USER}:${KEY}`).toString('base64');
      if (req.headers.authorization !== expected) {
        res.writeHead(401, { 'content-type': 'application/json', 'www-authenticate': 'Basic realm="kaggle"' });
        return res.end(JSON.stringify({ code: 401, message: 'Unauthenticated' }));
      }
      if (req.url === '/api/v1/datasets/download/navoneel/brain-mri') {
        res.writeHead(302, { location: `${storage.url}/blob/brain-mri.zip?X-Goog-Signature=abc123` });
        return res.end();
      }
      res.writeHead(404, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ code: 404, message: 'Not found' }));
    });
  });
  afterAll(async () => {
    await api.close();
    await storage.close();
  });

  it('answers 401 without credentials', async () => {
    const err = await downloadFile(`${api.url}/api/v1/datasets/download/navoneel/brain-mri`, join(tmp, 'k0', 'x.zip')).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'download_unauthorized' });
    expect((err as Error).message).toContain(`${api.url}/api/v1/datasets/download/navoneel/brain-mri`);
  });

  it('downloads with credentials from the environment, without leaking them', async () => {
    process.env.KAGGLE_USERNAME = USER;
    process.env.KAGGLE_KEY = KEY;
    process.env.KAGGLE_API_BASE = `${api.url}/api/v1`;
    process.env.KAGGLE_CONFIG_DIR = join(tmp, 'no-such-kaggle-dir');
    const dest = join(tmp, 'kaggle-ok');
    const msgs: string[] = [];
    const r = await materializeSource(parseSource('kaggle:navoneel/brain-mri'), dest, {
      kind: 'kaggle',
      onProgress: (m, d, t) => msgs.push(`${m} ${d ?? ''} ${t ?? ''}`),
    });
    expect(r).toMatchObject({ description: 'kaggle:navoneel/brain-mri', synthetic: false });
    expect(r.dir).toBe(join(dest, 'extracted', 'brain_tumor_dataset'));
    expect(await readFile(join(r.dir, 'yes', 'Y1.jpg'), 'utf8')).toBe('yes-image-1');

    // The storage host got the request without the Authorization header.
    expect(storage.requests.length).toBeGreaterThan(0);
    for (const q of storage.requests) expect(q.headers.authorization).toBeUndefined();
    expect(api.requests.at(-1)!.headers.authorization).toMatch(/^Basic /);

    // The key is nowhere under destDir, in the result, or in progress messages.
    const b64 = Buffer.from(`${USER}:${KEY}`).toString('base64');
    for (const f of await listFiles(dest)) {
      const text = (await readFile(f)).toString('latin1');
      expect(text, f).not.toContain(KEY);
      expect(text, f).not.toContain(b64);
    }
    expect(JSON.stringify(r)).not.toContain(KEY);
    expect(msgs.join('\n')).not.toContain(KEY);
  });

  it('turns URL user-info into Basic auth and never echoes it', async () => {
    const withCreds = api.url.replace('http://', `http://${USER}:${KEY}@`);
    const dest = join(tmp, 'userinfo', 'k.zip');
    await downloadFile(`${withCreds}/api/v1/datasets/download/navoneel/brain-mri`, dest);
    expect(sha256(await readFile(dest))).toBe(sha256(kaggleZip));
    const err = await downloadFile(`${withCreds}/api/v1/datasets/download/navoneel/nope`, join(tmp, 'userinfo', 'x.zip')).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'download_not_found' });
    expect(`${(err as Error).message} ${JSON.stringify((err as SliceWiseError).details)}`).not.toContain(KEY);
    expect((err as Error).message).toContain(`${api.url}/api/v1/datasets/download/navoneel/nope`);
  });

  it('keeps the key out of error messages', async () => {
    const creds = { username: USER, key: 'wrong-' + KEY };
    const errors: unknown[] = [];
    errors.push(await downloadKaggleDataset('navoneel', 'brain-mri', join(tmp, 'kaggle-bad'), { apiBase: `${api.url}/api/v1`, credentials: creds }).catch((e: unknown) => e));
    process.env.KAGGLE_USERNAME = USER;
    process.env.KAGGLE_KEY = KEY;
    errors.push(await downloadKaggleDataset('navoneel', 'no-such-dataset', join(tmp, 'kaggle-404'), { apiBase: `${api.url}/api/v1` }).catch((e: unknown) => e));
    expect(errors[0]).toMatchObject({ code: 'download_unauthorized' });
    expect((errors[0] as Error).message).toMatch(/Kaggle rejected the credentials/);
    expect(errors[1]).toMatchObject({ code: 'download_not_found' });
    expect((errors[1] as Error).message).toContain('navoneel/no-such-dataset');
    for (const e of errors) {
      const text = `${(e as Error).message}\n${(e as Error).stack}\n${JSON.stringify((e as SliceWiseError).details)}\n${inspect(e)}`;
      expect(text).not.toContain(KEY);
      expect(text).not.toContain(Buffer.from(`${USER}:${KEY}`).toString('base64'));
    }
    for (const d of ['kaggle-bad', 'kaggle-404']) {
      if (!(await exists(join(tmp, d)))) continue;
      for (const f of await listFiles(join(tmp, d))) expect((await readFile(f)).toString('latin1')).not.toContain(KEY);
    }
  });

  it('kaggleCredentials: env first, then ~/.kaggle/kaggle.json, else a clear error', async () => {
    const home = await mkdtemp(join(tmp, 'home-'));
    await expect(async () => kaggleCredentials({}, home)).rejects.toThrow();
    let err: SliceWiseError | undefined;
    try {
      kaggleCredentials({}, home);
    } catch (e) {
      err = e as SliceWiseError;
    }
    expect(err?.code).toBe('kaggle_credentials');
    expect(err?.message).toContain('KAGGLE_USERNAME');
    expect(err?.message).toContain('KAGGLE_KEY');
    expect(err?.message).toContain('kaggle.json');

    await mkdir(join(home, '.kaggle'));
    await writeFile(join(home, '.kaggle', 'kaggle.json'), JSON.stringify({ username: 'filed', key: KEY }), { mode: 0o600 });
    const c = kaggleCredentials({}, home);
    expect(c).toEqual({ username: 'filed', key: KEY });
    expect(JSON.stringify(c)).not.toContain(KEY);
    expect(inspect(c)).not.toContain(KEY);

    expect(kaggleCredentials({ KAGGLE_USERNAME: 'env', KAGGLE_KEY: 'envkey' }, home)).toEqual({ username: 'env', key: 'envkey' });

    await writeFile(join(home, '.kaggle', 'kaggle.json'), `{"username": "filed", "key": "${KEY}"`); // broken JSON
    let bad: Error | undefined;
    try {
      kaggleCredentials({}, home);
    } catch (e) {
      bad = e as Error;
    }
    expect(bad).toMatchObject({ code: 'kaggle_credentials' });
    expect(bad!.message).not.toContain(KEY);
  });
});

// ------------------------------------------------------------------------------------------------ other sources

describe('materializeSource: synthetic and path', () => {
  it('synthetic BraTS and Kaggle, reused when complete', async () => {
    const dest = join(tmp, 'syn-brats');
    const r = await materializeSource(parseSource('synthetic:2'), dest, { kind: 'brats', synth: { size: [32, 32, 16] } });
    expect(r).toEqual({ dir: join(dest, 'brats'), description: 'synthetic:2', synthetic: true });
    expect((await readdir(r.dir)).sort()).toEqual(['BraTS20_Training_001', 'BraTS20_Training_002']);
    expect(await exists(join(dest, 'SYNTHETIC.txt'))).toBe(true);
    expect(await readdir(join(dest, 'kaggle', 'yes'))).toEqual([]); // only the requested kind

    const mtime = (await stat(join(r.dir, 'BraTS20_Training_001', 'BraTS20_Training_001_flair.nii.gz'))).mtimeMs;
    const again = await materializeSource(parseSource('synthetic:2'), dest, { kind: 'brats', synth: { size: [32, 32, 16] } });
    expect(again).toEqual(r);
    expect((await stat(join(r.dir, 'BraTS20_Training_001', 'BraTS20_Training_001_flair.nii.gz'))).mtimeMs).toBe(mtime);

    // A different count replaces the result.
    const three = await materializeSource(parseSource('synthetic:3'), dest, { kind: 'brats', synth: { size: [32, 32, 16] } });
    expect(await readdir(three.dir)).toHaveLength(3);

    const k = await materializeSource(parseSource('synthetic:3'), join(tmp, 'syn-kaggle'), { kind: 'kaggle', synth: { kaggleSize: 64 } });
    expect(k.dir).toBe(join(tmp, 'syn-kaggle', 'kaggle'));
    expect(await readdir(join(k.dir, 'yes'))).toHaveLength(3);
    expect(await readdir(join(k.dir, 'no'))).toHaveLength(3);
  });

  it('path: a directory is used in place, an archive is extracted, a missing path is a 404', async () => {
    // In place: the located data root inside the given directory, no copy.
    const syn = await materializeSource(parseSource('synthetic:1'), join(tmp, 'p-src'), { kind: 'brats', synth: { size: [32, 32, 16] } });
    const dest = join(tmp, 'p-dest');
    const r = await materializeSource(parseSource(`path:${join(tmp, 'p-src')}`), dest, { kind: 'brats' });
    expect(r).toEqual({ dir: syn.dir, description: `path:${join(tmp, 'p-src')}`, synthetic: true });
    expect(await exists(dest)).toBe(false);

    const archive = join(tmp, 'p-archive.tgz');
    await writeFile(archive, bratsTgz);
    const a = await materializeSource(parseSource(`path:${archive}`), join(tmp, 'p-dest2'), { kind: 'brats' });
    expect(a.dir).toBe(join(tmp, 'p-dest2', 'extracted', 'BraTS2020_TrainingData', 'MICCAI_BraTS2020_TrainingData'));
    expect(a.synthetic).toBe(false);
    expect(await exists(archive)).toBe(true); // the user's archive is left alone

    const missing = join(tmp, 'does-not-exist');
    const err = await materializeSource(parseSource(`path:${missing}`), join(tmp, 'p-dest3'), { kind: 'brats' }).catch((e: unknown) => e);
    expect(err).toMatchObject({ status: 404, code: 'not_found' });
    expect((err as Error).message).toContain(missing);
  });
});
