/**
 * What the evaluation steps read from the database before their bodies run in a step thread: the checkpoints the
 * training steps recorded, and the data run's splits and preprocessing settings (a train-eval run evaluates on
 * the data of the run it trained on, sliced the way that run sliced it).
 */
import type { Config, StageName } from '../config/schema.ts';
import { runPaths } from '../disk/layout.ts';
import type { EvaluationSettings } from '../evaluation/evaluate.ts';
import { SliceWiseError } from '../lib/errors.ts';
import { TRAIN_STEPS, type TrainStep } from '../runs/modes.ts';
import { getRunRow, stepResult } from '../runs/store.ts';
import type { Db } from '../db/client.ts';
import type { RunRow } from '../db/schema.ts';
import type { TrainResult } from './train-stage.ts';

/** `data` and `seed` are the data run's: evaluation slices volumes the way its preprocessing did. */
export interface ModelInputs extends EvaluationSettings {
  /** Each stage's best checkpoint folder, as its training step recorded it. */
  checkpoints: Partial<Record<StageName, string>>;
  /** The data run's splits folder. */
  splitsDir: string;
}

export async function readModelInputs({ db, run }: { db: Db; run: RunRow }, step: string, needs: readonly TrainStep[] = TRAIN_STEPS): Promise<ModelInputs> {
  const checkpoints: ModelInputs['checkpoints'] = {};
  for (const train of needs) {
    const result = await stepResult<TrainResult>(db, run.id, train);
    if (!result?.checkpoint) {
      throw new SliceWiseError(`${step} needs the best checkpoint of ${train}, and run ${run.id} has recorded none (did its training succeed?)`, {
        status: 409,
        code: 'no_checkpoint',
      });
    }
    checkpoints[result.stage] = result.checkpoint;
  }
  const dataRun = run.dataRunId ? await getRunRow(db, run.dataRunId) : run;
  if (!dataRun) throw new SliceWiseError(`run ${run.id} was trained on run ${run.dataRunId}, which no longer exists`, { status: 409, code: 'no_data_run' });
  const dataConfig = dataRun.config as Config;
  return { checkpoints, splitsDir: runPaths(dataRun.dataDir, dataRun.id).splits, data: dataConfig.data, seed: dataConfig.seed, evaluation: (run.config as Config).evaluation };
}
