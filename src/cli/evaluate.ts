/**
 * `slicewise evaluate`: a finished run's final model on a set of patients or images it never saw (a hospital's
 * cases), with the evaluation code evaluate_multitask runs. Reads the run from the database (no Redis needed),
 * materialises the sources like a download step, and writes multitask_evaluation.json.
 */
import { join, resolve } from 'node:path';
import cliProgress from 'cli-progress';
import { openDb } from '../db/client.ts';
import { pgliteDir, rawDir } from '../disk/layout.ts';
import { materializeSource } from '../download/index.ts';
import { describeSource, parseSource, sourceKey } from '../download/sources.ts';
import { folderKaggle, folderPatients } from '../evaluation/datasets.ts';
import { evaluateCheckpoint, type KaggleSource, type PatientSource } from '../evaluation/evaluate.ts';
import type { MultitaskEvaluation } from '../evaluation/report.ts';
import { discoverPatients, parseLayout } from '../imaging/layout.ts';
import { writeJsonAtomic } from '../lib/atomic.ts';
import { SliceWiseError } from '../lib/errors.ts';
import { initBackend } from '../model/engine.ts';
import { getRunRow } from '../runs/store.ts';
import { readModelInputs } from '../workers/model-inputs.ts';

export interface EvaluateExternalOptions {
  runId: string;
  bratsSource?: string;
  bratsLayout?: string;
  kaggleSource?: string;
  /** Folder for multitask_evaluation.json. */
  out: string;
  dataDir: string;
  say(line: string): void;
}

async function materialize(spec: string, kind: 'brats' | 'kaggle', dataDir: string, say: (l: string) => void): Promise<string> {
  const source = parseSource(spec);
  const res = await materializeSource(source, rawDir(dataDir, kind, sourceKey(source)), { kind });
  say(`${kind}: ${describeSource(source)} -> ${res.dir}${res.synthetic ? ' (SYNTHETIC data)' : ''}`);
  return res.dir;
}

export async function evaluateExternal({ runId, bratsSource, bratsLayout, kaggleSource, out, dataDir, say }: EvaluateExternalOptions): Promise<MultitaskEvaluation> {
  dataDir = resolve(dataDir);
  const db = await openDb({ pgliteDir: pgliteDir(dataDir) });
  try {
    const run = await getRunRow(db.db, runId);
    if (!run) throw new SliceWiseError(`run ${runId} not found in ${db.where}`, { status: 404, code: 'run_not_found' });
    const inputs = await readModelInputs({ db: db.db, run }, 'slicewise evaluate', ['train_stage3_joint']);
    let patients: PatientSource | null = null;
    let kaggle: KaggleSource | null = null;
    if (bratsSource) {
      const found = await discoverPatients(await materialize(bratsSource, 'brats', dataDir, say), bratsLayout ? parseLayout(bratsLayout) : undefined);
      patients = folderPatients(found, inputs.data.modalities);
    }
    if (kaggleSource) kaggle = await folderKaggle(await materialize(kaggleSource, 'kaggle', dataDir, say), inputs.data.kaggle_image_size ?? inputs.data.image_size);
    const device = await initBackend();
    say(`Evaluating run ${runId}'s final model (${inputs.checkpoints.joint}) on ${device.device}: ${patients?.count ?? 0} patient(s), ${kaggle?.count ?? 0} image(s)`);
    const bar = process.stderr.isTTY ? new cliProgress.SingleBar({ format: '  evaluate [{bar}] {value}/{total}', stream: process.stderr }, cliProgress.Presets.shades_classic) : undefined;
    bar?.start((patients?.count ?? 0) + (kaggle?.count ?? 0), 0);
    const report = await evaluateCheckpoint({
      checkpoint: inputs.checkpoints.joint!,
      stage: 'joint',
      sources: { patients, kaggle },
      settings: inputs,
      runId,
      dataset: [bratsSource && `BraTS ${bratsSource}`, kaggleSource && `Kaggle ${kaggleSource}`].filter(Boolean).join(' + '),
      onProgress: (done) => bar?.update(done),
    });
    bar?.stop();
    const file = join(resolve(out), 'multitask_evaluation.json');
    await writeJsonAtomic(file, report);
    say(`Wrote ${file}`);
    return report;
  } finally {
    await db.close();
  }
}
