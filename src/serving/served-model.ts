/**
 * Which model the demo serves: the final checkpoint (stage 3's best) of the newest succeeded full or train-eval
 * run, or of the run asked for, with what a client should know about it (GET /model/info).
 */
import { and, desc, eq, inArray } from 'drizzle-orm';
import type { Db } from '../db/client.ts';
import { evaluations, runs, type RunRow } from '../db/schema.ts';
import type { MultitaskEvaluation } from '../evaluation/report.ts';
import { SliceWiseError } from '../lib/errors.ts';
import { readModelJson } from '../model/checkpoint.ts';
import { getRunRow } from '../runs/store.ts';
import { readModelInputs } from '../workers/model-inputs.ts';

export interface ServedModel {
  run_id: string;
  training_mode: string;
  checkpoint: { stage: 'joint'; dir: string; sha256: string };
  preset: string | null;
  architecture: { base: number; depth: number; head_hidden: number; in_channels: number };
  image_size: number;
  modalities: string[];
  threshold: number;
  /** The run's test-set figures, when it was evaluated. */
  evaluation: { dice: number | null; dice_3d: number | null; accuracy: number | null; roc_auc: number | null; combined: number | null } | null;
}

const MODEL_MODES = ['full', 'train-eval'];

export class NoModelError extends SliceWiseError {
  constructor(message: string, status = 409) {
    super(message, { status, code: 'no_model' });
    this.name = 'NoModelError';
  }
}

export async function resolveServedModel(db: Db, { fromRun }: { fromRun?: string } = {}): Promise<ServedModel> {
  let run: RunRow | undefined;
  if (fromRun) {
    run = await getRunRow(db, fromRun);
    if (!run) throw new SliceWiseError(`run ${fromRun} not found`, { status: 404, code: 'run_not_found' });
    if (!MODEL_MODES.includes(run.mode)) throw new NoModelError(`run ${fromRun} is a ${run.mode} run: it trained no model (use a full or train-eval run)`);
  } else {
    [run] = await db.select().from(runs).where(and(eq(runs.status, 'succeeded'), inArray(runs.mode, MODEL_MODES))).orderBy(desc(runs.createdAt)).limit(1);
    if (!run) throw new NoModelError('no trained model yet: no full or train-eval run has succeeded (run `slicewise pipeline --mode full` first, or pass --from-run)');
  }
  const inputs = await readModelInputs({ db, run }, 'the demo', ['train_stage3_joint']).catch((err: unknown) => {
    throw new NoModelError(`run ${run!.id} has no final model: ${(err as Error).message}`);
  });
  const dir = inputs.checkpoints.joint!;
  const modelJson = await readModelJson(dir);
  const [report] = await db.select().from(evaluations).where(and(eq(evaluations.runId, run.id), eq(evaluations.name, 'multitask')));
  const r = report?.report as MultitaskEvaluation | undefined;
  const c = modelJson.config;
  return {
    run_id: run.id,
    training_mode: run.trainingMode,
    checkpoint: { stage: 'joint', dir, sha256: modelJson.sha256['weights.bin'] },
    preset: c.preset ?? null,
    architecture: { base: c.base, depth: c.depth, head_hidden: c.headHidden, in_channels: c.inChannels },
    image_size: inputs.data.image_size,
    modalities: inputs.data.modalities,
    threshold: inputs.evaluation?.threshold ?? 0.5,
    evaluation: r
      ? {
          dice: r.segmentation?.per_slice.dice.mean ?? null,
          dice_3d: r.segmentation?.per_patient_3d.mean_dice ?? null,
          accuracy: r.classification.overall?.accuracy ?? null,
          roc_auc: r.classification.overall?.roc_auc ?? null,
          combined: r.combined,
        }
      : null,
  };
}
