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

  it('names the field of every bad body field, query parameter and header, and records nothing', async () => {
    const cases: { what: string; path?: string; body?: unknown; headers?: Record<string, string>; field: string; message: RegExp }[] = [
      { what: 'a run id that is none', body: { mode: 'train-eval', fromRun: '../x' }, field: 'fromRun', message: /not a run id/ },
      { what: 'a source spec of 5000 characters', body: { sources: { brats: 'x'.repeat(5000) } }, field: 'sources.brats', message: /4096/ },
      { what: 'a flag given as a string', body: { skipDownload: 'yes' }, field: 'skipDownload', message: /boolean/ },
      { what: 'an unknown top-level field', body: { mode: 'data-only', priority: 1 }, field: 'priority', message: /Unrecognized key: "priority"/ },
      { what: 'an unknown source field', body: { sources: { brats: 'synthetic:2', mri: 'x' } }, field: 'sources.mri', message: /Unrecognized key/ },
      { what: 'a query parameter on POST /runs', path: '/runs?mode=full', body: {}, field: 'mode', message: /no query parameters/ },
      { what: 'a blank Idempotency-Key', body: {}, headers: { 'Idempotency-Key': '   ' }, field: 'Idempotency-Key', message: /must not be empty/ },
      { what: 'an Idempotency-Key of 300 characters', body: {}, headers: { 'Idempotency-Key': 'k'.repeat(300) }, field: 'Idempotency-Key', message: /at most 255/ },
    ];
    for (const c of cases) {
      const res = await h.app.request(c.path ?? '/runs', { method: 'POST', body: JSON.stringify(c.body), headers: { 'content-type': 'application/json', ...c.headers } });
      expect(res.status, c.what).toBe(400);
      const { error } = await json(res);
      expect(error.fields, c.what).toEqual([{ field: c.field, message: expect.stringMatching(c.message) }]);
    }
    // The list's query is checked the same way, an unknown parameter named as itself.
    const list = await json(await h.app.request('/runs?limit=10&sort=desc'));
    expect(list.error.fields).toEqual([{ field: 'sort', message: 'Unrecognized key: "sort"' }]);
    expect((await json(await h.app.request('/runs'))).total).toBe(0);
  });
});
