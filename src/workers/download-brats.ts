/** download_brats: the run's BraTS source into data/raw/brats/<source>/ (shared between runs). */
import { defineStep, RunJobData } from './define.ts';
import { downloadDataset } from './download-dataset.ts';

export const downloadBrats = defineStep({
  name: 'download_brats',
  queue: 'download',
  data: RunJobData,
  attempts: (config) => config.workers.download_attempts,
  backoff: { type: 'exponential', delay: 2000 },
  run: (s) => downloadDataset('brats', s),
});
