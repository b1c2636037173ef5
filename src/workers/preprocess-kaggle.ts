/** preprocess_kaggle: the Kaggle images -> processed/kaggle/{images.npy, labels.npy, meta.json}; sandboxed (CPU-bound). */
import { runPaths } from '../disk/layout.ts';
import { preprocessKaggleDataset } from '../imaging/kaggle.ts';
import { defineStep, requireChild, RunJobData } from './define.ts';
import type { DownloadResult } from './download-dataset.ts';
import { throwIfAborted } from './errors.ts';

export interface KaggleResult {
  kind: 'preprocess_kaggle';
  outDir: string;
  processed: number;
  rejected: number;
  yes: number;
  no: number;
}

export const preprocessKaggle = defineStep({
  name: 'preprocess_kaggle',
  queue: 'preprocess',
  sandboxed: true,
  data: RunJobData,
  async run({ run, config, signal, progress, childResults }) {
    const download = await requireChild<DownloadResult>({ childResults, step: 'preprocess_kaggle' }, 'download');
    const outDir = runPaths(run.dataDir, run.id).processedKaggle;
    let last = 0;
    const res = await preprocessKaggleDataset(download.dir, outDir, {
      imageSize: config.data.kaggle_image_size ?? config.data.image_size,
      onProgress: (done, total) => {
        throwIfAborted(signal, 'preprocess_kaggle');
        if (Date.now() - last > 500 || done === total) {
          last = Date.now();
          void progress({ done, total });
        }
      },
    });
    const result: KaggleResult = { kind: 'preprocess_kaggle', outDir, processed: res.processed, rejected: res.rejected.length, yes: res.labels.yes, no: res.labels.no };
    return { result, counts: { processed: result.processed, rejected: result.rejected, yes: result.yes, no: result.no, done: result.processed + result.rejected } };
  },
});
