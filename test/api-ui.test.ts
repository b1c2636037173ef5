import { eq } from 'drizzle-orm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runs } from '../src/db/schema.ts';
import { harness, type Harness } from './helpers/services.ts';
import { insertRun } from './helpers/reports.ts';

describe('web UI routes', () => {
  let h: Harness;
  let runId: string;
  beforeAll(async () => {
    h = await harness('pglite', { workers: false });
    runId = await insertRun(h.ctx, { dataDir: h.dataDir });
  });
  afterAll(async () => {
    await h?.close();
  });

  it('redirects / to the runs list, which links each run and escapes what runs hold', async () => {
    const root = await h.app.request('/');
    expect(root.status).toBe(302);
    expect(root.headers.get('location')).toBe('/ui');
    await h.ctx.db.update(runs).set({ status: 'failed', error: '<script>alert(1)</script> went wrong' }).where(eq(runs.id, runId));
    const res = await h.app.request('/ui');
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toMatch(/^text\/html/);
    const page = await res.text();
    expect(page).toContain(`href="/ui/runs/${runId}"`);
    expect(page).toContain('&lt;script&gt;alert(1)&lt;/script&gt; went wrong');
    expect(page).not.toContain('<script>alert(1)');
    expect(page).toContain('href="/admin/queues"');
    // Filtered by status (validated like GET /runs).
    expect(await (await h.app.request('/ui?status=succeeded')).text()).not.toContain(`/ui/runs/${runId}`);
    expect((await h.app.request('/ui?status=bogus')).status).toBe(400);
  });

  it("serves a run's page: the shell, its boot data with Bull Board links, the script and Chart.js from node_modules", async () => {
    const res = await h.app.request(`/ui/runs/${runId}`);
    expect(res.status).toBe(200);
    const page = await res.text();
    const boot = JSON.parse(/<script type="application\/json" id="boot">(.*?)<\/script>/s.exec(page)![1]!);
    expect(boot.runId).toBe(runId);
    expect(boot.bullBoard.base).toBe('/admin/queues');
    expect(boot.bullBoard.steps.finalize).toBe(`/admin/queues/queue/pipeline/${runId}.finalize`);
    expect(boot.bullBoard.steps.train_stage3_joint).toBe(`/admin/queues/queue/train/${runId}.train_stage3_joint`);
    expect(boot.bullBoard.queues).toHaveProperty('preprocess');
    expect(page).toContain('<script src="/ui/vendor/chart.umd.js"></script>');

    const js = await h.app.request('/ui/assets/run.js');
    expect(js.status).toBe(200);
    expect(js.headers.get('content-type')).toMatch(/^text\/javascript/);
    expect(await js.text()).toContain('new Chart(');
    const css = await h.app.request('/ui/assets/style.css');
    expect(css.headers.get('content-type')).toMatch(/^text\/css/);
    const chart = await h.app.request('/ui/vendor/chart.umd.js');
    expect(chart.status).toBe(200);
    expect(await chart.text()).toContain('Chart.js v4.6.1');
  });

  it('answers unknown runs, pages and files with an HTML 404, and serves nothing but the listed assets', async () => {
    const res = await h.app.request('/ui/runs/run-nope');
    expect(res.status).toBe(404);
    expect(res.headers.get('content-type')).toMatch(/^text\/html/);
    expect(await res.text()).toContain('run run-nope not found');
    for (const path of ['/ui/assets/pages.ts', '/ui/assets/..%2F..%2Fpackage.json', '/ui/nothing', '/ui/runs/x/y']) {
      const r = await h.app.request(path);
      expect(r.status, path).toBe(404);
      expect(await r.text(), path).not.toContain('"name": "slicewise"');
    }
    // Outside /ui, errors stay JSON.
    expect((await h.app.request('/runs/run-nope')).headers.get('content-type')).toMatch(/^application\/json/);
  });
});
