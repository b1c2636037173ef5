/**
 * A check on real data that any user can run (not part of CI: it trains for minutes):
 *   npm run check:real [-- --epochs 30 --size 128]
 * Trains the small preset's segmentation (stage 1) on the slices of the real BraTS 2015 case pat0005 at
 * 128 x 128, then evaluates it on pat0001, a patient it never saw, with the code of `slicewise evaluate` and
 * evaluate_multitask: whole-tumour Dice per slice, and per patient in 3-D on the volume's own 240 x 240 x 155
 * grid. The fixtures are read from ../shared/fixtures (or SLICEWISE_FIXTURES).
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { loadConfig } from '../src/config/load.ts';
import { writeBratsSplit } from '../src/disk/layout.ts';
import { folderPatients } from '../src/evaluation/datasets.ts';
import { evaluateCheckpoint } from '../src/evaluation/evaluate.ts';
import { env } from '../src/env.ts';
import { preprocessPatient } from '../src/imaging/brats.ts';
import { discoverPatients, parseLayout } from '../src/imaging/layout.ts';
import { runStage } from '../src/model/stage.ts';

const { values } = parseArgs({ options: { epochs: { type: 'string', default: '30' }, size: { type: 'string', default: '128' } } });
const epochs = Number(values.epochs);
const size = Number(values.size);
const fixtures = resolve(env().fixtures ?? join(import.meta.dirname, '../../shared/fixtures'));
const work = await mkdtemp(join(tmpdir(), 'slicewise-check-real-'));
const t0 = Date.now();
try {
  const patients = await discoverPatients(join(fixtures, 'brats2015-deepmedic'), parseLayout('flair=Flair_*.nii.gz,seg=OTMultiClass.nii.gz'));
  const byId = Object.fromEntries(patients.map((p) => [p.patientId, p]));
  const processed = join(work, 'processed', 'brats');
  // Training patient: the pipeline's own rules; pat0001 stays out of training altogether.
  await preprocessPatient(byId.pat0005!, processed, { imageSize: size });
  await writeBratsSplit(join(work, 'splits', 'brats.json'), { train: ['pat0005'], val: [], test: [], processed_dir: processed });

  const config = loadConfig({
    trainingMode: 'quick',
    stage: 'seg_warmup',
    overrides: { data: { image_size: size }, training: { epochs, batch_size: 8, early_stopping: { enabled: false } } },
  });
  const result = await runStage(
    { stage: 'seg_warmup', splitsDir: join(work, 'splits'), checkpointDir: join(work, 'checkpoints'), config },
    {
      log: (m) => console.log(m),
      shouldStop: () => false,
      onEpoch: async (r) => console.log(`epoch ${r.epoch}/${r.epochs}  train loss ${r.trainLoss.toFixed(4)}  ${r.seconds.toFixed(1)} s`),
    },
  );

  const report = await evaluateCheckpoint({
    checkpoint: result.lastDir,
    stage: 'seg_warmup',
    sources: { patients: folderPatients([byId.pat0001!], config.data.modalities), kaggle: null },
    settings: { data: config.data, seed: config.seed, evaluation: config.evaluation },
    runId: 'check-real',
    dataset: 'real BraTS 2015 case pat0001',
  });
  const seg = report.segmentation!;
  const p = seg.per_patient_3d.patients[0]!;
  console.log(`\nSmall preset, stage 1, trained ${epochs} epochs on pat0005 at ${size}x${size}; evaluated on pat0001:`);
  console.log(`  whole-tumour Dice per patient, 3-D, all ${p.slices} slices on the 240x240x155 grid: ${p.dice!.toFixed(3)} (IoU ${p.iou!.toFixed(3)})`);
  console.log(`  per slice (the slices preprocessing keeps): ${seg.per_slice.dice.mean!.toFixed(3)} ± ${seg.per_slice.dice.std!.toFixed(3)} over ${seg.per_slice.slices}; without empty-vs-empty: ${seg.per_slice_non_empty.dice.mean?.toFixed(3)}`);
  console.log(`device ${result.device}; total ${((Date.now() - t0) / 1000).toFixed(0)} s`);
} finally {
  await rm(work, { recursive: true, force: true });
}
