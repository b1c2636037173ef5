/**
 * One runner records every step. A sandboxed step (preprocess_kaggle, in a step thread) and an in-process step
 * (preprocess_brats, in the worker's main thread) that fail on bad input must leave the same rows: the step's row,
 * the run's verdict and pipeline_results.json, in the same shape.
 */
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { tmpdir } from 'node:os';
import { harnessWithScratch, json, postRun, waitForRun } from './helpers/services.ts';

// The bad sources are scratch folders under the temp dir, which runs may read only when the operator allows it.
process.env.SLICEWISE_ALLOWED_ROOTS = tmpdir();

/** The JSON types of an object's values: what "the same shape" means for a row. */
function shape(o: Record<string, unknown>): Record<string, string> {
  return Object.fromEntries(Object.entries(o).map(([k, v]) => [k, v === null ? 'null' : Array.isArray(v) ? 'array' : typeof v]));
}

describe('failed steps leave the same rows, sandboxed or not', () => {
  const scope = harnessWithScratch('postgres', 'slicewise-rows-');

  async function failedRun(sources: { brats: string; kaggle: string }) {
    const { h } = scope;
    const { run } = await json(await postRun(h.app, { mode: 'data-only', sources, overrides: { data: { image_size: 32 } } }));
    const done = await waitForRun(h.app, run.id);
    const results = await json(await h.app.request(`/runs/${run.id}/results`));
    return { done, results };
  }

  it('preprocess_kaggle (sandboxed) and preprocess_brats (in-process)', async () => {
    const { root } = scope;
    // Kaggle: yes/ and no/ exist but hold no image -> preprocess_kaggle fails in its thread with a 422.
    const kaggle = join(root, 'kaggle-empty');
    await mkdir(join(kaggle, 'yes'), { recursive: true });
    await mkdir(join(kaggle, 'no'), { recursive: true });
    // BraTS: a folder with no patient in it -> preprocess_brats fails in the main thread.
    const brats = join(root, 'brats-empty');
    await mkdir(brats, { recursive: true });
    await writeFile(join(brats, 'README.txt'), 'not a dataset\n');

    const a = await failedRun({ brats: 'synthetic:2', kaggle: `path:${kaggle}` });
    const b = await failedRun({ brats: `path:${brats}`, kaggle: 'synthetic:4' });
    const stepA = a.done.steps.find((s: any) => s.name === 'preprocess_kaggle');
    const stepB = b.done.steps.find((s: any) => s.name === 'preprocess_brats');

    for (const [{ done }, step, name] of [
      [a, stepA, 'preprocess_kaggle'],
      [b, stepB, 'preprocess_brats'],
    ] as const) {
      expect(done.status).toBe('failed');
      expect(step.status).toBe('failed');
      // Bad input is not retried, in a thread or not.
      expect(step.attempts).toBe(1);
      expect(step.error).toBeTruthy();
      expect(done.error).toBe(`${name} failed: ${step.error}`);
      expect(done.errorDetails.step).toBe(name);
      expect(step.durationSeconds).toBeGreaterThanOrEqual(0);
      expect(step.startedAt).toBeTruthy();
      expect(step.finishedAt).toBeTruthy();
    }
    expect(stepA.error).toContain(kaggle);
    expect(stepB.error).toContain(brats);
    const { latestEpoch: _a, ...rowA } = stepA;
    const { latestEpoch: _b, ...rowB } = stepB;
    expect(shape(rowA)).toEqual(shape(rowB));
    expect(shape(a.done.errorDetails)).toMatchObject({ step: 'string' });
    expect(shape(a.results.steps.preprocess_kaggle)).toEqual(shape(b.results.steps.preprocess_brats));
    expect(a.results.steps.preprocess_kaggle.status).toBe('failed');
    expect(b.results.steps.preprocess_brats.status).toBe('failed');
  });
});
