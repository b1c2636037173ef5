import { join } from 'node:path';
import { WaitingChildrenError, type Job } from 'bullmq';
import type { AppContext } from '../context.ts';
import { patientCount } from '../config/load.ts';
import { discoverPatients, type PatientFiles } from '../imaging/layout.ts';
import type { PreprocessOptions } from '../imaging/brats.ts';
import { SliceWiseError } from '../lib/errors.ts';
import { runDir } from '../producers/run-flow.ts';
import { jobId, PATIENT_JOB } from '../queues/names.ts';
import type { RunSources } from '../runs/service.ts';
import { upsertPatient } from '../runs/store.ts';
import { choosePatients } from '../splits/index.ts';
import type { DownloadResult } from './download.ts';
import { runStep } from './step.ts';

/** What a preprocess_patient job carries: everything the sandboxed processor needs, since it has no database. */
export interface PatientJobData {
  runId: string;
  patient: PatientFiles;
  outDir: string;
  options: PreprocessOptions;
}

export interface PatientResult {
  kind: 'patient';
  patientId: string;
  slices: number;
  tumorSlices: number;
  outDir: string;
}

export interface PreprocessBratsResult {
  kind: 'preprocess_brats';
  outDir: string;
  patients: PatientResult[];
}

interface CoordinatorData {
  runId: string;
  phase?: 'fan-out' | 'collect';
}

/**
 * The number of patients is known only after download, so this job adds its own children (BullMQ's
 * "process step" pattern): phase fan-out discovers patients and adds one preprocess_patient job each, with ids
 * derived from run and patient so that a retry adds nothing twice; phase collect runs once they have all
 * finished and records the totals.
 */
export function preprocessBratsProcessor(ctx: AppContext) {
  return async (job: Job<CoordinatorData>, token?: string, signal?: AbortSignal): Promise<PreprocessBratsResult> =>
    runStep('preprocess_brats', ctx, job, token, signal, async ({ run, config, progress }) => {
      const outDir = join(runDir(run.dataDir, run.id), 'processed', 'brats');
      if ((job.data.phase ?? 'fan-out') === 'fan-out') {
        const download = Object.values(await job.getChildrenValues()).find((v): v is DownloadResult => v?.kind === 'download');
        if (!download) throw new SliceWiseError('preprocess_brats found no download result among its children', { code: 'flow_broken' });
        const sources = run.sources as RunSources;
        const found = await discoverPatients(download.dir, sources.bratsLayout);
        const n = patientCount(found.length, config.data);
        const chosen = new Set(choosePatients(found.map((p) => p.patientId), n, config.seed));
        const selected = found.filter((p) => chosen.has(p.patientId));
        const options: PreprocessOptions = {
          imageSize: config.data.image_size,
          modalities: config.data.modalities,
          minTumorPixels: config.data.min_tumor_pixels,
          keepProbability: config.data.keep_probability,
          seed: config.seed,
        };
        for (const p of selected) await upsertPatient(ctx.db, { runId: run.id, patientId: p.patientId, status: 'pending' });
        await progress({ found: found.length, total: selected.length, done: 0 });
        ctx.logger.info({ runId: run.id, found: found.length, selected: selected.length }, `Run ${run.id}: ${found.length} patients found, preprocessing ${selected.length}`);
        const attempts = config.workers.preprocess_attempts;
        await ctx.queues.preprocess.addBulk(
          selected.map((patient) => ({
            name: PATIENT_JOB,
            data: { runId: run.id, patient, outDir, options } satisfies PatientJobData,
            opts: {
              jobId: jobId(run.id, 'patient', patient.patientId),
              parent: { id: job.id!, queue: job.queueQualifiedName },
              failParentOnFailure: true,
              attempts,
              backoff: { type: 'exponential', delay: 1000 },
              removeOnComplete: { age: 7 * 24 * 3600, count: 20000 },
              removeOnFail: { age: 14 * 24 * 3600, count: 20000 },
            },
          })),
        );
        await job.updateData({ ...job.data, phase: 'collect' });
      }
      // Also on a redelivered collect: children may still be running.
      if (await job.moveToWaitingChildren(token!)) throw new WaitingChildrenError();
      const patients = Object.values(await job.getChildrenValues()).filter((v): v is PatientResult => v?.kind === 'patient');
      patients.sort((a, b) => a.patientId.localeCompare(b.patientId));
      // The authoritative record: event handlers may have missed a completion if a worker died right after it.
      for (const p of patients) {
        await upsertPatient(ctx.db, { runId: run.id, patientId: p.patientId, status: 'done', slices: p.slices, tumorSlices: p.tumorSlices, outputDir: p.outDir, error: null });
      }
      const slices = patients.reduce((a, p) => a + p.slices, 0);
      const tumorSlices = patients.reduce((a, p) => a + p.tumorSlices, 0);
      return {
        result: { kind: 'preprocess_brats', outDir, patients },
        counts: { done: patients.length, total: patients.length, slices, tumor_slices: tumorSlices },
      };
    });
}
