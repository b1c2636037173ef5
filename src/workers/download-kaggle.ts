/** download_kaggle: the run's Kaggle source into data/raw/kaggle/<source>/ (shared between runs). */
import { defineStep, RunJobData } from './define.ts';
import { downloadDataset } from './download-dataset.ts';

export const downloadKaggle = defineStep({
  name: 'download_kaggle',
  queue: 'download',
  data: RunJobData,
  attempts: (config) => config.workers.download_attempts,
  backoff: { type: 'exponential', delay: 2000 },
  run: (s) => downloadDataset('kaggle', s),
});
