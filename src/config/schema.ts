import { z } from 'zod';

export const TRAINING_MODES = ['quick', 'baseline', 'production'] as const;
export const STAGES = ['seg_warmup', 'cls_head', 'joint'] as const;
export type TrainingMode = (typeof TRAINING_MODES)[number];
export type StageName = (typeof STAGES)[number];

const fraction = z.number().min(0).max(1);
const obj = z.strictObject;
/** The model's parameter groups (src/model/unet.ts's PARAM_GROUPS; repeated here so the config pulls in no tfjs). */
const paramGroup = z.enum(['encoder', 'decoder', 'head']);
const learningRate = z.number().positive();

const Shape = obj({
  seed: z.number().int(),
  data: obj({
    image_size: z.number().int().min(16).max(1024),
    modalities: z.array(z.string().min(1)).min(1),
    min_tumor_pixels: z.number().int().min(0),
    keep_probability: fraction,
    cls_tumor_pixels: z.number().int().min(0),
    splits: obj({ train: fraction, val: fraction, test: fraction }),
    patients: obj({ fraction, min: z.number().int().min(1) }),
    max_patients: z.number().int().min(1).nullable(),
    kaggle_image_size: z.number().int().min(16).max(1024).nullable(),
  }),
  // The input channels are the modalities (data.modalities), not a setting of their own.
  model: obj({ preset: z.enum(['small', 'medium', 'large']) }),
  training: obj({
    epochs: z.number().int().min(1),
    batch_size: z.number().int().min(1),
    // AdamW, the only optimizer.
    optimizer: obj({
      lr: learningRate,
      weight_decay: z.number().min(0),
      betas: z.tuple([z.number(), z.number()]),
      eps: z.number().positive(),
    }),
    scheduler: obj({ name: z.enum(['cosine', 'none']), eta_min: z.number().min(0) }),
    grad_clip: z.number().positive().nullable(),
    early_stopping: obj({ enabled: z.boolean(), patience: z.number().int().min(1), min_delta: z.number().min(0) }),
    augmentation: z.enum(['none', 'minimal', 'moderate', 'aggressive']),
    keep_last_n: z.number().int().min(1),
  }),
  // The training stage's own settings: base.yaml holds the loss defaults, configs/stages/<stage>.yaml the rest.
  // Which data a stage reads and which metric picks its best checkpoint are fixed per stage by src/model.
  stage: obj({
    /** Groups that train (default per stage: seg_warmup encoder + decoder, cls_head head, joint all). */
    trainable: z.array(paramGroup).min(1).optional(),
    /** BraTS / Kaggle proportions of a training epoch (stages that read both). Unset: each sample once. */
    mix: obj({ brats: z.number().min(0), kaggle: z.number().min(0) })
      .refine((m) => m.brats + m.kaggle > 0, { message: 'brats + kaggle must be > 0' })
      .optional(),
    /** Base learning rate per group; a group without one uses training.optimizer.lr. */
    lr: obj({ encoder: learningRate, decoder: learningRate, head: learningRate }).partial().optional(),
    loss: obj({
      label_smoothing: z.number().min(0).lt(1),
      lambda_seg: z.number().min(0),
      lambda_cls: z.number().min(0),
      dice_weight: z.number().min(0),
      bce_weight: z.number().min(0),
      dice_smooth: z.number().positive(),
    }),
  }),
  evaluation: obj({
    /** A pixel (or an image) is predicted tumour when its probability is above this. */
    threshold: fraction,
    /** Slices per forward pass when evaluating. */
    batch_size: z.number().int().min(1),
    /** Grad-CAM images generate_gradcam writes: a quarter each of correct/wrong x tumour/no tumour. */
    gradcam_samples: z.number().int().min(4),
  }),
  workers: obj({ preprocess_attempts: z.number().int().min(1), download_attempts: z.number().int().min(1) }),
});

/**
 * The same schema with every key optional at every depth, still strict: one layer (a YAML file, or a run's
 * overrides) is validated on its own, which is what lets an error name the file that holds the bad key. An
 * optional object is made deep-partial too (a layer may set one of its keys; the merged config has them all).
 */
function deepPartial(schema: z.ZodType): z.ZodType {
  if (schema instanceof z.ZodOptional) return deepPartial(schema.unwrap() as z.ZodType).optional();
  if (schema instanceof z.ZodObject) {
    const shape = Object.fromEntries(Object.entries(schema.shape as Record<string, z.ZodType>).map(([k, v]) => [k, deepPartial(v).optional()]));
    return z.strictObject(shape);
  }
  return schema;
}

export const ConfigSchema = Shape.superRefine((c, ctx) => {
  const { train, val, test } = c.data.splits;
  if (Math.abs(train + val + test - 1) > 1e-6) {
    ctx.addIssue({ code: 'custom', path: ['data', 'splits'], message: `train + val + test must be 1 (is ${train + val + test})` });
  }
});
export const ConfigLayerSchema = deepPartial(Shape);

export type Config = z.infer<typeof ConfigSchema>;
