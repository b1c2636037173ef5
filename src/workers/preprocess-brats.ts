/**
 * preprocess_brats: discovers the downloaded patients, picks the run's subset, and adds one preprocess_patient
 * job per patient as its own children; once they have all finished it totals them. The CPU work is the children's.
 */
import { WaitingChildrenError } from 'bullmq';
import { z } from 'zod';
import { patientCount } from '../config/load.ts';
import { runPaths } from '../disk/layout.ts';
import { discoverPatients } from '../imaging/layout.ts';
import { sweepDeadWriters } from '../lib/atomic.ts';
import { addPatientShards } from '../producers/patient-shards.ts';
import type { RunSources } from '../runs/input.ts';
import { countPatients, upsertPatients } from '../runs/store.ts';
import { choosePatients } from '../splits/index.ts';
import { defineStep, requireChild, RunJobData } from './define.ts';
import type { DownloadResult } from './download-dataset.ts';
import { preprocessPatientStep, type PatientJobData, type PatientResult } from './preprocess-patient.ts';

const CoordinatorData = RunJobData.extend({
  /** fan-out adds the children; collect runs once they have finished (the job is processed twice). */
  phase: z.enum(['fan-out', 'collect']).optional(),
});

export interface PreprocessBratsResult {
  kind: 'preprocess_brats';
  outDir: string;
  patients: PatientResult[];
}

export const preprocessBrats = defineStep({
  name: 'preprocess_brats',
  queue: 'pipeline',
  data: CoordinatorData,
  async run({ ctx, job, token, data, run, config, progress, childResults, log }) {
    const outDir = runPaths(run.dataDir, run.id).processedBrats;
    if ((data.phase ?? 'fan-out') === 'fan-out') {
      const download = await requireChild<DownloadResult>({ childResults, step: 'preprocess_brats' }, 'download');
      const found = await discoverPatients(download.dir, (run.sources as RunSources).bratsLayout);
      const chosen = new Set(choosePatients(found.map((p) => p.patientId), patientCount(found.length, config.data), config.seed));
      const selected = found.filter((p) => chosen.has(p.patientId));
      // A redelivered coordinator may find patients done already: the count is the table's, not 0.
      await progress({ found: found.length, total: selected.length, done: (await countPatients(ctx.db, run.id)).done });
      log(`Run ${run.id}: ${found.length} patients found, preprocessing ${selected.length}`);
      const { present } = await addPatientShards<PatientJobData>(ctx, {
        parent: job,
        step: preprocessPatientStep,
        config,
        shards: selected.map((patient) => ({ patientId: patient.patientId, data: { runId: run.id, patient } })),
      });
      if (present > 0) log(`Run ${run.id}: ${present} of ${selected.length} patient jobs were added by an earlier attempt of preprocess_brats; added the other ${selected.length - present}`);
      await job.updateData({ ...data, phase: 'collect' });
    }
    // Also on a redelivered collect: children may still be running.
    if (await job.moveToWaitingChildren(token!)) throw new WaitingChildrenError();
    const patients = (await childResults()).filter((v): v is PatientResult => (v as PatientResult)?.kind === 'patient');
    patients.sort((a, b) => a.patientId.localeCompare(b.patientId));
    // The shards' rows were written behind them (shard-rows.ts), some maybe not at all (a worker killed first):
    // these, from the results BullMQ keeps with this job, are the record split and finalize read.
    const row = preprocessPatientStep.shard!.row;
    await upsertPatients(ctx.db, patients.map((p) => ({ runId: run.id, patientId: p.patientId, status: 'done' as const, ...row(p), error: null })));
    // What shard workers killed mid-patient left (their retries wrote the patients elsewhere): swept once here, as a
    // writer sweeps a folder only the first time it writes there.
    await sweepDeadWriters(outDir);
    const slices = patients.reduce((a, p) => a + p.slices, 0);
    const tumorSlices = patients.reduce((a, p) => a + p.tumorSlices, 0);
    return {
      result: { kind: 'preprocess_brats', outDir, patients } satisfies PreprocessBratsResult,
      counts: { done: patients.length, total: patients.length, slices, tumor_slices: tumorSlices },
    };
  },
});
