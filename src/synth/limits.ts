/**
 * The most the synthetic generator makes in one call. In a module of its own, free of the generator's imports, so
 * env.ts and the API's source checks can refuse a larger `synthetic:N` at the door instead of a worker failing
 * on it a minute later.
 */
export const SYNTH_LIMITS = {
  /** BraTS-like patients. */
  patients: 999,
  /** Kaggle-like images per class (`yes` and `no` each). */
  kaggleImagesPerClass: 999,
} as const;
