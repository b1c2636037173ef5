import { randomBytes } from 'node:crypto';
import { mkdir, writeFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:http';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { Job } from 'bullmq';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { eq } from 'drizzle-orm';
import { encodeNifti } from '../src/imaging/nifti-write.ts';
import { patients } from '../src/db/schema.ts';
import { jobId } from '../src/queues/names.ts';
import { tmpdir } from 'node:os';
import { harness, harnessWithScratch, json, postRun, waitForRun, type Harness } from './helpers/services.ts';

// The cases are scratch folders under the temp dir, and the cancel test downloads from a loopback server: runs
// may read and reach neither unless the operator allows it, as this file does.
process.env.SLICEWISE_ALLOWED_ROOTS = tmpdir();
process.env.SLICEWISE_ALLOW_PRIVATE_NETWORKS = '1';

/** A small BraTS-2020-named case: a bright ellipsoid with a tumour blob, seg labels {0, 2}. */
function volume(dims: [number, number, number], tumour = true) {
  const [X, Y, Z] = dims;
  const img = new Int16Array(X * Y * Z);
  const seg = new Int16Array(X * Y * Z);
  for (let z = 0; z < Z; z++)
    for (let y = 0; y < Y; y++)
      for (let x = 0; x < X; x++) {
        const i = x + X * (y + Y * z);
        const r = ((x - X / 2) / (X / 2.5)) ** 2 + ((y - Y / 2) / (Y / 2.5)) ** 2 + ((z - Z / 2) / (Z / 2.5)) ** 2;
        if (r < 1) img[i] = 300 + ((x * 7 + y * 3) % 50);
        const t = ((x - X / 2) / 8) ** 2 + ((y - Y / 2) / 8) ** 2 + ((z - Z / 2) / 6) ** 2;
        if (tumour && t < 1) {
          img[i] = 900;
          seg[i] = 2;
        }
      }
  return { img, seg };
}

async function writeCase(root: string, id: string, opts: { dims?: [number, number, number]; segDims?: [number, number, number]; flair?: Buffer; seg?: false } = {}) {
  const dims = opts.dims ?? [48, 48, 24];
  const dir = join(root, id);
  await mkdir(dir, { recursive: true });
  const { img } = volume(dims);
  await writeFile(join(dir, `${id}_flair.nii.gz`), opts.flair ?? gzipSync(encodeNifti(img, dims)));
  if (opts.seg !== false) {
    const sd = opts.segDims ?? dims;
    await writeFile(join(dir, `${id}_seg.nii.gz`), gzipSync(encodeNifti(volume(sd).seg, sd)));
  }
}

describe('bad input fails the run with a message naming patient and file', () => {
  const scope = harnessWithScratch('postgres', 'slicewise-bad-');

  const good = 'BraTS20_Training_001';
  const bad = 'BraTS20_Training_002';
  const cases: [string, (dir: string) => Promise<void>, RegExp][] = [
    ['a corrupt .nii.gz', (d) => writeCase(d, bad, { flair: Buffer.concat([Buffer.from([0x1f, 0x8b, 8, 0]), randomBytes(4000)]) }), /BraTS20_Training_002_flair\.nii\.gz/],
    [
      'a truncated volume',
      (d) => {
        const { img } = volume([48, 48, 24]);
        const whole = encodeNifti(img, [48, 48, 24]);
        return writeCase(d, bad, { flair: gzipSync(whole.subarray(0, whole.length / 2)) });
      },
      /BraTS20_Training_002_flair\.nii\.gz.*truncated|truncated.*BraTS20_Training_002_flair/i,
    ],
    ['a missing seg file', (d) => writeCase(d, bad, { seg: false }), /BraTS20_Training_002.*seg/],
    ['mismatched image and seg shapes', (d) => writeCase(d, bad, { segDims: [48, 48, 20] }), /BraTS20_Training_002.*(shape|48x48x20|48 x 48 x 20)/i],
  ];

  it.each(cases)('%s', async (name, makeBad, fileRe) => {
    const { h, root } = scope;
    const dir = join(root, name.replace(/\W+/g, '-'));
    await writeCase(dir, good);
    await makeBad(dir);
    const res = await postRun(h.app, { mode: 'data-only', sources: { brats: `path:${dir}`, kaggle: 'synthetic:4' }, overrides: { data: { image_size: 32 } } });
    expect(res.status).toBe(201);
    const { run } = await json(res);
    const done = await waitForRun(h.app, run.id);
    expect(done.status).toBe('failed');
    expect(done.error).toContain(bad);
    expect(done.error).toMatch(fileRe);
    const step = done.steps.find((s: any) => s.name === 'preprocess_brats');
    expect(step.status).toBe('failed');
    expect(step.error).toContain(bad);
    const rows = await h.ctx.db.select().from(patients).where(eq(patients.runId, run.id));
    const badRow = rows.find((r) => r.patientId === bad)!;
    expect(badRow.status).toBe('failed');
    expect(badRow.error).toContain(bad);
    // The run's record reaches pipeline_results.json too.
    const results = await json(await h.app.request(`/runs/${run.id}/results`));
    expect(results.success).toBe(false);
    expect(results.steps.preprocess_brats.error).toContain(bad);
  });

  it('one failed run leaves another run unaffected', async () => {
    const { h } = scope;
    const res = await postRun(h.app, { mode: 'data-only', sources: { brats: 'synthetic:2', kaggle: 'synthetic:4' }, overrides: { data: { image_size: 32 } } });
    const { run } = await json(res);
    expect((await waitForRun(h.app, run.id)).status).toBe('succeeded');
  });
});

describe('cancel', () => {
  let h: Harness;
  let server: Server;
  let port: number;
  let clientGone: Promise<void>;
  let requested: Promise<void>;
  beforeAll(async () => {
    h = await harness('pglite');
    let markGone!: () => void;
    let markRequested!: () => void;
    clientGone = new Promise((r) => (markGone = r));
    requested = new Promise((r) => (markRequested = r));
    // A server that sends a "large archive" a trickle at a time, so the download is still running when we cancel.
    server = createServer((req, res) => {
      markRequested();
      res.writeHead(200, { 'content-type': 'application/zip', 'content-length': String(50 * 1024 * 1024) });
      const timer = setInterval(() => res.write(Buffer.alloc(1024)), 50);
      req.socket.on('close', () => {
        clearInterval(timer);
        markGone();
      });
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    port = (server.address() as { port: number }).port;
  });
  afterAll(async () => {
    server?.closeAllConnections();
    server?.close();
    await h?.close();
  });

  it('stops a running run: the active download is aborted and later steps never start', async () => {
    const { run } = await json(await postRun(h.app, { mode: 'data-only', sources: { brats: `http://127.0.0.1:${port}/brats.zip`, kaggle: 'synthetic:4' } }));
    await Promise.race([requested, new Promise((_, rej) => setTimeout(() => rej(new Error('download_brats never reached the server')), 20_000))]);
    await new Promise((r) => setTimeout(r, 300)); // a few chunks in: mid-download
    const mid = await json(await h.app.request(`/runs/${run.id}`));
    expect(mid.steps.find((s: any) => s.name === 'download_brats').status).toBe('running');
    const res = await h.app.request(`/runs/${run.id}/cancel`, { method: 'POST' });
    expect(res.status).toBe(200);
    expect((await json(res)).run.status).toBe('cancelled');

    // The worker hears the cancel and aborts the download: the server sees the client go away.
    await Promise.race([clientGone, new Promise((_, rej) => setTimeout(() => rej(new Error('download was not aborted within 10 s')), 10_000))]);
    const job = await Job.fromId(h.ctx.queues.download, jobId(run.id, 'download_brats'));
    for (let i = 0; i < 50 && (await job!.getState()) === 'active'; i++) await new Promise((r) => setTimeout(r, 100));
    expect(await job!.getState()).toBe('failed');

    const d = await json(await h.app.request(`/runs/${run.id}`));
    expect(d.status).toBe('cancelled');
    const byName = Object.fromEntries(d.steps.map((s: any) => [s.name, s.status]));
    expect(byName.download_brats).toBe('cancelled');
    expect(byName.preprocess_brats).toBe('cancelled');
    expect(byName.split_brats).toBe('cancelled');
    expect(d.patients).toHaveLength(0);
    for (let i = 0; i < 50 && h.workers!.activeCount() > 0; i++) await new Promise((r) => setTimeout(r, 100));
    expect(h.workers!.activeCount()).toBe(0);

    const again = await h.app.request(`/runs/${run.id}/cancel`, { method: 'POST' });
    expect(again.status).toBe(409);
  });
});
