import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vitest/config';

/**
 * The browser suite (`npm run test:browser`): real Chromium against the API on a real port. Kept out of the
 * default `npm test` (its files end in .browser.ts, which the default include does not match).
 */
export default defineConfig({
  test: {
    root: fileURLToPath(new URL('../..', import.meta.url)),
    include: ['test/browser/**/*.browser.ts'],
    // One CI-size full run for every file (the run page's and the demo's).
    globalSetup: ['test/browser/global-setup.ts'],
    testTimeout: 240_000,
    hookTimeout: 240_000,
    fileParallelism: false,
    pool: 'forks',
  },
});
