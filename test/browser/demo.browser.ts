/**
 * The demo page in a real browser, serving the final model of the suite's shared CI-size run (global-setup.ts):
 * reached from the run page's header; a real Kaggle image uploaded shows the class and the probability the API
 * gives for the same file, and its mask overlay and Grad-CAM load; the real BraTS volume uploaded shows the tumour
 * volume the API gives, and the slider changes the slice shown. Screenshots go to test-output/.
 */
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Page } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { createApp } from '../../src/api/app.ts';
import { DemoService } from '../../src/serving/demo-service.ts';
import { FIXTURES, type Harness } from '../helpers/services.ts';
import { attachHarness } from '../helpers/trained-run.ts';
import { browse, OUT, type Browsing } from './chromium.ts';

const KAGGLE = join(FIXTURES, 'kaggle-navoneel');
const VOLUME = join(FIXTURES, 'brats2015-deepmedic', 'pat0001', 'Flair_subtrMeanDivStd.nii.gz');

describe('the demo page', () => {
  let h: Harness & { runId: string };
  let demo: DemoService;
  let browsing: Browsing | undefined;
  let base: string;
  let page: Page;
  let pageErrors: string[];

  /** What the API answers for a file, asked the way the page asks (multipart, the page's default parameters). */
  async function apiAnswer(path: string, file: string, field: string) {
    const fd = new FormData();
    fd.append(field, new File([await readFile(file)], file.split('/').pop()!));
    const res = await fetch(`${base}${path}`, { method: 'POST', body: fd });
    expect(res.status).toBe(200);
    return res.json() as Promise<any>;
  }

  beforeAll(async () => {
    h = await attachHarness(inject('sharedRun'));
    demo = new DemoService({ db: h.ctx.db });
    const app = createApp(h.ctx, { demo });
    await demo.model();
    browsing = await browse(app.fetch);
    ({ base, page, pageErrors } = browsing);
  });

  afterAll(async () => {
    await browsing?.close();
    await demo?.close();
    await h?.close();
  });

  it("is linked from the run page's header and shows the served model", async () => {
    await page.goto(`${base}/ui/runs/${h.runId}`);
    await page.waitForSelector('#demo-link');
    expect(await page.getAttribute('#nav-demo', 'href')).toBe('/ui/demo');
    await page.click('#demo-link');
    await page.waitForURL(`${base}/ui/demo`);
    await page.waitForSelector('body[data-state="ready"]');
    expect(await page.textContent('#model-run')).toBe(h.runId);
    const info = await (await fetch(`${base}/model/info`)).json();
    expect(await page.textContent('#model')).toContain(info.device);
  });

  it('uploads a real image: the class and probability the API gives, the mask overlay and the Grad-CAM side by side', async () => {
    // A tumour image the model segments (p(tumour) >= 0.3, the original's rule), asked of the API first.
    let file = '';
    let answer: any;
    for (const name of ['Y1.jpg', 'Y113.JPG', 'Y12.jpg', 'Y28.jpg', 'Y41.jpg']) {
      answer = await apiAnswer('/predict_multitask?min_object_size=50', join(KAGGLE, 'yes', name), 'file');
      file = join(KAGGLE, 'yes', name);
      if (answer.segmentation) break;
    }
    expect(answer.segmentation, 'some fixture image reaches p(tumour) >= 0.3').not.toBeNull();

    await page.setInputFiles('#file', file);
    await page.waitForSelector(`body[data-state="done"] #result[data-file="${file.split('/').pop()}"]`, { timeout: 60_000 });
    expect(await page.getAttribute('#result', 'data-kind')).toBe('image');
    expect(await page.getAttribute('#cls', 'data-label')).toBe(answer.classification.predicted_label);
    expect(await page.textContent('#cls')).toBe(answer.classification.predicted_label === 'tumor' ? 'tumour' : 'no tumour');
    expect(await page.textContent('#prob')).toBe(answer.classification.tumor_probability.toFixed(3));
    expect(await page.textContent('#tumor-pixels')).toBe(String(answer.segmentation.tumor_pixels));
    await page.waitForFunction(() => [...document.querySelectorAll<HTMLImageElement>('#result img')].every((i) => i.complete));
    const images = await page.$$eval('#result img', (els) => els.map((i) => ({ id: i.id, w: (i as HTMLImageElement).naturalWidth, h: (i as HTMLImageElement).naturalHeight, src: i.getAttribute('src')! })));
    expect(images.map((i) => i.id)).toEqual(['input-image', 'overlay', 'gradcam']);
    const size = answer.image_size;
    expect(images.find((i) => i.id === 'overlay')).toMatchObject({ w: size, h: size, src: `data:image/png;base64,${answer.segmentation.overlay_png_base64}` });
    expect(images.find((i) => i.id === 'gradcam')).toMatchObject({ w: size, h: size });
    expect(images.find((i) => i.id === 'input-image')!.w).toBeGreaterThan(0);
    // Side by side: three figures in one row.
    const tops = await page.$$eval('.figures figure', (els) => els.map((e) => Math.round(e.getBoundingClientRect().top)));
    expect(new Set(tops).size).toBe(1);
    expect(await page.isHidden('#error')).toBe(true);
    expect(await page.textContent('#result')).not.toMatch(/\b(null|undefined|NaN)\b/);
    await page.screenshot({ path: join(OUT, 'demo-image.png'), fullPage: true });
  });

  it('uploads the real BraTS volume: the tumour volume the API gives, and a slider that changes the slice shown', async () => {
    const answer = await apiAnswer('/patient/analyze_stack?min_object_size=50', VOLUME, 'files');
    await page.setInputFiles('#file', VOLUME);
    await page.waitForSelector('body[data-state="done"] #result[data-file="Flair_subtrMeanDivStd.nii.gz"]', { timeout: 120_000 });
    expect(await page.getAttribute('#result', 'data-kind')).toBe('volume');
    expect(await page.textContent('#volume-ml')).toBe(`${answer.tumor_volume_ml.toFixed(3)} ml`);
    expect(await page.textContent('#tumor-voxels')).toBe(String(answer.tumor_voxels));
    expect(await page.textContent('#slices-with-tumor')).toBe(`${answer.slices_with_tumor} / 155`);
    expect(await page.textContent('#voxel-size')).toBe('1 x 1 x 1 mm');
    expect(await page.getAttribute('#slice', 'max')).toBe('154');
    expect(await page.textContent('#result')).not.toMatch(/\b(null|undefined|NaN)\b/);

    const shown = async () => page.$eval('#slice-image', (i) => ({ slice: (i as HTMLImageElement).dataset.slice!, src: i.getAttribute('src')!, w: (i as HTMLImageElement).naturalWidth, complete: (i as HTMLImageElement).complete }));
    const first = await shown();
    const target = first.slice === '40' ? '100' : '40';
    await page.locator('#slice').fill(target);
    const second = await shown();
    expect(second.slice).toBe(target);
    expect(second.src).not.toBe(first.src);
    expect(await page.textContent('#slice-label')).toContain(`slice ${Number(target) + 1} of 155 · ${answer.slices[Number(target)].tumor_pixels} tumour pixels`);
    await page.waitForFunction(() => (document.getElementById('slice-image') as HTMLImageElement).complete);
    expect(await page.$eval('#slice-image', (i) => [(i as HTMLImageElement).naturalWidth, (i as HTMLImageElement).naturalHeight])).toEqual([240, 240]);
    await page.screenshot({ path: join(OUT, 'demo-volume.png'), fullPage: true });
    await page.locator('#result').screenshot({ path: join(OUT, 'demo-volume-result.png') });
  });

  it("shows the server's reason for a file it refuses", async () => {
    const notes = join(OUT, 'notes.txt');
    await writeFile(notes, 'not an image');
    await page.setInputFiles('#file', notes);
    await page.waitForSelector('body[data-state="error"]');
    expect(await page.textContent('#error')).toMatch(/^notes\.txt is not a PNG, JPEG or NIfTI/);
    expect(pageErrors).toEqual([]);
  });
});
