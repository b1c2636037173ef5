/**
 * The browser suite's one CI-size `full` run (4 synthetic patients, 64 x 64, 3 epochs), made once before its files
 * and shared with them through vitest's provide/inject: each file attaches to it (attachHarness). Its database,
 * files and Redis keys go when the suite ends.
 */
import type { TestProject } from 'vitest/node';
import { harnessWithTrainedRun } from '../helpers/trained-run.ts';

const EPOCHS = 3;

export default async function setup(project: TestProject) {
  const { h, runId, seconds } = await harnessWithTrainedRun('postgres', { epochs: EPOCHS });
  console.log(`browser suite: CI-size full run ${runId} finished in ${seconds.toFixed(0)} s`);
  project.provide('sharedRun', { databaseUrl: h.db.url!, dataDir: h.dataDir, prefix: h.ctx.prefix, runId, epochs: EPOCHS });
  return async () => {
    await h.close();
  };
}
