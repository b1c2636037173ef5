/**
 * The model the demo serves and the threads that run it, started on first use: a server that comes up before any
 * run has trained answers "no trained model yet" and starts serving as soon as one has, without a restart.
 */
import type { Db } from '../db/client.ts';
import { InferencePool } from './inference-pool.ts';
import { resolveServedModel, type ServedModel } from './served-model.ts';

export interface DemoLimits {
  /** Largest upload, in bytes. Default: 64 MB. */
  maxUploadBytes: number;
  /** Largest decoded image, in pixels (width x height). Default: 50 million. */
  maxImagePixels: number;
  /** Largest volume, in voxels (its header's dimensions, checked before inflating). Default: 50 million. */
  maxVolumeVoxels: number;
  /** Most files in one batch request. Default: 32. */
  maxBatchFiles: number;
}

export const DEFAULT_DEMO_LIMITS: DemoLimits = { maxUploadBytes: 64 * 1024 * 1024, maxImagePixels: 50_000_000, maxVolumeVoxels: 50_000_000, maxBatchFiles: 32 };

export interface DemoServiceOptions {
  db: Db;
  /** Serve this run's model. Default: the newest succeeded full or train-eval run. */
  fromRun?: string;
  /** Inference threads. Default: one per core. */
  threads?: number;
  limits?: Partial<DemoLimits>;
}

export interface ServingModel {
  info: ServedModel;
  pool: InferencePool;
}

export class DemoService {
  readonly limits: DemoLimits;
  private current: Promise<ServingModel> | null = null;

  constructor(private readonly opts: DemoServiceOptions) {
    this.limits = { ...DEFAULT_DEMO_LIMITS, ...opts.limits };
  }

  /** The served model, its threads warm. Throws NoModelError (409) while there is none; tries again next time. */
  model(): Promise<ServingModel> {
    if (!this.current) {
      const starting = (async () => {
        const info = await resolveServedModel(this.opts.db, { fromRun: this.opts.fromRun });
        const pool = new InferencePool({ checkpoint: info.checkpoint.dir, size: this.opts.threads });
        try {
          await pool.ready;
        } catch (err) {
          await pool.close();
          throw err;
        }
        return { info, pool };
      })();
      this.current = starting;
      starting.catch(() => {
        if (this.current === starting) this.current = null;
      });
    }
    return this.current;
  }

  async close(): Promise<void> {
    const c = this.current;
    this.current = null;
    await c?.then((m) => m.pool.close(), () => undefined);
  }
}
