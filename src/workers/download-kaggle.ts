/** download_kaggle: the run's Kaggle source into data/raw/kaggle/<source>/ (shared between runs). */
import { defineStep, RunJobData } from './define.ts';
import { downloadDataset } from './download-dataset.ts';

// Declared in full, as every step is (define.ts): the same shape as its sibling steps' declarations by design.
export const downloadKaggle = defineStep({
  name: 'download_kaggle',
  queue: 'download',
  data: RunJobData,
  attempts: (config) => config.workers.download_attempts,
  run: (s) => downloadDataset('kaggle', s),
});
