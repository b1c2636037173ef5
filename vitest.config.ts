import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts', 'packages/*/test/**/*.test.ts'],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    // Integration tests share one Redis and one Postgres; files run one at a time to keep the 2-core box calm.
    fileParallelism: false,
    pool: 'forks',
  },
});
