/**
 * What a hostile API caller must not get from a run's sources: a folder outside the allowed roots read (directly,
 * through `..` or through a symlink), a `file:` URL, a request to a private address (directly, through a name
 * that resolves to one, or through a redirect), an archive that expands without bound, entries written outside
 * the destination, or more patients than the limit. Real Redis and PGlite behind the real app, real servers on
 * loopback, real archives built here.
 */
import type { AppContext } from '../src/context.ts';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { randomBytes } from 'node:crypto';
import { lookup } from 'node:dns/promises';
import { mkdir, mkdtemp, readdir, readFile, realpath, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import { loadConfig } from '../src/config/load.ts';
import type { RunRow } from '../src/db/schema.ts';
import { downloadFile } from '../src/download/fetch.ts';
import { extractArchive } from '../src/download/extract.ts';
import { blockedRange, pinnedLookup, resolvePublic } from '../src/download/network.ts';
import { allowOperatorSources, resolveAllowedPath } from '../src/download/policy.ts';
import { parseSource } from '../src/download/sources.ts';
import { SliceWiseError } from '../src/lib/errors.ts';
import { downloadDataset } from '../src/workers/download-dataset.ts';
import type { InProcessContext, RunJobData } from '../src/workers/define.ts';
import { buildZip, deflatedZeros, gzipWrap, tarEntry, tarHeader } from './helpers/zip.ts';
import { bareEnv, runCli } from './helpers/cli.ts';
import { harness, json, postRun, waitForRun, type Harness } from './helpers/services.ts';

const KNOBS = ['SLICEWISE_ALLOWED_ROOTS', 'SLICEWISE_ALLOW_PRIVATE_NETWORKS', 'SLICEWISE_EXTRACT_MAX_BYTES', 'SLICEWISE_EXTRACT_MAX_RATIO', 'SLICEWISE_MAX_PATIENTS', 'SLICEWISE_MAX_KAGGLE_IMAGES'];
const saved: Record<string, string | undefined> = {};
let tmp: string;

beforeAll(async () => {
  for (const k of KNOBS) {
    saved[k] = process.env[k];
    delete process.env[k];
  }
  tmp = await realpath(await mkdtemp(join(tmpdir(), 'slicewise-sec-')));
});
afterEach(() => {
  for (const k of KNOBS) delete process.env[k];
});
afterAll(async () => {
  for (const k of KNOBS) {
    if (saved[k] === undefined) delete process.env[k];
    else process.env[k] = saved[k];
  }
  await rm(tmp, { recursive: true, force: true });
});

async function exists(p: string): Promise<boolean> {
  return stat(p).then(
    () => true,
    () => false,
  );
}

async function startServer(handler: http.RequestListener): Promise<{ url: string; hits: () => number; close(): Promise<void> }> {
  let hits = 0;
  const server = http.createServer((req, res) => {
    hits++;
    handler(req, res);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    hits: () => hits,
    close: () =>
      new Promise<void>((r) => {
        server.closeAllConnections();
        server.close(() => r());
      }),
  };
}

/** What a download step's body gets for a run row that reached the worker with these sources (not through the API). */
function forgedDownload(h: { ctx: AppContext; dataDir: string }, id: string, sources: { brats: string; kaggle: string }): InProcessContext<RunJobData> {
  const run = { id, dataDir: h.dataDir, sources: { ...sources, skipDownload: false }, config: loadConfig({ trainingMode: 'quick' }) } as unknown as RunRow;
  return { ctx: h.ctx, run, config: run.config, signal: new AbortController().signal, progress: async () => {}, log: () => {} } as unknown as InProcessContext<RunJobData>;
}

async function caught(p: Promise<unknown>): Promise<SliceWiseError> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(SliceWiseError);
  return err as SliceWiseError;
}

// ------------------------------------------------------------------------------------------------ the API's door

describe('POST /runs: sources', () => {
  let h: Harness;
  let allowed: string;
  let outside: string;
  beforeAll(async () => {
    h = await harness('postgres', { workers: false });
    allowed = join(tmp, 'allowed');
    outside = join(tmp, 'outside');
    await mkdir(join(allowed, 'brats'), { recursive: true });
    await mkdir(join(outside, 'secret'), { recursive: true });
    await writeFile(join(outside, 'secret', 'data.txt'), 'not yours');
    await symlink(join(outside, 'secret'), join(allowed, 'link-out'));
  });
  afterAll(async () => {
    await h?.close();
  });

  async function refused(sources: Record<string, string>, field: string, code: string) {
    const res = await postRun(h.app, { mode: 'data-only', sources });
    const body = await json(res);
    expect(res.status, JSON.stringify(body)).toBe(400);
    expect(body.error.code).toBe(code);
    expect(body.error.message).toContain(field);
    return body.error as { message: string; details: Record<string, unknown> };
  }

  it('refuses a path outside the allowed roots, directly, via .. and via a symlink, naming the field and the roots', async () => {
    process.env.SLICEWISE_ALLOWED_ROOTS = allowed;
    const roots = [await realpath(h.dataDir), allowed];
    for (const [sources, field] of [
      [{ brats: 'path:/etc' }, 'sources.brats'],
      [{ kaggle: `path:${allowed}/../outside/secret` }, 'sources.kaggle'],
      [{ brats: `path:${join(allowed, 'link-out')}` }, 'sources.brats'],
      [{ brats: `path:${join(allowed, 'link-out', 'data.txt')}` }, 'sources.brats'],
      // Missing or not, the answer is the same: a caller learns nothing about what exists outside.
      [{ kaggle: `path:${join(outside, 'no-such-thing')}` }, 'sources.kaggle'],
    ] as const) {
      const err = await refused(sources, field, 'path_not_allowed');
      for (const r of roots) expect(err.message).toContain(r);
      expect(err.details).toMatchObject({ field, allowedRoots: roots });
      expect(err.message).not.toContain(join(outside, 'secret', 'data.txt')); // a link's target is not revealed
    }
  });

  it('accepts paths inside the data dir and the allowed roots', async () => {
    process.env.SLICEWISE_ALLOWED_ROOTS = `${join(tmp, 'elsewhere')}:${allowed}`;
    await mkdir(join(h.dataDir, 'mine'), { recursive: true });
    const res = await postRun(h.app, { mode: 'data-only', sources: { brats: `path:${join(allowed, 'brats')}`, kaggle: `path:${join(h.dataDir, 'mine')}` } });
    expect(res.status).toBe(201);
    // Without the knob the same request is refused: the roots are what decides.
    delete process.env.SLICEWISE_ALLOWED_ROOTS;
    await refused({ brats: `path:${join(allowed, 'brats')}` }, 'sources.brats', 'path_not_allowed');
  });

  it('refuses file: URLs with a clear message', async () => {
    const err = await refused({ brats: 'file:///etc/passwd' }, 'sources.brats', 'bad_source');
    expect(err.message).toMatch(/file: URLs are not accepted.*path:DIR_OR_ARCHIVE/);
  });

  it('refuses private and loopback address literals and localhost, unless the operator allows them', async () => {
    for (const url of ['https://10.1.2.3/brats.zip', 'https://169.254.169.254/latest/meta-data/', 'https://[::1]/brats.zip', 'https://localhost/brats.zip', 'http://127.0.0.1:9/x.zip', 'https://[::ffff:192.168.0.1]/x.zip', 'https://100.64.0.1/x.zip']) {
      const err = await refused({ kaggle: url }, 'sources.kaggle', 'private_address');
      expect(err.message).toContain('SLICEWISE_ALLOW_PRIVATE_NETWORKS');
    }
    process.env.SLICEWISE_ALLOW_PRIVATE_NETWORKS = '1';
    expect((await postRun(h.app, { mode: 'data-only', sources: { kaggle: 'https://10.1.2.3/brats.zip' } })).status).toBe(201);
  });

  it('caps the patients of a run: synthetic:N and max_patients, naming the count and the limit', async () => {
    process.env.SLICEWISE_MAX_PATIENTS = '50';
    const a = await refused({ brats: 'synthetic:51' }, 'sources.brats', 'too_many_patients');
    expect(a.message).toMatch(/51 patients.*limit of 50.*SLICEWISE_MAX_PATIENTS/);
    const res = await postRun(h.app, { mode: 'data-only', overrides: { data: { max_patients: 500 } } });
    expect(res.status).toBe(400);
    const b = (await json(res)).error;
    expect(b.code).toBe('too_many_patients');
    expect(b.message).toMatch(/max_patients.*500 patients.*limit of 50/);
    expect((await postRun(h.app, { mode: 'data-only', sources: { brats: 'synthetic:50' } })).status).toBe(201);
  });

  it('caps synthetic:N: Kaggle images per class (SLICEWISE_MAX_KAGGLE_IMAGES) and BraTS patients beyond what the generator makes', async () => {
    // By default the cap is what the generator makes per class.
    const huge = await refused({ kaggle: 'synthetic:100000000' }, 'sources.kaggle', 'too_many_images');
    expect(huge.message).toMatch(/100000000 images per class.*limit of 999 per class.*SLICEWISE_MAX_KAGGLE_IMAGES/);
    expect(huge.details).toMatchObject({ field: 'sources.kaggle', count: 100000000, limit: 999 });
    process.env.SLICEWISE_MAX_KAGGLE_IMAGES = '10';
    const over = await refused({ kaggle: 'synthetic:11' }, 'sources.kaggle', 'too_many_images');
    expect(over.message).toMatch(/11 images per class.*limit of 10 per class.*SLICEWISE_MAX_KAGGLE_IMAGES/);
    expect((await postRun(h.app, { mode: 'data-only', sources: { kaggle: 'synthetic:10' } })).status).toBe(201);
    // The patient cap stays BraTS's own: a Kaggle count is not held against it, nor a BraTS one against this.
    process.env.SLICEWISE_MAX_PATIENTS = '5';
    expect((await postRun(h.app, { mode: 'data-only', sources: { brats: 'synthetic:5', kaggle: 'synthetic:10' } })).status).toBe(201);
    // Within SLICEWISE_MAX_PATIENTS (5000) but more than the generator makes: refused here, not by a worker later.
    delete process.env.SLICEWISE_MAX_PATIENTS;
    const brats = await refused({ brats: 'synthetic:2000' }, 'sources.brats', 'too_many_patients');
    expect(brats.message).toMatch(/2000 patients, more than the synthetic generator makes \(999\)/);
  });

  it('the CLI refuses a synthetic:N over the caps while reading its command line, naming the flag', async () => {
    const dataDir = join(tmp, 'cli-capped');
    const kaggle = await runCli(['pipeline', '--mode', 'data-only', '--kaggle-source', 'synthetic:11', '--data-dir', dataDir], tmp, bareEnv({ SLICEWISE_MAX_KAGGLE_IMAGES: '10' }));
    expect(kaggle.code, kaggle.out).toBe(1);
    expect(kaggle.out).toMatch(/--kaggle-source: synthetic:11: 11 images per class, more than the limit of 10 per class \(SLICEWISE_MAX_KAGGLE_IMAGES\)/);
    const brats = await runCli(['evaluate', '--run', 'run-x', '--brats-source', 'synthetic:51', '--data-dir', dataDir], tmp, bareEnv({ SLICEWISE_MAX_PATIENTS: '50' }));
    expect(brats.code, brats.out).toBe(1);
    expect(brats.out).toMatch(/--brats-source: synthetic:51: 51 patients, more than the limit of 50 per run \(SLICEWISE_MAX_PATIENTS\)/);
    // Nothing started: no data dir, no Redis, no database.
    expect(await exists(dataDir)).toBe(false);
  });

  it('the download step refuses a synthetic:N over its own process\'s cap before generating anything', async () => {
    process.env.SLICEWISE_MAX_KAGGLE_IMAGES = '3';
    const s = forgedDownload(h, 'run-forged-count', { brats: 'synthetic', kaggle: 'synthetic:4' });
    const err = await caught(downloadDataset('kaggle', s));
    expect(err.code).toBe('too_many_images');
    expect(err.message).toMatch(/synthetic:4: 4 images per class, more than the limit of 3 per class/);
    expect(await exists(join(h.dataDir, 'raw'))).toBe(false);
  });

  it("the download step refuses a path the worker's roots do not allow, whatever the run row says", async () => {
    const s = forgedDownload(h, 'run-forged', { brats: 'path:/etc', kaggle: 'synthetic' });
    const err = await caught(downloadDataset('brats', s));
    expect(err.code).toBe('path_not_allowed');
    expect(err.message).toContain('sources.brats');
    expect(await exists(join(h.dataDir, 'raw'))).toBe(false);
  });
});

// ------------------------------------------------------------------------------------------------ the worker's own check

describe('path checks', () => {
  it('reads the canonical path it checked, and a path typed by the operator on the CLI is allowed in its process', async () => {
    const dataDir = join(tmp, 'data-cli');
    const typed = join(tmp, 'typed-on-cli');
    await mkdir(typed, { recursive: true });
    await mkdir(dataDir, { recursive: true });
    await symlink(typed, join(dataDir, 'shortcut'));
    // Inside the data dir through a symlink whose target is outside: refused.
    await expect(resolveAllowedPath(join(dataDir, 'shortcut'), { field: 'sources.brats', dataDir })).rejects.toMatchObject({ code: 'path_not_allowed' });
    allowOperatorSources([`path:${typed}`, 'synthetic', undefined, 'path:']);
    expect(await resolveAllowedPath(join(dataDir, 'shortcut'), { field: 'sources.brats', dataDir })).toBe(typed);
    expect(await resolveAllowedPath(`${typed}/sub/../x`, { field: 'sources.brats', dataDir })).toBe(join(typed, 'x'));
  });
});

// ------------------------------------------------------------------------------------------------ network

describe('downloads reach public addresses only', () => {
  it('classifies addresses, including IPv4 inside IPv6', () => {
    const blocked = ['127.0.0.1', '10.0.0.1', '172.31.255.255', '192.168.1.1', '169.254.169.254', '100.64.0.1', '0.0.0.0', '224.0.0.1', '255.255.255.255', '::', '::1', 'fe80::1', 'fd12:3456::1', 'ff02::1', '::ffff:127.0.0.1', '::ffff:a9fe:a9fe', '64:ff9b::a9fe:a9fe', '2002:7f00:1::', '::127.0.0.1'];
    for (const a of blocked) expect(blockedRange(a), a).toBeDefined();
    expect(blockedRange('169.254.169.254')).toMatch(/link-local/);
    expect(blockedRange('::ffff:10.0.0.1')).toMatch(/private/);
    for (const a of ['8.8.8.8', '1.1.1.1', '172.32.0.1', '100.128.0.1', '2606:4700:4700::1111', '2a00:1450:4001::200e', '::ffff:8.8.8.8']) expect(blockedRange(a), a).toBeUndefined();
  });

  it('refuses private literals, localhost and names resolving to loopback, before any request', async () => {
    const server = await startServer((_req, res) => res.end('should not be reached'));
    try {
      const port = new URL(server.url).port;
      for (const url of ['https://10.0.0.5/a.zip', 'http://169.254.169.254/latest/meta-data/', 'https://[::1]/a.zip', `http://localhost:${port}/a.zip`, `${server.url}/a.zip`]) {
        const err = await caught(downloadFile(url, join(tmp, 'net', 'a.zip'), { retries: 0 }));
        expect(err.code, url).toBe('private_address');
      }
      // A name that is not "localhost" but resolves to loopback (/etc/hosts maps this machine's name there).
      const name = hostname();
      const addrs = await lookup(name, { all: true }).catch(() => []);
      if (addrs.length && addrs.every((a) => blockedRange(a.address))) {
        const err = await caught(downloadFile(`http://${name}:${port}/a.zip`, join(tmp, 'net', 'b.zip'), { retries: 0 }));
        expect(err.code).toBe('private_address');
        expect(err.message).toContain(`resolves to ${addrs[0]!.address}`);
      }
      expect(server.hits()).toBe(0);
      expect(await exists(join(tmp, 'net', 'a.zip.part'))).toBe(false);

      // The operator's knob opens it.
      process.env.SLICEWISE_ALLOW_PRIVATE_NETWORKS = '1';
      const ok = await downloadFile(`${server.url}/a.zip`, join(tmp, 'net', 'a.zip'), { retries: 0 });
      expect(ok.bytes).toBe('should not be reached'.length);
    } finally {
      await server.close();
    }
  });

  it('checks every redirect hop: a trusted server cannot send the download to a private address', async () => {
    const inner = await startServer((_req, res) => res.end('internal secret'));
    const outer = await startServer((req, res) => {
      res.writeHead(302, { location: req.url === '/meta' ? 'https://169.254.169.254/latest/meta-data/' : `${inner.url}/secret` });
      res.end();
    });
    try {
      // The first server stands for an operator-configured host (as KAGGLE_API_BASE is); its redirects are not.
      const network = { trustedOrigins: [outer.url] };
      for (const path of ['/go', '/meta']) {
        const err = await caught(downloadFile(`${outer.url}${path}`, join(tmp, 'redir', 'x.zip'), { retries: 0, network }));
        expect(err.code).toBe('private_address');
        expect(err.message).toMatch(/redirected \(hop 1\)/);
      }
      expect(outer.hits()).toBe(2);
      expect(inner.hits()).toBe(0);
    } finally {
      await outer.close();
      await inner.close();
    }
  });

  it('pins the connection to the checked address: a name is never looked up a second time', async () => {
    const server = await startServer((_req, res) => res.end('pinned'));
    try {
      // `.invalid` never resolves (RFC 6761): the request can only land through the pinned address.
      const url = new URL(`http://rebinding.invalid:${new URL(server.url).port}/x`);
      await expect(resolvePublic(url)).rejects.toMatchObject({ code: 'download_dns' });
      const body = await new Promise<string>((resolve, reject) => {
        http
          .get(url, { lookup: pinnedLookup({ address: '127.0.0.1', family: 4 }) as never }, (res) => {
            let text = '';
            res.on('data', (c) => (text += c));
            res.on('end', () => resolve(text));
          })
          .on('error', reject);
      });
      expect(body).toBe('pinned');
    } finally {
      await server.close();
    }
  });

  it('refuses a download larger than the cap, announced or not, and keeps no partial file', async () => {
    process.env.SLICEWISE_ALLOW_PRIVATE_NETWORKS = '1';
    process.env.SLICEWISE_EXTRACT_MAX_BYTES = '64K';
    const chunk = Buffer.alloc(16 * 1024, 7);
    const server = await startServer((req, res) => {
      if (req.url === '/announced') res.writeHead(200, { 'content-length': String(1 << 30) });
      else res.writeHead(200); // chunked: no length, never ends by itself
      const timer = setInterval(() => res.write(chunk), 1);
      res.on('close', () => clearInterval(timer));
    });
    try {
      for (const path of ['/announced', '/streamed']) {
        const dest = join(tmp, 'big', `${path.slice(1)}.bin`);
        const err = await caught(downloadFile(`${server.url}${path}`, dest, { retries: 0 }));
        expect(err.code).toBe('download_too_large');
        expect(err.message).toContain('SLICEWISE_EXTRACT_MAX_BYTES');
        expect(await exists(`${dest}.part`)).toBe(false);
      }
    } finally {
      await server.close();
    }
  });
});

// ------------------------------------------------------------------------------------------------ archives

describe('archive extraction is capped and stays inside its folder', () => {
  const MiB = 1024 * 1024;

  async function bombCase(name: string, archive: Buffer) {
    const root = await mkdtemp(join(tmp, 'bomb-'));
    const file = join(root, name);
    await writeFile(file, archive);
    const dest = join(root, 'out');
    const rss = process.memoryUsage().rss;
    const t0 = Date.now();
    const err = await caught(extractArchive(file, dest));
    return { err, ms: Date.now() - t0, rssGrowth: process.memoryUsage().rss - rss, root, dest };
  }

  it('a zip bomb (one 300 MiB entry of zeros in 300 KiB) fails fast with the cap named and flat memory', async () => {
    const zeros = deflatedZeros(300 * MiB);
    const zip = buildZip([{ name: 'data/ok.txt', data: 'fine' }, { name: 'data/zeros.nii', deflated: zeros }]);
    expect(zip.length).toBeLessThan(MiB);
    process.env.SLICEWISE_EXTRACT_MAX_BYTES = '64M';
    const { err, ms, rssGrowth, root, dest } = await bombCase('bomb.zip', zip);
    expect(err.code).toBe('archive_too_large');
    expect(err.message).toContain('bomb.zip');
    expect(err.message).toContain('"data/zeros.nii"');
    expect(err.message).toContain('past the limit of 64 MiB');
    expect(err.message).toContain('SLICEWISE_EXTRACT_MAX_BYTES');
    expect(ms).toBeLessThan(10_000); // a shared, loaded machine: the point is that it is not minutes
    expect(rssGrowth).toBeLessThan(64 * MiB);
    expect(await exists(dest)).toBe(false);
    expect(await readdir(root)).toEqual(['bomb.zip']); // the temporary folder is gone too
  });

  it('a tar.gz bomb fails fast with the cap named and flat memory', async () => {
    const size = 300 * MiB;
    const tarData = deflatedZeros(size + 1024, Buffer.concat([tarEntry('ok.txt', 'fine'), tarHeader('BraTS/zeros.nii', size)]));
    const tgz = gzipWrap(tarData);
    expect(tgz.length).toBeLessThan(MiB);
    process.env.SLICEWISE_EXTRACT_MAX_BYTES = '64M';
    const { err, ms, rssGrowth, root, dest } = await bombCase('bomb.tar.gz', tgz);
    expect(err.code).toBe('archive_too_large');
    expect(err.message).toMatch(/bomb\.tar\.gz: entry "BraTS\/zeros\.nii" takes the extracted size to 300 MiB, past the limit of 64 MiB/);
    expect(ms).toBeLessThan(10_000); // a shared, loaded machine: the point is that it is not minutes
    expect(rssGrowth).toBeLessThan(64 * MiB);
    expect(await exists(dest)).toBe(false);
    expect(await readdir(root)).toEqual(['bomb.tar.gz']);
  });

  it('counts every entry: honest entries that add up past the cap, and the expansion ratio', async () => {
    // Five entries of 4 MiB: the cap of 10 MiB is crossed by the third.
    const entries = [0, 1, 2, 3, 4].map((i) => ({ name: `p${i}/flair.nii`, deflated: deflatedZeros(4 * MiB) }));
    const root = await mkdtemp(join(tmp, 'sum-'));
    const zip = join(root, 'many.zip');
    await writeFile(zip, buildZip(entries));
    const err = await caught(extractArchive(zip, join(root, 'out'), { limits: { maxBytes: 10 * MiB } }));
    expect(err.code).toBe('archive_too_large');
    expect(err.message).toContain('"p2/flair.nii"');
    expect(await exists(join(root, 'out'))).toBe(false);

    // The same archive against the ratio: 20 MiB out of ~20 KiB in is far past 100x once the allowance is spent.
    const ratio = await caught(extractArchive(zip, join(root, 'out'), { limits: { ratioAllowance: 6 * MiB } }));
    expect(ratio.code).toBe('archive_too_large');
    expect(ratio.message).toContain('SLICEWISE_EXTRACT_MAX_RATIO=100');
    expect(ratio.message).toContain('"p1/flair.nii"');

    // Within the limits it extracts, zeros and all: the bomb builder makes valid archives.
    const ok = await extractArchive(zip, join(root, 'out'), { limits: { maxBytes: 21 * MiB, ratioAllowance: 21 * MiB } });
    expect(ok.entries).toBe(5);
    expect((await stat(join(ok.dir, 'p4', 'flair.nii'))).size).toBe(4 * MiB);
    const tgz = join(root, 'small.tar.gz');
    // Some incompressible bytes first: all zeros would trip tar's own 1000x guard.
    const noise = randomBytes(8192).toString('base64');
    await writeFile(tgz, gzipWrap(deflatedZeros(2 * MiB + 1024, Buffer.concat([tarEntry('noise.txt', noise), tarHeader('z.nii', 2 * MiB)]))));
    const t = await extractArchive(tgz, join(root, 'tout'));
    expect((await stat(join(t.dir, 'z.nii'))).size).toBe(2 * MiB);
  });

  it('refuses links pointing out of the tree (tar symlink, tar hard link, zip symlink) and device files', async () => {
    const end = Buffer.alloc(1024);
    const cases: [string, Buffer, string, RegExp][] = [
      ['sym.tar', Buffer.concat([tarEntry('fine.txt', 'fine'), tarEntry('etc', '', '2', '/etc'), end]), 'zip_slip', /"etc" is a symbolic link to "\/etc"/],
      ['symdots.tar', Buffer.concat([tarEntry('a/up', '', '2', '../../..'), end]), 'zip_slip', /symbolic link/],
      ['hard.tar', Buffer.concat([tarEntry('pw', '', '1', '../../etc/passwd'), end]), 'zip_slip', /"pw" is a hard link/],
      ['chr.tar', Buffer.concat([tarEntry('null', '', '3'), end]), 'unsafe_entry', /"null" is a character device/],
      ['fifo.tar', Buffer.concat([tarEntry('pipe', '', '6'), end]), 'unsafe_entry', /"pipe" is a FIFO/],
      ['sym.zip', buildZip([{ name: 'fine.txt', data: 'fine' }, { name: 'etc', data: '/etc', mode: 0o120777 }]), 'zip_slip', /"etc" is a symbolic link to "\/etc"/],
      ['dots.zip', buildZip([{ name: 'a/link', data: '../../x', mode: 0o120777 }]), 'zip_slip', /symbolic link/],
      ['fifo.zip', buildZip([{ name: 'pipe', data: '', mode: 0o010644 }]), 'unsafe_entry', /FIFO/],
    ];
    for (const [name, data, code, re] of cases) {
      const root = await mkdtemp(join(tmp, 'link-'));
      await writeFile(join(root, name), data);
      const err = await caught(extractArchive(join(root, name), join(root, 'out')));
      expect(err.code, name).toBe(code);
      expect(err.message, name).toMatch(re);
      expect(err.message).toContain(name);
      expect(await readdir(root), name).toEqual([name]);
    }
    // Links that stay inside are skipped, never written; setuid bits from an archive are dropped.
    const root = await mkdtemp(join(tmp, 'link-ok-'));
    await writeFile(join(root, 'in.zip'), buildZip([{ name: 'a/b.txt', data: 'b' }, { name: 'a/c', data: 'b.txt', mode: 0o120777 }]));
    const z = await extractArchive(join(root, 'in.zip'), join(root, 'zout'));
    expect(z).toMatchObject({ entries: 1, skipped: 1 });
    expect(await readdir(join(z.dir, 'a'))).toEqual(['b.txt']);
    await writeFile(join(root, 'suid.tar'), Buffer.concat([tarEntry('run.sh', '#!/bin/sh\n', '0', '', 0o4777), end]));
    const t = await extractArchive(join(root, 'suid.tar'), join(root, 'tout'));
    expect((await stat(join(t.dir, 'run.sh'))).mode & 0o7777).toBe(0o644);
    expect(await readFile(join(t.dir, 'run.sh'), 'utf8')).toBe('#!/bin/sh\n');
  });
});

// ------------------------------------------------------------------------------------------------ a run that meets a bomb

describe('a run whose download fails on the cap', () => {
  let h: Harness;
  beforeAll(async () => {
    h = await harness('postgres');
  });
  afterAll(async () => {
    await h?.close();
  });

  it('fails download_brats with the cap named, and every step of the run settles', async () => {
    process.env.SLICEWISE_EXTRACT_MAX_BYTES = '16M';
    const archive = join(h.dataDir, 'uploads', 'brats.tar.gz');
    await mkdir(join(h.dataDir, 'uploads'), { recursive: true });
    await writeFile(archive, gzipWrap(deflatedZeros(64 * 1024 * 1024 + 1024, tarHeader('BraTS20_Training_001/BraTS20_Training_001_flair.nii', 64 * 1024 * 1024))));
    const res = await postRun(h.app, { mode: 'data-only', sources: { brats: `path:${archive}`, kaggle: 'synthetic:4' }, overrides: { data: { image_size: 32 } } });
    expect(res.status).toBe(201);
    const { run } = await json(res);
    const done = await waitForRun(h.app, run.id, 60_000);
    expect(done.status).toBe('failed');
    const step = done.steps.find((s: any) => s.name === 'download_brats');
    expect(step.status).toBe('failed');
    expect(step.attempts).toBe(1); // bad input: not retried
    expect(step.error).toMatch(/brats\.tar\.gz: entry "BraTS20_Training_001\/BraTS20_Training_001_flair\.nii".*past the limit of 16 MiB/);
    expect(done.error).toContain('download_brats failed');
    // Once finalize has run, no step is left "running" or "pending", in the database or in pipeline_results.json.
    let results: any;
    // The Kaggle branch may still be finishing its own steps; finalize settles the rest once it has.
    for (let i = 0; i < 600; i++) {
      results = await json(await h.app.request(`/runs/${run.id}/results`));
      const open = Object.values(results.steps as Record<string, { status: string }>).filter((s) => s.status === 'running' || s.status === 'pending');
      if (open.length === 0) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    for (const [name, s] of Object.entries(results.steps as Record<string, { status: string }>)) expect(['success', 'failed', 'cancelled', 'skipped'], name).toContain(s.status);
    expect(results.steps.download_brats.status).toBe('failed');
    expect(parseSource(done.sources.brats)).toEqual({ kind: 'path', path: archive });
  });

  it('a download still running when another step fails the run stops and settles, and finalize closes the run', async () => {
    process.env.SLICEWISE_ALLOW_PRIVATE_NETWORKS = '1';
    let clientGone!: () => void;
    const gone = new Promise<void>((r) => (clientGone = r));
    // A "large archive" served a trickle at a time: the download is still running when the Kaggle branch fails.
    const server = await startServer((req, res) => {
      res.writeHead(200, { 'content-type': 'application/zip', 'content-length': String(50 * 1024 * 1024) });
      const timer = setInterval(() => res.write(Buffer.alloc(1024)), 50);
      req.socket.on('close', () => {
        clearInterval(timer);
        clientGone();
      });
    });
    try {
      const kaggle = join(h.dataDir, 'kaggle-empty');
      await mkdir(join(kaggle, 'yes'), { recursive: true });
      await mkdir(join(kaggle, 'no'), { recursive: true });
      const res = await postRun(h.app, { mode: 'data-only', sources: { brats: `${server.url}/brats.zip`, kaggle: `path:${kaggle}` } });
      expect(res.status).toBe(201);
      const { run } = await json(res);
      const done = await waitForRun(h.app, run.id, 60_000);
      expect(done.error).toMatch(/^preprocess_kaggle failed/);
      // The download hears that the run has ended, stops (the server sees the client go) and says why.
      await Promise.race([gone, new Promise((_, rej) => setTimeout(() => rej(new Error('the download did not stop within 15 s')), 15_000))]);
      let d: any;
      for (let i = 0; i < 150; i++) {
        d = await json(await h.app.request(`/runs/${run.id}`));
        if (d.steps.every((s: any) => !['running', 'pending'].includes(s.status))) break;
        await new Promise((r) => setTimeout(r, 100));
      }
      const step = d.steps.find((s: any) => s.name === 'download_brats');
      expect(step.status).toBe('cancelled');
      expect(step.error).toMatch(/download of .*brats\.zip \(run \S+ failed meanwhile\) was aborted/);
      expect(d.steps.find((s: any) => s.name === 'finalize').status).toBe('success');
      // finalize wrote the run's pipeline_results.json with every step settled.
      const file = JSON.parse(await readFile(join(h.dataDir, 'runs', run.id, 'pipeline_results.json'), 'utf8'));
      expect(file.steps.download_brats.status).toBe('cancelled');
      for (const [name, s] of Object.entries(file.steps as Record<string, { status: string }>)) expect(['success', 'failed', 'cancelled', 'skipped'], name).toContain(s.status);
    } finally {
      await server.close();
    }
  });

  it('fails download_brats when the patients found exceed the limit, before any is preprocessed', async () => {
    process.env.SLICEWISE_MAX_PATIENTS = '1';
    const dir = join(h.dataDir, 'three');
    for (const id of ['BraTS20_Training_001', 'BraTS20_Training_002', 'BraTS20_Training_003']) {
      await mkdir(join(dir, id), { recursive: true });
      for (const m of ['flair', 'seg']) await writeFile(join(dir, id, `${id}_${m}.nii`), 'not read');
    }
    const res = await postRun(h.app, { mode: 'data-only', sources: { brats: `path:${dir}`, kaggle: 'synthetic:4' } });
    expect(res.status).toBe(201);
    const done = await waitForRun(h.app, (await json(res)).run.id, 60_000);
    const step = done.steps.find((s: any) => s.name === 'download_brats');
    expect(step.status).toBe('failed');
    expect(step.error).toMatch(/has 3 patients and this run would preprocess 2.*limit of 1 per run \(SLICEWISE_MAX_PATIENTS\)/);
    expect(done.patients).toHaveLength(0);
  });
});
