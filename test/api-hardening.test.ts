/**
 * What a hostile or careless caller of the runs API gets: a clear 4xx naming the field, never internal error
 * text, and no say over where the server writes.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { harness, json, postRun, type Harness } from './helpers/services.ts';

describe('runs API input checks', () => {
  let h: Harness;
  beforeAll(async () => {
    h = await harness('pglite', { workers: false });
  });
  afterAll(async () => {
    await h?.close();
  });

  it('refuses an id that is no run id, on every route, without SQL in the answer', async () => {
    for (const path of ['/runs/%00', '/runs/%00/cancel', '/runs/%00/artifacts', '/runs/a%2Fb/results', `/runs/${'x'.repeat(101)}`]) {
      const method = path.endsWith('/cancel') ? 'POST' : 'GET';
      const res = await h.app.request(path, { method });
      const text = await res.text();
      expect(res.status, path).toBe(400);
      expect(text).toContain('not a run id');
      expect(text.toLowerCase()).not.toMatch(/select|from "runs"|params/);
    }
    // A well-formed id that does not exist is still a plain 404.
    expect((await h.app.request('/runs/run-20260101-000000-000000')).status).toBe(404);
  });

  it('lets no caller choose the data dir', async () => {
    const res = await postRun(h.app, { mode: 'data-only', dataDir: '/etc/slicewise' });
    expect(res.status).toBe(400);
    const body = await json(res);
    expect(body.error.message).toMatch(/Unrecognized key.*dataDir/);
  });

  it('checks a layout given as an object exactly as one given as a string', async () => {
    for (const bratsLayout of ['flair=Flair_*.nii.gz,seg=../x/*.nii.gz', { flair: 'Flair_*.nii.gz', seg: '../x/*.nii.gz' }]) {
      const res = await postRun(h.app, { mode: 'data-only', sources: { brats: 'synthetic:2', bratsLayout } });
      expect(res.status).toBe(400);
      expect((await json(res)).error.message).toContain('cannot contain a path separator');
    }
    const keys = (n: number) => ({ ...Object.fromEntries(Array.from({ length: n }, (_, i) => [`m${i}`, 'x*.nii.gz'])), seg: 'seg.nii.gz' });
    const res = await postRun(h.app, { mode: 'data-only', sources: { brats: 'synthetic:2', bratsLayout: keys(100) } });
    expect(res.status).toBe(400);
    expect((await json(res)).error.message).toContain('at most 16 modalities');
    // Ten thousand do not even get read: the body is over the request limit.
    expect((await postRun(h.app, { mode: 'data-only', sources: { brats: 'synthetic:2', bratsLayout: keys(10_000) } })).status).toBe(413);
    const noSeg = await postRun(h.app, { mode: 'data-only', sources: { brats: 'synthetic:2', bratsLayout: { flair: 'Flair_*.nii.gz' } } });
    expect((await json(noSeg)).error.message).toContain('no seg entry');
  });

  it('refuses an oversized request body with 413 before reading it all', async () => {
    const res = await h.app.request('/runs', { method: 'POST', body: `{"mode":"data-only"${' '.repeat(2 * 1024 * 1024)}}`, headers: { 'content-type': 'application/json' } });
    expect(res.status).toBe(413);
    expect((await json(res)).error.code).toBe('body_too_large');
  });
});
