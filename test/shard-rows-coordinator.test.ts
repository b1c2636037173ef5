/**
 * Patient shards write their rows behind them (src/workers/shard-rows.ts), so the record split and finalize read is
 * the coordinator's: here the workers' write-behind waits an hour, so every patient row a run ends with was written
 * by preprocess_brats from the results BullMQ kept with it.
 */
import { describe, expect, it } from 'vitest';
import { harnessWithScratch, json, postRun, waitForRun } from './helpers/services.ts';

process.env.SLICEWISE_SHARD_ROWS_MS = String(3_600_000);

describe('the coordinator writes every patient row', () => {
  const scope = harnessWithScratch('pglite', 'slicewise-shard-rows-');

  it('a run whose shard rows were never written behind ends with every patient done, its figures and its split', async () => {
    const { h } = scope;
    const { run } = await json(
      await postRun(h.app, { mode: 'data-only', sources: { brats: 'synthetic:5', kaggle: 'synthetic:4' }, overrides: { data: { image_size: 32, patients: { fraction: 1 } } } }),
    );
    const done = await waitForRun(h.app, run.id);
    expect(done.status, JSON.stringify(done.error)).toBe('succeeded');
    expect(done.patients).toHaveLength(5);
    for (const p of done.patients) {
      expect(p).toMatchObject({ status: 'done', error: null });
      expect(p.slices).toBeGreaterThan(0);
      expect(p.tumorSlices).toBeGreaterThanOrEqual(0);
      expect(['train', 'val', 'test']).toContain(p.split);
    }
    const step = done.steps.find((s: { name: string }) => s.name === 'preprocess_brats');
    expect(step.counts).toMatchObject({ done: 5, total: 5 });
  });
});
