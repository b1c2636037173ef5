/**
 * The run page in a real browser, on a real CI-size `full` run (the suite's shared one, made by global-setup.ts):
 * the evaluation table shows what the database holds, every training curve has one point per recorded epoch, the
 * Grad-CAM images load. Screenshots go to test-output/.
 */
import { join } from 'node:path';
import { and, eq } from 'drizzle-orm';
import type { Page } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { createApp } from '../../src/api/app.ts';
import { formatEntry, generateToken, hashToken, SESSION_COOKIE, TokenStore } from '../../src/api/auth.ts';
import { artifacts, evaluations, metrics } from '../../src/db/schema.ts';
import type { Harness } from '../helpers/services.ts';
import { attachHarness } from '../helpers/trained-run.ts';
import { browse, OUT, type Browsing } from './chromium.ts';

const EPOCHS = inject('sharedRun').epochs;
const TRAIN_STEPS = ['train_stage1_seg_warmup', 'train_stage2_cls_head', 'train_stage3_joint'];

/** The page's rule for figures: 3 decimals, integers as they are, a dash when missing. */
function shown(v: unknown, format: string): string {
  if (v == null) return '—';
  return format === 'int' ? String(Math.round(v as number)) : (v as number).toFixed(3);
}

function at(obj: unknown, path: string): unknown {
  return path.split('.').reduce<any>((o, k) => (o == null ? undefined : o[k]), obj);
}

describe('the run page of a finished full run', () => {
  let h: Harness;
  let browsing: Browsing | undefined;
  let base: string;
  let page: Page;
  let runId: string;
  let pageErrors: string[];

  beforeAll(async () => {
    h = await attachHarness(inject('sharedRun'));
    runId = inject('sharedRun').runId;

    browsing = await browse(h.app.fetch);
    ({ base, page, pageErrors } = browsing);
  });

  afterAll(async () => {
    await browsing?.close();
    await h?.close();
  });

  it('lists the run at /ui, and / leads there', async () => {
    await page.goto(`${base}/`);
    expect(new URL(page.url()).pathname).toBe('/ui');
    const link = page.locator(`a[href="/ui/runs/${runId}"]`);
    await expect(link.count()).resolves.toBe(1);
    await page.screenshot({ path: join(OUT, 'runs-list.png'), fullPage: true });
  });

  it('shows the evaluation the database holds, one point per epoch on every curve, and the Grad-CAM images', async () => {
    await page.goto(`${base}/ui/runs/${runId}`);
    await page.waitForSelector('body[data-ready="true"]', { timeout: 30_000 });
    expect(await page.locator('#run-header .pill').textContent()).toBe('succeeded');
    for (const step of TRAIN_STEPS) await expect(page.locator(`#steps tr[data-step="${step}"] .pill`).textContent()).resolves.toBe('success');

    // The evaluation table: every figure bound to the report (data-eval) shows the stored value, to 3 decimals.
    const rows = await h.ctx.db.select().from(evaluations).where(eq(evaluations.runId, runId));
    const stored = Object.fromEntries(rows.map((r) => [r.name, r.report]));
    expect(stored.multitask, 'the run wrote its multitask evaluation').toBeTruthy();
    const cells = await page.$$eval('[data-eval]', (els) => els.map((e) => ({ path: (e as HTMLElement).dataset.eval!, format: (e as HTMLElement).dataset.format!, text: e.textContent!.trim() })));
    const paths = cells.map((c) => c.path);
    expect(paths).toEqual(expect.arrayContaining(['multitask.combined', 'multitask.classification.overall.accuracy', 'multitask.classification.overall.roc_auc']));
    if ((stored.multitask as any).segmentation) expect(paths).toEqual(expect.arrayContaining(['multitask.segmentation.per_slice.dice.mean', 'multitask.segmentation.per_patient_3d.mean_dice']));
    if (stored.phase_comparison) expect(paths.filter((p) => p.startsWith('phase_comparison.phases.')).length).toBeGreaterThanOrEqual(6);
    for (const c of cells) expect(c.text, c.path).toBe(shown(at(stored, c.path), c.format));

    // Training curves: each chart's labels are the epochs the metrics table holds, each series one value per epoch.
    const charts = await page.$$eval('canvas[data-step]', (els) =>
      els.map((c) => {
        const chart = (window as any).Chart.getChart(c);
        const datasets: { label: string; data: (number | null)[] }[] = chart.data.datasets.map((d: any) => ({ label: d.label, data: d.data }));
        return { step: (c as HTMLElement).dataset.step!, labels: chart.data.labels as number[], datasets };
      }),
    );
    expect([...new Set(charts.map((c) => c.step))].sort()).toEqual([...TRAIN_STEPS].sort());
    const metricRows = await h.ctx.db.select().from(metrics).where(eq(metrics.runId, runId));
    const LABEL_TO_NAME: Record<string, string> = { 'train loss': 'train_loss', 'val loss': 'val_loss', 'val Dice': 'val_dice', 'val IoU': 'val_iou', 'val accuracy': 'val_accuracy', 'val F1': 'val_f1', 'val ROC AUC': 'val_auc' };
    for (const c of charts) {
      const rowsOf = metricRows.filter((m) => m.step === c.step && m.epoch >= 0);
      const epochs = [...new Set(rowsOf.map((m) => m.epoch))].sort((a, b) => a - b);
      expect(epochs.length, c.step).toBe(EPOCHS);
      expect(c.labels, c.step).toEqual(epochs);
      expect(c.datasets.length, c.step).toBeGreaterThan(0);
      for (const d of c.datasets) {
        const name = LABEL_TO_NAME[d.label]!;
        expect(d.data, `${c.step} ${d.label}`).toHaveLength(epochs.length);
        expect(d.data, `${c.step} ${d.label}`).toEqual(epochs.map((e) => rowsOf.find((m) => m.epoch === e && m.name === name)?.value ?? null));
      }
    }
    for (const step of TRAIN_STEPS) {
      const labels = charts.filter((c) => c.step === step).flatMap((c) => c.datasets.map((d) => d.label));
      expect(labels, step).toEqual(expect.arrayContaining(['train loss', 'val loss']));
    }

    // The Grad-CAM gallery: one <img> per recorded image, each decoded by the browser.
    const gradcams = await h.ctx.db.select().from(artifacts).where(and(eq(artifacts.runId, runId), eq(artifacts.kind, 'gradcam')));
    expect(gradcams.length, 'the run recorded Grad-CAM images').toBeGreaterThan(0);
    await page.locator('#gradcam').scrollIntoViewIfNeeded();
    await page.waitForFunction(() => [...document.querySelectorAll<HTMLImageElement>('img.gradcam')].every((i) => i.complete), undefined, { timeout: 15_000 });
    const images = await page.$$eval('img.gradcam', (els) => els.map((i) => ({ src: (i as HTMLImageElement).getAttribute('src')!, w: (i as HTMLImageElement).naturalWidth })));
    expect(images).toHaveLength(gradcams.length);
    for (const img of images) expect(img.w, img.src).toBeGreaterThan(0);

    // The run's flow (its finalize job) in Bull Board.
    const board = await page.getAttribute('#bull-board-run', 'href');
    expect(board).toBe(`/admin/queues/queue/pipeline/${runId}.finalize`);
    expect((await fetch(`${base}${board}`)).status).toBe(200);

    expect(pageErrors).toEqual([]);
    await page.screenshot({ path: join(OUT, 'run-page.png'), fullPage: true });
  });

  it('with tokens on: signs in on the form, the run page offers Sign out, and signing out leads back to /login', async () => {
    const token = generateToken();
    const store = await TokenStore.open({ inline: formatEntry('browser', 'user', hashToken(token)) });
    const secured = await browse(createApp(h.ctx, { auth: store }).fetch);
    try {
      const { page: p, base: b } = secured;
      await p.goto(`${b}/ui/runs/${runId}`);
      expect(new URL(p.url()).pathname).toBe('/login');
      await p.fill('#token', token);
      await Promise.all([p.waitForURL(`${b}/ui/runs/${runId}`), p.click('button[type=submit]')]);
      await p.waitForSelector('body[data-ready="true"]', { timeout: 30_000 });
      await expect(p.locator('#sign-out').isVisible()).resolves.toBe(true);
      await p.screenshot({ path: join(OUT, 'run-page-signed-in.png') });
      await Promise.all([p.waitForURL(`${b}/login`), p.click('#sign-out')]);
      expect((await p.context().cookies(b)).filter((c) => c.name === SESSION_COOKIE)).toEqual([]);
      await p.goto(`${b}/ui/runs/${runId}`);
      expect(new URL(p.url()).pathname).toBe('/login');
      expect(secured.pageErrors).toEqual([]);
    } finally {
      await secured.close();
    }
  });
});
