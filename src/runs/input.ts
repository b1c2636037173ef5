import { z } from 'zod';
import { TRAINING_MODES } from '../config/schema.ts';

export const PIPELINE_MODES = ['full', 'data-only', 'train-eval', 'demo'] as const;
export type PipelineMode = (typeof PIPELINE_MODES)[number];

/** Parsed (and refused when it carries credentials) by parseSource, so the error lists the accepted forms. */
const sourceString = z.string().min(1).max(4096);

export const CreateRunSchema = z.strictObject({
  mode: z.enum(PIPELINE_MODES).default('data-only'),
  trainingMode: z.enum(TRAINING_MODES).default('quick'),
  sources: z
    .strictObject({
      /** synthetic[:N] | path:DIR_OR_ARCHIVE | https://... | kaggle:OWNER/DATASET. Default: synthetic. */
      brats: sourceString.default('synthetic'),
      kaggle: sourceString.default('synthetic'),
      /** modality -> file pattern, as "flair=Flair_*.nii.gz,seg=OTMultiClass.nii.gz" or an object (checked alike). */
      bratsLayout: z
        .union([
          z.string().min(1).max(2000),
          z.record(z.string(), z.string().min(1)).refine((o) => Object.keys(o).length <= 16, 'at most 16 modalities'),
        ])
        .optional(),
    })
    .default({ brats: 'synthetic', kaggle: 'synthetic' }),
  skipDownload: z.boolean().default(false),
  /** Where raw data, processed slices and outputs go. Default: the server's data dir. */
  dataDir: z.string().min(1).optional(),
  /** train-eval: the run whose processed data and splits to train on. Default: the latest succeeded run that made data. */
  fromRun: z.string().regex(/^[A-Za-z0-9._-]{1,100}$/, 'not a run id (letters, digits, ".", "_" and "-", at most 100)').optional(),
  /** Per-run config overrides, layered over base -> mode (validated against the config schema). */
  overrides: z.record(z.string(), z.unknown()).optional(),
});
export type CreateRunInput = z.input<typeof CreateRunSchema>;

/** What a run stores about its sources: specs that parseSource reads back, never credentials (parseSource refuses them). */
export interface RunSources {
  brats: string;
  kaggle: string;
  bratsLayout?: Record<string, string>;
  skipDownload: boolean;
}

export const ListRunsQuery = z.strictObject({
  status: z.enum(['queued', 'running', 'succeeded', 'failed', 'cancelled']).optional(),
  limit: z.coerce.number().int().min(1).max(200).default(20),
  offset: z.coerce.number().int().min(0).default(0),
});
