/**
 * The model the demo serves and the threads that run it, started on first use: a server that comes up before any
 * run has trained answers "no trained model yet" and starts serving as soon as one has, without a restart; a
 * server already serving one moves to a newer run's model when one succeeds (model(), refreshMs).
 */
import type { Db } from '../db/client.ts';
import { env } from '../env.ts';
import { InferencePool, type EngineName } from './inference-pool.ts';
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
  /** What runs the model. Default: SLICEWISE_DEMO_ENGINE, else `onnx`. */
  engine?: EngineName;
  limits?: Partial<DemoLimits>;
  /**
   * How often, at most, a request (or /model/info) makes the service look for a newer model: the newest succeeded
   * run may change while the server runs. Default: 5000 ms. The request itself never waits for that look.
   */
  refreshMs?: number;
}

export interface ServingModel {
  info: ServedModel;
  pool: InferencePool;
}

const DEFAULT_REFRESH_MS = 5000;

function sameCheckpoint(a: ServedModel, b: ServedModel): boolean {
  return a.checkpoint.dir === b.checkpoint.dir && a.checkpoint.sha256 === b.checkpoint.sha256;
}

export class DemoService {
  readonly limits: DemoLimits;
  private current: Promise<ServingModel> | null = null;
  /** What `current` resolved to, once it has. */
  private active: ServingModel | null = null;
  private checkedAt = 0;
  private checking: Promise<void> | null = null;
  /** Pools of models replaced by a newer one, finishing their requests in flight. */
  private readonly retiring = new Set<InferencePool>();
  private closed = false;

  constructor(private readonly opts: DemoServiceOptions) {
    this.limits = { ...DEFAULT_DEMO_LIMITS, ...opts.limits };
  }

  private async startPool(info: ServedModel): Promise<InferencePool> {
    const e = env();
    const pool = new InferencePool({ checkpoint: info.checkpoint.dir, size: this.opts.threads, kernelThreads: e.demoKernelThreads, engine: this.opts.engine ?? e.demoEngine, imageSize: info.image_size });
    try {
      await pool.ready;
    } catch (err) {
      await pool.close();
      throw err;
    }
    return pool;
  }

  /**
   * The served model, its threads warm. Throws NoModelError (409) while there is none; tries again next time.
   * Every `refreshMs` at most, also looks for a newer model in the background: when the served run (or its
   * checkpoint) changed, the new model's threads load while the old ones keep answering, then the new model
   * takes over and the old threads stop once their requests in flight are answered.
   */
  model(): Promise<ServingModel> {
    if (!this.current) {
      const starting = (async () => {
        const info = await resolveServedModel(this.opts.db, { fromRun: this.opts.fromRun });
        const served = { info, pool: await this.startPool(info) };
        if (this.closed) {
          await served.pool.close();
          throw new Error('the demo service was closed');
        }
        this.active = served;
        return served;
      })();
      this.checkedAt = Date.now();
      this.current = starting;
      starting.catch(() => {
        if (this.current === starting) this.current = null;
      });
    } else if (this.active && !this.checking && Date.now() - this.checkedAt >= (this.opts.refreshMs ?? DEFAULT_REFRESH_MS)) {
      this.checking = this.refresh().finally(() => {
        this.checkedAt = Date.now();
        this.checking = null;
      });
    }
    return this.current;
  }

  /** The look for a newer model that model() started, if one is under way (for tests and shutdown). */
  async settled(): Promise<void> {
    await this.checking;
  }

  private async refresh(): Promise<void> {
    const old = this.active!;
    // A database hiccup, or a newest run without a usable model: keep serving what we have.
    const info = await resolveServedModel(this.opts.db, { fromRun: this.opts.fromRun }).catch(() => null);
    if (!info || this.closed || this.active !== old) return;
    if (sameCheckpoint(info, old.info)) {
      // Same weights; the run's figures (its evaluation, say) may still have changed.
      if (JSON.stringify(info) !== JSON.stringify(old.info)) this.swap({ info, pool: old.pool });
      return;
    }
    const pool = await this.startPool(info).catch(() => null);
    if (!pool) return;
    if (this.closed || this.active !== old) {
      await pool.close();
      return;
    }
    this.swap({ info, pool });
    if (old.pool !== pool) {
      this.retiring.add(old.pool);
      void old.pool.drain().finally(() => this.retiring.delete(old.pool));
    }
  }

  private swap(next: ServingModel): void {
    this.active = next;
    this.current = Promise.resolve(next);
  }

  async close(): Promise<void> {
    this.closed = true;
    const c = this.current;
    this.current = null;
    this.active = null;
    await this.checking;
    await Promise.all([c?.then((m) => m.pool.close(), () => undefined), ...[...this.retiring].map((p) => p.close())]);
  }
}
