/**
 * preprocess_patient: one BraTS patient's volumes -> images.npy, masks.npy, meta.json. One job per patient, added
 * by preprocess_brats; sandboxed, because a 240 x 240 x 155 volume is a second of solid CPU.
 */
import { z } from 'zod';
import type { Config } from '../config/schema.ts';
import { runPaths } from '../disk/layout.ts';
import { preprocessPatient, type PreprocessOptions } from '../imaging/brats.ts';
import { defineStep, RunJobData } from './define.ts';
import { throwIfAborted } from './errors.ts';

export const PatientJobData = RunJobData.extend({
  patient: z.object({
    patientId: z.string().min(1),
    dir: z.string(),
    files: z.record(z.string(), z.string()),
    expected: z.record(z.string(), z.string()).optional(),
    layout: z.record(z.string(), z.string()).optional(),
  }),
});
export type PatientJobData = z.infer<typeof PatientJobData>;

export interface PatientResult {
  kind: 'patient';
  patientId: string;
  slices: number;
  tumorSlices: number;
  outDir: string;
}

function preprocessOptions(config: Config): PreprocessOptions {
  return {
    imageSize: config.data.image_size,
    modalities: config.data.modalities,
    minTumorPixels: config.data.min_tumor_pixels,
    keepProbability: config.data.keep_probability,
    seed: config.seed,
  };
}

export const preprocessPatientStep = defineStep({
  name: 'preprocess_patient',
  queue: 'preprocess',
  sandboxed: true,
  data: PatientJobData,
  attempts: (config) => config.workers.preprocess_attempts,
  backoff: { type: 'exponential', delay: 1000 },
  shard: {
    rollsUpInto: 'preprocess_brats',
    patientId: (d) => d.patient.patientId,
    row: (r: PatientResult) => ({ slices: r.slices, tumorSlices: r.tumorSlices, outputDir: r.outDir }),
  },
  async run({ data, run, config, signal }) {
    throwIfAborted(signal, `patient ${data.patient.patientId}`);
    const paths = runPaths(run.dataDir, run.id);
    const meta = await preprocessPatient(data.patient, paths.processedBrats, preprocessOptions(config));
    throwIfAborted(signal, `patient ${data.patient.patientId}`);
    const result: PatientResult = {
      kind: 'patient',
      patientId: meta.patient_id,
      slices: meta.slices.length,
      tumorSlices: meta.slices.filter((s) => s.has_tumor).length,
      outDir: paths.patient(meta.patient_id).dir,
    };
    return { result };
  },
});
