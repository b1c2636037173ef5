/** download_brats: the run's BraTS source into data/raw/brats/<source>/ (shared between runs). */
import { defineStep, RunJobData } from './define.ts';
import { downloadDataset } from './download-dataset.ts';

// Declared in full, as every step is (define.ts): the same shape as its sibling steps' declarations by design.
export const downloadBrats = defineStep({
  name: 'download_brats',
  queue: 'download',
  data: RunJobData,
  attempts: (config) => config.workers.download_attempts,
  run: (s) => downloadDataset('brats', s),
});
