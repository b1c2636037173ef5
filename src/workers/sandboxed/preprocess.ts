/**
 * Sandboxed processor for the preprocess queue, run by BullMQ in a worker thread: a 240x240x155 volume takes
 * a second of solid CPU, and on the main thread that would starve lock renewal and the event loop. No database
 * here (an embedded PGlite lives in the main thread only); bookkeeping happens in the main thread's worker
 * events and in the parents that collect these results.
 */
import type { SandboxedJob } from 'bullmq';
import { preprocessPatient } from '../../imaging/brats.ts';
import { preprocessKaggleDataset } from '../../imaging/kaggle.ts';
import { PatientDataError } from '../../lib/errors.ts';
import type { KaggleJobData } from '../../producers/run-flow.ts';
import type { PatientJobData, PatientResult } from '../preprocess-brats.ts';
import type { DownloadResult } from '../download.ts';

export interface KaggleResult {
  kind: 'preprocess_kaggle';
  outDir: string;
  processed: number;
  rejected: number;
  yes: number;
  no: number;
}

function unrecoverable(err: Error): Error {
  // BullMQ recognises the name across the thread boundary; retrying a corrupt file cannot help.
  const e = new Error(err.message);
  e.name = 'UnrecoverableError';
  return e;
}

function checkAborted(signal: AbortSignal | undefined) {
  if (signal?.aborted) throw unrecoverable(new Error('cancelled: the run was cancelled'));
}

export default async function process(job: SandboxedJob, _token?: string, signal?: AbortSignal): Promise<PatientResult | KaggleResult> {
  checkAborted(signal);
  if (job.name === 'preprocess_patient') {
    const data = job.data as PatientJobData;
    try {
      const meta = await preprocessPatient(data.patient, data.outDir, data.options);
      checkAborted(signal);
      return {
        kind: 'patient',
        patientId: meta.patient_id,
        slices: meta.slices.length,
        tumorSlices: meta.slices.filter((s) => s.has_tumor).length,
        outDir: `${data.outDir}/${meta.patient_id}`,
      };
    } catch (err) {
      if (err instanceof PatientDataError) throw unrecoverable(err);
      throw err;
    }
  }
  if (job.name === 'preprocess_kaggle') {
    const data = job.data as KaggleJobData;
    const values = (await job.getChildrenValues()) as Record<string, DownloadResult>;
    const download = Object.values(values).find((v) => v?.kind === 'download');
    if (!download) throw new Error('preprocess_kaggle found no download result among its children');
    let last = 0;
    const res = await preprocessKaggleDataset(download.dir, data.outDir, {
      imageSize: data.imageSize,
      onProgress: (done, total) => {
        checkAborted(signal);
        if (Date.now() - last > 500 || done === total) {
          last = Date.now();
          void job.updateProgress({ done, total });
        }
      },
    });
    return { kind: 'preprocess_kaggle', outDir: data.outDir, processed: res.processed, rejected: res.rejected.length, yes: res.labels.yes, no: res.labels.no };
  }
  throw unrecoverable(new Error(`the preprocess queue has no processor for job name '${job.name}'`));
}
